"""``dora_linear``: DoRA (weight-decomposed LoRA, Liu et al. 2024) as one fused op, with HF PEFT's semantics.

    g = m / ‖W + s·B·A‖_row  (detached)        y = x·Wᵀ + b + (g − 1) ⊙ (x̃·Wᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ

m = ``magnitude`` (out_features,), trainable; x̃ = x without dropout (p = 0, or eval), else the dropped x, as
PEFT's ``lora.Linear`` with ``use_dora=True``. The norm is detached (PEFT, and the paper's §4.3), so A and B
get their gradients through the LoRA term only and m through g.

No B·A, no dequantized W. The squared norm of row n is
``‖W_n‖² + 2s·(W·Aᵀ)_n·B_n + s²·B_n·(A·Aᵀ)·B_nᵀ``: one pass over W for the skinny W·Aᵀ (N × r) and the row sums of
squares, and an r × r Gram (the backends' ``weight_norm``; a quantized W is read a block at a time).

The op is the LoRA linear with a per-column scale c (fp32, (G, N): G groups of rows, row m uses
c[m // (M/G)]; one group but in mixed batches)::

    S = x̃·Aᵀ,   u = s·S·Bᵀ,   Z = x̃·Wᵀ + u
    y = x·Wᵀ + b + (c − 1) ⊙ Z + u              (= c ⊙ (x·Wᵀ + u) + b without dropout: an epilogue)

With c = g that is DoRA: (g − 1)⊙(x̃·Wᵀ + u) + u = (g − 1)⊙(x̃·Wᵀ) + g⊙u. Backward, with dY' = c ⊙ dY::

    dS = s·dY'·B,  dB = s·dY'ᵀ·S,  dA = dSᵀ·x̃,  dc = Σ_rows dY ⊙ Z (per group),  db = Σ_rows dY
    dX = dY'·W + dS·A                                         without dropout
    dX = dY·W + keep/(1-p) ⊙ [((c − 1)⊙dY)·W + dS·A]          with dropout (the second base GEMM PEFT runs too)

so DoRA costs LoRA's passes plus a column scale on the output and on dY, the column sums for dc, and, only
while m trains, one (M, N) tensor kept for backward (Z). Autograd takes dc to m (g = m / n, dm = dc / n)
and B (m's gradient from the LoRA term flows through c as well).

Backends: a backend with the DoRA methods of :class:`lora_kernels.backends.DoRABackend` (the torch backend;
the Triton kernels of :mod:`lora_kernels.ops.dora` when they import) runs the op; one without them runs it on
the torch backend; ``"eager"`` runs :func:`lora_kernels.reference.dora_linear_reference` (PEFT's maths, B·A
formed) on the seeded dropout mask of the fused backends. ``torch.compile`` traces the pair of custom ops
``lora_kernels::dora_linear_forward`` / ``dora_linear_backward`` (a dense base; a quantized one runs the
autograd Function).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .backends import backend_for, draw_seed_tensor, resolve_backend
from .backends import torch as torch_backend
from .functional import (_autocast_enabled, _check_inputs, _eager_inputs, _first_order_only, _in_x_dtype,
                         _outside_autocast, _quantized, _rows)
from .reference import dora_linear_reference


def dora_impl(backend: str, name: str, quantized: bool):
    """The backend object that runs DoRA: the resolved backend when it has the DoRA methods, else the torch
    backend (with the Triton kernels' dropout mask when Triton was resolved, so that a mask matches)."""
    impl = backend_for(backend, name, quantized)
    if hasattr(impl, "dora_forward"):
        return impl
    return torch_backend.KERNEL_MASK if name == "triton" else torch_backend.DEFAULT


def weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                backend: str = "auto") -> torch.Tensor:
    """‖W + scaling·B·A‖ per output row, (out_features,) fp32 (float64 for float64 adapters), detached, computed
    without forming B·A (see the module docstring). ``weight`` may be a quantized base."""
    name = "torch" if backend == "eager" else resolve_backend(backend, lora_A)
    with torch.no_grad():
        return dora_impl(backend, name, _quantized(weight)).weight_norm(weight, lora_A, lora_B, float(scaling))


