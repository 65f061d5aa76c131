"""minimind.model: real MiniMind checkpoints reproduce their logits; KV cache, padding, loss, load errors."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import MINIMIND_FIXTURES, tiny_minimind
from minimind.checkpoint import load_minimind, read_state_dict
from minimind.model import MiniMindConfig, RawRouter

FIXTURES = MINIMIND_FIXTURES
CHECKPOINTS = ["minimind2_tiny_dense", "minimind2_tiny_moe", "minimind3_tiny_dense", "minimind3_tiny_moe"]
ARCH_MOE = [(arch, moe) for arch in ("minimind2", "minimind3") for moe in (False, True)]


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"MiniMind fixture {name} not found under {FIXTURES} (needs the shared fixtures checkout)")
    return path


def fixture_input_ids() -> torch.Tensor:
    """The input ids every fixture logits file was computed on (see the fixtures' README)."""
    return torch.arange(0, 48).remainder(6400).view(2, 24) * 7 % 6400


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_fixture_checkpoints_reproduce_logits(name):
    path = fixture(f"{name}.pth")
    model = load_minimind(path)  # strict: every key used, none missing
    expected = torch.load(fixture(f"{name}_logits.pt"), weights_only=True)
    with torch.no_grad():
        logits = model(fixture_input_ids()).logits
    assert logits.shape == expected.shape == (2, 24, 6400)
    assert (logits - expected).abs().max().item() < 1e-5

    c = model.config
    assert (c.arch, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        name[:9], 64, 2, 8, 2, 8)
    assert c.rms_norm_eps == (1e-5 if c.arch == "minimind2" else 1e-6)
    assert c.intermediate_size == (192 if c.arch == "minimind2" else 256)
    assert c.use_moe == name.endswith("moe")
    if c.use_moe:
        assert c.n_routed_experts == 4
        assert (c.n_shared_experts, c.num_experts_per_tok) == ((1, 2) if c.arch == "minimind2" else (0, 1))
    sd, _ = read_state_dict(path)
    assert set(sd) == set(model.state_dict())


def test_layer_types_allow_lora_swaps():
    """Attention and FFN projections are nn.Linear; MiniMind2's router is a raw parameter, MiniMind-3's a Linear."""
    for arch, moe in ARCH_MOE:
        model = tiny_minimind(arch, moe)
        block = model.model.layers[0]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert type(getattr(block.self_attn, proj)) is nn.Linear
        ffns = list(block.mlp.experts) + list(getattr(block.mlp, "shared_experts", [])) if moe else [block.mlp]
        for ffn in ffns:
            assert all(type(getattr(ffn, p)) is nn.Linear for p in ("gate_proj", "up_proj", "down_proj"))
        if moe:
            assert isinstance(block.mlp.gate, RawRouter if arch == "minimind2" else nn.Linear)
            assert "model.layers.0.mlp.gate.weight" in model.state_dict()


def test_config_arch_defaults():
    mm2, mm3 = MiniMindConfig(arch="minimind2", hidden_size=512), MiniMindConfig(arch="minimind3", hidden_size=768)
    assert (mm2.intermediate_size, mm2.rms_norm_eps, mm2.use_qk_norm) == (1408, 1e-5, False)
    assert (mm3.intermediate_size, mm3.rms_norm_eps, mm3.use_qk_norm) == (math.ceil(768 * math.pi / 64) * 64, 1e-6, True)
    assert MiniMindConfig.from_dict({"arch": "minimind3", "num_experts": 8, "flash_attn": True}).n_routed_experts == 8
    with pytest.raises(ValueError, match="arch must be one of"):
        MiniMindConfig(arch="llama")
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        MiniMindConfig(num_attention_heads=8, num_key_value_heads=3)


@pytest.mark.parametrize("arch,moe", ARCH_MOE)
def test_kv_cache_decoding_equals_full_sequence(arch, moe):
    model = tiny_minimind(arch, moe)
    ids = torch.randint(3, 97, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)  # prefill
        parts, past = [out.logits], out.past_key_values
        out = model(ids[:, 4:7], past_key_values=past, use_cache=True)  # a chunk of 3 on top of the cache
        parts.append(out.logits)
        past = out.past_key_values
        for t in range(7, 11):  # then one token at a time
            out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            parts.append(out.logits)
            past = out.past_key_values
    assert past[0][0].shape == (2, 11, 2, 8)
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch,moe", ARCH_MOE)
def test_attention_mask_padding_equals_unpadded(arch, moe):
    model = tiny_minimind(arch, moe)
    a, b = torch.randint(3, 97, (1, 9)), torch.randint(3, 97, (1, 5))
    with torch.no_grad():
        ref_a, ref_b = model(a).logits, model(b).logits
        pad = torch.zeros(1, 4, dtype=torch.long)
        # Left padding (as in batched generation) and right padding (as in training batches).
        left_mask, right_mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5]), torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
        left = model(torch.cat([a, torch.cat([pad, b], 1)]), attention_mask=left_mask).logits
        right = model(torch.cat([a, torch.cat([b, pad], 1)]), attention_mask=right_mask).logits
    for got_a, got_b in ((left[:1], left[1:, 4:]), (right[:1], right[1:, :5])):
        assert (got_a - ref_a).abs().max().item() < 1e-5
        assert (got_b - ref_b).abs().max().item() < 1e-5
    assert torch.isfinite(left).all()


def test_left_padded_cache_decoding_equals_unpadded():
    model = tiny_minimind("minimind3")
    b = torch.randint(3, 97, (1, 7))
    with torch.no_grad():
        ref = model(b).logits
        x = torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)
        mask = torch.tensor([[0, 0, 0] + [1] * 7])
        out = model(x[:, :6], attention_mask=mask[:, :6], use_cache=True)
        parts = [out.logits[:, 3:]]
        for t in range(6, 10):
            out = model(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values, use_cache=True)
            parts.append(out.logits)
    assert (torch.cat(parts, 1) - ref).abs().max().item() < 1e-5


def test_labels_loss_is_shifted_and_ignores_minus_100():
    model = tiny_minimind()
    ids = torch.randint(3, 97, (2, 8))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 6:] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 97)
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    n = (labels[:, 1:] != -100).sum()
    manual = -torch.log_softmax(logits, -1)[torch.arange(14), labels[:, 1:].reshape(-1).clamp(min=0)]
    assert out.loss.item() == pytest.approx((manual * (labels[:, 1:].reshape(-1) != -100)).sum().item() / n.item(), abs=1e-5)
    assert out.aux_loss.item() == 0.0 and out.past_key_values is None


@pytest.mark.parametrize("arch", ["minimind2", "minimind3"])
def test_moe_aux_loss_in_training_and_gradients(arch):
    model = tiny_minimind(arch, True).train()
    ids = torch.randint(3, 97, (2, 6))
    out = model(ids, labels=ids)
    assert out.aux_loss.item() > 0
    (out.loss + out.aux_loss).backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    model.eval()
    assert model(ids).aux_loss.item() == 0.0


def test_logits_to_keep_matches_tail():
    model = tiny_minimind()
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        # tighter than the fp32 bar: the same rows, computed in a smaller batch (only GEMM blocking differs)
        assert torch.allclose(model(ids, logits_to_keep=2).logits, model(ids).logits[:, -2:], atol=1e-6)
