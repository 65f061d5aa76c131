"""``lora_linear``: the functional LoRA linear, one ``torch.autograd.Function`` over pluggable backends.

    y = x·Wᵀ + b + scaling · (dropout(x)·Aᵀ)·Bᵀ

Backends:

* ``"triton"``: the fused Triton kernels in :mod:`lora_kernels.ops.lora_linear` (CUDA tensors, or any
  tensors under ``TRITON_INTERPRET=1``);
* ``"torch"``: the fused pure-PyTorch backend in :mod:`lora_kernels.torch_backend` (every device);
* ``"eager"``: the reference (:func:`lora_kernels.reference.lora_linear_reference`) differentiated by
  autograd, with the same seeded dropout mask as ``"torch"``, so both agree under one ``torch.manual_seed``;
* ``"auto"``: ``"triton"`` for CUDA tensors when Triton and the kernels import, else ``"torch"``.

Dropout never stores a mask: each call draws one integer seed from torch's default (CPU) generator, and
the backend regenerates the mask from it in forward and again in backward. ``torch.manual_seed`` therefore
makes a layer reproducible.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
from types import ModuleType
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import torch_backend
from .reference import lora_linear_reference

BACKENDS = ("auto", "triton", "torch", "eager")


@functools.lru_cache(maxsize=None)
def _triton_module() -> Optional[ModuleType]:
    """The Triton backend module, or None when Triton or the kernels cannot be imported here."""
    try:
        return importlib.import_module("lora_kernels.ops.lora_linear")
    except ImportError:
        return None


def triton_available() -> bool:
    """True when the Triton backend can be imported on this machine."""
    return _triton_module() is not None


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The concrete backend (``"triton"``, ``"torch"`` or ``"eager"``) that ``backend`` means for ``x``.

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
        RuntimeError: ``"triton"`` was asked for where it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs triton and lora_kernels.ops; use backend='torch' or 'auto'")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (x is on {x.device}); set TRITON_INTERPRET=1 before "
                "importing triton to run the kernels on the CPU interpreter, or use backend='torch'"
            )
    return backend


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator (so ``torch.manual_seed`` fixes it)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor, got {got}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"x must have last dimension in_features={in_features}, got x of shape {tuple(x.shape)}"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features or lora_A.shape[0] < 1:
        raise ValueError(
            f"lora_A must have shape (rank, in_features=({in_features})), got {tuple(lora_A.shape)}"
        )
    rank = lora_A.shape[0]
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(
            f"lora_B must have shape (out_features, rank) = {(out_features, rank)}, got {tuple(lora_B.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if not (isinstance(scaling, (int, float)) and math.isfinite(scaling)):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")


class _LoRALinearFunction(torch.autograd.Function):
    """Reshapes to 2-D, runs a backend, and saves x, S and the (parameter) weights: no mask, no x̃."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, impl):
        x2d = x.reshape(-1, x.shape[-1])
        y, s = impl.forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        need_x, need_w, _, need_a, need_bb = ctx.needs_input_grad[:5]
        # Save only what the requested gradients read: x for dA/dW, W for dX, S for dB.
        ctx.save_for_backward(
            x2d if (need_w or need_a) else None,
            weight if need_x else None,
            lora_A,
            lora_B,
            s if need_bb else None,
        )
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.impl = scaling, dropout_p, seed, impl
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x2d, weight, lora_A, lora_B, s = ctx.saved_tensors
        grad_y2d = grad_y.reshape(-1, grad_y.shape[-1])
        with torch.autocast(grad_y.device.type, enabled=False):
            dx, dw, db, da, dbb = ctx.impl.backward(
                grad_y2d, x2d, weight, lora_A, lora_B, s,
                ctx.scaling, ctx.dropout_p, ctx.seed, ctx.needs_input_grad[:5],
            )
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, da, dbb, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused LoRA linear ``y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ``.

    Args:
        x: input of shape (..., in_features), any number of leading dimensions, any strides.
        weight: base weight (out_features, in_features), in x's dtype (as for ``F.linear``).
        bias: base bias (out_features,) or None.
        lora_A: (rank, in_features). lora_B: (out_features, rank). Cast to x's dtype when they differ
            (for example fp32 adapters on a bf16 model); their gradients come back in their own dtype.
        scaling: LoRA scale (alpha / rank), passed at run time.
        dropout_p: dropout probability on the LoRA path's input, in [0, 1).
        training: dropout is applied only when True.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"`` (see the module docstring).

    Returns:
        Tensor of shape (..., out_features) in x's dtype (or the autocast dtype under autocast).

    Raises:
        TypeError: x is not floating point, or weight/bias dtypes differ from x's.
        ValueError: shapes do not fit, dropout_p outside [0, 1), unknown backend.
        RuntimeError: ``backend="triton"`` where Triton cannot run.
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Mirror autocast's rule for linear layers: compute in the autocast dtype, then run the op with
        # autocast off so that no inner op re-casts (the in-place addmm_ would see mixed dtypes).
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend)

    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"weight and bias must have x's dtype {x.dtype}, got weight {weight.dtype}"
            + (f", bias {bias.dtype}" if bias is not None else "")
        )
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    name = resolve_backend(backend, x)
    p = float(dropout_p) if training else 0.0
    seed = draw_seed() if p > 0 else 0

    if name == "eager":
        mask = None
        if p > 0:
            mask = torch_backend.dropout_mask(seed, (x.numel() // x.shape[-1], x.shape[-1]), p, x.device)
            mask = mask.view(x.shape)
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, float(scaling), mask, p)
    impl = _triton_module() if name == "triton" else torch_backend
    return _LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), p, seed, impl)
