"""replace_linear_with_fused_lora and the model-level helpers."""
import pytest
import torch
import torch.nn as nn

from helpers import D, F_, Q0, TOLERANCES, V, TinyLM, assert_unchanged, base_model, model_with_custom_linear, snapshot
from lora_kernels import (
    disable_lora,
    merge_and_unload,
    FusedLoRALinear,
    find_target_linears,
    lora_state_dict,
    lora_summary,
    mark_only_lora_as_trainable,
    merge_lora,
    replace_linear_with_fused_lora,
    unmerge_lora,
)


def lora_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, FusedLoRALinear))


def per_layer(names):
    return [f"layers.{i}.{n}" for i in range(2) for n in names]


@pytest.mark.parametrize("targets,expected", [
    ("square", per_layer(["o_proj", "q_proj"])),
    ("all-linear", per_layer(["down_proj", "k_proj", "o_proj", "q_proj", "up_proj"])),
    (["q_proj", "up_proj"], per_layer(["q_proj", "up_proj"])),
    (["layers.1.k_proj"], ["layers.1.k_proj"]),
    (r".*\.(q|k)_proj", per_layer(["k_proj", "q_proj"])),
    (r"layers\.0\..*_proj", [f"layers.0.{n}" for n in ["down_proj", "k_proj", "o_proj", "q_proj", "up_proj"]]),
])
def test_targets(targets, expected):
    model = replace_linear_with_fused_lora(TinyLM(), rank=2, target_modules=targets)
    assert lora_names(model) == sorted(expected)


def test_suffix_must_follow_a_dot():
    # "proj" is not a module name: a list entry matches a whole path or a suffix after a dot, like PEFT.
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        replace_linear_with_fused_lora(TinyLM(), target_modules=["proj"])


def test_exclude_modules():
    model = replace_linear_with_fused_lora(TinyLM(), rank=2, target_modules="all-linear",
                                           exclude_modules=["layers.0.up_proj", "down_proj"])
    assert lora_names(model) == sorted(per_layer(["k_proj", "o_proj", "q_proj"]) + ["layers.1.up_proj"])


def test_output_is_unchanged_and_weights_are_shared():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, V, (2, 5))
    before = model(ids)
    q_weight = model.layers[0].q_proj.weight
    replace_linear_with_fused_lora(model, rank=4, target_modules="all-linear")
    assert model.layers[0].q_proj.weight is q_weight  # no copy
    assert model.lm_head.weight is model.embed.weight  # tying survives
    assert torch.allclose(model(ids), before, atol=1e-6)  # B = 0: only the base GEMM's rounding (tighter than fp32's)


def test_freeze_base_and_training_moves_only_lora():
    torch.manual_seed(0)
    model = replace_linear_with_fused_lora(TinyLM(), rank=4, alpha=8, target_modules="square")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{w}" for n in lora_names(model) for w in ("lora_A", "lora_B")}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randint(0, V, (2, 5))).logsumexp(-1).mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    assert model.layers[0].q_proj.lora_B.abs().sum() > 0


def test_freeze_base_false_keeps_requires_grad():
    model = replace_linear_with_fused_lora(TinyLM(), rank=2, freeze_base=False)
    assert model.embed.weight.requires_grad and model.layers[0].q_proj.weight.requires_grad


def test_mark_only_lora_as_trainable():
    model = replace_linear_with_fused_lora(TinyLM(), rank=2, freeze_base=False)
    mark_only_lora_as_trainable(model)
    assert all(p.requires_grad == (n.endswith("lora_A") or n.endswith("lora_B")) for n, p in model.named_parameters())


