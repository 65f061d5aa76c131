"""``lora_linear``: the functional LoRA linear, one ``torch.autograd.Function`` over pluggable backends.

    y = x·Wᵀ + b + scaling · (dropout(x)·Aᵀ)·Bᵀ

This module holds the op: its input checks, the autocast rule, the ``autograd.Function`` (with the one helper
that decides what is saved for backward) and its ``torch.library`` twin for ``torch.compile``, and the eager
path shared with :mod:`lora_kernels.mixed`. The backends, their registry and the resolution of ``backend=``
names are in :mod:`lora_kernels.backends`.

Backends:

* ``"triton"``: the fused Triton kernels in :mod:`lora_kernels.ops.lora_linear` (CUDA tensors, or any
  tensors under ``TRITON_INTERPRET=1``);
* ``"torch"``: the fused pure-PyTorch backend in :mod:`lora_kernels.backends.torch` (every device);
* ``"eager"``: the reference (:func:`lora_kernels.reference.lora_linear_reference`) differentiated by
  autograd, with the same seeded dropout mask as ``"torch"``, so both agree under one ``torch.manual_seed``;
* ``"auto"``: ``"triton"`` for CUDA tensors in fp32/fp16/bf16 when Triton and the kernels import, else
  ``"torch"``. A configuration (device, dtype, shape bucket, rank, dropout) whose kernels fail to compile
  or launch on the user's GPU warns once, naming the shape, dtype and error, and runs on the torch backend
  (with the kernels' own dropout mask) from then on; ``"triton"`` raises with that message instead
  (:mod:`lora_kernels.backends.triton`).

Dropout never stores a mask: each call draws a seed, a one-element int64 tensor on x's device, from that
device's default generator (``torch.randint``), and the backend regenerates the mask from it in forward and
again in backward. ``torch.manual_seed`` therefore makes a layer reproducible. Nothing on the host reads the
seed's value on a GPU (no ``.item()``, no sync): the kernels load it, and the device generator advances per
call, so a CUDA graph (``torch.compile(mode="reduce-overhead")``, ``torch.cuda.graphs``) that captured a
training step replays new masks. The only host read is on the CPU, where it costs no sync.

Gradients are first order: the fused backends' backward is not itself differentiable. Double backward
(``create_graph=True``, gradient penalties) raises an error that says to use ``backend="eager"``.

``torch.compile``: while Dynamo traces, the op is the pair of ``torch.library`` custom ops
``lora_kernels::lora_linear_forward`` / ``lora_linear_backward`` around the same backends (Triton kernels on
CUDA), so models compile with ``fullgraph=True``. The seed is then a tensor drawn by ``torch.randint`` on x's
device in the graph: no graph break, no recompile per call, no CPU op. ``aot_eager`` draws the seed eager mode draws; Inductor uses
its own RNG unless ``torch._inductor.config.fallback_random`` is set. Eager calls keep the
``autograd.Function``, which costs less Python per call than custom-op dispatch. The ``"eager"`` backend
with dropout does not compile with ``fullgraph=True`` (its seed is a Python int).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

# BACKENDS, backend_names and triton_available are re-exported: lora_kernels.functional was their home.
from .backends import (BACKENDS, backend_for, backend_names, draw_seed_tensor, resolve_backend,  # noqa: F401
                       triton_available)
from .backends import torch as torch_backend
from .reference import lora_linear_reference


def _quantized(weight) -> bool:
    """True for a frozen quantized base (:class:`lora_kernels.quant.QuantizedWeight`) instead of a tensor."""
    return not isinstance(weight, torch.Tensor)


def _first_order_only(backward):
    """Like ``once_differentiable``, with an error that says how to get double backward."""
    DelayedError = getattr(getattr(torch._C, "_functions", None), "DelayedError", None)
    if DelayedError is None:  # pragma: no cover - a torch without it: the generic message
        return once_differentiable(backward)
    message = (b"lora_linear's fused backends (torch, triton) compute first-order gradients only; for double "
               b"backward (create_graph=True, gradient penalties) use backend='eager'")

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():  # the usual backward (no create_graph): nothing to guard
            return backward(ctx, *grads)
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads):
            return outputs

        def detached(t):
            if t is None:
                return t
            t = t.detach()
            t.requires_grad_(True)
            return t

        return DelayedError(message, len(outputs))(*[detached(t) for t in outputs])

    return wrapper


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
    if torch.compiler.is_compiling():
        # Under torch.compile(dynamic=True) the two numbers may be symbolic floats, on which Python's checks
        # would break the graph; they were checked when eager mode (or the layer's constructor) saw them.
        return
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if not (isinstance(scaling, (int, float)) and math.isfinite(scaling)):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")


def _in_x_dtype(x, weight, bias, lora_A, lora_B) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` in x's dtype, once W (a tensor) and the bias are checked to have it, as ``F.linear``
    wants (a quantized W is dequantized in x's dtype).

    Raises:
        TypeError: naming the dtypes.
    """
    quantized = _quantized(weight)
    if (not quantized and weight.dtype != x.dtype) or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"weight and bias must have x's dtype {x.dtype}, got weight {weight.format if quantized else weight.dtype}"
            + (f", bias {bias.dtype}" if bias is not None else "")
        )
    if lora_A.dtype != x.dtype or lora_B.dtype != x.dtype:  # no .to() calls on the hot path when they match
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    return lora_A, lora_B


