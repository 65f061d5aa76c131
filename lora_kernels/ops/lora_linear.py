"""Fused Triton kernels for the LoRA linear: the ``"triton"`` backend of :func:`lora_kernels.lora_linear`.

    y = x·Wᵀ + b + s · (x̃·Aᵀ)·Bᵀ,     x̃ = keep ⊙ x / (1 - p),     s = scaling = alpha / rank

Shapes: x (M, K), W (N, K), b (N,), A = lora_A (r, K), B = lora_B (N, r), keep (M, K) a Bernoulli(1 - p)
keep-mask that is never stored. This module implements the backend contract stated in
:mod:`lora_kernels.torch_backend` (``forward``, ``backward``, ``dropout_mask``).

Passes (one kernel launch each; ``[...]`` only when needed)::

    forward    _lora_down_kernel     S = (keep ⊙ x)·Aᵀ / (1-p)             (M, r), dropout fused, S kept
               _lora_matmul_kernel   acc = s·S·Bᵀ;  acc += x·Wᵀ;  y = acc + b   y written once
    backward   _lora_dy_kernel       one pass over dY:  dS = s·dY·B,  dB = s·dYᵀ·S,  [db = Σ_rows dY]
               [_sum_partials_kernel]  dS, when dY's columns were split over programs
               _lora_matmul_kernel   acc = (keep ⊙ dS·A)/(1-p);  acc += dY·W     dX written once
               _lora_da_kernel       dA = dSᵀ·(keep ⊙ x)/(1-p), mask regenerated, no copy of x
               [_sum_partials_kernel]  dB, db, dA partial sums, all three in one launch
               [_lora_matmul_kernel] dW = dYᵀ·x, only when W is trainable

Dropout mask. ``keep(seed, row, col)`` is a pure function of the seed and the element's global (row, col)
in x, so every kernel regenerates the same mask whatever its block sizes. It is a counter-based hash
(a 32-bit avalanche mixer keyed per row, then per column), not ``tl.rand``: in the sm90 PTX of a mask
kernel, ``tl.rand`` (Philox-4x32-10, one of its four outputs used) costs ~75 instructions per element and
this hash ~17. With the mask rebuilt in three passes (S, dX, dA) over an 8192x4096 input, Philox alone
would cost roughly as much as one of the layer's GEMMs on an H100. The hash passes the statistical tests
in ``tests/test_ops_lora_linear.py`` (keep rate, row/column/seed independence). The drop threshold is
p·2³² rounded to fp32 (24 significant bits), so the keep probability is 1 - p to ~6e-8 relative.

Determinism. No float atomics: reductions that are split over programs write fp32 partial sums to a
workspace that ``_sum_partials_kernel`` adds in a fixed order, so gradients are bitwise reproducible run to
run for a given shape, dtype and device.

Numerics. Every ``tl.dot`` accumulates in fp32 (fp16/bf16 inputs use tensor cores with fp32 accumulators);
bias, scale and mask are applied to the fp32 accumulator, and each output is rounded to its dtype once.
For fp32 inputs ``tl.dot`` follows torch's fp32 matmul precision, set through either of its APIs
(``torch.set_float32_matmul_precision`` / ``allow_tf32``, or ``torch.backends[.cuda.matmul].fp32_precision``):
IEEE by default (``input_precision="ieee"``, matching ``torch.mm`` and the tests' 1e-5 bar), TF32 when torch
would use it for ``torch.mm``. S and dS are stored in x's dtype because
they are the operands of the next GEMMs; the 1/(1-p) factor is applied after the GEMMs, on fp32
accumulators, so dropping is exact (keep ⊙ x never rounds).

Sizes. Any M >= 0 (M = 0 returns without launching), any K and N (edges masked; rows and columns of GEMM
operands past an edge are wrapped, not masked, and only the store is masked), any rank (the rank is padded
to a power of two >= 16 inside the kernels and looped in blocks of at most 64), any strides of x, dY and the
weights (no ``.contiguous()`` copies), fp32/fp16/bf16. Row offsets are int64, so M·K and M·N may pass 2³¹.
``scaling`` and ``dropout_p`` are run-time arguments (no recompilation per alpha or p); so is the seed
(``do_not_specialize``). M is too in the skinny passes; the GEMM kernel specialises on it as Triton does on
every size (M = 1, M a multiple of 16, other: at most three variants, never one per sequence length), because
for dW = dYᵀ·x its M is out_features along dY's contiguous dimension, and without ``M % 16 == 0`` known the
wrapped row index ``offs_m % M`` hides that contiguity (scalar 2-byte loads instead of 16-byte cp.async).

GPU notes (block sizes and tuning). Block sizes come from :func:`lora_kernels.ops.configs.kernel_configs`, a small cache keyed by
(device capability, SM count, dtype, TF32 on/off, M bucket = next power of two of M capped at 8192, N and
K buckets, rank block); a new M only looks up its bucket, it never compiles or tunes. Defaults:

* Hopper (sm90), fp16/bf16 GEMMs: 128x256x64 tiles, 8 warps, 3 stages, or 128x128x64 / 64x128x64 when
  the tile count gives a badly quantised last wave (a waves x tile-area model picks); GROUP_M = 8.
* Ampere/Ada (sm80/86/89): 128x128x32, 8 warps, 4 stages (64 KB of shared memory, so sm86/89 fit too).
* fp32: 64x128x32, 8 warps under IEEE (CUDA cores); under TF32 128x128x32 tiles (128x256 spill on sm90).
* Small M (decode, M <= 64): BLOCK_M = max(16, next_pow2(M)), narrower N tiles for more programs, K blocks
  of 128 bytes.
* Skinny passes (S, dY, dA) are memory-bound: 32-128 rows x 128-256 bytes of columns, 4-8 warps, 3-4
  stages; when a pass has fewer programs than ~4 waves, its reduction
  dimension is split over programs (fp32 partials).
* Pipeline stages are cut to fit each arch's shared memory (232,448 B sm90, 166,912 B sm80, 101,376 B
  sm86/89); fp32 (IEEE and TF32) uses rank blocks of 32, fp16/bf16 of 64.

``python -m lora_kernels.check --aot`` compiles every kernel in every configuration the launchers can choose
for sm80/86/89/90 with the installed Triton, and fails on a compile error, shared memory over the limit,
a register spill in a default configuration, or an sm90 fp16/bf16 GEMM without wgmma (report in
benchmarks/results/compile-gate/). Their speed has not been measured on a GPU yet; the dY pass is not
software-pipelined on sm80 (its dY tile feeds two MMAs and a column sum; loads are 16-byte vectors).

Set ``LORA_KERNELS_AUTOTUNE=1`` to time a few candidate GEMM tiles with ``triton.testing.do_bench`` the first
time each bucket is seen on a CUDA device and cache the fastest (never under ``TRITON_INTERPRET=1``, never
per new M). Under the interpreter all blocks are 32 and nothing is split, to keep CPU tests fast.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .configs import (  # noqa: F401 - re-exported: tests and tools reach them through this module
    KernelConfig,
    LoRAKernelConfigs,
    _autotune_enabled,
    _bucket,
    _input_precision,
    _interpreting,
    _rank_block,
    _tuned_gemm,
    kernel_configs,
    override_configs,
)
from . import configs as _configs

Grads = Tuple[Optional[torch.Tensor], ...]


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _mix32(h):
    """A 32-bit avalanche mixer (xor-shift-multiply, constants from Wellons' hash-prospector), uint32."""
    h ^= h >> 16
    h *= 0x21F0AAAD
    h ^= h >> 15
    h *= 0x735A2D97
    h ^= h >> 15
    return h


@triton.jit
def _keep_mask(seed, rows, cols, dropout_p):
    """Keep-mask (len(rows), len(cols)) for global row and column indices: True with probability 1 - p.

    keep = mix(mix(row ^ mix(seed)) ^ col·φ) >= p·2³²: a pure function of (seed, row, col). The per-row key
    is computed once per row of the tile, so an element costs one xor, one mixer and one compare.
    """
    threshold = tl.minimum(dropout_p * 4294967296.0, 4294967040.0).to(tl.uint32)
    seed_key = _mix32(seed.to(tl.uint32) ^ 0x3C6EF372)
    row_key = _mix32(rows.to(tl.uint32) ^ seed_key)
    col_key = cols.to(tl.uint32) * 0x9E3779B1
    return _mix32(row_key[:, None] ^ col_key[None, :]) >= threshold


@triton.jit
def _split_tiles(pid_s, tiles_per_split, size, BLOCK: tl.constexpr):
    """[start, end): the tiles of a reduced dimension of length ``size`` that split ``pid_s`` covers."""
    start = pid_s * tiles_per_split
    return start, tl.minimum(start + tiles_per_split, tl.cdiv(size, BLOCK))


@triton.jit(do_not_specialize=["M", "seed"])
def _dropout_mask_kernel(
    # pointers
    out_ptr,
    # sizes
    M, K,
    # strides
    stride_om, stride_ok,
    # run-time scalars
    seed, dropout_p,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out (M, K) bool = keep(seed, row, col): the mask every kernel below regenerates, for tests."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, offs_m, offs_k, dropout_p)
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_k[None, :].to(tl.int64) * stride_ok
    tl.store(ptrs, keep, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit(do_not_specialize=["M", "seed"])
def _lora_down_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr,
    # sizes
    M, K, R,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    # run-time scalars
    seed, dropout_p, inv_keep,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """S (M, R) = (keep ⊙ x)·Aᵀ · inv_keep, with x (M, K) and A (R, K). Grid (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)).

    The mask multiplies x exactly (keeps or zeroes); 1/(1-p) scales the fp32 accumulator.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)  # wrapped: in-bounds loads, the store drops rows >= M
    r_mask = offs_r < R

    ks = offs_k.to(tl.int64)  # x's column stride may be large (a transposed view): int64 addresses
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
    at_ptrs = a_ptr + offs_r[None, :].to(tl.int64) * stride_ar + ks[:, None] * stride_ak  # (BLOCK_K, BLOCK_R) = Aᵀ
    step_x = tl.full([], BLOCK_K, tl.int64) * stride_xk
    step_a = tl.full([], BLOCK_K, tl.int64) * stride_ak

    # --- stream x once over K
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, offs_m, k0 + offs_k, dropout_p), x, 0.0)
        at = tl.load(at_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(x, at, acc, input_precision=INPUT_PRECISION)
        x_ptrs += step_x
        at_ptrs += step_a

    # --- epilogue
    if HAS_DROPOUT:
        acc = acc * inv_keep
    s_ptrs = s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr
    tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & r_mask[None, :])


@triton.jit(do_not_specialize=["seed"])
def _lora_matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, bias_ptr, l_ptr, r_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_bias,
    stride_lm, stride_lr, stride_rr, stride_rn,
    # run-time scalars
    lora_scale, seed, dropout_p,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """C (M, N) = lora_scale · [keep ⊙] (L·Rᵀᵀ) + A·B [+ bias], all in one fp32 accumulator.

    A (M, K), B (K, N), L (M, R), R (R, N), bias (N,), keep(seed, row, col) over C's (row, col).
    Uses: forward y = s·S·Bᵀ + x·Wᵀ + b; input gradient dX = keep ⊙ (dS·A)/(1-p) + dY·W; weight
    gradient dW = dYᵀ·x (no LoRA term). The LoRA term is computed first so the accumulator starts at it
    and the output is written once. Grid: cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N), grouped by GROUP_M rows
    of tiles for L2 reuse.
    """
    # --- tile coordinates, grouped ordering
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrapped: loads stay in bounds without masks on M and N; the store drops the wrapped rows/columns.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)

    # --- LoRA term: the accumulator starts at lora_scale · [keep ⊙] L·R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        # Not software-pipelined (num_stages=1): the rank loop runs once for r <= 64 and a few times above,
        # so multi-buffering it buys nothing, while num_stages copies of an (BLOCK_M + BLOCK_N) x BLOCK_R
        # tile overflow shared memory (fp32/TF32, BLOCK_R 64: 294,912 B on sm90 at 3 stages).
        for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
            r_mask = offs_r < R - r0
            lo = tl.load(l_ptr + rows[:, None] * stride_lm + (r0 + offs_r)[None, :] * stride_lr,
                         mask=r_mask[None, :], other=0.0)
            ro = tl.load(r_ptr + (r0 + offs_r)[:, None] * stride_rr + cols[None, :] * stride_rn,
                         mask=r_mask[:, None], other=0.0)
            acc = tl.dot(lo, ro, acc, input_precision=INPUT_PRECISION)
        acc = acc * lora_scale
        if HAS_DROPOUT:
            acc = tl.where(_keep_mask(seed, offs_m, offs_n, dropout_p), acc, 0.0)

    # --- main loop over K
    ks = offs_k.to(tl.int64)  # for dW the K dimension is the tokens, whose stride times K can pass 2³¹
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    step_a = tl.full([], BLOCK_K, tl.int64) * stride_ak
    step_b = tl.full([], BLOCK_K, tl.int64) * stride_bk
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += step_a
        b_ptrs += step_b

    # --- epilogue
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["M"])
def _lora_dy_kernel(
    # pointers
    dy_ptr, b_ptr, s_ptr, ds_ptr, dbb_ptr, db_ptr,
    # sizes
    M, N, R, tiles_per_split,
    # strides
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsp, stride_dsm, stride_dsr, stride_dbbp, stride_dbbn, stride_dbbr, stride_dbp, stride_dbn,
    # run-time scalars
    scaling,
    # meta-parameters
    COMPUTE_DS: tl.constexpr, COMPUTE_DBB: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One pass over dY (M, N) gives, for a block of BLOCK_M rows and one split of dY's columns:

        dS[split]   (M, R) += s · dY·B          B = lora_B (N, R); summed over splits afterwards
        dB[m-block] (N, R)  = s · dYᵀ·S         S (M, R) from the forward; summed over m-blocks afterwards
        db[m-block] (N,)    = Σ_rows dY         summed over m-blocks afterwards

    Grid (cdiv(M, BLOCK_M), number of column splits, cdiv(R, BLOCK_R)); a split covers ``tiles_per_split``
    column tiles. Partial sums go to fp32 workspaces (or straight to the output when there is one), never
    through atomics, so the result is deterministic.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask = offs_m < M  # rows are masked (not wrapped): they are reduced over for dB and db
    r_mask = offs_r < R
    rows = offs_m.to(tl.int64)
    # Workspace offsets in int64: a partial-sum buffer holds (M-blocks x N x R) or (splits x M x R) values,
    # which passes 2³¹ at long sequences and wide layers (8192 M-blocks x 4096 x 64, say).
    block_m64 = pid_m.to(tl.int64)
    split64 = pid_s.to(tl.int64)
    if COMPUTE_DBB:
        s = tl.load(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)

    # --- stream this split's column tiles of dY once
    ds_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    t_start, t_end = _split_tiles(pid_s, tiles_per_split, N, BLOCK_N)
    for t in range(t_start, t_end):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        cols = offs_n.to(tl.int64)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        if COMPUTE_DS:
            b = tl.load(b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            ds_acc = tl.dot(dy, b, ds_acc, input_precision=INPUT_PRECISION)
        if COMPUTE_DBB:
            dbb = tl.dot(tl.trans(dy), s, input_precision=INPUT_PRECISION) * scaling
            tl.store(dbb_ptr + block_m64 * stride_dbbp + cols[:, None] * stride_dbbn + offs_r[None, :] * stride_dbbr,
                     dbb.to(dbb_ptr.dtype.element_ty), mask=n_mask[:, None] & r_mask[None, :])
        if COMPUTE_DBIAS:
            if pid_r == 0:
                db = tl.sum(dy.to(tl.float32), axis=0)
                tl.store(db_ptr + block_m64 * stride_dbp + cols * stride_dbn, db.to(db_ptr.dtype.element_ty),
                         mask=n_mask)

    # --- epilogue
    if COMPUTE_DS:
        ds_ptrs = ds_ptr + split64 * stride_dsp + rows[:, None] * stride_dsm + offs_r[None, :] * stride_dsr
        tl.store(ds_ptrs, (ds_acc * scaling).to(ds_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit(do_not_specialize=["M", "seed"])
def _lora_da_kernel(
    # pointers
    ds_ptr, x_ptr, da_ptr,
    # sizes
    M, K, R, tiles_per_split,
    # strides
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dap, stride_dar, stride_dak,
    # run-time scalars
    seed, dropout_p, inv_keep,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dA[split] (R, K) = dSᵀ·(keep ⊙ x) · inv_keep over this split's rows; dS (M, R), x (M, K).

    The mask is regenerated from the seed (no stored mask, no dropped copy of x). Grid (cdiv(K, BLOCK_K),
    cdiv(R, BLOCK_R), number of row splits); a split covers ``tiles_per_split`` row tiles, and the
    per-split fp32 partials are summed afterwards in a fixed order.
    """
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (offs_k % K).to(tl.int64)  # wrapped; the store drops columns >= K
    r_mask = offs_r < R

    # --- stream this split's row tiles of x and dS once
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    t_start, t_end = _split_tiles(pid_s, tiles_per_split, M, BLOCK_M)
    for t in range(t_start, t_end):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        rows = offs_m.to(tl.int64)
        ds = tl.load(ds_ptr + rows[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, offs_m, offs_k, dropout_p), x, 0.0)
        acc = tl.dot(tl.trans(ds), x, acc, input_precision=INPUT_PRECISION)

    # --- epilogue
    if HAS_DROPOUT:
        acc = acc * inv_keep
    da_ptrs = da_ptr + pid_s.to(tl.int64) * stride_dap + offs_r[:, None] * stride_dar + offs_k[None, :].to(tl.int64) * stride_dak
    tl.store(da_ptrs, acc.to(da_ptr.dtype.element_ty), mask=r_mask[:, None] & (offs_k[None, :] < K))


@triton.jit
def _sum_partials_block(p_ptr, out_ptr, num_partials, numel, block, BLOCK: tl.constexpr):
    """out[i] = Σ_j p[j, i] for one block of i, j in increasing order (p contiguous (num_partials, numel))."""
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    ptrs = p_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, num_partials):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += numel
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_partials_kernel(
    p0_ptr, out0_ptr, count0, numel0,
    p1_ptr, out1_ptr, count1, numel1,
    p2_ptr, out2_ptr, count2, numel2,
    BLOCK: tl.constexpr,
):
    """Deterministic sums of up to three fp32 partial workspaces in one launch (programs are assigned to
    the workspaces in order). Grid: Σ cdiv(numel_i, BLOCK)."""
    pid = tl.program_id(0)
    blocks0 = tl.cdiv(numel0, BLOCK)
    blocks1 = tl.cdiv(numel1, BLOCK)
    if pid < blocks0:
        _sum_partials_block(p0_ptr, out0_ptr, count0, numel0, pid, BLOCK)
    elif pid < blocks0 + blocks1:
        _sum_partials_block(p1_ptr, out1_ptr, count1, numel1, pid - blocks0, BLOCK)
    else:
        _sum_partials_block(p2_ptr, out2_ptr, count2, numel2, pid - blocks0 - blocks1, BLOCK)


# --------------------------------------------------------------------------------------------- launchers


def _split(programs: int, num_tiles: int, target_programs: int, min_tiles: int) -> Tuple[int, int]:
    """(number of splits, tiles per split) so that programs · splits reaches ``target_programs`` while each
    split keeps at least ``min_tiles`` tiles of its reduction (and there is always at least one split)."""
    splits = 1
    if programs < target_programs and num_tiles >= 2 * min_tiles:
        splits = min(triton.cdiv(target_programs, max(programs, 1)), num_tiles // min_tiles)
    tiles_per_split = max(1, triton.cdiv(num_tiles, splits))
    return max(1, triton.cdiv(num_tiles, tiles_per_split)), tiles_per_split


def _workspace(count: int, shape: Tuple[int, ...], out: torch.Tensor) -> torch.Tensor:
    """Where ``count`` partial sums of ``out`` go: ``out`` itself (viewed with a leading 1) when there is a
    single partial, else a fp32 workspace (count, *shape) to be summed by :func:`_sum_partials`."""
    if count == 1:
        return out.unsqueeze(0)
    return torch.empty((count, *shape), device=out.device, dtype=torch.float32)


def _sum_partials(*jobs: Tuple[torch.Tensor, torch.Tensor]) -> None:
    """out = workspace.sum(0) in a fixed order for each (workspace, out) pair whose workspace is not ``out``
    itself; up to three pairs per launch."""
    jobs = [(p, o) for p, o in jobs if p.data_ptr() != o.data_ptr() and o.numel() > 0]
    if not jobs:
        return
    assert len(jobs) <= 3, f"at most three workspaces per launch, got {len(jobs)}"
    block = 1024
    args, programs = [], 0
    for i in range(3):
        p, o = jobs[i] if i < len(jobs) else jobs[0]
        n = o.numel() if i < len(jobs) else 0
        assert o.is_contiguous() and p.is_contiguous()
        args += [p, o, p.shape[0], n]
        programs += triton.cdiv(n, block)
    _sum_partials_kernel[(programs,)](*args, BLOCK=block)


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_matmul(c, a, strides_a, b, strides_b, k, *, bias=None, lora=None, lora_scale=1.0, seed=0,
                   dropout_p=0.0, config: KernelConfig, max_block_r: int, tune_key: Optional[tuple] = None) -> None:
    """c (M, N) = lora_scale · [keep ⊙] (L·R) + a·b [+ bias].

    ``a`` is read as an (M, k) matrix with (row, column) strides ``strides_a``, ``b`` as (k, N) with
    ``strides_b``; ``lora`` is (L, strides_l, R, strides_r, rank) for L (M, rank) and R (rank, N), or None.
    """
    m, n = c.shape
    if m == 0 or n == 0:
        return
    if lora is not None:
        l_t, strides_l, r_t, strides_r, rank = lora
    else:
        l_t, strides_l, r_t, strides_r, rank = c, (0, 0), c, (0, 0), 0
    block_r = _rank_block(max(rank, 1), max_block_r)
    bias_t = bias if bias is not None else c
    stride_bias = bias.stride(0) if bias is not None else 0

    def launch(cfg: KernelConfig) -> None:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        _lora_matmul_kernel[grid](
            a, b, c, bias_t, l_t, r_t,
            m, n, k, rank,
            strides_a[0], strides_a[1], strides_b[0], strides_b[1], c.stride(0), c.stride(1), stride_bias,
            strides_l[0], strides_l[1], strides_r[0], strides_r[1],
            float(lora_scale), int(seed), float(dropout_p),
            HAS_BIAS=bias is not None, HAS_LORA=lora is not None, HAS_DROPOUT=dropout_p > 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r, GROUP_M=cfg.group_m,
            INPUT_PRECISION=_input_precision(a.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if tune_key is not None and _configs._OVERRIDE is None and _autotune_enabled(c.device):
        config = _tuned_gemm(tune_key + (lora is not None, dropout_p > 0, bias is not None), config, launch)
    launch(config)


def _check(x: torch.Tensor, weight: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, in_features), got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1] or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A (rank, in_features) and lora_B (out_features, rank) must agree on a rank >= 1, "
                         f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: two launches, y written once.

    Args:
        x: (M, K), any strides. weight: (N, K). bias: (N,) or None. lora_A: (r, K). lora_B: (N, r).
            All in one floating dtype.
        scaling: the LoRA scale s (run-time, no recompilation). dropout_p: drop probability in [0, 1).
        seed: dropout seed; the mask is ``dropout_mask(seed, (M, K), dropout_p, x.device)``.

    Returns:
        ``y`` (M, N) = x·Wᵀ + b + s·S·Bᵀ and ``S`` (M, r) = (keep ⊙ x)·Aᵀ/(1-p), both in x's dtype.

    Raises:
        ValueError / TypeError: shapes or dtypes do not fit.
    """
    _check(x, weight, lora_A, lora_B)
    m, k = x.shape
    n, rank = weight.shape[0], lora_A.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    s = torch.empty((m, rank), device=x.device, dtype=x.dtype)
    if m == 0:
        return y, s
    if k == 0:
        s.zero_()
    cfgs = kernel_configs(x.device, x.dtype, m, n, k, rank)
    precision = _input_precision(x.dtype)
    with _device_guard(x):
        if k > 0:
            cfg = cfgs.down
            block_r = _rank_block(rank, cfgs.max_block_r)
            grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(rank, block_r))
            _lora_down_kernel[grid](
                x, lora_A, s,
                m, k, rank,
                x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s.stride(0), s.stride(1),
                int(seed), float(dropout_p), 1.0 / (1.0 - dropout_p),
                HAS_DROPOUT=dropout_p > 0, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
                INPUT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        _launch_matmul(
            y, x, (x.stride(0), x.stride(1)), weight, (weight.stride(1), weight.stride(0)), k,
            bias=bias, lora=(s, (s.stride(0), s.stride(1)), lora_B, (lora_B.stride(1), lora_B.stride(0)), rank),
            lora_scale=scaling, config=cfgs.forward, max_block_r=cfgs.max_block_r,
            tune_key=("forward", x.device, x.dtype, _bucket(m), n, k),
        )
    return y, s


def backward(
    grad_y: torch.Tensor,
    x: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    s: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float,
    seed: int,
    needs_grad: Sequence[bool],
) -> Grads:
    """Fused backward: gradients ``(dx, dweight, dbias, dA, dB)``, None where ``needs_grad`` is False.

    Args:
        grad_y: dY (M, N), any strides. x: (M, K), needed for dA and dW (else may be None).
        weight: (N, K), needed for dX. lora_A: (r, K). lora_B: (N, r). s: S from ``forward``, needed for dB.
        scaling, dropout_p, seed: as given to ``forward``; the mask is regenerated from ``seed``.
        needs_grad: five booleans for (x, weight, bias, lora_A, lora_B).

    Returns:
        dX = dY·W + keep ⊙ (dS·A)/(1-p) with dS = s·dY·B; dW = dYᵀ·x; db = Σ_rows dY; dA = dSᵀ·x̃;
        dB = s·dYᵀ·S. Deterministic (fixed-order partial sums, no atomics).
    """
    need_x, need_w, need_b, need_a, need_bb = (bool(v) for v in needs_grad)
    m, n = grad_y.shape
    rank, k = lora_A.shape
    dtype = lora_A.dtype
    if grad_y.dtype != dtype:  # tl.dot needs both operands in one dtype
        grad_y = grad_y.to(dtype)
    device = grad_y.device

    def new(*shape, zero=False):
        return (torch.zeros if zero else torch.empty)(shape, device=device, dtype=dtype)

    if m == 0:  # nothing to launch: empty dX, zero sums
        return (new(0, k) if need_x else None, new(n, k, zero=True) if need_w else None,
                new(n, zero=True) if need_b else None, new(rank, k, zero=True) if need_a else None,
                new(n, rank, zero=True) if need_bb else None)

    cfgs = kernel_configs(device, dtype, m, n, k, rank)
    precision = _input_precision(dtype)
    has_dropout = dropout_p > 0
    inv_keep = 1.0 / (1.0 - dropout_p)
    dx = dw = db = da = dbb = None
    need_ds = need_x or need_a
    tail = []  # (workspace, out) pairs summed in one launch at the end
    with _device_guard(grad_y):
        # --- one pass over dY: dS, dB, db
        ds = new(m, rank) if need_ds else None
        if need_ds or need_bb or need_b:
            cfg = cfgs.grad_output_pass
            block_r = _rank_block(rank, cfgs.max_block_r)
            m_blocks, r_blocks = triton.cdiv(m, cfg.block_m), triton.cdiv(rank, block_r)
            splits, tiles_per_split = _split(m_blocks * r_blocks, triton.cdiv(n, cfg.block_n), cfgs.target_programs,
                                             cfgs.min_split_tiles)
            ds_ws = _workspace(splits, (m, rank), ds) if need_ds else grad_y.unsqueeze(0)
            if need_bb:
                dbb = new(n, rank)
                dbb_ws = _workspace(m_blocks, (n, rank), dbb)
                tail.append((dbb_ws, dbb))
            else:
                dbb_ws = grad_y.unsqueeze(0)
            if need_b:
                db = new(n)
                db_ws = _workspace(m_blocks, (n,), db)
                tail.append((db_ws, db))
            else:
                db_ws = grad_y
            s_t = s if need_bb else grad_y
            _lora_dy_kernel[(m_blocks, splits, r_blocks)](
                grad_y, lora_B, s_t, ds_ws, dbb_ws, db_ws,
                m, n, rank, tiles_per_split,
                grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1), s_t.stride(0), s_t.stride(1),
                ds_ws.stride(0), ds_ws.stride(1), ds_ws.stride(2), dbb_ws.stride(0), dbb_ws.stride(1),
                dbb_ws.stride(2), db_ws.stride(0), db_ws.stride(1),
                float(scaling),
                COMPUTE_DS=need_ds, COMPUTE_DBB=need_bb, COMPUTE_DBIAS=need_b,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r, INPUT_PRECISION=precision,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            if need_ds:
                _sum_partials((ds_ws, ds))

        # --- dX = keep ⊙ (dS·A)/(1-p) + dY·W in one GEMM
        if need_x:
            dx = new(m, k)
            _launch_matmul(
                dx, grad_y, (grad_y.stride(0), grad_y.stride(1)), weight, (weight.stride(0), weight.stride(1)), n,
                lora=(ds, (ds.stride(0), ds.stride(1)), lora_A, (lora_A.stride(0), lora_A.stride(1)), rank),
                lora_scale=inv_keep if has_dropout else 1.0, seed=seed, dropout_p=dropout_p,
                config=cfgs.grad_input, max_block_r=cfgs.max_block_r,
                tune_key=("grad_input", device, dtype, _bucket(m), k, n),
            )

        # --- dA = dSᵀ·(keep ⊙ x)/(1-p), mask regenerated
        if need_a:
            da = new(rank, k)
            if k > 0:
                cfg = cfgs.grad_a
                block_r = _rank_block(rank, cfgs.max_block_r)
                k_blocks, r_blocks = triton.cdiv(k, cfg.block_k), triton.cdiv(rank, block_r)
                splits, tiles_per_split = _split(k_blocks * r_blocks, triton.cdiv(m, cfg.block_m), cfgs.target_programs,
                                                 cfgs.min_split_tiles)
                da_ws = _workspace(splits, (rank, k), da)
                tail.append((da_ws, da))
                _lora_da_kernel[(k_blocks, r_blocks, splits)](
                    ds, x, da_ws,
                    m, k, rank, tiles_per_split,
                    ds.stride(0), ds.stride(1), x.stride(0), x.stride(1),
                    da_ws.stride(0), da_ws.stride(1), da_ws.stride(2),
                    int(seed), float(dropout_p), inv_keep,
                    HAS_DROPOUT=has_dropout, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
                    INPUT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                )
        _sum_partials(*tail)

        # --- dW = dYᵀ·x, only for a trainable base
        if need_w:
            dw = new(n, k)
            _launch_matmul(
                dw, grad_y, (grad_y.stride(1), grad_y.stride(0)), x, (x.stride(0), x.stride(1)), m,
                config=cfgs.grad_weight, max_block_r=cfgs.max_block_r,
                tune_key=("grad_weight", device, dtype, n, k, _bucket(m)),
            )
    return dx, dw, db, da, dbb


def dropout_mask(seed: int, shape: Sequence[int], dropout_p: float, device: torch.device) -> torch.Tensor:
    """The keep-mask the kernels regenerate for ``seed``: True where an element of x survives dropout.

    Args:
        seed: the dropout seed given to ``forward``/``backward``.
        shape: (M, K), or any shape whose last dimension is K (rows are the flattened leading dimensions).
        dropout_p: drop probability in [0, 1).
        device: where to build it (a CUDA device, or any device under ``TRITON_INTERPRET=1``).

    Returns:
        A bool tensor of ``shape``.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        raise ValueError("shape must have at least one dimension (the last is K)")
    k = shape[-1]
    m = 1
    for d in shape[:-1]:
        m *= d
    out = torch.empty((m, k), device=device, dtype=torch.bool)
    if out.numel() == 0:
        return out.view(shape)
    block = 32 if _interpreting() else 64
    with _device_guard(out):
        _dropout_mask_kernel[(triton.cdiv(m, block), triton.cdiv(k, block))](
            out, m, k, out.stride(0), out.stride(1), int(seed), float(dropout_p), BLOCK_M=block, BLOCK_K=block,
        )
    return out.view(shape)