def _save_for_backward(ctx, x2d, weight, lora_A, lora_B, s, z, col_scale, seed) -> None:
    """Only what the requested gradients read (as :mod:`lora_kernels.functional` saves for LoRA), plus Z while c
    needs a gradient."""
    need_x, need_weight, _, need_lora_A, need_lora_B, _ = ctx.needs_input_grad[:6]
    ctx.qweight = weight if _quantized(weight) and (need_x or need_weight) else None
    ctx.save_for_backward(
        x2d if (need_weight or need_lora_A) else None,
        weight if (need_x or need_weight) and ctx.qweight is None else None,
        lora_A, lora_B,
        s if need_lora_B else None,
        z, col_scale, seed,
    )


def _saved_for_backward(ctx) -> tuple:
    x2d, weight, lora_A, lora_B, s, z, col_scale, seed = ctx.saved_tensors
    return x2d, ctx.qweight if ctx.qweight is not None else weight, lora_A, lora_B, s, z, col_scale, seed


class _DoRALinearFunction(torch.autograd.Function):
    """The column-scaled LoRA linear on 2-D x (M, K): saves x, S, the seed, c and (while c needs a gradient) Z."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_A, lora_B, col_scale, scaling, dropout_p, seed, impl):
        y, s, z = impl.dora_forward(x2d, weight, bias, lora_A, lora_B, scaling, col_scale, dropout_p, seed,
                                    keep_z=ctx.needs_input_grad[5])
        _save_for_backward(ctx, x2d, weight, lora_A, lora_B, s, z, col_scale, seed)
        ctx.scaling, ctx.dropout_p, ctx.impl = scaling, dropout_p, impl
        return y

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_y):
        x2d, weight, lora_A, lora_B, s, z, col_scale, seed = _saved_for_backward(ctx)
        args = (grad_y, x2d, weight, lora_A, lora_B, s, z, col_scale, ctx.scaling, ctx.dropout_p, seed,
                ctx.needs_input_grad[:6])
        if _autocast_enabled(grad_y.device.type):
            with torch.autocast(grad_y.device.type, enabled=False):
                grads = ctx.impl.dora_backward(*args)
        else:
            grads = ctx.impl.dora_backward(*args)
        return (*grads, None, None, None, None)


# ---------------------------------------------------------------------------------------------------
# torch.compile: the same backend calls as two torch.library custom ops (see lora_kernels.functional).


def _compiled_impl(backend: str, x: torch.Tensor):
    return dora_impl(backend, resolve_backend(backend, x), False)


@torch.library.custom_op("lora_kernels::dora_linear_forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, col_scale: torch.Tensor, scaling: float, dropout_p: float,
                seed: Optional[torch.Tensor], backend: str, keep_z: bool) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """The backend's DoRA forward on 2-D x: ``(y (M, N), S (M, r), Z (M, N), or empty when not kept)``."""
    with torch.autocast(x.device.type, enabled=False):
        y, s, z = _compiled_impl(backend, x).dora_forward(x, weight, bias, lora_A, lora_B, scaling, col_scale,
                                                          dropout_p, seed, keep_z)
    return y.contiguous(), s.contiguous(), z.contiguous() if z is not None else x.new_empty(0)


@_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, col_scale, scaling, dropout_p, seed, backend, keep_z):
    m, n = x.shape[0], weight.shape[0]
    return x.new_empty(m, n), x.new_empty(m, lora_A.shape[0]), x.new_empty((m, n) if keep_z else (0,))


@torch.library.custom_op("lora_kernels::dora_linear_backward", mutates_args=())
def _backward_op(grad_y: torch.Tensor, x: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                 lora_A: torch.Tensor, lora_B: torch.Tensor, s: Optional[torch.Tensor], z: Optional[torch.Tensor],
                 col_scale: torch.Tensor, scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
                 backend: str, needs_grad: List[bool]) -> List[torch.Tensor]:
    """The backend's six DoRA gradients; an empty tensor stands for one not asked for."""
    with torch.autocast(grad_y.device.type, enabled=False):
        grads = _compiled_impl(backend, grad_y).dora_backward(grad_y, x, weight, lora_A, lora_B, s, z, col_scale,
                                                              scaling, dropout_p, seed, tuple(needs_grad))
    return [g.contiguous() if g is not None else grad_y.new_empty(0) for g in grads]