def test_mark_only_lora_as_trainable_trains_dora_magnitudes():
    from lora_kernels import LoRAConfig, add_adapter

    model = replace_linear_with_fused_lora(TinyLM(), rank=2, use_dora=True, freeze_base=False)
    add_adapter(model, "b", target_modules=["q_proj"], config=LoRAConfig(rank=2, use_dora=True), freeze_base=False)
    model.requires_grad_(False)
    mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    magnitudes = {n for n in trainable if n.endswith("lora_magnitude")}
    assert "layers.0.q_proj.lora_magnitude" in magnitudes and "layers.0.q_proj.lora_adapters.b.lora_magnitude" in magnitudes
    assert len(magnitudes) == 2 * 2 + 2  # "default" on the square layers (q, o) of both blocks, "b" on both q_proj
    assert trainable == {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B",
                                                                                              "lora_magnitude")}


def test_kwargs_reach_the_layers():
    model = replace_linear_with_fused_lora(TinyLM(), rank=4, alpha=16, dropout=0.1, use_rslora=True,
                                           init="kaiming", backend="eager")
    layer = model.layers[1].o_proj
    assert (layer.rank, layer.alpha, layer.dropout, layer.use_rslora, layer.init, layer.backend) == (
        4, 16.0, 0.1, True, "kaiming", "eager")
    assert layer.scaling == pytest.approx(8.0)


def test_non_linear_named_explicitly_is_refused():
    model = TinyLM()
    model.layers[0].conv = nn.Conv1d(D, D, 1)
    with pytest.raises(TypeError, match="layers.0.conv.*Conv1d"):
        replace_linear_with_fused_lora(model, target_modules=["conv"])


def test_bad_target_values():
    with pytest.raises(ValueError, match="target_modules"):
        replace_linear_with_fused_lora(TinyLM(), target_modules=3)
    with pytest.raises(ValueError, match="regular expression"):
        replace_linear_with_fused_lora(TinyLM(), target_modules="(")
    with pytest.raises(ValueError, match="empty"):
        replace_linear_with_fused_lora(TinyLM(), target_modules=[])


