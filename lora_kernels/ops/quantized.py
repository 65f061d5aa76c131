"""Triton kernels for a frozen quantized base (QLoRA): the ``"triton"`` backend when W is NF4 or int8.

    y  = x·Wᵀ + b + s·(x̃·Aᵀ)·Bᵀ            W = dequant(codes, scales)  (N, K), never materialised
    dX = dY·W + keep ⊙ (dS·A)/(1-p)

Formats are those of :mod:`lora_kernels.quant` (bitsandbytes' layouts):

* NF4: element f = n·K + k of the row-major W is nibble ``f & 1`` (0: high) of byte ``f >> 1``; its value is
  ``code[nibble] · absmax[f // QBLOCK]``, and with double quantization
  ``absmax[b] = code2[qabsmax[b]] · absmax2[b // 256] + offset``;
* int8: ``W[n, k] = (q[n, k] · scale[n]) · (1/127)``.

The passes are those of :mod:`lora_kernels.ops.lora_linear` with the two GEMMs that read W replaced:

    forward    _lora_down_kernel        S = (keep ⊙ x)·Aᵀ/(1-p)                    (shared)
               _qlora_matmul_kernel     y = s·S·Bᵀ + x·dequant(W)ᵀ + b          W tiles dequantized in the loop
    backward   _lora_dy_kernel, [sums]  dS, dB, db                                (shared)
               _qlora_matmul_kernel     dX = keep ⊙ (dS·A)/(1-p) + dY·dequant(W)
               _lora_da_kernel, [sums]  dA                                        (shared)

Inside the main loop over the reduction, each program loads the packed bytes of its W tile (a quarter of
the 16-bit bytes for NF4, half for int8), unpacks the 4-bit codes, looks them up in the 16-entry codebook
(an L1-resident gather), multiplies by the block's absmax in fp32 and rounds the tile once to x's dtype, the
operand ``tl.dot`` takes; the LoRA term, dropout mask (``_keep_mask``), bias and the fp32 accumulator are
exactly those of the 16-bit kernels. The dequantized tile equals ``QuantizedWeight.dequantize(x.dtype)`` bit
for bit for NF4 without double quantization and int8; with double quantization the absmax may differ by an
ulp where the compiler fuses its multiply-add (an FMA).

Dequantize-once path: from the number of rows ``configs.DEQUANT_ONCE`` gives (NF4 on sm90: M >= 448 +
1.4e9 / (N·K), e.g. 531 at 4096²; never under the interpreter unless a test adds a rule), re-dequantizing W in
every 128-row tile costs more integer work than one pass (see benchmarks/cost_model.py): ``forward`` and ``backward``
then run ``_dequant_kernel`` once per call (W in x's dtype, a temporary) and the 16-bit kernels of
:mod:`lora_kernels.ops.lora_linear`. Memory: the temporary is N·K elements of x's dtype (2·N·K bytes in
bf16: 32 MiB for 4096², the 16-bit W the quantization saved), alive only during the call; the caching
allocator keeps the block for the next layer's call, so the peak grows by the largest such W, not by the
model's.

Sizes and layouts: any M, N, K (blocks of 64 may span rows of W when K % 64 != 0: the index arithmetic is
per element, so no alignment is assumed), any strides of x and dY; the packed data is contiguous as
:mod:`lora_kernels.quant` and bitsandbytes store it. GPU tiles come from ``kernel_configs`` with BLOCK_N
capped at 128: a dequantized tile lives in registers next to the accumulator.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..quant import ABSMAX_BLOCKSIZE, INT8_SCALE
from . import configs as _configs
from . import lora_linear as _base
from .configs import KernelConfig, _input_precision, _rank_block
from .launch import Launch, cached, call_key, check_operands, device_guard, seed_tensor
from .lora_linear import (  # the 16-bit kernels' building blocks, which the quantized GEMM reuses
    NO_DORA,
    _dora_epilogue,
    _dora_gemm_config,
    _dora_operands,
    _dora_start,
    _grouped_tile,
    _lora_term,
    dropout_mask,  # noqa: F401 - the backend contract: the mask is the 16-bit kernels' own
)

Grads = Tuple[Optional[torch.Tensor], ...]
FORMAT_IDS = {"nf4": 0, "int8": 1}
# Caps on the 16-bit kernels' tiles (see the module docstring: a dequantized tile lives in registers, and
# the pipeliner multi-buffers the gathered bytes and scales of every stage).
_MAX_BLOCK_N = 128
_MAX_BLOCK_K = 64
_MAX_STAGES = 2
# Tiles of at least this many outputs take 8 warps: with 4, the accumulator and the dequantized tile
# together spill on sm80 (64x128 tiles: 255 registers and 68-228 B of spills in ptxas -v).
_WIDE_TILE = 64 * 128
# Decode tiles (BLOCK_M <= 32) take K blocks of 32: at 64 the 4-warp dX GEMM with double quantization
# spills 196 B on sm90 (and 8 warps spill in the forward).
_DECODE_MAX_BLOCK_K = 32
# IEEE fp32 runs tl.dot on CUDA cores, whose operands sit in registers: smaller N and K blocks, 8 warps from
# 64x64 tiles (4 warps spill 40-52 B in the sm90 NF4 dX GEMM at M = 64), and rank blocks of 16 in decode
# tiles (32 spill 12 B in the sm90 NF4-dq forward at M = 1, r = 100).
_IEEE_MAX_BLOCK_NK = (64, 16)
_IEEE_WIDE_TILE = 64 * 64
_IEEE_DECODE_MAX_BLOCK_R = 16


@triton.jit
def _dequant(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, w_rows, w_cols, W_K, mask,
             FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
             INV127: tl.constexpr):
    """W[w_rows, w_cols] in fp32 (the broadcast shape of the int64 index tensors); 0 where ``mask`` is False.

    W is (·, W_K) row-major. NF4 (FORMAT 0): code[nibble of f] · absmax[f // QBLOCK], f = row·W_K + col,
    the even element in the high nibble (QBLOCK2 absmax per second-level scale under double quantization);
    int8 (FORMAT 1): (q · scale[row]) · INV127.
    """
    if FORMAT == 0:
        f = w_rows * W_K + w_cols
        byte = tl.load(q_ptr + (f >> 1), mask=mask, other=0)
        nibble = tl.where((f & 1) == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble)
        block = f // QBLOCK
        if DOUBLE_QUANT:
            qabs = tl.load(absmax_ptr + block, mask=mask, other=0)
            scale = tl.load(code2_ptr + qabs) * tl.load(absmax2_ptr + block // QBLOCK2, mask=mask, other=0.0) + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        w = value * scale
    else:
        q = tl.load(q_ptr + w_rows * W_K + w_cols, mask=mask, other=0)
        w = q.to(tl.float32) * tl.load(absmax_ptr + w_rows) * INV127
    return tl.where(mask, w, 0.0)


@triton.jit(do_not_specialize=["M"])
def _qlora_matmul_kernel(
    # pointers: A operand, the quantized W (codes, absmax, codebook, absmax2, codebook2, offset), C, bias, L, R
    a_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, c_ptr, bias_ptr, l_ptr, r_ptr,
    # sizes: C (M, N), reduction K, rank R, W's row length W_K (its in_features)
    M, N, K, R, W_K,
    # strides
    stride_am, stride_ak, stride_cm, stride_cn, stride_bias, stride_lm, stride_lr, stride_rr, stride_rn,
    # run-time scalars
    lora_scale, seed_ptr, dropout_p,
    # DoRA (read only under COL_SCALE / DORA_DROPOUT): column scale c (fp32), Z (M, N) output, 1/(1-p)
    col_scale_ptr, z_ptr, stride_zm, stride_zn, inv_keep,
    # meta-parameters
    FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
    INV127: tl.constexpr, IDX64: tl.constexpr, W_T: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COL_SCALE: tl.constexpr, KEEP_Z: tl.constexpr, DORA_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """C (M, N) = lora_scale · [keep ⊙] (L·R) + A·B [+ bias], B (K, N) the dequantized W, in one fp32 accumulator.

    ``W_T``: B = Wᵀ with W (N, K) (forward: y = s·S·Bᵀ + x·Wᵀ + b; L = S (M, r), R = lora_Bᵀ (r, N)); else
    B = W with W (K, N) (dX = keep ⊙ (dS·A)/(1-p) + dY·W; L = dS (M, r), R = lora_A (r, N), keep over C's
    (row, col)). Grid: cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N), grouped by GROUP_M rows of tiles.
    DoRA's column scale, Z and second accumulator (``COL_SCALE``, ``KEEP_Z``, ``DORA_DROPOUT``) are those of
    ``_lora_matmul_kernel`` (the same helpers), off for LoRA.
    """
    # --- tile coordinates (grouped), and the LoRA term the accumulator starts from: as _lora_matmul_kernel
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)  # wrapped: in-bounds loads; the store drops them
    cols = (offs_n % N).to(tl.int64)
    acc = _lora_term(l_ptr, r_ptr, rows, cols, offs_m, offs_n, R, stride_lm, stride_lr, stride_rr, stride_rn,
                     lora_scale, seed_ptr, dropout_p, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_R, INPUT_PRECISION)
    acc_z = acc
    seed = 0
    if DORA_DROPOUT:
        acc, acc_z = _dora_start(acc, dropout_p, COL_SCALE)
        seed = tl.load(seed_ptr)

    # --- main loop over K: A tile loaded as usual, the W tile dequantized from its packed bytes
    offset = 0.0
    if DOUBLE_QUANT:
        offset = tl.load(offset_ptr)
    ks = offs_k.to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    step_a = tl.full([], BLOCK_K, tl.int64) * stride_ak
    # W's element indices in int32 unless W has 2³¹ elements or more: int64 index tiles cost registers
    w_cols = cols if IDX64 else offs_n % N
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
        kk = (k0 + ks) if IDX64 else (k0 + offs_k)
        if W_T:  # B[k, n] = W[n, k]
            w = _dequant(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, w_cols[None, :], kk[:, None],
                         W_K, k_mask[:, None], FORMAT, DOUBLE_QUANT, QBLOCK, QBLOCK2, INV127)
        else:  # B[k, n] = W[k, n]
            w = _dequant(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, kk[:, None], w_cols[None, :],
                         W_K, k_mask[:, None], FORMAT, DOUBLE_QUANT, QBLOCK, QBLOCK2, INV127)
        w = w.to(a_ptr.dtype.element_ty)
        if COL_SCALE == 2 or DORA_DROPOUT:
            a, a_second = _dora_operands(a, col_scale_ptr, seed, offs_m, k0 + offs_k, k_mask, dropout_p, COL_SCALE,
                                         DORA_DROPOUT)
            if DORA_DROPOUT:
                acc_z = tl.dot(a_second, w, acc_z, input_precision=INPUT_PRECISION)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        a_ptrs += step_a

    # --- epilogue
    if COL_SCALE == 1 or DORA_DROPOUT:
        acc = _dora_epilogue(acc, acc_z, col_scale_ptr, z_ptr, offs_m, offs_n, cols, M, N, stride_zm, stride_zn,
                             seed_ptr, dropout_p, inv_keep, COL_SCALE, KEEP_Z, DORA_DROPOUT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _dequant_kernel(
    # pointers: the quantized W (codes, absmax, codebook, absmax2, codebook2, offset), the output W
    q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, w_ptr,
    # sizes: W (N, K), row-major
    N, K,
    # meta-parameters
    FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
    INV127: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W (N, K) = dequant(codes, scales) in w_ptr's dtype: each element computed and rounded as the in-loop
    tiles of ``_qlora_matmul_kernel`` compute it. Grid: cdiv(N, BLOCK_N) · cdiv(K, BLOCK_K)."""
    pid = tl.program_id(0)
    pid_n, pid_k = pid // tl.cdiv(K, BLOCK_K), pid % tl.cdiv(K, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = (offs_n % N).to(tl.int64)  # wrapped: in-bounds loads (int8 reads its row scale unmasked)
    cols = (offs_k % K).to(tl.int64)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    offset = 0.0
    if DOUBLE_QUANT:
        offset = tl.load(offset_ptr)
    w = _dequant(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, rows[:, None], cols[None, :], K, mask,
                 FORMAT, DOUBLE_QUANT, QBLOCK, QBLOCK2, INV127)
    tl.store(w_ptr + rows[:, None] * K + cols[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launchers


_DEQUANT_BLOCK = (32, 128)  # (BLOCK_N, BLOCK_K): 16 elements per thread at 8 warps; memory-bound


def dequantize(qweight, dtype: torch.dtype) -> torch.Tensor:
    """W (N, K) in ``dtype``, one launch of ``_dequant_kernel`` (the dequantize-once path's temporary).

    Equal to ``qweight.dequantize(dtype)`` bit for bit for NF4 without double quantization and int8 (with it,
    an ulp where the compiler fuses the absmax's multiply-add, as in the GEMMs).
    """
    n, k = qweight.shape
    w = torch.empty((n, k), device=qweight.device, dtype=dtype)
    block_n, block_k = _DEQUANT_BLOCK
    grid = (triton.cdiv(n, block_n) * triton.cdiv(k, block_k),)
    with device_guard(w):
        _dequant_kernel[grid](*_qtensors(qweight), w, n, k, FORMAT=FORMAT_IDS[qweight.format],
                              DOUBLE_QUANT=qweight.double_quant, QBLOCK=qweight.blocksize, QBLOCK2=ABSMAX_BLOCKSIZE,
                              INV127=INT8_SCALE, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8)
    return w


def _dequantize_once(qweight, m: int) -> bool:
    return _configs.dequantize_once(qweight.device, qweight.format, m, *qweight.shape)


def _qmatmul_launch(m: int, n: int, k: int, rank: int, qweight, *, w_t: bool, has_bias: bool, has_dropout: bool,
                    config: KernelConfig, max_block_r: int, dtype: torch.dtype,
                    capability: Optional[Tuple[int, int]] = None, dora: Tuple[int, bool, bool] = NO_DORA) -> Launch:
    """The launch of ``_qlora_matmul_kernel`` for C (m, n) over a reduction of k on a GPU of ``capability``
    (None: the interpreter); ``dora`` = (COL_SCALE, KEEP_Z, DORA_DROPOUT) as in ``lora_linear._matmul_launch``."""
    config = _dora_gemm_config(config, dora[2], dtype)
    precision = _input_precision(dtype)
    ieee_fp32 = dtype == torch.float32 and precision == "ieee"
    max_n, max_k = _IEEE_MAX_BLOCK_NK if ieee_fp32 else (_MAX_BLOCK_N, _MAX_BLOCK_K)
    wide_tile = _IEEE_WIDE_TILE if ieee_fp32 else _WIDE_TILE
    if config.block_m <= 32:
        max_k = min(max_k, _DECODE_MAX_BLOCK_K)
        if rank > 32:  # rank blocks of 64 beside a 128-wide tile: 4 B spilled on sm90 (bf16 forward, M = 17);
            max_n = min(max_n, 64)  # and beside a 64-wide one 8 B on sm80 (fp16/bf16 NF4-dq forward, M = 17)
            max_block_r = min(max_block_r, 32)
        if ieee_fp32:
            max_block_r = min(max_block_r, _IEEE_DECODE_MAX_BLOCK_R)
        elif dtype == torch.float32 and qweight.format == "int8":  # TF32 int8 16x64x32 decode tiles: 16 B
            max_k = min(max_k, 16)  # spilled on sm90 (forward, M = 1); NF4 spills 4-8 B at 16 instead
    if qweight.double_quant and has_dropout:
        # NF4 with double quantization (two more gathers per W tile) in the dX GEMM with dropout: 32x128 decode
        # tiles spilled 8 B (sm80, M = 17), 128x128x64 tiles 72 B (sm90, M = 512)
        # (and 16x64x32 4 B, sm90, M = 1)
        max_n, max_k = (min(max_n, 64), min(max_k, 16)) if config.block_m <= 32 else (max_n, min(max_k, 32))
    if config.block_m <= 32:  # decode: rank blocks of 16 (32 spilled 8 B in the sm90 NF4 dX GEMM at M = 1)
        max_block_r = min(max_block_r, 16)
    if qweight.double_quant and not w_t and _configs.TRITON_VERSION < (3, 9):
        # Triton < 3.9, NF4-dq dX GEMM (none of these spill on 3.9): 128x128x64 tiles spilled 4 B on sm90
        # (fp16/bf16, M = 512, N = K = 4096), TF32 64x64x32 tiles at a rank block of 32 8 B on sm80 (M = 512, r = 100)
        if config.block_m > 32:
            max_k = min(max_k, 32)
        if dtype == torch.float32 and precision != "ieee":
            max_block_r = min(max_block_r, 16)
    if dtype == torch.float32 and precision != "ieee" and config.block_m == 64:
        max_n = min(max_n, 64)  # TF32 64x128x16 tiles, 8 warps: 4 B spilled on sm80 (int8 dX, M = 64)
    block_n, block_k = min(config.block_n, max_n), min(config.block_k, max_k)
    warps = max(config.num_warps, 8) if config.block_m * block_n >= wide_tile else config.num_warps
    if (dtype == torch.float32 and precision != "ieee" and _configs.consumer_sm8x(capability)
            and (config.block_m <= 32 or qweight.format == "int8")):
        # TF32 on sm86/sm89: 4 warps spill 4-16 B in decode tiles (NF4, NF4-dq) and in int8's 64x64x32 forward at
        # M = 512; 8 warps do not (but spill 4 B in the NF4-dq 64x64x16 forward at M = 64, which keeps 4)
        warps = 8
    numel = qweight.shape[0] * qweight.shape[1]
    return Launch(_qlora_matmul_kernel, (triton.cdiv(m, config.block_m) * triton.cdiv(n, block_n),), dict(
        FORMAT=FORMAT_IDS[qweight.format], DOUBLE_QUANT=qweight.double_quant, QBLOCK=qweight.blocksize,
        QBLOCK2=ABSMAX_BLOCKSIZE, INV127=INT8_SCALE, IDX64=numel + max(block_n, block_k) >= 2**31, W_T=w_t,
        HAS_BIAS=has_bias, HAS_DROPOUT=has_dropout, COL_SCALE=dora[0], KEEP_Z=dora[1], DORA_DROPOUT=dora[2],
        BLOCK_M=config.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_R=_rank_block(max(rank, 1), max_block_r), GROUP_M=config.group_m, INPUT_PRECISION=precision,
        num_warps=warps, num_stages=min(config.num_stages, _MAX_STAGES)))


def _qtensors(qweight) -> tuple:
    """The seven W pointers of ``_qlora_matmul_kernel`` (unused ones: the codes, never read)."""
    d = qweight.data
    return (d, qweight.absmax, qweight.code if qweight.code is not None else d,
            qweight.absmax2 if qweight.double_quant else d, qweight.code2 if qweight.double_quant else d,
            qweight.offset if qweight.double_quant else d)


class _ForwardPlan(_base._ForwardPlan):
    """The 16-bit forward plan with the base GEMM on the quantized W."""

    def _plan_base(self, x, qweight, bias, lora_B, cfgs, precision) -> None:
        m, n, k, rank = self.m, self.n, self.k, self.rank
        self.matmul = _qmatmul_launch(m, n, k, rank, qweight, w_t=True, has_bias=bias is not None, has_dropout=False,
                                      config=cfgs.forward, max_block_r=cfgs.forward_block_cap(rank), dtype=x.dtype,
                                      capability=_configs._device_info(x.device)[0], dora=self.gemm_dora)
        # x (M, K), y (M, N) contiguous, bias (N,), L = S (M, r) contiguous, R = lora_Bᵀ (r, N)
        self.matmul_ints = (m, n, k, rank, k, *x.stride(), n, 1, bias.stride(0) if bias is not None else 0, rank, 1,
                            lora_B.stride(1), lora_B.stride(0))

    def _run_base(self, env, x, qweight, bias, lora_B, y, s, scaling, tail) -> None:
        self.matmul.run(env, x, *_qtensors(qweight), y, bias if bias is not None else y, s, lora_B,
                        *self.matmul_ints, float(scaling), *tail)


class _BackwardPlan(_base._BackwardPlan):
    """The 16-bit backward plan (W frozen: no dW) with the dX GEMM on the quantized W."""

    def _plan_grad_input(self, grad_y, qweight, lora_A, cfgs, precision, has_dropout) -> None:
        m, n, k, rank = self.m, self.n, self.k, self.rank
        dora = self._grad_input_dora()
        self.grad_x_gemm = _qmatmul_launch(m, k, n, rank, qweight, w_t=False, has_bias=False,
                                           has_dropout=has_dropout and self.dora is None, config=cfgs.grad_input,
                                           max_block_r=cfgs.grad_input_block_cap(), dtype=lora_A.dtype,
                                           capability=_configs._device_info(grad_y.device)[0], dora=dora)
        # dY (M, N), dX (M, K) contiguous, L = dS (M, r) contiguous, R = A (r, K)
        self.grad_x_ints = (m, k, n, rank, k, *grad_y.stride(), k, 1, 0, rank, 1, *lora_A.stride())

    def _run_grad_input(self, env, grad_y, qweight, grad_x, grad_s, lora_A, lora_scale, tail) -> None:
        self.grad_x_gemm.run(env, grad_y, *_qtensors(qweight), grad_x, grad_x, grad_s, lora_A, *self.grad_x_ints,
                             lora_scale, *tail)


def _qkey(qweight) -> tuple:
    """What a quantized W contributes to a plan key: its format, shape and flags (the data is contiguous)."""
    return (qweight.format, tuple(qweight.shape), qweight.double_quant, qweight.blocksize)


def forward(x: torch.Tensor, qweight, bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
            scaling: float, dropout_p: float, seed) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on a quantized base: ``(y (M, N), S (M, r))`` as :func:`lora_kernels.ops.lora_linear.forward`,
    with ``qweight`` a :class:`lora_kernels.quant.QuantizedWeight` on x's device."""
    check_operands(x, None, lora_A, lora_B)
    _check_quantized(qweight, x)
    n = qweight.shape[0]
    if x.shape[0] == 0:
        return (torch.empty((0, n), device=x.device, dtype=x.dtype),
                torch.empty((0, lora_A.shape[0]), device=x.device, dtype=x.dtype))
    if _dequantize_once(qweight, x.shape[0]):  # the temporary W is freed on return (see the module docstring)
        return _base.forward(x, dequantize(qweight, x.dtype), bias, lora_A, lora_B, scaling, dropout_p, seed)
    has_dropout = dropout_p > 0
    key = call_key("qforward", x.device, x.dtype, (x, bias, lora_A, lora_B), (has_dropout, _qkey(qweight)))
    plan = cached(_FORWARD_PLANS, key, lambda: _ForwardPlan(x, qweight, bias, lora_A, lora_B, has_dropout))
    with device_guard(x):
        return plan(x, qweight, bias, lora_A, lora_B, scaling, dropout_p,
                    seed_tensor(seed, x.device) if has_dropout else None)


def backward(grad_y: torch.Tensor, x: Optional[torch.Tensor], qweight, lora_A: torch.Tensor, lora_B: torch.Tensor,
             s: Optional[torch.Tensor], scaling: float, dropout_p: float, seed, needs_grad: Sequence[bool]) -> Grads:
    """Fused backward on a quantized base: ``(grad_x, None, grad_bias, grad_lora_A, grad_lora_B)`` as
    :func:`lora_kernels.ops.lora_linear.backward` (the quantized base is frozen: never a dW)."""
    needs = tuple(bool(v) for v in needs_grad)
    if needs[1]:
        raise ValueError("a quantized base is frozen: needs_grad[1] (dW) must be False")
    dtype = lora_A.dtype
    if grad_y.dtype != dtype:
        grad_y = grad_y.to(dtype)
    if needs[0]:
        _check_quantized(qweight, grad_y)
    if grad_y.shape[0] == 0:
        return _base.backward(grad_y, x, None, lora_A, lora_B, s, scaling, dropout_p, seed, needs)
    if needs[0] and _dequantize_once(qweight, grad_y.shape[0]):  # only dX reads W; the temporary dies on return
        return _base.backward(grad_y, x, dequantize(qweight, dtype), lora_A, lora_B, s, scaling, dropout_p, seed,
                              needs)
    has_dropout = dropout_p > 0
    key = call_key("qbackward", grad_y.device, dtype, (grad_y, x, lora_A, lora_B, s),
                    (has_dropout, needs, _qkey(qweight) if needs[0] else None))
    plan = cached(_BACKWARD_PLANS, key,
                   lambda: _BackwardPlan(grad_y, x, qweight, lora_A, lora_B, s, needs, has_dropout))
    with device_guard(grad_y):
        return plan(grad_y, x, qweight, lora_A, lora_B, s, scaling, dropout_p,
                    seed_tensor(seed, grad_y.device) if has_dropout else None)


def _check_quantized(qweight, t: torch.Tensor) -> None:
    if getattr(qweight, "format", None) not in FORMAT_IDS:
        raise TypeError(f"weight must be a lora_kernels.quant.QuantizedWeight (nf4 or int8), got "
                        f"{type(qweight).__name__}")
    if qweight.device != t.device:
        raise ValueError(f"the quantized weight is on {qweight.device} but the input is on {t.device}")
    if not qweight.data.is_contiguous():
        raise ValueError("the quantized weight's packed data must be contiguous (as lora_kernels.quant stores it)")


_FORWARD_PLANS: dict = {}
_BACKWARD_PLANS: dict = {}
