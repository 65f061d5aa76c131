"""FusedLoRALinear: a drop-in nn.Linear with the numbers of HF PEFT's lora.Linear."""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import ScaledLinear, assert_close, make_peft_linear
from lora_kernels import FusedLoRALinear


def adapted_layer(k=24, n=16, r=4, bias=True, dtype=torch.float32, **kwargs):
    """A layer whose B is non-zero, so its adapter changes the output."""
    torch.manual_seed(0)
    layer = FusedLoRALinear(k, n, bias=bias, rank=r, dtype=dtype, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    return layer


def test_drop_in_for_nn_linear():
    linear = nn.Linear(12, 7)
    layer = FusedLoRALinear(12, 7, rank=3)
    assert (layer.in_features, layer.out_features) == (12, 7)
    assert set(linear.state_dict()) <= set(layer.state_dict())
    assert set(layer.state_dict()) - set(linear.state_dict()) == {"lora_A", "lora_B"}
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (7, 3)
    assert FusedLoRALinear(12, 7, bias=False, rank=3).bias is None
    layer.load_state_dict(linear.state_dict(), strict=False)
    x = torch.randn(5, 12)
    # B = 0: the adapter adds nothing yet, so only the base GEMM's rounding remains (tighter than the fp32 bar)
    assert torch.allclose(layer(x), linear(x), rtol=1e-6, atol=1e-6)


def test_from_linear_shares_the_weight():
    linear = nn.Linear(10, 10, bias=False)
    layer = FusedLoRALinear.from_linear(linear, rank=2)
    assert layer.weight is linear.weight and layer.bias is None
    assert layer.lora_A.dtype == linear.weight.dtype
    with pytest.raises(TypeError, match="nn.Linear"):
        FusedLoRALinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("rank,alpha,rslora,expected", [
    (16, None, False, 1.0), (8, 16, False, 2.0), (16, 8, False, 0.5), (16, 32, True, 8.0), (4, None, True, 2.0),
])
def test_scaling(rank, alpha, rslora, expected):
    assert FusedLoRALinear(64, 64, rank=rank, alpha=alpha, use_rslora=rslora).scaling == pytest.approx(expected)


def test_minimind_init():
    # 16·1024 = 16384 normal draws: the sample std of N(0, 0.02²) is within 2% of 0.02 with
    # overwhelming probability (its relative standard error is 1/sqrt(2n) ≈ 0.55%).
    layer = FusedLoRALinear(1024, 64, rank=16, init="minimind")
    assert abs(layer.lora_A.std().item() - 0.02) < 0.02 * 0.02
    assert abs(layer.lora_A.mean().item()) < 4 * 0.02 / math.sqrt(16 * 1024)
    assert torch.count_nonzero(layer.lora_B) == 0


def test_kaiming_init():
    # kaiming_uniform with a = sqrt(5) draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    layer = FusedLoRALinear(400, 64, rank=16, init="kaiming")
    bound = 1 / math.sqrt(400)
    assert layer.lora_A.abs().max().item() <= bound
    assert layer.lora_A.abs().max().item() > 0.99 * bound
    assert torch.count_nonzero(layer.lora_B) == 0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft_lora_linear(bias, rslora):
    pytest.importorskip("peft")
    k, n, r, alpha = 40, 24, 6, 12
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias)
    peft_layer = make_peft_linear(linear, r=r, alpha=alpha, use_rslora=rslora)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
    ours = FusedLoRALinear.from_linear(linear, rank=r, alpha=alpha, use_rslora=rslora, freeze_base=False)
    with torch.no_grad():
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(3, 7, k)
    grad_out = torch.randn(3, 7, n)

    def outputs_and_grads(layer, a, b):
        xx = x.clone().requires_grad_()
        y = layer(xx)
        grads = torch.autograd.grad(y, [xx, a, b, linear.weight], grad_out)
        return [y, *grads]

    expected = outputs_and_grads(peft_layer, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)
    got = outputs_and_grads(ours, ours.lora_A, ours.lora_B)
    for name, g, e in zip(["y", "dx", "dA", "dB", "dW"], got, expected):
        assert_close(g, e, torch.float32, name)


def test_base_is_frozen_by_default_and_gets_no_grad():
    linear = nn.Linear(24, 16)
    for layer in (adapted_layer(), FusedLoRALinear.from_linear(linear, rank=4)):
        assert not layer.weight.requires_grad and not layer.bias.requires_grad
        layer(torch.randn(4, 24, requires_grad=True)).sum().backward()
        assert layer.weight.grad is None and layer.bias.grad is None
        assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert not linear.weight.requires_grad  # the same Parameter, shared with the wrapped linear


