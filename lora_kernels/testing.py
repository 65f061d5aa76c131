"""What the tests, the self-check (``python -m lora_kernels.check``) and the benchmarks share: the per-dtype
tolerance table (stated and justified once, here), the comparison that explains its failures, and the
builder of HF PEFT's ``lora.Linear`` that we are compared with.

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
* float64, 1e-12: u = 2^-53 ≈ 1.1e-16; float64 results (the eager backend, chunked products) against the
  float64 reference differ only in summation order, far inside it.
* "tf32" (fp32 tensors with TF32 matmuls, as torch.mm under ``set_float32_matmul_precision("high")``),
  4e-3: TF32 keeps fp16's 10-bit mantissa (u = 2^-11) on the GEMM inputs and accumulates in fp32, so a
  result carries at most fp16's roundings of the operands and fewer of the outputs: fp16's bound holds.
  Only a GPU computes in TF32; the CPU interpreter computes in fp32, well inside it.
"""
from __future__ import annotations

import inspect
from typing import Dict, Optional, Union

import torch

TOLERANCES: Dict[Union[torch.dtype, str], float] = {
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3.2e-2,
    torch.float64: 1e-12,
    "tf32": 4e-3,
}
# The precisions of ``python -m lora_kernels.check`` and the TOLERANCES key each is checked against.
PRECISIONS: Dict[str, Union[torch.dtype, str]] = {
    "fp32": torch.float32, "tf32": "tf32", "fp16": torch.float16, "bf16": torch.bfloat16,
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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: Union[torch.dtype, str], name: str = "tensor",
                 magnitude: Optional[torch.Tensor] = None) -> None:
    """Asserts shapes match and the relative error is within ``TOLERANCES[dtype]``.

    Raises:
        AssertionError: naming ``name``, the error, the tolerance and the first mismatching entries.
    """
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
    """HF PEFT's ``lora.Linear`` (adapter ``"default"``) around ``linear``, the layer we are compared with.

    PEFT >= 0.18 takes a ``LoraConfig``, older ones keywords; both are handled.

    Raises:
        ImportError: peft is not installed.
    """
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora)
    if "config" in inspect.signature(Linear.__init__).parameters:
        return Linear(linear, "default", config=LoraConfig(**kwargs), r=r, lora_alpha=alpha)
    return Linear(linear, "default", **kwargs)
