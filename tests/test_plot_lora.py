"""minimind.plot_lora: the numbers in lora_stats.json are the spectrum of s·B·A, and the PNGs are written."""
import json

import pytest
import torch

from helpers import TOLERANCES
from lora_kernels import iter_lora_layers, replace_linear_with_fused_lora, save_lora
from minimind.checkpoint import save_minimind
from minimind.lora_io import save_minimind_lora
from minimind.model import MiniMindConfig, MiniMindForCausalLM
from minimind.plot_lora import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A tiny MiniMind with rank-4 adapters (alpha 8: scaling 2) whose B is random, saved in both formats."""
    root = tmp_path_factory.mktemp("plot")
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=2, max_position_embeddings=32))
    save_minimind(model, root / "base.safetensors")
    replace_linear_with_fused_lora(model, rank=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            layer.lora_B.normal_()
    save_lora(model, root / "adapter.safetensors")
    save_minimind_lora(model, root / "adapter.pth")
    return root, model


def assert_spectra(stats_file, expected_by_name):
    stats = json.loads(stats_file.read_text())
    assert {row["name"] for row in stats["layers"]} == set(expected_by_name)
    for row in stats["layers"]:
        expected = expected_by_name[row["name"]]
        got = torch.tensor(row["singular_values"])
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= TOLERANCES[torch.float32] * expected.max(), row["name"]
    return stats


def test_singular_values_are_those_of_s_b_a(adapted, tmp_path):
    root, model = adapted
    assert main([str(root / "adapter.safetensors"), "--out", str(tmp_path), "--top_k", "2"]) == 0
    layers = dict(iter_lora_layers(model))
    expected = {name: torch.linalg.svdvals(layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach())[:4]
                for name, layer in layers.items()}
    assert all(layer.scaling == 2.0 for layer in layers.values())
    stats = assert_spectra(tmp_path / "lora_stats.json", expected)
    for row in stats["layers"]:
        sigma = torch.tensor(row["singular_values"], dtype=torch.float64)
        assert row["energy_top_k"] == pytest.approx((sigma[:2].square().sum() / sigma.square().sum()).item())
        p = sigma / sigma.sum()
        assert row["effective_rank"] == pytest.approx(torch.exp(-(p * p.log()).sum()).item())
        assert 1 <= row["effective_rank"] <= 4
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == len(layers) + 1 and "lora_overview.png" in pngs
    assert all(p.read_bytes()[:8] == PNG for p in tmp_path.glob("*.png"))


def test_minimind_format_and_the_base(adapted, tmp_path):
    """MiniMind's files hold B·s in fp16 (no scaling of their own); --base adds ‖ΔW‖/‖W‖ per layer."""
    root, model = adapted
    assert main([str(root / "adapter.pth"), "--base", str(root / "base.safetensors"), "--out", str(tmp_path),
                 "--no_layers"]) == 0
    file = torch.load(root / "adapter.pth", weights_only=True)
    expected = {}
    for name, layer in iter_lora_layers(model):
        delta = file[f"{name}.lora.B.weight"].float() @ file[f"{name}.lora.A.weight"].float()
        expected[name] = torch.linalg.svdvals(delta)[:4]
    stats = assert_spectra(tmp_path / "lora_stats.json", expected)
    weights = dict(model.named_modules())
    for row in stats["layers"]:
        delta_norm = torch.linalg.vector_norm(expected[row["name"]])
        assert row["relative_update"] == pytest.approx((delta_norm / weights[row["name"]].weight.norm()).item(),
                                                       rel=1e-4)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["lora_overview.png"]


def test_a_missing_adapter_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope.pth"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.pth" in err
