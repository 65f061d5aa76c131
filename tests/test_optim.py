"""lora_param_groups: LoRA+ gives lora_B R times lora_A's learning rate, in groups any optimizer takes."""
import math

import pytest
import torch
import torch.nn as nn

from lora_kernels import lora_param_groups, replace_linear_with_fused_lora


def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    return replace_linear_with_fused_lora(model, rank=2, target_modules="all-linear")


def test_loraplus_groups_give_b_ratio_times_a_lr():
    model = small_model()
    groups = {g["name"]: g for g in lora_param_groups(model, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)}
    assert set(groups) == {"lora_A", "lora_B"}  # the base is frozen: nothing else trains
    assert groups["lora_A"]["lr"] == pytest.approx(1e-3) and groups["lora_B"]["lr"] == pytest.approx(16e-3)
    assert {id(p) for p in groups["lora_A"]["params"]} == {id(model[0].lora_A), id(model[2].lora_A)}
    assert {id(p) for p in groups["lora_B"]["params"]} == {id(model[0].lora_B), id(model[2].lora_B)}
    opt = torch.optim.AdamW(list(groups.values()))  # any optimizer takes the groups as they are
    assert [g["lr"] / g["lr_scale"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3])


def test_plain_lora_and_other_trainable_parameters():
    model = small_model()
    model[1].requires_grad_(True)  # a trained norm: its own group, no weight decay
    groups = {g["name"]: g for g in lora_param_groups(model, lr=2e-4, weight_decay=0.05)}
    assert groups["lora_B"]["lr"] == groups["lora_A"]["lr"] == pytest.approx(2e-4)
    assert groups["other_no_decay"]["weight_decay"] == 0.0 and groups["lora_A"]["weight_decay"] == 0.05
    assert len(groups["other_no_decay"]["params"]) == 2  # LayerNorm weight and bias


def test_b_moves_ratio_times_further_in_the_first_adam_step():
    # Adam's first step is lr·sign(grad) (up to eps), so |ΔB| / |ΔA| per entry is the lr ratio.
    model = small_model()
    with torch.no_grad():
        model[0].lora_B.normal_()
    opt = torch.optim.Adam(lora_param_groups(model, lr=1e-3, loraplus_lr_ratio=4))
    a0, b0 = model[0].lora_A.detach().clone(), model[0].lora_B.detach().clone()
    model(torch.randn(5, 8)).square().sum().backward()
    opt.step()
    step_a = (model[0].lora_A.detach() - a0).abs().max().item()
    step_b = (model[0].lora_B.detach() - b0).abs().max().item()
    assert step_a == pytest.approx(1e-3, rel=1e-3) and step_b == pytest.approx(4e-3, rel=1e-3)


@pytest.mark.parametrize("kwargs, words", [
    (dict(lr=0.0), "lr must be"), (dict(lr=math.nan), "lr must be"),
    (dict(lr=1e-3, loraplus_lr_ratio=-2), "loraplus_lr_ratio must be"),
    (dict(lr=1e-3, loraplus_lr_ratio=math.inf), "loraplus_lr_ratio must be"),
    (dict(lr=1e-3, weight_decay=-1), "weight_decay must be"),
])
def test_bad_values_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        lora_param_groups(small_model(), **kwargs)


def test_a_model_without_lora_is_refused():
    with pytest.raises(ValueError, match="no trainable lora_A"):
        lora_param_groups(nn.Linear(4, 4), lr=1e-3)


def test_groups_of_one_adapter_hold_only_its_parameters():
    from lora_kernels import add_adapter

    model = small_model()
    model[1].requires_grad_(True)  # another trainable parameter: left out when adapters are named
    add_adapter(model, "qa")
    groups = {g["name"]: g for g in lora_param_groups(model, lr=1e-3, loraplus_lr_ratio=2, adapter_names=["qa"])}
    assert set(groups) == {"lora_A", "lora_B"}
    qa = [model[i].lora_params("qa") for i in (0, 2)]
    assert [id(p) for p in groups["lora_A"]["params"]] == [id(a) for a, _ in qa]
    assert [id(p) for p in groups["lora_B"]["params"]] == [id(b) for _, b in qa]
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        lora_param_groups(model, lr=1e-3, adapter_names=["nope"])


# ---------------------------------------------------------------------------------------------------
# DoRA: the magnitudes train, at B's learning rate (PEFT's LoRA+ rule for 1-D adapter parameters), no decay


def dora_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 6))
    return replace_linear_with_fused_lora(model, rank=2, target_modules="all-linear", use_dora=True)


def test_dora_magnitudes_get_their_own_group_at_b_rate_without_decay():
    model = dora_model()
    groups = {g["name"]: g for g in lora_param_groups(model, lr=1e-3, loraplus_lr_ratio=8, weight_decay=0.1)}
    assert list(groups) == ["lora_A", "lora_B", "lora_magnitude"]
    magnitude = groups["lora_magnitude"]
    assert [id(p) for p in magnitude["params"]] == [id(model[0].lora_magnitude), id(model[2].lora_magnitude)]
    assert magnitude["lr"] == pytest.approx(8e-3) and magnitude["lr_scale"] == 8
    assert magnitude["weight_decay"] == 0.0 and groups["lora_B"]["weight_decay"] == 0.1
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups.values() for p in g["params"]} == trainable  # nothing dropped


def test_dora_magnitude_moves_at_b_rate_in_the_first_adam_step():
    # Adam's first step is lr·sign(grad) (up to eps): m moves by B's learning rate, and AdamW's decay (which
    # would also shrink m by lr·wd·m) is off for it.
    model = dora_model()
    with torch.no_grad():
        model[0].lora_B.normal_()
    opt = torch.optim.AdamW(lora_param_groups(model, lr=1e-3, loraplus_lr_ratio=4, weight_decay=0.5))
    m0 = model[0].lora_magnitude.detach().clone()
    model(torch.randn(5, 8)).square().sum().backward()
    opt.step()
    step = (model[0].lora_magnitude.detach() - m0).abs()
    assert step.max().item() == pytest.approx(4e-3, rel=1e-3) and step.min().item() == pytest.approx(4e-3, rel=1e-3)


def test_groups_of_one_dora_adapter_include_its_magnitudes():
    from lora_kernels import LoRAConfig, add_adapter

    model = small_model()  # plain LoRA "default"
    add_adapter(model, "dora", config=LoRAConfig(rank=2, use_dora=True))
    per_adapter = {name: {g["name"]: g for g in lora_param_groups(model, lr=1e-3, adapter_names=[name])}
                   for name in ("default", "dora")}
    assert list(per_adapter["default"]) == ["lora_A", "lora_B"]
    assert [id(p) for p in per_adapter["dora"]["lora_magnitude"]["params"]] == \
        [id(model[i].lora_magnitude_of("dora")) for i in (0, 2)]
    grouped = [id(p) for groups in per_adapter.values() for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
