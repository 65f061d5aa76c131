"""Triton kernels for DoRA (issue #20): the ``"triton"`` backend's ``dora_forward``, ``dora_backward`` and
``weight_norm`` (the contract is :class:`lora_kernels.backends.base.DoRABackend`; the torch backend's
methods are the executable spec).

DoRA is the LoRA linear with a per-output-column scale c (fp32, one DoRA adapter: c = g = m / ‖W + s·B·A‖)::

    S = x̃·Aᵀ (M, r),   u = s·S·Bᵀ,   Z = x̃·Wᵀ + u (M, N)
    y = x·Wᵀ + b + (c − 1) ⊙ Z + u  = c ⊙ (x·Wᵀ + u) + b   without dropout (x̃ = x)

with x (M, K), W (N, K) dense or a frozen :class:`lora_kernels.quant.QuantizedWeight`, A (r, K), B (N, r),
x̃ = keep ⊙ x / (1 − p) under the LoRA kernels' seeded mask (regenerated, never stored).

Passes: the LoRA launch plans of :mod:`lora_kernels.ops.lora_linear` (and :mod:`lora_kernels.ops.quantized`
for a quantized W) with their DoRA flags on; nothing here copies a kernel::

    forward   _lora_down_kernel     S = (keep ⊙ x)·Aᵀ/(1-p)                     (LoRA's)
              _lora_matmul_kernel   one pass over x and W; no dropout: acc = x·Wᵀ + u, Z = acc, y = c ⊙ acc + b;
                                    dropout: a second accumulator over keep ⊙ x in the same K loop (the mask
                                    regenerated in registers), Z = (keep ⊙ x)·Wᵀ/(1-p) + u, y = x·Wᵀ + u +
                                    (c − 1) ⊙ Z + b;  Z written only when ``keep_z``
    backward  _lora_dy_kernel       one pass over dY: dY' = c ⊙ dY as a prologue on each tile;
                                    dS = s·dY'·B, dB = s·dY'ᵀ·S, db = Σ_rows dY, dc = Σ_rows dY ⊙ Z
              [_sum_partials_kernel]  dS and dc partials (fp32, fixed order)
              _lora_matmul_kernel   dX = dY'·W + dS·A (prologue on dY tiles); dropout: dX = dY·W +
                                    keep ⊙ [((c − 1) ⊙ dY)·W + dS·A]/(1-p), a second accumulator
              _lora_da_kernel       dA = dSᵀ·x̃                                 (LoRA's)
              [dW]                  dW = c ⊙ (dYᵀ·x) rows, dropout: + ((c − 1)/(1-p)) ⊙ dYᵀ·(keep ⊙ x): the LoRA
                                    dW GEMM and torch ops (a trainable base under DoRA is rare)
    weight_norm  _weight_norm_kernel   one pass over W (dense, or NF4/int8 tiles dequantized in registers):
                                    W·Aᵀ (N, r) and ‖W_n‖² together; then, with torch ops on (N, r) and
                                    (r, r) tensors, n² = ‖W_n‖² + 2s·(W·Aᵀ)_n·B_n + s²·B_n·(A·Aᵀ)·B_nᵀ

Deterministic: dc is reduced like dB and db (fp32 partials per row block, summed in a fixed order), no
atomics. Numerics: c multiplies fp32 accumulators in the epilogue; the prologue dY' = c ⊙ dY is formed in
fp32 and rounded once to dY's dtype (the MMA operand), as the torch backend's ``grad_y * c`` is.

Column-scale groups: the kernels take G = 1 (c of shape (N,) or (1, N)); a mixed batch with G > 1 groups
(row m scaled by c[m // (M/G)]) runs on the torch backend (:mod:`lora_kernels.backends.triton` routes it).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..quant import ABSMAX_BLOCKSIZE, INT8_SCALE
from . import lora_linear as _base
from . import quantized as _quantized
from .configs import _input_precision, _rank_block, kernel_configs
from .launch import Launch, cached, call_key, check_operands, device_guard, seed_tensor
from .lora_linear import DoRAFlags, dropout_mask  # noqa: F401 - the mask is the LoRA kernels' own
from .quantized import FORMAT_IDS, _dequant, _qkey, _qtensors

Grads = Tuple[Optional[torch.Tensor], ...]

# Quantized W in the weight-norm pass: its dequantized tile lives in registers (as in ops.quantized's GEMMs).
_QUANT_MAX_BLOCK_K = 64
_QUANT_MAX_STAGES = 2


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["N"])
def _weight_norm_kernel(
    # pointers: dense W, or the quantized W (codes, absmax, codebook, absmax2, codebook2, offset); A; outputs
    w_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, lora_A_ptr, w_at_ptr, squares_ptr,
    # sizes
    N, K, R,
    # strides (of a dense W; a quantized one is row-major (N, K))
    stride_wn, stride_wk, stride_lora_A_r, stride_lora_A_k, stride_w_at_n, stride_w_at_r,
    # meta-parameters
    QUANTIZED: tl.constexpr, FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, QBLOCK: tl.constexpr,
    QBLOCK2: tl.constexpr, INV127: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One pass over W (N, K): W·Aᵀ (N, R) fp32 and the row sums of squares ‖W_n‖² (N,) fp32, A (R, K).

    A quantized W (``QUANTIZED``) is dequantized tile by tile in registers (``ops.quantized._dequant``): the
    squares use the fp32 values, the MMA their rounding to A's dtype. Grid (cdiv(N, BLOCK_N),
    cdiv(R, BLOCK_R)); the squares are stored by the first rank block's programs.
    """
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_n % N).to(tl.int64)  # wrapped: in-bounds loads, the stores drop rows >= N
    r_mask = offs_r < R
    offset = 0.0
    if QUANTIZED and DOUBLE_QUANT:
        offset = tl.load(offset_ptr)

    # --- stream W once over K
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    squares = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + offs_k).to(tl.int64)
        k_mask = offs_k < K - k0
        if QUANTIZED:
            w32 = _dequant(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, rows[:, None], kk[None, :],
                           K, k_mask[None, :], FORMAT, DOUBLE_QUANT, QBLOCK, QBLOCK2, INV127)
            w = w32.to(lora_A_ptr.dtype.element_ty)
        else:
            w = tl.load(w_ptr + rows[:, None] * stride_wn + kk[None, :] * stride_wk, mask=k_mask[None, :], other=0.0)
            w32 = w.to(tl.float32)
        squares += tl.sum(w32 * w32, axis=1)
        lora_At = tl.load(lora_A_ptr + offs_r[None, :].to(tl.int64) * stride_lora_A_r + kk[:, None] * stride_lora_A_k,
                          mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(w, lora_At, acc, input_precision=INPUT_PRECISION)

    # --- epilogue
    n_mask = offs_n < N
    tl.store(w_at_ptr + offs_n[:, None].to(tl.int64) * stride_w_at_n + offs_r[None, :] * stride_w_at_r, acc,
             mask=n_mask[:, None] & r_mask[None, :])
    if pid_r == 0:
        tl.store(squares_ptr + offs_n, squares, mask=n_mask)


# --------------------------------------------------------------------------------------------- launchers

_FORWARD_PLANS: dict = {}
_BACKWARD_PLANS: dict = {}
_NORM_PLANS: dict = {}


def clear_plans() -> None:
    """Forget every cached DoRA launch plan."""
    for cache in (_FORWARD_PLANS, _BACKWARD_PLANS, _NORM_PLANS):
        cache.clear()


def _column_scale(col_scale: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """c as the (N,) contiguous fp32 vector the kernels index (a view of a (1, N) or (N,) tensor).

    Raises:
        ValueError / TypeError: c is not fp32, not on the device, or has G > 1 groups or the wrong width.
    """
    if col_scale.dtype != torch.float32:
        raise TypeError(f"col_scale must be float32, got {col_scale.dtype}")
    if col_scale.device != device:
        raise ValueError(f"col_scale is on {col_scale.device} but the input is on {device}")
    if col_scale.dim() not in (1, 2) or col_scale.shape[-1] != n or (col_scale.dim() == 2 and col_scale.shape[0] != 1):
        raise ValueError(f"the Triton DoRA kernels take col_scale of shape ({n},) or (1, {n}) (one group; the "
                         f"torch backend takes G > 1), got {tuple(col_scale.shape)}")
    return col_scale.reshape(n).contiguous()


def _is_quantized(weight) -> bool:
    return not isinstance(weight, torch.Tensor)


def forward(x: torch.Tensor, weight, bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
            scaling, col_scale: torch.Tensor, dropout_p: float, seed,
            keep_z: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Fused DoRA forward: the S pass and one GEMM (y written once, Z with it when asked).

    Args:
        x: (M, K), any strides. weight: (N, K) tensor, or a QuantizedWeight (NF4/int8) on x's device.
        bias: (N,) or None. lora_A: (r, K). lora_B: (N, r). x, weight, bias, A and B in one dtype.
        scaling: s, or a mixed batch's (M, r) / (1, r) tensor (as :func:`lora_kernels.ops.lora_linear.forward`).
        col_scale: c, fp32 (N,) or (1, N). dropout_p: in [0, 1). seed: as for the LoRA kernels.
        keep_z: also return Z = x̃·Wᵀ + s·S·Bᵀ (M, N), what the backward needs for dc.

    Returns:
        ``(y, S, Z or None)``: y = x·Wᵀ + b + (c − 1) ⊙ Z + u (M, N), S = x̃·Aᵀ (M, r), all in x's dtype.

    Raises:
        ValueError / TypeError: shapes, dtypes or devices do not fit (naming them).
    """
    quantized = _is_quantized(weight)
    check_operands(x, None if quantized else weight, lora_A, lora_B)
    n = weight.shape[0]
    c = _column_scale(col_scale, n, x.device)
    if quantized:
        _quantized._check_quantized(weight, x)
    m = x.shape[0]
    if m == 0:
        empty = torch.empty((0, n), device=x.device, dtype=x.dtype)
        return empty, torch.empty((0, lora_A.shape[0]), device=x.device, dtype=x.dtype), (empty if keep_z else None)
    if quantized and _quantized._dequantize_once(weight, m):  # the temporary W dies on return
        weight, quantized = _quantized.dequantize(weight, x.dtype), False
    has_dropout = dropout_p > 0
    flags = DoRAFlags(keep_z=bool(keep_z))
    plan_class = _quantized._ForwardPlan if quantized else _base._ForwardPlan
    key = call_key("dora-forward", x.device, x.dtype, (x, None if quantized else weight, bias, lora_A, lora_B, c),
                   (has_dropout, flags, _qkey(weight) if quantized else None))
    plan = cached(_FORWARD_PLANS, key, lambda: plan_class(x, weight, bias, lora_A, lora_B, has_dropout, dora=flags))
    with device_guard(x):
        return plan(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                    seed_tensor(seed, x.device) if has_dropout else None, col_scale=c)


def backward(grad_y: torch.Tensor, x: Optional[torch.Tensor], weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
             s: Optional[torch.Tensor], z: Optional[torch.Tensor], col_scale: torch.Tensor, scaling,
             dropout_p: float, seed, needs_grad: Sequence[bool]) -> Grads:
    """Fused DoRA backward: ``(grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B, grad_col_scale)``,
    None where ``needs_grad`` (six booleans, in that order) is False.

    Args:
        grad_y: dY (M, N). x: (M, K), for dA and dW. weight: (N, K) tensor or QuantizedWeight, for dX.
        lora_A, lora_B: (r, K), (N, r). s: S from ``forward`` (for dB). z: Z from ``forward`` (for dc).
        col_scale: c, fp32 (N,) or (1, N). scaling, dropout_p, seed: as given to ``forward``.

    Returns:
        With dY' = c ⊙ dY and dS = s·dY'·B: dX = dY'·W + dS·A (dropout: dY·W + keep ⊙ [((c − 1) ⊙ dY)·W +
        dS·A]/(1-p)); dW = dY'ᵀ·x (dropout: dYᵀ·x + ((c − 1) ⊙ dY)ᵀ·x̃); db = Σ_rows dY; dA = dSᵀ·x̃;
        dB = s·dY'ᵀ·S; dc = Σ_rows dY ⊙ Z in fp32, shaped like ``col_scale``. Deterministic.

    Raises:
        ValueError: dW asked of a quantized (frozen) base, or c does not fit.
    """
    needs = tuple(bool(v) for v in needs_grad)
    need_x, need_weight, need_bias, need_lora_A, need_lora_B, need_col_scale = needs
    quantized = _is_quantized(weight)
    if quantized and need_weight:
        raise ValueError("a quantized base is frozen: needs_grad[1] (dW) must be False")
    m, n = grad_y.shape
    rank, k = lora_A.shape
    dtype, device = lora_A.dtype, grad_y.device
    c = _column_scale(col_scale, n, device)
    if grad_y.dtype != dtype:  # tl.dot needs both operands in one dtype
        grad_y = grad_y.to(dtype)
    if m == 0:
        def zeros(*shape, dtype=dtype):
            return torch.zeros(shape, device=device, dtype=dtype)
        return (zeros(0, k) if need_x else None, zeros(n, k) if need_weight else None, zeros(n) if need_bias else None,
                zeros(rank, k) if need_lora_A else None, zeros(n, rank) if need_lora_B else None,
                zeros(*col_scale.shape, dtype=torch.float32) if need_col_scale else None)
    if quantized and need_x:
        _quantized._check_quantized(weight, grad_y)
        if _quantized._dequantize_once(weight, m):
            weight, quantized = _quantized.dequantize(weight, dtype), False
    has_dropout = dropout_p > 0
    flags = DoRAFlags(need_grad_col_scale=need_col_scale)
    plan_class = _quantized._BackwardPlan if quantized and need_x else _base._BackwardPlan
    lora_needs = needs[:5]
    key = call_key("dora-backward", device, dtype,
                   (grad_y, x, None if quantized else weight, lora_A, lora_B, s, z if need_col_scale else None, c),
                   (has_dropout, needs, _qkey(weight) if quantized and need_x else None))
    plan = cached(_BACKWARD_PLANS, key, lambda: plan_class(grad_y, x, weight, lora_A, lora_B, s, lora_needs,
                                                           has_dropout, dora=flags))
    seed = seed_tensor(seed, device) if has_dropout else None
    with device_guard(grad_y):
        grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B, grad_col_scale = plan(
            grad_y, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, col_scale=c, z=z)
    if grad_weight is not None:  # the plan's dW GEMM gave dYᵀ·x
        grad_weight = _grad_weight_dora(grad_weight, grad_y, x, c, dropout_p, seed)
    if grad_col_scale is not None:
        grad_col_scale = grad_col_scale.view(col_scale.shape)
    return grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B, grad_col_scale


def _grad_weight_dora(grad_weight: torch.Tensor, grad_y: torch.Tensor, x: torch.Tensor, c: torch.Tensor,
                      dropout_p: float, seed) -> torch.Tensor:
    """DoRA's dW from the LoRA GEMM's dYᵀ·x (N, K): c ⊙ rows without dropout; with dropout
    dYᵀ·x + ((c − 1)/(1-p)) ⊙ rows of dYᵀ·(keep ⊙ x), the mask rebuilt by the mask kernel (an (M, K) bool
    temporary: only a trainable base with DoRA and dropout gets here)."""
    if dropout_p <= 0:
        return grad_weight.mul_(c[:, None].to(grad_weight.dtype))
    keep = dropout_mask(seed, x.shape, dropout_p, x.device)
    dropped = torch.mm(grad_y.t(), torch.where(keep, x, 0))
    return grad_weight.add_(dropped.mul_(((c - 1.0) / (1.0 - dropout_p))[:, None].to(dropped.dtype)))


class _NormPlan:
    """The weight-norm pass of one (W, A) configuration (see ``_weight_norm_kernel``)."""

    def __init__(self, weight, lora_A: torch.Tensor):
        n, k = weight.shape
        rank = lora_A.shape[0]
        dtype, device = lora_A.dtype, lora_A.device
        quantized = _is_quantized(weight)
        # W·Aᵀ is the S pass's shape of problem (rows of W for rows of x): its blocks, with the quantized GEMMs'
        # caps where a dequantized tile sits in registers
        cfgs = kernel_configs(device, dtype, n, rank, k, rank)
        cfg, block_r = cfgs.down, _rank_block(rank, cfgs.max_block_r)
        block_k, stages = cfg.block_k, cfg.num_stages
        if quantized:
            block_k, stages = min(block_k, _QUANT_MAX_BLOCK_K), min(stages, _QUANT_MAX_STAGES)
        meta = dict(QUANTIZED=quantized, FORMAT=FORMAT_IDS[weight.format] if quantized else 0,
                    DOUBLE_QUANT=quantized and weight.double_quant, QBLOCK=weight.blocksize if quantized else 64,
                    QBLOCK2=ABSMAX_BLOCKSIZE, INV127=INT8_SCALE, BLOCK_N=cfg.block_m, BLOCK_K=block_k,
                    BLOCK_R=block_r, INPUT_PRECISION=_input_precision(dtype), num_warps=cfg.num_warps,
                    num_stages=stages)
        self.launch = Launch(_weight_norm_kernel, (triton.cdiv(n, cfg.block_m), triton.cdiv(rank, block_r)), meta)
        w_strides = (k, 1) if quantized else weight.stride()
        self.ints = (n, k, rank, *w_strides, *lora_A.stride(), rank, 1)
        self.n, self.rank, self.quantized = n, rank, quantized

    def __call__(self, weight, lora_A: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        w_at = torch.empty((self.n, self.rank), device=lora_A.device, dtype=torch.float32)
        squares = torch.empty((self.n,), device=lora_A.device, dtype=torch.float32)
        qargs = _qtensors(weight) if self.quantized else (weight,) * 6
        self.launch(lora_A if self.quantized else weight, *qargs, lora_A, w_at, squares, *self.ints)
        return w_at, squares


def weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B·A‖ per row of W, (N,) fp32, detached, without forming B·A or dequantizing all of W.

    One kernel streams W (dense, or NF4/int8 dequantized tile by tile) for W·Aᵀ (N, r) and ‖W_n‖²; then
    n² = ‖W_n‖² + 2s·(W·Aᵀ)_n·B_n + s²·B_n·(A·Aᵀ)·B_nᵀ with the r×r Gram in fp32, clamped at 0 (rounding
    may take a tiny n² below it).

    Args:
        weight: (N, K) tensor, or a QuantizedWeight on A's device. lora_A: (r, K). lora_B: (N, r), in
            weight's dtype (A's dtype for a quantized W). scaling: s.

    Raises:
        ValueError / TypeError: shapes, dtypes or devices do not fit.
    """
    quantized = _is_quantized(weight)
    lora_A, lora_B = lora_A.detach(), lora_B.detach()
    if quantized:
        _quantized._check_quantized(weight, lora_A)
    else:
        weight = weight.detach()
        if weight.dtype != lora_A.dtype:
            raise TypeError(f"weight must have lora_A's dtype {lora_A.dtype}, got {weight.dtype}")
    n, k = weight.shape
    if lora_A.shape[1] != k or lora_B.shape != (n, lora_A.shape[0]):
        raise ValueError(f"lora_A (rank, {k}) and lora_B ({n}, rank) must fit W {tuple(weight.shape)}, got "
                         f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    if n == 0 or k == 0:
        w_at = torch.zeros((n, lora_A.shape[0]), device=lora_A.device, dtype=torch.float32)
        squares = torch.zeros((n,), device=lora_A.device, dtype=torch.float32)
    else:
        key = call_key("dora-norm", lora_A.device, lora_A.dtype, (None if quantized else weight, lora_A),
                       (_qkey(weight) if quantized else None,))
        plan = cached(_NORM_PLANS, key, lambda: _NormPlan(weight, lora_A))
        with device_guard(lora_A):
            w_at, squares = plan(weight, lora_A)
    a32, b32 = lora_A.float(), lora_B.float()
    squares.add_((w_at * b32).sum(1), alpha=2.0 * scaling)
    squares.add_((b32 @ (a32 @ a32.t()) * b32).sum(1), alpha=float(scaling) ** 2)
    return squares.clamp_(min=0).sqrt_()