def _save_for_backward(ctx, x2d, weight, lora_A, lora_B, s, seed) -> None:
    """Saves only what the requested gradients read: x for dA/dW, W for dX, S for dB, and never a mask. A
    quantized base is not a tensor: the context keeps the view (its tensors are the module's buffers, never
    copied). Used by the autograd Function and by the custom op's autograd alike."""
    need_x, need_weight, _, need_lora_A, need_lora_B = ctx.needs_input_grad[:5]
    ctx.qweight = weight if _quantized(weight) and need_x else None
    ctx.save_for_backward(
        x2d if (need_weight or need_lora_A) else None,
        weight if need_x and ctx.qweight is None else None,
        lora_A,
        lora_B,
        s if need_lora_B else None,
        seed,
    )


def _saved_for_backward(ctx) -> tuple:
    """``(x2d, weight, lora_A, lora_B, s, seed)`` as :func:`_save_for_backward` saved them (None where not
    needed), the quantized base put back in W's place."""
    x2d, weight, lora_A, lora_B, s, seed = ctx.saved_tensors
    return x2d, ctx.qweight if ctx.qweight is not None else weight, lora_A, lora_B, s, seed


class _LoRALinearFunction(torch.autograd.Function):
    """Runs a backend on 2-D x (M, K) and saves x, S, the seed and the (parameter) weights: no mask, no x̃.

    The output is the backend's own (M, N) tensor; the caller reshapes it outside the Function, so the
    model may change it in place (``h += residual``) as it may an ``nn.Linear`` output.
    """

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, impl):
        y, s = impl.forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        _save_for_backward(ctx, x2d, weight, lora_A, lora_B, s, seed)
        ctx.scaling, ctx.dropout_p, ctx.impl = scaling, dropout_p, impl
        return y

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_y):
        x2d, weight, lora_A, lora_B, s, seed = _saved_for_backward(ctx)
        args = (grad_y, x2d, weight, lora_A, lora_B, s, ctx.scaling, ctx.dropout_p, seed, ctx.needs_input_grad[:5])
        if _autocast_enabled(grad_y.device.type):  # backward called inside autocast: compute in saved dtypes
            with torch.autocast(grad_y.device.type, enabled=False):
                grads = ctx.impl.backward(*args)
        else:
            grads = ctx.impl.backward(*args)
        grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B = grads
        return grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B, None, None, None, None


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast, such as "meta"
        return False


def _outside_autocast(op: Callable[..., torch.Tensor], x: torch.Tensor, weight, bias: Optional[torch.Tensor],
                      *args) -> torch.Tensor:
    """``op(x, weight, bias, *args)`` under autocast, as autocast runs a linear layer: x, a tensor W, the bias
    and every floating-point tensor among ``args`` cast to the autocast dtype, then ``op`` run with autocast
    off so that no inner op re-casts (the in-place addmm_ would see mixed dtypes). A quantized W stays as it
    is (it is dequantized in x's dtype). The one autocast rule of :func:`lora_linear` and the mixed ops."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type)
    weight = weight if _quantized(weight) else weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    with torch.autocast(device_type, enabled=False):
        return op(x.to(dtype), weight, bias, *args)


def _eager_inputs(x: torch.Tensor, weight, seed: Optional[torch.Tensor],
                  dropout_ps: Sequence[float]) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]], list]:
    """What ``backend="eager"`` hands the reference (:mod:`lora_kernels.reference`), for :func:`lora_linear`
    and the mixed ops alike: W dense in x's dtype, and per dropout probability the keep-mask the fused torch
    backend regenerates from ``seed`` (None for p = 0) and the probability that mask realises, so that
    ``"eager"`` and ``"torch"`` agree under one ``torch.manual_seed``."""
    dense = weight.dequantize(x.dtype) if _quantized(weight) else weight
    masks = [torch_backend.dropout_mask(seed, x.shape, p, x.device) if p > 0 else None for p in dropout_ps]
    realised = [torch_backend.DEFAULT.realised_p(p, x.device) for p in dropout_ps]
    return dense, masks, realised


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x viewed as 2-D (M, K); works for K = 0, where ``reshape(-1, 0)`` cannot infer M."""
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


