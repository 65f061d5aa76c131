"""lora_kernels.reference: the eager references every backend is checked against, checked in turn against
independent forms of the same maths (the merged weight W + s·B·A, explicit sums, one row at a time)."""
import pytest
import torch

from helpers import assert_close
from lora_kernels.reference import (
    lora_linear_mixed_reference,
    lora_linear_reference,
    lora_linear_stacked_reference,
    lora_linear_unfused,
)


def tensors(seed=0, lead=(3, 5), k=12, n=7, rank=3, adapters=1):
    """float64 x, W, b and ``adapters`` (A, B) pairs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    pairs = [(torch.randn(rank, k, generator=g, dtype=torch.float64),
              torch.randn(n, rank, generator=g, dtype=torch.float64)) for _ in range(adapters)]
    return x, w, b, pairs


@pytest.mark.parametrize("bias", [True, False])
def test_reference_equals_the_merged_weight(bias):
    # y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ = x·(W + s·B·A)ᵀ + b: the product written the other way round.
    x, w, b, [(a, bb)] = tensors()
    b = b if bias else None
    expected = x @ (w + 0.75 * bb @ a).T + (b if bias else 0)
    assert_close(lora_linear_reference(x, w, b, a, bb, 0.75), expected, torch.float64, "y")


def test_reference_dropout_scales_the_kept_inputs_of_the_lora_term_only():
    x, w, b, [(a, bb)] = tensors(seed=1)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) > 0.4
    p = 0.4
    kept = torch.where(mask, x / (1 - p), torch.zeros_like(x))
    expected = torch.einsum("...k,nk->...n", x, w) + b + 2.0 * torch.einsum("...k,rk,nr->...n", kept, a, bb)
    assert_close(lora_linear_reference(x, w, b, a, bb, 2.0, dropout_mask=mask, dropout_p=p), expected, torch.float64,
                 "y")
    # An all-keep mask with p = 0 is no dropout.
    assert torch.equal(lora_linear_reference(x, w, b, a, bb, 2.0, dropout_mask=torch.ones_like(mask), dropout_p=0.0),
                       lora_linear_reference(x, w, b, a, bb, 2.0))


def test_unfused_without_dropout_or_in_eval_is_the_reference():
    x, w, b, [(a, bb)] = tensors(seed=3)
    expected = lora_linear_reference(x, w, b, a, bb, 0.5)
    assert_close(lora_linear_unfused(x, w, b, a, bb, 0.5), expected, torch.float64, "no dropout")
    assert_close(lora_linear_unfused(x, w, b, a, bb, 0.5, dropout_p=0.9, training=False), expected, torch.float64,
                 "eval mode")


def test_stacked_is_the_sum_of_the_merged_weights():
    x, w, b, pairs = tensors(seed=4, adapters=3)
    scalings = [0.5, 2.0, 1.25]
    merged = w + sum(s * bb @ a for (a, bb), s in zip(pairs, scalings))
    got = lora_linear_stacked_reference(x, w, b, [(a, bb, s) for (a, bb), s in zip(pairs, scalings)])
    assert_close(got, x @ merged.T + b, torch.float64, "y")


def test_mixed_gives_each_row_its_adapter_and_the_base_to_minus_one():
    x, w, b, pairs = tensors(seed=5, lead=(4, 3), adapters=2)
    adapters = [(a, bb, s) for (a, bb), s in zip(pairs, [0.5, 3.0])]
    rows = torch.tensor([1, -1, 0, 1])
    got = lora_linear_mixed_reference(x, w, b, adapters, rows)
    for i, adapter in enumerate(rows.tolist()):
        if adapter < 0:
            expected = x[i] @ w.T + b
        else:
            a, bb, s = adapters[adapter]
            expected = x[i] @ (w + s * bb @ a).T + b
        assert_close(got[i], expected, torch.float64, f"row {i} (adapter {adapter})")
