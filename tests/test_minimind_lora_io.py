"""minimind.lora_io: MiniMind's LoRA files load onto FusedLoRALinear and reproduce their logits; our files
load in MiniMind's own LoRA code; bad files fail before anything changes."""
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import MINIMIND_FIXTURES, assert_load_refused, load_file_into_base, minimind_file, nan_at, pickled_payload, tiny_minimind
from lora_kernels import FusedLoRALinear, replace_linear_with_fused_lora
from minimind import load_minimind_lora, save_minimind_lora
from minimind.checkpoint import load_minimind

FIXTURES = MINIMIND_FIXTURES


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"MiniMind fixture {name} not found under {FIXTURES} (needs the shared fixtures checkout)")
    return path


class MiniMindLoRA(nn.Module):
    """MiniMind's LoRA semantics, as an oracle: y = W x + B(A(x)), A and B plain bias-free linears."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        self.base = linear
        self.lora = nn.Module()
        self.lora.A = nn.Linear(linear.in_features, rank, bias=False)
        self.lora.B = nn.Linear(rank, linear.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.lora.B(self.lora.A(x))


def minimind_apply_and_load(model: nn.Module, path: Path, rank: int) -> nn.Module:
    """MiniMind's apply_lora (every square linear) then load_lora (each module takes the keys under its name)."""
    state = torch.load(path, weights_only=True)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module.weight.shape[0] == module.weight.shape[1] and "lm_head" not in name:
            wrapped = MiniMindLoRA(module, rank)
            prefix = f"{name}.lora."
            wrapped.lora.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, wrapped)
    return model


@pytest.mark.parametrize("generation", ["minimind2", "minimind3"])
def test_fixture_lora_files_reproduce_logits(generation):
    model = load_minimind(fixture(f"{generation}_tiny_dense.pth"))
    path = fixture(f"{generation}_tiny_dense_lora_r8.pth")
    expected = torch.load(fixture(f"{generation}_tiny_dense_lora_r8_logits.pt"), weights_only=True)
    assert load_minimind_lora(model, path) is model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FusedLoRALinear)}
    assert sorted(layers) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj"))
    assert all(m.rank == 8 and m.scaling == 1.0 for m in layers.values())
    ids = torch.arange(0, 48).remainder(6400).view(2, 24) * 7 % 6400
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max().item() < 1e-5


def test_save_writes_minimind_keys_fp16_and_roundtrips_the_fixture(tmp_path):
    model = load_minimind(fixture("minimind3_tiny_dense.pth"))
    src = fixture("minimind3_tiny_dense_lora_r8.pth")
    load_minimind_lora(model, src)
    save_minimind_lora(model, tmp_path / "out.pth")
    ours, theirs = torch.load(tmp_path / "out.pth", weights_only=True), torch.load(src, weights_only=True)
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].dtype == torch.float16 and torch.equal(ours[k], theirs[k]) for k in ours)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("alpha", [None, 32.0])
def test_minimind_load_lora_reads_our_file_and_matches(tmp_path, alpha):
    """A model with FusedLoRALinear (any scaling) == MiniMind's LoRA code loading our saved file."""
    ours = tiny_minimind()
    replace_linear_with_fused_lora(ours, rank=4, alpha=alpha, target_modules=["q_proj", "o_proj"])
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in ours.named_modules():
            if isinstance(m, FusedLoRALinear):
                # fp16-exact values (the file is fp16; scaling 8 is a power of two)
                m.lora_A.copy_((torch.randn_like(m.lora_A) * 0.1).half().float())
                m.lora_B.copy_((torch.randn_like(m.lora_B) * 0.1).half().float() / m.scaling)
    path = tmp_path / "adapter.pth"
    save_minimind_lora(ours, path)
    theirs = minimind_apply_and_load(tiny_minimind(), path, rank=4)
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() < 1e-5
        # ...and our loader reads it back to the same outputs, at scaling 1.
        again = load_minimind_lora(tiny_minimind(), path)
        assert (again(ids).logits - ours(ids).logits).abs().max().item() < 1e-5
    assert all(m.scaling == 1.0 for m in again.modules() if isinstance(m, FusedLoRALinear))