def test_freeze_base_false_trains_the_base():
    built = FusedLoRALinear(24, 16, rank=4, freeze_base=False)
    wrapped = FusedLoRALinear.from_linear(nn.Linear(24, 16), rank=4, freeze_base=False)
    for layer in (built, wrapped):
        assert layer.weight.requires_grad and layer.bias.requires_grad
        layer(torch.randn(4, 24)).sum().backward()
        assert layer.weight.grad is not None and layer.bias.grad is not None


def test_merge_unmerge_round_trip_is_exact():
    layer = adapted_layer(dropout=0.2)
    layer.eval()
    before = layer.weight.detach().clone()
    x = torch.randn(6, 24)
    y = layer(x)
    layer.merge()
    assert layer.merged
    y_merged = layer(x)
    # A merged layer is a plain linear with W + scaling·B·A.
    assert torch.equal(y_merged, F.linear(x, layer.weight, layer.bias))
    assert_close(y_merged, y, torch.float32, "merged output")
    layer.merge()  # merging twice is a no-op
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight, before)
    assert torch.equal(layer(x), y)


def test_unmerge_without_keeping_the_original():
    layer = adapted_layer()
    before = layer.weight.detach().clone()
    layer.merge(keep_original=False)
    assert layer._weight_before_merge is None
    layer.unmerge()
    assert_close(layer.weight, before, torch.float32, "weight")


def test_to_linear():
    layer = adapted_layer(bias=True)
    x = torch.randn(5, 24)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear
    assert_close(linear(x), layer(x), torch.float32, "to_linear output")
    assert linear.weight.data_ptr() != layer.weight.data_ptr()
    layer.merge()
    assert torch.equal(layer.to_linear().weight, layer.weight)


@pytest.mark.parametrize("kwargs,words", [
    ({"rank": 0}, "rank must be an integer >= 1, got 0"),
    ({"rank": -2}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"alpha": 0}, "alpha must be a finite number > 0"),
    ({"alpha": -1.0}, "alpha"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ({"dropout": -0.1}, "dropout"),
    ({"init": "xavier"}, "init"),
    ({"backend": "cuda"}, "backend"),
])
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        FusedLoRALinear(8, 8, **kwargs)


def test_large_rank_warns():
    # in·out/(in+out) = 8·8/16 = 4: rank 4 makes the adapter as large as the layer.
    with pytest.warns(UserWarning, match="at least as many parameters"):
        FusedLoRALinear(8, 8, rank=4)
    with pytest.warns(UserWarning):
        FusedLoRALinear.from_linear(nn.Linear(8, 8), rank=5)


def test_wrong_input_width():
    with pytest.raises(ValueError, match="in_features=24"):
        adapted_layer()(torch.randn(3, 23))


def test_integer_input():
    with pytest.raises(TypeError, match="floating-point"):
        adapted_layer()(torch.ones(3, 24, dtype=torch.long))


def test_repr_names_the_adapter():
    text = repr(FusedLoRALinear(8, 16, rank=2, alpha=4))
    assert "rank=2" in text and "alpha=4" in text and "scaling=2" in text


def test_named_adapters_on_one_layer():
    from lora_kernels import LoRAConfig

    torch.manual_seed(0)
    layer = FusedLoRALinear(24, 16, rank=4, alpha=8)
    assert "rank=4, alpha=8, scaling=2" in repr(layer)  # one default adapter: the repr it always had
    layer.add_adapter("qa", LoRAConfig(rank=8, alpha=4, init="kaiming"))
    a, b = layer.lora_params("qa")
    assert a.shape == (8, 24) and b.shape == (16, 8) and not b.any()  # B = 0: a fresh adapter adds nothing
    assert layer.adapter_names == ["default", "qa"] and layer.active_adapters == ["default"]
    assert layer.rank == 4 and layer.lora_configs["qa"].scaling == 0.5
    with pytest.raises(ValueError, match="already has an adapter named 'qa'"):
        layer.add_adapter("qa", LoRAConfig(rank=2))
    layer.set_adapter(["default", "qa"])
    assert "'qa': rank 8 alpha 4" in repr(layer) and "active=['default', 'qa']" in repr(layer)
    layer.delete_adapter("default")
    assert layer.lora_A is None and layer.adapter_names == ["qa"] and layer.active_adapters == ["qa"]
    assert set(layer.state_dict()) == {"weight", "bias", "lora_adapters.qa.lora_A", "lora_adapters.qa.lora_B"}
    with pytest.raises(AttributeError):
        layer.rank  # noqa: B018 - the default adapter's rank: there is none now


