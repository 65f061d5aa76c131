"""Shared test tools: the per-dtype tolerances (stated once, here) and a comparison that explains itself.

Every backend is compared with the eager reference evaluated in float64 on the same (already rounded)
inputs. The error measure is ``max|actual - expected| / scale``, where ``scale`` is by default
``max|expected|``: normalising by the largest magnitude keeps entries that happen to be near zero from
dominating, and makes one number per dtype meaningful across shapes.

Where a result is a sum whose terms cancel (a gradient summed over a few rows of mixed sign), rounding
error follows the terms, not the small sum: pass ``magnitude``, the same computation evaluated on the
absolute values of every input (``magnitudes64`` in the tests), and the scale becomes
``max(Σ|terms|)``, the conditioning-aware bound of floating-point summation. The tolerances below are
the same numbers in both cases.

Why these numbers (u = unit roundoff of the dtype):
* float32, 1e-5: the core issue's bar. Products are accumulated in fp32; for the K <= a few hundred used
  in tests the accumulated error is ~sqrt(K)·u ≈ 1e-6 relative, so 1e-5 leaves a 10x margin while a
  wrong mask, scale or transpose gives errors of order 1e-1 or more.
* float16, 4e-3: u = 2^-11 ≈ 4.9e-4. A result passes through about four roundings to fp16 (S = x̃·Aᵀ,
  the base GEMM output, the LoRA add, the output store), each up to u relative to its own magnitude,
  which can approach the largest output: 4u ≈ 2e-3, doubled for margin.
* bfloat16, 3.2e-2: the same four roundings with u = 2^-8 ≈ 3.9e-3, doubled: 8u ≈ 3.1e-2.
* "tf32" (fp32 tensors with TF32 matmuls, as torch.mm under ``set_float32_matmul_precision("high")``),
  4e-3: TF32 keeps fp16's 10-bit mantissa (u = 2^-11) on the GEMM inputs and accumulates in fp32, so a
  result carries at most fp16's roundings of the operands and fewer of the outputs: fp16's bound holds.
  Only a GPU computes in TF32; the CPU interpreter computes in fp32, well inside it.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import pytest
import torch

TOLERANCES = {
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3.2e-2,
    torch.float64: 1e-12,
    "tf32": 4e-3,
}


def _scale(expected: torch.Tensor, magnitude: Optional[torch.Tensor]) -> float:
    reference = expected if magnitude is None else magnitude
    scale = reference.detach().double().abs().max().item() if reference.numel() else 0.0
    return scale if scale > 0 else 1.0


def relative_error(actual: torch.Tensor, expected: torch.Tensor, magnitude: Optional[torch.Tensor] = None) -> float:
    """max|actual - expected| / scale in float64 (0 for empty tensors); scale is max|expected|, or
    max|magnitude| when the magnitudes of the summed terms are given (see the module docstring)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if expected.numel() == 0:
        return 0.0
    return (actual - expected).abs().max().item() / _scale(expected, magnitude)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "tensor",
                 magnitude: Optional[torch.Tensor] = None) -> None:
    """Asserts shapes match and the relative error is within ``TOLERANCES[dtype]``; on failure the
    message shows the error, the tolerance and the first mismatching entries."""
    assert actual is not None, f"{name}: got None"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    tol = TOLERANCES[dtype]
    err = relative_error(actual, expected, magnitude)
    if not err <= tol:  # also catches NaN
        a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
        scale = _scale(e, magnitude)
        bad = ((a - e).abs() > tol * scale).nonzero()[:5]
        rows = "\n".join(f"  at {tuple(i.tolist())}: got {a[tuple(i)].item():.6g}, expected {e[tuple(i)].item():.6g}"
                         for i in bad)
        raise AssertionError(f"{name}: relative error {err:.3g} > {tol:g} ({dtype})\n{rows}")


def make_peft_linear(linear: torch.nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
    """HF PEFT's ``lora.Linear`` around ``linear`` (PEFT >= 0.18 takes a LoraConfig; older ones keywords)."""
    import inspect

    from peft import LoraConfig
    from peft.tuners.lora import Linear

    kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora)
    if "config" in inspect.signature(Linear.__init__).parameters:
        return Linear(linear, "default", config=LoraConfig(**kwargs), r=r, lora_alpha=alpha)
    return Linear(linear, "default", **kwargs)


needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None
                                or importlib.util.find_spec("transformers") is None,
                                reason="peft and transformers are needed")


def two_peft_adapters(tmp_path, up_rank: Optional[int] = None):
    """A tiny transformers Llama with two PEFT LoRA adapters (``"default"`` on q/v, ``"tr"`` with rsLoRA on
    v/up, ``up_proj`` at rank ``up_rank`` when given), B drawn non-zero, saved by PEFT under
    ``tmp_path / "peft"``, and a copy of the base with both loaded by ``load_peft_adapter``.

    Returns:
        ``(base, peft_model, ours)``, all in eval mode.
    """
    import copy

    from peft import LoraConfig, get_peft_model
    from test_transformers import tiny_model

    from lora_kernels import load_peft_adapter

    base = tiny_model("llama").eval()
    torch.manual_seed(1)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft.add_adapter("tr", LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["v_proj", "up_proj"],
                                      rank_pattern={"up_proj": up_rank} if up_rank else {}))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft.eval()
    peft.save_pretrained(tmp_path / "peft")  # "default" at the root, "tr" in tr/
    ours = copy.deepcopy(base)
    load_peft_adapter(ours, tmp_path / "peft")
    load_peft_adapter(ours, tmp_path / "peft" / "tr", adapter_name="tr")
    return base, peft, ours