def test_replacing_twice_is_refused():
    model = replace_linear_with_fused_lora(TinyLM(), rank=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        replace_linear_with_fused_lora(model, target_modules=["q_proj"])


def test_merge_and_unmerge_model():
    torch.manual_seed(0)
    model = replace_linear_with_fused_lora(TinyLM(), rank=4, target_modules="all-linear").eval()
    for _, p in lora_state_dict(model).items():
        p.normal_(0, 0.2)  # lora_state_dict shares storage with the parameters
    ids = torch.randint(0, V, (2, 5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    y = model(ids)
    merge_lora(model)
    assert all(m.merged for _, m in model.named_modules() if isinstance(m, FusedLoRALinear))
    assert torch.allclose(model(ids), y, atol=TOLERANCES[torch.float32])  # fp32 merged vs unmerged
    unmerge_lora(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_lora_state_dict_and_summary():
    model = replace_linear_with_fused_lora(TinyLM(), rank=3, target_modules="all-linear")
    state = lora_state_dict(model)
    assert sorted(state) == sorted(f"{n}.{w}" for n in lora_names(model) for w in ("lora_A", "lora_B"))
    assert state["layers.0.up_proj.lora_A"].shape == (3, D)
    assert state["layers.0.up_proj.lora_B"].shape == (F_, 3)

    summary = lora_summary(model)
    # rank·(in + out) per adapted layer: q (16+16), k (16+8), o (16+16), up (16+40), down (40+16).
    expected_lora = 2 * 3 * ((D + D) + (D + 8) + (D + D) + (D + F_) + (F_ + D))
    base = sum(p.numel() for p in TinyLM().parameters())  # the tied head counted once
    assert (summary.trainable, summary.total, summary.lora_layers) == (expected_lora, base + expected_lora, 10)
    assert summary.percent == pytest.approx(100 * expected_lora / (base + expected_lora))
    assert f"{expected_lora:,}" in str(summary)


def test_find_target_linears_does_not_modify():
    model = TinyLM()
    assert find_target_linears(model, "square") == per_layer(["q_proj", "o_proj"])
    assert lora_names(model) == []


def test_disable_lora():
    torch.manual_seed(0)
    base = TinyLM()
    ids = torch.randint(0, V, (2, 5))
    expected = base(ids)
    model = replace_linear_with_fused_lora(base, rank=2, target_modules="all-linear")
    for p in lora_state_dict(model).values():
        p.normal_()
    adapted = model(ids)
    assert not torch.allclose(adapted, expected, atol=1e-3)  # not blind: the adapter moves the output (a threshold)
    with disable_lora(model):
        assert torch.equal(model(ids), expected)
    assert torch.equal(model(ids), adapted)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with disable_lora(model):
            pass


def test_merge_and_unload():
    torch.manual_seed(0)
    model = replace_linear_with_fused_lora(TinyLM(), rank=2, target_modules="all-linear")
    for p in lora_state_dict(model).values():
        p.normal_(0, 0.2)
    ids = torch.randint(0, V, (2, 5))
    adapted = model(ids)
    merge_and_unload(model)
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(TinyLM().state_dict())
    assert torch.allclose(model(ids), adapted, atol=TOLERANCES[torch.float32])  # fp32 merged vs unmerged


def test_rank_and_alpha_patterns_and_config():
    from lora_kernels import LoRAConfig

    model = replace_linear_with_fused_lora(TinyLM(), config=LoRAConfig(rank=4, alpha=8, rank_pattern={"o_proj": 2}),
                                           alpha_pattern={r"layers\.1\..*": 1})
    got = {n: (l.rank, l.alpha) for n, l in model.named_modules() if isinstance(l, FusedLoRALinear)}
    assert got == {"layers.0.q_proj": (4, 8.0), "layers.0.o_proj": (2, 8.0),
                   "layers.1.q_proj": (4, 1.0), "layers.1.o_proj": (2, 1.0)}
    with pytest.raises(TypeError, match="either config"):
        replace_linear_with_fused_lora(TinyLM(), rank=8, config=LoRAConfig(rank=4))
    with pytest.raises(ValueError, match=r"rank_pattern key '\(a\|ab\)\*'"):
        replace_linear_with_fused_lora(TinyLM(), rank_pattern={"(a|ab)*": 2})


# ---------------------------------------------------------------------------------------------------
# Refusals and tied heads

IDS = torch.arange(10).view(2, 5)


def test_replace_refuses_a_custom_forward_without_changing_the_model():
    model = model_with_custom_linear()
    before = snapshot(model)
    with torch.no_grad():
        expected = model(IDS)
    with pytest.raises(TypeError, match="layers.0.q_proj: ScaledLinear.*allow_custom_forward"):
        replace_linear_with_fused_lora(model, rank=2, target_modules="square")
    assert_unchanged(model, before)
    # Opting in wraps it (and drops its forward, as the message says); excluding it leaves its outputs alone.
    replace_linear_with_fused_lora(model, rank=2, target_modules="square", exclude_modules=[Q0])
    with torch.no_grad():
        assert torch.equal(model(IDS), expected)
    opted = replace_linear_with_fused_lora(model_with_custom_linear(), rank=2, target_modules=[Q0],
                                           allow_custom_forward=True)
    assert isinstance(opted.layers[0].q_proj, FusedLoRALinear)


def test_merge_lora_on_a_tied_head_keeps_the_embedding():
    from lora_kernels import merge_lora as merge, unmerge_lora

    model = base_model()  # lm_head.weight is embed.weight
    embedding = model.embed.weight.detach().clone()
    replace_linear_with_fused_lora(model, rank=2, target_modules=["lm_head"])
    with torch.no_grad():
        model.lm_head.lora_B.normal_()
        expected = model(IDS)
    merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected)
    assert torch.equal(model.embed.weight, embedding)
    unmerge_lora(model)
    assert model.lm_head.weight is model.embed.weight and torch.equal(model.embed.weight, embedding)