@_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, s, z, col_scale, scaling, dropout_p, seed, backend, needs_grad):
    (m, n), (r, k) = grad_y.shape, lora_A.shape
    shapes = [(m, k), (n, k), (n,), (r, k), (n, r), tuple(col_scale.shape)]
    dtypes = [grad_y.dtype] * 5 + [col_scale.dtype]
    return [grad_y.new_empty(shape if need else (0,), dtype=dtype)
            for shape, need, dtype in zip(shapes, needs_grad, dtypes)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, col_scale, scaling, dropout_p, seed, backend, keep_z = inputs
    _save_for_backward(ctx, x, weight, lora_A, lora_B, output[1], output[2] if keep_z else None, col_scale, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_y, _grad_s, _grad_z):
    x, weight, lora_A, lora_B, s, z, col_scale, seed = _saved_for_backward(ctx)
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    grads = _backward_op(grad_y, x, weight, lora_A, lora_B, s, z, col_scale, ctx.scaling, ctx.dropout_p, seed,
                         ctx.backend, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# The op


def scaled_lora_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                       lora_B: torch.Tensor, col_scale: torch.Tensor, scaling, dropout_p, seed: Optional[torch.Tensor],
                       backend: str, impl) -> torch.Tensor:
    """The column-scaled LoRA linear (module docstring) on x (..., K), run by the backend object ``impl``
    (:func:`dora_impl`): ``col_scale`` fp32 (G, N), G dividing x's row count. ``scaling`` and ``dropout_p``
    may be the mixed batches' tensors. What :func:`dora_linear` and the mixed ops run."""
    x2d = _rows(x)
    if torch.compiler.is_compiling() and not _quantized(weight) and not isinstance(scaling, torch.Tensor) \
            and not isinstance(dropout_p, torch.Tensor):
        y, _, _ = _forward_op(x2d, weight, bias, lora_A, lora_B, col_scale, float(scaling), float(dropout_p), seed,
                              backend, col_scale.requires_grad)
    else:
        y = _DoRALinearFunction.apply(x2d, weight, bias, lora_A, lora_B, col_scale, scaling, dropout_p, seed, impl)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def dora_linear(
    x: torch.Tensor,
    weight,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused DoRA linear, PEFT's ``use_dora=True`` (see the module docstring).

    Args:
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend: as for
            :func:`lora_kernels.lora_linear` (a quantized base too).
        magnitude: m (out_features,), any floating dtype (the scale g = m / n is computed in fp32).

    Returns:
        (..., out_features) in x's dtype (the autocast dtype under autocast).

    Raises:
        As :func:`lora_kernels.lora_linear`, and ValueError for a magnitude that is not (out_features,).
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    out_features = weight.shape[0]
    if not isinstance(magnitude, torch.Tensor) or tuple(magnitude.shape) != (out_features,):
        got = tuple(magnitude.shape) if isinstance(magnitude, torch.Tensor) else type(magnitude).__name__
        raise ValueError(f"magnitude must have shape (out_features,) = ({out_features},), got {got}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude is on {magnitude.device} but x is on {x.device}")
    if _autocast_enabled(x.device.type):
        return _outside_autocast(lambda *args: dora_linear(*args[:5], magnitude, *args[5:]), x, weight, bias,
                                 lora_A, lora_B, scaling, dropout_p, training, backend)
    quantized = _quantized(weight)
    lora_A, lora_B = _in_x_dtype(x, weight, bias, lora_A, lora_B)
    p = float(dropout_p) if training else 0.0
    name = resolve_backend(backend, x)
    seed = draw_seed_tensor(x.device) if p > 0 else None
    if name == "eager":
        dense, (mask,), (realised,) = _eager_inputs(x, weight, seed, [p])
        return dora_linear_reference(x, dense, bias, lora_A, lora_B, magnitude.to(x.dtype), float(scaling), mask,
                                     realised)
    norm = weight_norm(weight, lora_A, lora_B, float(scaling), backend)
    col_scale = (magnitude.to(norm.dtype) / norm)[None, :]  # g, differentiable in m
    return scaled_lora_linear(x, weight, bias, lora_A, lora_B, col_scale, float(scaling), p, seed, backend,
                              dora_impl(backend, name, quantized))