def test_layer_built_for_a_named_adapter():
    from lora_kernels import LoRAConfig

    layer = FusedLoRALinear.from_linear(nn.Linear(8, 6), config=LoRAConfig(rank=2, alpha=4), adapter_name="tr")
    assert layer.lora_A is None and layer.active_adapters == ["tr"] and layer.lora_params("tr")[0].shape == (2, 8)
    with torch.no_grad():
        layer.lora_params("tr")[1].normal_()
    x = torch.randn(3, 8)
    a, b = layer.lora_params("tr")
    assert_close(layer(x), F.linear(x, layer.weight, layer.bias) + 2.0 * (x @ a.t()) @ b.t(), torch.float32)
    with pytest.raises(ValueError, match="adapter name must be .* got 'a/b'"):
        FusedLoRALinear(8, 8, adapter_name="a/b")


# ---------------------------------------------------------------------------------------------------
# Refusals: (case id, call, exception, words)

API_CASES = [
    ("rank 0", lambda t: FusedLoRALinear(4, 4, rank=0), ValueError, ["rank", "got 0"]),
    ("alpha NaN", lambda t: FusedLoRALinear(4, 4, rank=2, alpha=float("nan")), ValueError, ["alpha", "nan"]),
    ("dropout 1", lambda t: FusedLoRALinear(4, 4, rank=2, dropout=1.0), ValueError, ["dropout", "1.0"]),
    ("from_linear on a subclass with its own forward",
     lambda t: FusedLoRALinear.from_linear(ScaledLinear(4, 4), rank=2), TypeError,
     ["ScaledLinear", "allow_custom_forward"]),
    ("from_linear on a conv", lambda t: FusedLoRALinear.from_linear(nn.Conv1d(4, 4, 1), rank=2), TypeError,
     ["Conv1d"]),
]


@pytest.mark.parametrize("call,exception,words", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses(tmp_path, call, exception, words):
    with pytest.raises(exception) as err:
        call(tmp_path)
    assert all(word in str(err.value) for word in words), str(err.value)


# ---------------------------------------------------------------------------------------------------
# Silent wrong results that are now right (or refused)


@torch.no_grad()
def test_merged_state_dict_counts_the_adapter_once():
    torch.manual_seed(0)
    layer = FusedLoRALinear(8, 6, rank=2)
    layer.lora_B.normal_()
    x = torch.randn(3, 8)
    expected = layer(x)
    for keep in (True, False):
        layer.merge(keep_original=keep)
        fresh = FusedLoRALinear(8, 6, rank=2)
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(fresh(x), expected)
        # Loading into a merged layer keeps it merged, with the loaded adapter.
        merged = FusedLoRALinear(8, 6, rank=2)
        merged.merge()
        merged.load_state_dict(layer.state_dict())
        assert merged.merged
        torch.testing.assert_close(merged(x), expected)
        merged.unmerge()
        torch.testing.assert_close(merged.weight, fresh.weight)
        layer.unmerge()


def test_unmerge_after_changing_b_restores_the_weight():
    torch.manual_seed(0)
    layer = FusedLoRALinear(8, 6, rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    original = layer.weight.detach().clone()
    layer.merge(keep_original=False)
    with torch.no_grad():
        layer.lora_B.mul_(3.0)
    layer.alpha = 5.0
    layer.unmerge()
    # one fp32 add and one subtract of the delta per weight: a bound on those two roundings, not a dtype tolerance
    torch.testing.assert_close(layer.weight, original, atol=1e-6, rtol=0)


def test_training_a_merged_layer_warns_once():
    layer = FusedLoRALinear(8, 6, rank=2, freeze_base=False)  # a trained W: backward runs, LoRA gets nothing
    layer.merge()
    layer.train()
    with pytest.warns(UserWarning, match="no gradient.*unmerge"):
        layer(torch.randn(2, 8)).sum().backward()
    assert layer.lora_B.grad is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 8))  # once per layer
        layer.eval()
        layer(torch.randn(2, 8))