def test_bad_files_fail_before_changing_the_model(tmp_path):
    model = tiny_minimind()
    a, b = torch.zeros(4, 32), torch.zeros(32, 4)
    torch.save({"model.layers.0.self_attn.q_proj.lora.A.weight": a, "model.layers.0.self_attn.q_proj.lora.B.weight": b,
                "model.layers.0.self_attn.nope.lora.A.weight": a, "model.layers.0.self_attn.nope.lora.B.weight": b,
                "model.norm.lora.A.weight": a, "model.norm.lora.B.weight": b,
                "model.layers.1.self_attn.k_proj.lora.A.weight": a, "model.layers.1.self_attn.k_proj.lora.B.weight": b},
               tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_minimind_lora(model, tmp_path / "bad.pth")
    msg = str(err.value)
    assert "model.layers.0.self_attn.nope: no such module" in msg
    assert "model.norm: is a RMSNorm, not a linear layer" in msg
    assert "model.layers.1.self_attn.k_proj: file has lora_A (4, 32), lora_B (32, 4)" in msg  # k_proj: 32 -> 16
    assert "q_proj" not in msg
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())  # nothing was swapped

    torch.save({"model.layers.0.self_attn.q_proj.lora.A.weight": a, "x.weight": a}, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \['x.weight'\].*A without B"):
        load_minimind_lora(model, tmp_path / "keys.pth")
    with pytest.raises(FileNotFoundError):
        load_minimind_lora(model, tmp_path / "missing.pth")

    torch.save({"model.layers.0.self_attn.q_proj.lora.A.weight": a, "model.layers.0.self_attn.q_proj.lora.B.weight": b},
               tmp_path / "ok.pth")
    load_minimind_lora(model, tmp_path / "ok.pth")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FusedLoRALinear) and layer.scaling == 1.0
    # Loading again replaces the adapter of the existing layer; another rank does not fit it.
    torch.save({"model.layers.0.self_attn.q_proj.lora.A.weight": a + 1, "model.layers.0.self_attn.q_proj.lora.B.weight": b},
               tmp_path / "ok2.pth")
    assert load_minimind_lora(model, tmp_path / "ok2.pth").model.layers[0].self_attn.q_proj is layer
    assert torch.equal(layer.lora_A, a + 1)
    torch.save({"model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(2, 32),
                "model.layers.0.self_attn.q_proj.lora.B.weight": torch.zeros(32, 2)}, tmp_path / "r2.pth")
    with pytest.raises(ValueError, match=r"the model needs \(4, 32\)"):
        load_minimind_lora(model, tmp_path / "r2.pth")


def test_save_refuses_a_dora_adapter(tmp_path):
    model = replace_linear_with_fused_lora(tiny_minimind(), rank=2, use_dora=True)
    with pytest.raises(ValueError, match=r"q_proj: adapter 'default' is DoRA .*lora_kernels.save_lora"):
        save_minimind_lora(model, tmp_path / "dora.pth")
    assert not (tmp_path / "dora.pth").exists()


def test_save_needs_lora_layers(tmp_path):
    with pytest.raises(ValueError, match="no FusedLoRALinear"):
        save_minimind_lora(tiny_minimind(), tmp_path / "x.pth")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["minimind", "lora_kernels", "peft"])
def test_load_adapter_tells_the_formats_apart(tmp_path, fmt):
    from lora_kernels import lora_state_dict, save_lora, save_peft_adapter
    from minimind.lora_io import load_adapter

    trained = replace_linear_with_fused_lora(tiny_minimind(), rank=4, alpha=8, target_modules="all-linear")
    for p in lora_state_dict(trained).values():
        p.normal_(0, 0.1)
    path = {"minimind": tmp_path / "a.pth", "lora_kernels": tmp_path / "a.safetensors", "peft": tmp_path / "peft"}[fmt]
    {"minimind": save_minimind_lora, "lora_kernels": save_lora, "peft": save_peft_adapter}[fmt](trained, path)
    loaded = load_adapter(tiny_minimind(), path)
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        expected, got = trained(ids).logits, loaded(ids).logits
    tol = 2e-3 if fmt == "minimind" else 1e-6  # MiniMind's format stores fp16 (B with the scaling folded in)
    assert (got - expected).abs().max() <= tol * expected.abs().max()


def test_load_lora_on_another_format_names_its_loader(tmp_path):
    """lora_kernels.load_lora given a MiniMind file, or PEFT's weights file, says which loader reads it."""
    import lora_kernels as lk

    model = replace_linear_with_fused_lora(tiny_minimind(), rank=4, target_modules=["q_proj", "v_proj"])
    minimind_file = tmp_path / "lora_minimind.pth"
    save_minimind_lora(model, minimind_file)
    with pytest.raises(ValueError, match=r"load_minimind_lora\(model, path\)"):
        lk.load_lora(tiny_minimind(), minimind_file)
    lk.save_peft_adapter(model, tmp_path / "peft")
    with pytest.raises(ValueError, match=r"load_peft_adapter\(model, directory\)"):
        lk.load_lora(tiny_minimind(), tmp_path / "peft" / "adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------------
# Bad files: (case id, build(tmp_path) -> (model, load), exception, words)

LOADER_CASES = [
    ("MiniMind NaN adapter", load_file_into_base(minimind_file(nan_at("layers.0.q_proj.lora.A.weight")),
                                                 loader=load_minimind_lora), ValueError,
     ["mm.pth", "layers.0.q_proj.lora.A.weight", "non-finite"]),
    ("MiniMind pickle payload", load_file_into_base(lambda t: pickled_payload(t / "mm.pth"), loader=load_minimind_lora),
     ValueError, ["mm.pth", "weights_only"]),
]


@pytest.mark.parametrize("build,exception,words", [c[1:] for c in LOADER_CASES], ids=[c[0] for c in LOADER_CASES])
def test_loader_refuses_and_changes_nothing(tmp_path, build, exception, words):
    assert_load_refused(tmp_path, build, exception, words)