# ---------------------------------------------------------------------------------------------------
# torch.compile: the same backend calls as two torch.library custom ops. Dynamo and AOTAutograd see
# through them (fake implementations give the output shapes, register_autograd the backward), so a model
# compiles with fullgraph=True. The seed travels as a tensor and `.item()` runs only inside the opaque op.
# Eager calls keep _LoRALinearFunction: custom-op dispatch adds Python overhead to every call.


def _impl_for(backend: str, x: torch.Tensor) -> Any:
    # Resolved at run time, inside the op, so that tracing never imports Triton.
    return backend_for(backend, resolve_backend(backend, x))


@torch.library.custom_op("lora_kernels::lora_linear_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The backend's forward on 2-D x: ``(y (M, N), S (M, r))``."""
    impl = _impl_for(backend, x)
    with torch.autocast(x.device.type, enabled=False):
        y, s = impl.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return y.contiguous(), s.contiguous()


@_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("lora_kernels::lora_linear_backward", mutates_args=())
def _backward_op(
    grad_y: torch.Tensor,
    x: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    s: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    backend: str,
    needs_grad: List[bool],
) -> List[torch.Tensor]:
    """The backend's ``(grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B)``; an empty tensor stands for a
    gradient not asked for."""
    impl = _impl_for(backend, grad_y)
    with torch.autocast(grad_y.device.type, enabled=False):
        grads = impl.backward(grad_y, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, tuple(needs_grad))
    return [g.contiguous() if g is not None else grad_y.new_empty(0) for g in grads]


@_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, backend, needs_grad):
    (m, n), (r, k) = grad_y.shape, lora_A.shape
    shapes = [(m, k), (n, k), (n,), (r, k), (n, r)]
    return [grad_y.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs_grad)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    _save_for_backward(ctx, x, weight, lora_A, lora_B, output[1], seed)  # as _LoRALinearFunction saves
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_s):
    x, weight, lora_A, lora_B, s, seed = _saved_for_backward(ctx)
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = _backward_op(grad_y, x, weight, lora_A, lora_B, s, ctx.scaling, ctx.dropout_p, seed, ctx.backend,
                         needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _lora_linear_custom_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend):
    seed = draw_seed_tensor(x.device) if dropout_p > 0 else None
    y, _ = _forward_op(_rows(x), weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
    return y.view(*x.shape[:-1], weight.shape[0])


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
        weight: base weight (out_features, in_features), in x's dtype (as for ``F.linear``), or a frozen
            quantized base (:class:`lora_kernels.quant.QuantizedWeight`, NF4 or int8), dequantized in x's
            dtype inside the kernels (Triton: W tiles in the GEMMs' main loops; torch: a chunk of rows at a
            time). With a quantized base, ``torch.compile`` runs the op through the autograd Function.
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
        TypeError: x is not floating point, weight/bias dtypes differ from x's, or ``backend="triton"`` for a
            dtype the kernels do not support (float64).
        ValueError: shapes do not fit, dropout_p outside [0, 1), unknown backend.
        RuntimeError: ``backend="triton"`` where Triton cannot run, or its kernels failed.
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    if _autocast_enabled(x.device.type):  # compute in the autocast dtype, as autocast runs a linear layer
        return _outside_autocast(lora_linear, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend)

    quantized = _quantized(weight)
    lora_A, lora_B = _in_x_dtype(x, weight, bias, lora_A, lora_B)
    p = float(dropout_p) if training else 0.0
    if backend in ("auto", "triton", "torch") and torch.compiler.is_compiling() and not quantized:
        return _lora_linear_custom_op(x, weight, bias, lora_A, lora_B, float(scaling), p, backend)
    name = resolve_backend(backend, x)
    seed = draw_seed_tensor(x.device) if p > 0 else None

    if name == "eager":
        dense, (mask,), (realised,) = _eager_inputs(x, weight, seed, [p])
        return lora_linear_reference(x, dense, bias, lora_A, lora_B, float(scaling), mask, realised)
    y = _LoRALinearFunction.apply(_rows(x), weight, bias, lora_A, lora_B, float(scaling), p, seed,
                                  backend_for(backend, name, quantized))
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
