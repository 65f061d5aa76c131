"""Fused Triton kernels for the LoRA linear: the ``"triton"`` backend of :func:`lora_kernels.lora_linear`.

    y = x·Wᵀ + b + s · (x̃·Aᵀ)·Bᵀ,     x̃ = keep ⊙ x / (1 - p),     s = scaling = alpha / rank

Shapes: x (M, K), W (N, K), b (N,), A = lora_A (r, K), B = lora_B (N, r), keep (M, K) a Bernoulli(1 - p)
keep-mask that is never stored. This module implements the backend contract stated in
:mod:`lora_kernels.backends.base` (``forward``, ``backward``, ``dropout_mask``).

Passes (one kernel launch each; ``[...]`` only when needed)::

    forward    _lora_down_kernel     S = (keep ⊙ x)·Aᵀ / (1-p)             (M, r), dropout fused, S kept
               _lora_matmul_kernel   acc = s·S·Bᵀ;  acc += x·Wᵀ;  y = acc + b   y written once
    backward   _lora_dy_kernel       one pass over dY:  dS = s·dY·B,  dB = s·dYᵀ·S,  [dbias = Σ_rows dY]
               [_sum_partials_kernel]  dS, when dY's columns were split over programs
               _lora_matmul_kernel   acc = (keep ⊙ dS·A)/(1-p);  acc += dY·W     dX written once
               _lora_da_kernel       dA = dSᵀ·(keep ⊙ x)/(1-p), mask regenerated, no copy of x
               [_sum_partials_kernel]  dB, dbias, dA partial sums, all three in one launch
               [_lora_matmul_kernel] dW = dYᵀ·x, only when W is trainable

Dropout mask. ``keep(seed, row, col)`` is a pure function of the seed and the element's global (row, col)
in x, so every kernel regenerates the same mask whatever its block sizes. It is a counter-based hash
(a 32-bit avalanche mixer keyed per row, then one xor-shift-multiply round per element), not ``tl.rand``:
in the sm90 PTX of a mask kernel, ``tl.rand`` (Philox-4x32-10, one of its four outputs used) costs ~75
instructions per element, a full mixer per element ~15 and this hash ~6 (``cuobjdump -sass`` of the S pass:
dropout adds 472 instructions to its body with the full mixer, see ``benchmarks/results/``). With the mask
rebuilt in three passes (S, dX, dA) over an 8192x4096 input, the integer work decides whether the S and dA
passes are memory-bound (``benchmarks/cost_model.py``). The hash passes the statistical tests in
``tests/test_ops_lora_linear.py`` (keep rate, joint drop rates of neighbours and of elements 2^k apart in
rows and columns, seed independence). The drop threshold is
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
``scaling`` and ``dropout_p`` are run-time arguments (no recompilation per alpha or p); so is M in the
skinny passes (``do_not_specialize``). The GEMM kernel specialises on M as Triton does on every size (M = 1,
M a multiple of 16, other: at most three variants, never one per sequence length), because for dW = dYᵀ·x
its M is out_features along dY's contiguous dimension, and without ``M % 16 == 0`` known the wrapped row
index ``offs_m % M`` hides that contiguity (scalar 2-byte loads instead of 16-byte cp.async). The seed is a
one-element int64 tensor on the device that the kernels read: nothing on the host depends on its value, so a
CUDA graph that captured a training step replays fresh masks as the seed tensor is redrawn on the device.

GPU notes (block sizes and tuning). Block sizes come from :func:`lora_kernels.ops.configs.kernel_configs`, a small cache keyed by
(device capability, SM count, dtype, TF32 on/off, M bucket = next power of two of M capped at 8192, N, K,
rank block); a new M only looks up its bucket, it never compiles or tunes. Defaults:

* Hopper (sm90), fp16/bf16 GEMMs: 128x256x64 tiles, 8 warps, 3 stages, or 128x128x64 / 64x128x64 when
  the tile count gives a badly quantised last wave (a waves x tile-area model picks); GROUP_M = 8.
* Ampere/Ada (sm80/86/89): 128x128x32, 8 warps, 4 stages (64 KB of shared memory, so sm86/89 fit too).
* fp32: 64x128x32, 8 warps under IEEE (CUDA cores); under TF32 128x128x32 tiles (128x256 spill on sm90).
  On sm86/sm89 (``configs.consumer_sm8x``) the IEEE dW GEMM's 64x64x16 tile and the TF32 quantized decode
  and int8 tiles take 8 warps: with 4, ptxas spills 4-16 B there that it does not on sm80.
* Small M (decode, M <= 64): BLOCK_M = max(16, next_pow2(M)), narrower N tiles for more programs, K blocks
  of 128 bytes.
* Skinny passes (S, dY, dA) are memory-bound: 32-128 rows x 128-256 bytes of columns, 4-8 warps, 3-4
  stages; when a pass has fewer programs than ~4 waves, its reduction
  dimension is split over programs (fp32 partials). On sm90 the dY pass takes 256-row blocks where the GPU
  stays filled (``configs.WIDE_DY_ROWS``): half the dB partials.
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

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple

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
from .launch import Launch, cached, call_key, check_operands, device_guard, launch_env, seed_tensor, split_reduction

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

    keep = round(mix(row ^ mix(seed)) ^ col·φ) >= p·2³², with ``mix`` the full avalanche mixer and ``round``
    one xor-shift-multiply: a pure function of (seed, row, col). The per-row key is computed once per row of
    the tile, so an element costs one xor, one round and one compare.
    """
    threshold = tl.minimum(dropout_p * 4294967296.0, 4294967040.0).to(tl.uint32)
    seed_key = _mix32(seed.to(tl.uint32) ^ 0x3C6EF372)
    row_key = _mix32(rows.to(tl.uint32) ^ seed_key)
    col_key = cols.to(tl.uint32) * 0x9E3779B1
    # Per element, one xor-shift-multiply round is enough: the row key is already a full avalanche of
    # (seed, row), the column key a Weyl sequence, and the compare reads the product's top bits, which
    # depend on every input bit (the full mixer here cost ~15 instructions per element, this ~6).
    h = row_key[:, None] ^ col_key[None, :]
    h ^= h >> 16
    h *= 0x21F0AAAD
    return h >= threshold


@triton.jit
def _split_tiles(pid_s, tiles_per_split, size, BLOCK: tl.constexpr):
    """[start, end): the tiles of a reduced dimension of length ``size`` that split ``pid_s`` covers."""
    start = pid_s * tiles_per_split
    return start, tl.minimum(start + tiles_per_split, tl.cdiv(size, BLOCK))


@triton.jit(do_not_specialize=["M"])
def _dropout_mask_kernel(
    # pointers
    keep_ptr,
    # sizes
    M, K,
    # strides
    stride_keep_m, stride_keep_k,
    # run-time scalars (the seed is read from device memory: a CUDA graph replays a pointer, not a value)
    seed_ptr, dropout_p,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """keep (M, K) bool = keep(seed, row, col): the mask every kernel below regenerates, for tests."""
    seed = tl.load(seed_ptr)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, offs_m, offs_k, dropout_p)
    keep_ptrs = keep_ptr + offs_m[:, None].to(tl.int64) * stride_keep_m + offs_k[None, :].to(tl.int64) * stride_keep_k
    tl.store(keep_ptrs, keep, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit(do_not_specialize=["M"])
def _lora_down_kernel(
    # pointers
    x_ptr, lora_A_ptr, s_ptr,
    # sizes
    M, K, R,
    # strides
    stride_xm, stride_xk, stride_lora_A_r, stride_lora_A_k, stride_sm, stride_sr,
    # run-time scalars
    seed_ptr, dropout_p, inv_keep,
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
    # (BLOCK_K, BLOCK_R) = Aᵀ
    lora_At_ptrs = lora_A_ptr + offs_r[None, :].to(tl.int64) * stride_lora_A_r + ks[:, None] * stride_lora_A_k
    step_x = tl.full([], BLOCK_K, tl.int64) * stride_xk
    step_lora_A = tl.full([], BLOCK_K, tl.int64) * stride_lora_A_k

    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    # --- stream x once over K
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, offs_m, k0 + offs_k, dropout_p), x, 0.0)
        lora_At = tl.load(lora_At_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(x, lora_At, acc, input_precision=INPUT_PRECISION)
        x_ptrs += step_x
        lora_At_ptrs += step_lora_A

    # --- epilogue
    if HAS_DROPOUT:
        acc = acc * inv_keep
    s_ptrs = s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr
    tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & r_mask[None, :])


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program over cdiv(M, BLOCK_M) x cdiv(N, BLOCK_N) output tiles, ordered in groups
    of GROUP_M rows of tiles so that programs running together share operand tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (pid % num_pid_in_group) % group_size_m, (pid % num_pid_in_group) // group_size_m


@triton.jit
def _lora_term(l_ptr, r_ptr, rows, cols, offs_m, offs_n, R, stride_lm, stride_lr, stride_rr, stride_rn, lora_scale,
               seed_ptr, dropout_p, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """lora_scale · [keep ⊙] L[rows]·R[:, cols] as a (BLOCK_M, BLOCK_N) fp32 tile: the accumulator a LoRA GEMM
    starts from. L (M, R), R (R, N); keep(seed, offs_m, offs_n) over the output's (row, col)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
        acc = tl.where(_keep_mask(tl.load(seed_ptr), offs_m, offs_n, dropout_p), acc, 0.0)
    return acc


@triton.jit
def _dora_operands(a, col_scale_ptr, seed, offs_m, kk, k_mask, dropout_p, COL_SCALE: tl.constexpr,
                   DORA_DROPOUT: tl.constexpr):
    """The two A operands of one K step of a DoRA GEMM (:mod:`lora_kernels.ops.dora`), from the loaded tile
    ``a`` (BLOCK_M, BLOCK_K) whose global rows are ``offs_m`` and reduction indices ``kk``:

    * ``COL_SCALE == 2`` (dX, a = dY, the reduction runs over dY's columns): without dropout ``(c ⊙ dY, ·)``,
      the prologue dY' = c ⊙ dY; with dropout ``(dY, (c − 1) ⊙ dY)``;
    * ``COL_SCALE == 1`` (forward, a = x) with dropout: ``(x, keep ⊙ x)``, keep(seed, row, k) the mask of the
      S pass, regenerated here.

    c (fp32, one value per reduction index) scales in fp32 and the product is rounded to a's dtype once.
    """
    second = a
    if COL_SCALE == 2:
        c = tl.load(col_scale_ptr + kk, mask=k_mask, other=0.0)
        if DORA_DROPOUT:
            second = (a.to(tl.float32) * (c - 1.0)[None, :]).to(a.dtype)
        else:
            a = (a.to(tl.float32) * c[None, :]).to(a.dtype)
    elif DORA_DROPOUT:
        second = tl.where(_keep_mask(seed, offs_m, kk, dropout_p), a, 0.0)
    return a, second


@triton.jit
def _dora_epilogue(acc, acc_z, col_scale_ptr, z_ptr, offs_m, offs_n, cols, M, N, stride_zm, stride_zn, seed_ptr,
                   dropout_p, inv_keep, COL_SCALE: tl.constexpr, KEEP_Z: tl.constexpr, DORA_DROPOUT: tl.constexpr):
    """The DoRA epilogue on the fp32 accumulators of a (BLOCK_M, BLOCK_N) output tile, before the bias.

    Forward (``COL_SCALE == 1``, c over the output's columns), with u = s·S·Bᵀ:
        no dropout: acc = x·Wᵀ + u = Z;                        y = c ⊙ Z
        dropout:    acc = x·Wᵀ + u, acc_z = (1-p)·u + (keep ⊙ x)·Wᵀ;  Z = acc_z/(1-p);  y = acc + (c − 1) ⊙ Z
        and Z (M, N) is stored in z_ptr's dtype when ``KEEP_Z``.
    dX with dropout (``COL_SCALE == 2``): acc = dY·W, acc_z = dS·A + ((c − 1) ⊙ dY)·W;
        dX = acc + keep ⊙ acc_z/(1-p), keep(seed, row, col) over dX's (row, col) = x's.
    """
    if COL_SCALE == 1:
        c = tl.load(col_scale_ptr + cols)[None, :]  # cols are wrapped: in bounds
        if DORA_DROPOUT:
            z = acc_z * inv_keep
            acc = acc + (c - 1.0) * z
        else:
            z = acc
            acc = acc * c
        if KEEP_Z:
            z_ptrs = z_ptr + offs_m[:, None].to(tl.int64) * stride_zm + offs_n[None, :].to(tl.int64) * stride_zn
            tl.store(z_ptrs, z.to(z_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    elif DORA_DROPOUT:
        acc += tl.where(_keep_mask(tl.load(seed_ptr), offs_m, offs_n, dropout_p), acc_z * inv_keep, 0.0)
    return acc


@triton.jit
def _dora_start(acc, dropout_p, COL_SCALE: tl.constexpr):
    """The DoRA GEMMs' two accumulators with dropout, from the LoRA term ``acc``: forward (COL_SCALE 1)
    (u, (1-p)·u), so that Z = acc_z/(1-p) = x̃·Wᵀ + u; dX (COL_SCALE 2) (0, dS·A)."""
    if COL_SCALE == 1:
        return acc, acc * (1.0 - dropout_p)
    return tl.zeros_like(acc), acc


@triton.jit
def _lora_matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, bias_ptr, l_ptr, r_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_bias,
    stride_lm, stride_lr, stride_rr, stride_rn,
    # run-time scalars
    lora_scale, seed_ptr, dropout_p,
    # DoRA (read only under COL_SCALE / DORA_DROPOUT): column scale c (fp32), Z (M, N) output, 1/(1-p)
    col_scale_ptr, z_ptr, stride_zm, stride_zn, inv_keep,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COL_SCALE: tl.constexpr, KEEP_Z: tl.constexpr, DORA_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """C (M, N) = lora_scale · [keep ⊙] (L·Rᵀᵀ) + A·B [+ bias], all in one fp32 accumulator.

    A (M, K), B (K, N), L (M, R), R (R, N), bias (N,), keep(seed, row, col) over C's (row, col).
    Uses: forward y = s·S·Bᵀ + x·Wᵀ + b; input gradient dX = keep ⊙ (dS·A)/(1-p) + dY·W; weight
    gradient dW = dYᵀ·x (no LoRA term). The LoRA term is computed first so the accumulator starts at it
    and the output is written once. Grid: cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N), grouped by GROUP_M rows
    of tiles for L2 reuse.

    DoRA (:mod:`lora_kernels.ops.dora`; all off for LoRA, which then compiles to the same code): a column
    scale c (N,) fp32 applied in the epilogue (``COL_SCALE == 1``, forward, Z = the pre-scale accumulator
    stored when ``KEEP_Z``) or as a prologue on A's columns (``COL_SCALE == 2``, dX: dY' = c ⊙ dY), and with
    ``DORA_DROPOUT`` a second accumulator over the same B tiles (see ``_dora_operands``/``_dora_epilogue``).
    """
    # --- tile coordinates, grouped ordering
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrapped: loads stay in bounds without masks on M and N; the store drops the wrapped rows/columns.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)

    # --- LoRA term: the accumulator starts at lora_scale · [keep ⊙] L·R
    if HAS_LORA:
        acc = _lora_term(l_ptr, r_ptr, rows, cols, offs_m, offs_n, R, stride_lm, stride_lr, stride_rr, stride_rn,
                         lora_scale, seed_ptr, dropout_p, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_R, INPUT_PRECISION)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_z = acc
    seed = 0
    if DORA_DROPOUT:
        acc, acc_z = _dora_start(acc, dropout_p, COL_SCALE)
        seed = tl.load(seed_ptr)

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
        if COL_SCALE == 2 or DORA_DROPOUT:
            a, a_second = _dora_operands(a, col_scale_ptr, seed, offs_m, k0 + offs_k, k_mask, dropout_p, COL_SCALE,
                                         DORA_DROPOUT)
            if DORA_DROPOUT:
                acc_z = tl.dot(a_second, b, acc_z, input_precision=INPUT_PRECISION)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += step_a
        b_ptrs += step_b

    # --- epilogue
    if COL_SCALE == 1 or DORA_DROPOUT:
        acc = _dora_epilogue(acc, acc_z, col_scale_ptr, z_ptr, offs_m, offs_n, cols, M, N, stride_zm, stride_zn,
                             seed_ptr, dropout_p, inv_keep, COL_SCALE, KEEP_Z, DORA_DROPOUT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["M"])
def _lora_dy_kernel(
    # pointers
    grad_y_ptr, lora_B_ptr, s_ptr, grad_s_ptr, grad_lora_B_ptr, grad_bias_ptr,
    # sizes
    M, N, R, tiles_per_split,
    # strides
    stride_grad_y_m, stride_grad_y_n, stride_lora_B_n, stride_lora_B_r, stride_sm, stride_sr,
    stride_grad_s_p, stride_grad_s_m, stride_grad_s_r,
    stride_grad_lora_B_p, stride_grad_lora_B_n, stride_grad_lora_B_r, stride_grad_bias_p, stride_grad_bias_n,
    # run-time scalars
    scaling,
    # DoRA (read only under HAS_COL_SCALE / COMPUTE_GRAD_COL_SCALE): c (N,) fp32, Z (M, N), dc partials (·, N)
    col_scale_ptr, z_ptr, grad_col_scale_ptr, stride_zm, stride_zn, stride_grad_col_scale_p,
    stride_grad_col_scale_n,
    # meta-parameters
    COMPUTE_GRAD_S: tl.constexpr, COMPUTE_GRAD_LORA_B: tl.constexpr, COMPUTE_GRAD_BIAS: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr, COMPUTE_GRAD_COL_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One pass over dY (M, N) gives, for a block of BLOCK_M rows and one split of dY's columns:

        dS[split]      (M, R) += s · dY·B       B = lora_B (N, R); summed over splits afterwards
        dB[m-block]    (N, R)  = s · dYᵀ·S      grad_lora_B; S (M, R) from the forward; summed over m-blocks
        dbias[m-block] (N,)    = Σ_rows dY      grad_bias; summed over m-blocks afterwards

    Grid (cdiv(M, BLOCK_M), number of column splits, cdiv(R, BLOCK_R)); a split covers ``tiles_per_split``
    column tiles. Partial sums go to fp32 workspaces (or straight to the output when there is one), never
    through atomics, so the result is deterministic.

    DoRA (:mod:`lora_kernels.ops.dora`): with ``HAS_COL_SCALE`` the two MMAs take dY' = c ⊙ dY (a prologue on
    each dY tile, c (N,) fp32), so dS = s·dY'·B and dB = s·dY'ᵀ·S, while dbias stays Σ_rows dY; with
    ``COMPUTE_GRAD_COL_SCALE`` the same dY tile gives dc[m-block] (N,) = Σ_rows dY ⊙ Z (fp32 partials),
    Z (M, N) the forward's pre-scale output.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask = offs_m < M  # rows are masked (not wrapped): they are reduced over for dB and dbias
    r_mask = offs_r < R
    rows = offs_m.to(tl.int64)
    # Workspace offsets in int64: a partial-sum buffer holds (M-blocks x N x R) or (splits x M x R) values,
    # which passes 2³¹ at long sequences and wide layers (8192 M-blocks x 4096 x 64, say).
    block_m64 = pid_m.to(tl.int64)
    split64 = pid_s.to(tl.int64)
    if COMPUTE_GRAD_LORA_B:
        s = tl.load(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)

    # --- stream this split's column tiles of dY once
    grad_s_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    t_start, t_end = _split_tiles(pid_s, tiles_per_split, N, BLOCK_N)
    for t in range(t_start, t_end):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        cols = offs_n.to(tl.int64)
        grad_y = tl.load(grad_y_ptr + rows[:, None] * stride_grad_y_m + cols[None, :] * stride_grad_y_n,
                         mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        grad_y_mma = grad_y  # the MMAs' operand: dY, or dY' = c ⊙ dY for DoRA
        if HAS_COL_SCALE:
            col_scale = tl.load(col_scale_ptr + cols, mask=n_mask, other=0.0)
            grad_y_mma = (grad_y.to(tl.float32) * col_scale[None, :]).to(grad_y.dtype)
        if COMPUTE_GRAD_S:
            lora_B = tl.load(lora_B_ptr + cols[:, None] * stride_lora_B_n + offs_r[None, :] * stride_lora_B_r,
                             mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            grad_s_acc = tl.dot(grad_y_mma, lora_B, grad_s_acc, input_precision=INPUT_PRECISION)
        if COMPUTE_GRAD_LORA_B:
            grad_lora_B = tl.dot(tl.trans(grad_y_mma), s, input_precision=INPUT_PRECISION) * scaling
            grad_lora_B_ptrs = (grad_lora_B_ptr + block_m64 * stride_grad_lora_B_p
                                + cols[:, None] * stride_grad_lora_B_n + offs_r[None, :] * stride_grad_lora_B_r)
            tl.store(grad_lora_B_ptrs, grad_lora_B.to(grad_lora_B_ptr.dtype.element_ty),
                     mask=n_mask[:, None] & r_mask[None, :])
        if COMPUTE_GRAD_BIAS:
            if pid_r == 0:
                grad_bias = tl.sum(grad_y.to(tl.float32), axis=0)
                tl.store(grad_bias_ptr + block_m64 * stride_grad_bias_p + cols * stride_grad_bias_n,
                         grad_bias.to(grad_bias_ptr.dtype.element_ty), mask=n_mask)
        if COMPUTE_GRAD_COL_SCALE:
            if pid_r == 0:
                z = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :] * stride_zn,
                            mask=m_mask[:, None] & n_mask[None, :], other=0.0)
                grad_col_scale = tl.sum(grad_y.to(tl.float32) * z.to(tl.float32), axis=0)
                tl.store(grad_col_scale_ptr + block_m64 * stride_grad_col_scale_p + cols * stride_grad_col_scale_n,
                         grad_col_scale, mask=n_mask)

    # --- epilogue
    if COMPUTE_GRAD_S:
        grad_s_ptrs = (grad_s_ptr + split64 * stride_grad_s_p + rows[:, None] * stride_grad_s_m
                       + offs_r[None, :] * stride_grad_s_r)
        tl.store(grad_s_ptrs, (grad_s_acc * scaling).to(grad_s_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & r_mask[None, :])


@triton.jit(do_not_specialize=["M"])
def _lora_da_kernel(
    # pointers
    grad_s_ptr, x_ptr, grad_lora_A_ptr,
    # sizes
    M, K, R, tiles_per_split,
    # strides
    stride_grad_s_m, stride_grad_s_r, stride_xm, stride_xk,
    stride_grad_lora_A_p, stride_grad_lora_A_r, stride_grad_lora_A_k,
    # run-time scalars
    seed_ptr, dropout_p, inv_keep,
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

    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    # --- stream this split's row tiles of x and dS once
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    t_start, t_end = _split_tiles(pid_s, tiles_per_split, M, BLOCK_M)
    for t in range(t_start, t_end):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        rows = offs_m.to(tl.int64)
        grad_s = tl.load(grad_s_ptr + rows[:, None] * stride_grad_s_m + offs_r[None, :] * stride_grad_s_r,
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, offs_m, offs_k, dropout_p), x, 0.0)
        acc = tl.dot(tl.trans(grad_s), x, acc, input_precision=INPUT_PRECISION)

    # --- epilogue
    if HAS_DROPOUT:
        acc = acc * inv_keep
    grad_lora_A_ptrs = (grad_lora_A_ptr + pid_s.to(tl.int64) * stride_grad_lora_A_p
                        + offs_r[:, None] * stride_grad_lora_A_r + offs_k[None, :].to(tl.int64) * stride_grad_lora_A_k)
    tl.store(grad_lora_A_ptrs, acc.to(grad_lora_A_ptr.dtype.element_ty), mask=r_mask[:, None] & (offs_k[None, :] < K))


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
#
# A call does little more than its launches: each configuration is planned once (configs, grids, splits,
# workspace shapes, integer arguments, compiled kernels) and cached; lora_kernels.ops.launch holds that
# machinery, shared with lora_kernels.ops.quantized.

NO_DORA = (0, False, False)  # a LoRA GEMM: (COL_SCALE, KEEP_Z, DORA_DROPOUT) off


def _matmul_launch(m: int, n: int, k: int, rank: int, *, has_bias: bool, has_lora: bool, has_dropout: bool,
                   config: KernelConfig, max_block_r: int, precision: str,
                   tune: Optional[Tuple[tuple, Callable[[KernelConfig], None]]] = None,
                   dora: Tuple[int, bool, bool] = NO_DORA) -> Launch:
    """The launch of ``_lora_matmul_kernel`` for C (m, n) over a reduction of k (see its docstring);
    ``dora`` = (COL_SCALE, KEEP_Z, DORA_DROPOUT), all off for LoRA. Its run-time arguments end with
    :func:`_gemm_tail`'s."""
    if tune is not None and _configs._OVERRIDE is None:
        config = _tuned_gemm(tune[0] + (has_lora, has_dropout, has_bias) + tuple(dora), config, tune[1])
    col_scale, keep_z, dora_dropout = dora
    return Launch(_lora_matmul_kernel, (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),), dict(
        HAS_BIAS=has_bias, HAS_LORA=has_lora, HAS_DROPOUT=has_dropout,
        COL_SCALE=col_scale, KEEP_Z=keep_z, DORA_DROPOUT=dora_dropout,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_R=_rank_block(max(rank, 1), max_block_r), GROUP_M=config.group_m, INPUT_PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages))


def _sum_launch(numels: Sequence[int]) -> Optional[Launch]:
    """The launch that sums up to three (count, numel) fp32 workspaces into their outputs, or None."""
    numels = [n for n in numels if n > 0]
    if not numels:
        return None
    assert len(numels) <= 3, f"at most three workspaces per launch, got {len(numels)}"
    block = 1024
    return Launch(_sum_partials_kernel, (sum(triton.cdiv(n, block) for n in numels),), dict(BLOCK=block))


def _sum_args(jobs: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> list:
    """The arguments of a ``_sum_launch`` for (workspace (count, *shape), out) pairs; unused slots are empty."""
    args = []
    for i in range(3):
        p, o = jobs[i] if i < len(jobs) else jobs[0]
        args += [p, o, p.shape[0], o.numel() if i < len(jobs) else 0]
    return args


@dataclasses.dataclass(frozen=True)
class DoRAFlags:
    """What a DoRA call (:mod:`lora_kernels.ops.dora`) adds to a plan: the forward keeps Z = x̃·Wᵀ + s·S·Bᵀ
    (``keep_z``), the backward computes dc = Σ_rows dY ⊙ Z (``need_grad_col_scale``)."""

    keep_z: bool = False
    need_grad_col_scale: bool = False


def _gemm_tail(placeholder: torch.Tensor, seed, dropout_p: float, col_scale: Optional[torch.Tensor] = None,
               z: Optional[torch.Tensor] = None) -> tuple:
    """The last run-time arguments of a GEMM launch: seed_ptr, dropout_p, col_scale_ptr, z_ptr, stride_zm,
    stride_zn, inv_keep (``placeholder`` stands for a pointer the kernel does not read)."""
    return (seed if dropout_p > 0 else placeholder, float(dropout_p),
            col_scale if col_scale is not None else placeholder, z if z is not None else placeholder,
            *(z.stride() if z is not None else (0, 0)), 1.0 / (1.0 - dropout_p))


def _dy_tail(placeholder: torch.Tensor, col_scale: Optional[torch.Tensor], z: Optional[torch.Tensor],
             grad_col_scale_ws: Optional[torch.Tensor]) -> tuple:
    """The DoRA run-time arguments of the dY pass: col_scale_ptr, z_ptr, grad_col_scale_ptr, the strides of Z
    and of the dc workspace (count, N) (``placeholder`` for what it does not read)."""
    return (col_scale if col_scale is not None else placeholder, z if z is not None else placeholder,
            grad_col_scale_ws if grad_col_scale_ws is not None else placeholder,
            *(z.stride() if z is not None else (0, 0)),
            *((grad_col_scale_ws.shape[-1], 1) if grad_col_scale_ws is not None else (0, 0)))


_FORWARD_PLANS: Dict[tuple, "_ForwardPlan"] = {}
_BACKWARD_PLANS: Dict[tuple, "_BackwardPlan"] = {}


def clear_plans() -> None:
    """Forget every cached launch plan (configs changed under them, or to free their compiled handles)."""
    _FORWARD_PLANS.clear()
    _BACKWARD_PLANS.clear()


def _consumer_fp32(t: torch.Tensor) -> bool:
    """An fp32 tensor on sm86/sm89 (``configs.consumer_sm8x``), where a few DoRA tiles that fit sm80 spill."""
    return t.dtype == torch.float32 and _configs.consumer_sm8x(_configs._device_info(t.device)[0])


def _dora_gemm_config(config: KernelConfig, dora_dropout: bool, dtype: torch.dtype) -> KernelConfig:
    """A DoRA GEMM with dropout carries two fp32 accumulators: N tiles of at most 128 (two 128x256 ones
    would need 256 registers per thread at 8 warps), 64 in IEEE fp32, whose CUDA-core dots also keep their
    operands in registers: N tiles of 64 and K blocks of 16 there (64x128x32 tiles spilled 632 B on sm90,
    64x64x32 ones 40-204 B). TF32 takes N tiles of 64 too: its 128x128x32 forward tiles, dense and int8,
    spilled 512-584 B on sm80 (fp32 operands: twice the registers of fp16's per mma.sync)."""
    if not dora_dropout:
        return config
    if dtype == torch.float32 and _input_precision(dtype) == "ieee":
        return dataclasses.replace(config, block_n=min(config.block_n, 64), block_k=min(config.block_k, 16))
    return dataclasses.replace(config, block_n=min(config.block_n, 64 if dtype == torch.float32 else 128))


class _ForwardPlan:
    """The launches of one forward configuration: S = (keep ⊙ x)·Aᵀ/(1-p), then y = s·S·Bᵀ + x·Wᵀ + b; for
    DoRA (``dora`` given) the GEMM also applies the column scale and keeps Z (:mod:`lora_kernels.ops.dora`)."""

    def __init__(self, x, weight, bias, lora_A, lora_B, has_dropout: bool, dora: Optional[DoRAFlags] = None):
        m, k = x.shape
        n, rank = weight.shape[0], lora_A.shape[0]
        self.m, self.n, self.k, self.rank = m, n, k, rank
        self.dora, self.has_dropout = dora, has_dropout
        # (COL_SCALE, KEEP_Z, DORA_DROPOUT) of the GEMM: the column scale in the epilogue
        self.gemm_dora = NO_DORA if dora is None else (1, dora.keep_z, has_dropout)
        cfgs = kernel_configs(x.device, x.dtype, m, n, k, rank)
        precision = _input_precision(x.dtype)
        self.down = None
        if k > 0:
            cfg, block_r = cfgs.down, _rank_block(rank, cfgs.max_block_r)
            self.down = Launch(_lora_down_kernel, (triton.cdiv(m, cfg.block_m), triton.cdiv(rank, block_r)), dict(
                HAS_DROPOUT=has_dropout, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
                INPUT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            # sizes and strides of x (M, K), A (r, K) and S (M, r), S contiguous
            self.down_ints = (m, k, rank, *x.stride(), *lora_A.stride(), rank, 1)
        self.matmul = None
        if n > 0:
            self._plan_base(x, weight, bias, lora_B, cfgs, precision)

    def _plan_base(self, x, weight, bias, lora_B, cfgs, precision) -> None:
        """Plans the GEMM y = s·S·Bᵀ + x·Wᵀ + b (a subclass plans another kind of W: ops.quantized)."""
        m, n, k, rank = self.m, self.n, self.k, self.rank
        # a = x (M, K), b = Wᵀ (K, N), c = y (M, N) contiguous, bias (N,), L = S (M, r), R = Bᵀ (r, N)
        self.matmul_ints = (m, n, k, rank, x.stride(0), x.stride(1), weight.stride(1), weight.stride(0), n, 1,
                            bias.stride(0) if bias is not None else 0, rank, 1,
                            lora_B.stride(1), lora_B.stride(0))
        tune = None
        if _autotune_enabled(x.device):
            tune = (("forward", x.device, x.dtype, _bucket(m), n, k),
                    lambda cfg: self._launch_with(cfg, x, weight, bias, lora_B, cfgs.forward_block_cap(rank)))
        self.matmul = _matmul_launch(m, n, k, rank, has_bias=bias is not None, has_lora=True,
                                     has_dropout=False, config=_dora_gemm_config(cfgs.forward, self.gemm_dora[2], x.dtype),
                                     max_block_r=cfgs.forward_block_cap(rank),
                                     precision=precision, tune=tune, dora=self.gemm_dora)

    def _launch_with(self, cfg, x, weight, bias, lora_B, max_block_r) -> None:
        """One forward GEMM with tile ``cfg`` on scratch outputs (autotuning times this)."""
        y = torch.empty((self.m, self.n), device=x.device, dtype=x.dtype)
        s = torch.zeros((self.m, self.rank), device=x.device, dtype=x.dtype)
        launch = _matmul_launch(self.m, self.n, self.k, self.rank, has_bias=bias is not None, has_lora=True,
                                has_dropout=False, config=_dora_gemm_config(cfg, self.gemm_dora[2], x.dtype),
                                max_block_r=max_block_r, precision=_input_precision(x.dtype), dora=self.gemm_dora)
        c = torch.ones((self.n,), device=x.device, dtype=torch.float32) if self.dora is not None else None
        launch(x, weight, y, bias if bias is not None else y, s, lora_B, *self.matmul_ints, 1.0,
               *_gemm_tail(y, torch.zeros((1,), device=x.device, dtype=torch.int64), 0.5 if self.gemm_dora[2] else 0.0,
                           c, y if self.gemm_dora[1] else None))

    def __call__(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale=None):
        """``(y, S)``, or for DoRA ``(y, S, Z or None)`` with ``col_scale`` c (N,) fp32."""
        y = torch.empty((self.m, self.n), device=x.device, dtype=x.dtype)
        s = torch.empty((self.m, self.rank), device=x.device, dtype=x.dtype)
        z = None
        if self.dora is not None and self.dora.keep_z:
            z = torch.empty((self.m, self.n), device=x.device, dtype=x.dtype)
        env = launch_env()
        if self.down is not None:
            self.down.run(env, x, lora_A, s, *self.down_ints, seed if dropout_p > 0 else x, float(dropout_p),
                      1.0 / (1.0 - dropout_p))
        else:
            s.zero_()
        if isinstance(scaling, torch.Tensor):  # a mixed batch: S' = S ⊙ Scale is kept, the GEMM scales by 1
            s.mul_(scaling)
            scaling = 1.0
        if self.matmul is not None:  # LoRA's GEMM never reads the mask; DoRA's does, with dropout
            tail = _gemm_tail(y, seed, dropout_p if self.gemm_dora[2] else 0.0, col_scale, z)
            self._run_base(env, x, weight, bias, lora_B, y, s, scaling, tail)
        return (y, s) if self.dora is None else (y, s, z)

    def _run_base(self, env, x, weight, bias, lora_B, y, s, scaling, tail) -> None:
        """Launches the planned GEMM y = s·S·Bᵀ + x·Wᵀ + b (``tail``: :func:`_gemm_tail`'s arguments)."""
        self.matmul.run(env, x, weight, y, bias if bias is not None else y, s, lora_B, *self.matmul_ints,
                        float(scaling), *tail)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: two launches, y written once.

    Args:
        x: (M, K), any strides. weight: (N, K). bias: (N,) or None. lora_A: (r, K). lora_B: (N, r).
            All in one floating dtype.
        scaling: the LoRA scale s (run-time, no recompilation), or an (M, r) / (1, r) tensor of per-(row,
            rank-column) scales for a mixed batch (:mod:`lora_kernels.mixed`): S is then returned scaled,
            S' = S ⊙ scaling, and the GEMM adds S'·Bᵀ. dropout_p: drop probability in [0, 1).
        seed: dropout seed, a one-element int64 tensor on x's device (or an int); the mask is
            ``dropout_mask(seed, (M, K), dropout_p, x.device)``.

    Returns:
        ``y`` (M, N) = x·Wᵀ + b + s·S·Bᵀ and ``S`` (M, r) = (keep ⊙ x)·Aᵀ/(1-p), both in x's dtype.

    Raises:
        ValueError / TypeError: shapes or dtypes do not fit.
    """
    check_operands(x, weight, lora_A, lora_B)
    if x.shape[0] == 0:
        return (torch.empty((0, weight.shape[0]), device=x.device, dtype=x.dtype),
                torch.empty((0, lora_A.shape[0]), device=x.device, dtype=x.dtype))
    has_dropout = dropout_p > 0
    key = call_key("forward", x.device, x.dtype, (x, weight, bias, lora_A, lora_B), (has_dropout,))
    plan = cached(_FORWARD_PLANS, key, lambda: _ForwardPlan(x, weight, bias, lora_A, lora_B, has_dropout))
    with device_guard(x):
        return plan(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                    seed_tensor(seed, x.device) if has_dropout else None)


class _BackwardPlan:
    """The launches of one backward configuration (see the module docstring): the dY pass, [dS partial sums],
    the dX GEMM, the dA pass, [dB/dbias/dA partial sums], [the dW GEMM]. For DoRA (``dora`` given,
    :mod:`lora_kernels.ops.dora`) the dY pass and the dX GEMM take dY' = c ⊙ dY, and the dY pass also
    gives dc = Σ_rows dY ⊙ Z (summed with the dS partials); the dW GEMM stays dYᵀ·x."""

    def __init__(self, grad_y, x, weight, lora_A, lora_B, s, needs: Tuple[bool, ...], has_dropout: bool,
                 dora: Optional[DoRAFlags] = None):
        need_x, need_weight, need_bias, need_lora_A, need_lora_B = needs
        m, n = grad_y.shape
        rank, k = lora_A.shape
        device, dtype = grad_y.device, lora_A.dtype
        self.m, self.n, self.k, self.rank, self.needs = m, n, k, rank, needs
        self.dora, self.has_dropout = dora, has_dropout
        need_grad_col_scale = dora is not None and dora.need_grad_col_scale
        cfgs = kernel_configs(device, dtype, m, n, k, rank)
        precision = _input_precision(dtype)
        self.need_grad_s = need_x or need_lora_A

        # --- the dY pass: dS (split over dY's columns), dB, dbias and DoRA's dc (partials per row block)
        self.grad_y_pass = None
        self.grad_s_sum = None
        if self.need_grad_s or need_lora_B or need_bias or need_grad_col_scale:
            # DoRA's dY pass also holds c ⊙ dY and a Z tile: rank blocks of 64 spilled 48 B at 4 warps on sm80.
            # In fp32 on sm86/sm89, 4 B spilled at 32x32 tiles (4 and 8 warps) and at rank blocks of 32 (8 warps,
            # 128 registers): 32x16 tiles, rank blocks of 16 and 8 warps there.
            max_block_r = cfgs.max_block_r if dora is None else min(cfgs.max_block_r, 32)
            consumer_fp32 = dora is not None and _consumer_fp32(grad_y)
            cfg, block_r = cfgs.grad_output_pass, _rank_block(rank, 16 if consumer_fp32 else max_block_r)
            if consumer_fp32:
                cfg = dataclasses.replace(cfg, block_n=min(cfg.block_n, 16), num_warps=max(cfg.num_warps, 8))
            elif dora is not None and grad_y.element_size() == 2 and cfg.block_m > 64:
                # sm90's 128- and 256-row 16-bit blocks spilled 4-248 B with the DoRA tiles (the full sweep):
                # DoRA takes sm8x's 64 rows and 4 warps there
                cfg = dataclasses.replace(cfg, block_m=64, num_warps=4)
            m_blocks, r_blocks = triton.cdiv(m, cfg.block_m), triton.cdiv(rank, block_r)
            splits, tiles_per_split = split_reduction(m_blocks * r_blocks, triton.cdiv(n, cfg.block_n),
                                                      cfgs.target_programs, cfgs.min_split_tiles)
            self.grad_s_count, self.grad_lora_B_count, self.grad_bias_count = splits, m_blocks, m_blocks
            self.grad_y_pass = Launch(_lora_dy_kernel, (m_blocks, splits, r_blocks), dict(
                COMPUTE_GRAD_S=self.need_grad_s, COMPUTE_GRAD_LORA_B=need_lora_B, COMPUTE_GRAD_BIAS=need_bias,
                HAS_COL_SCALE=dora is not None, COMPUTE_GRAD_COL_SCALE=need_grad_col_scale,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r, INPUT_PRECISION=precision,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            # sizes, then the strides of dY, B, S, and of the three workspaces: (count, M, r), (count, N, r) and
            # (count, N), contiguous whether they are fp32 partials or the outputs themselves (count 1)
            s_strides = s.stride() if need_lora_B else (0, 0)
            self.grad_y_pass_ints = (m, n, rank, tiles_per_split, *grad_y.stride(), *lora_B.stride(), *s_strides,
                                     m * rank, rank, 1, n * rank, rank, 1, n, 1)
            # the dS partials and dc's (complete after this pass), summed in one launch
            self.grad_s_sum = _sum_launch([m * rank] * (self.need_grad_s and splits > 1)
                                          + [n] * (need_grad_col_scale and m_blocks > 1))

        # --- dX = keep ⊙ (dS·A)/(1-p) + dY·W
        self.grad_x_gemm = None
        if need_x and k > 0:
            self._plan_grad_input(grad_y, weight, lora_A, cfgs, precision, has_dropout)

        # --- dA = dSᵀ·(keep ⊙ x)/(1-p), rows split over programs
        self.grad_lora_A_pass = None
        self.grad_lora_A_count = 1
        if need_lora_A and k > 0:
            cfg, block_r = cfgs.grad_a, _rank_block(rank, cfgs.max_block_r)
            k_blocks, r_blocks = triton.cdiv(k, cfg.block_k), triton.cdiv(rank, block_r)
            splits, tiles_per_split = split_reduction(k_blocks * r_blocks, triton.cdiv(m, cfg.block_m),
                                                      cfgs.target_programs, cfgs.min_split_tiles)
            self.grad_lora_A_count = splits
            self.grad_lora_A_pass = Launch(_lora_da_kernel, (k_blocks, r_blocks, splits), dict(
                HAS_DROPOUT=has_dropout, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
                INPUT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            self.grad_lora_A_ints = (m, k, rank, tiles_per_split, rank, 1, x.stride(0), x.stride(1), rank * k, k, 1)

        # --- one launch sums the dB, dbias and dA partials
        tail = []
        if self.grad_y_pass is not None and need_lora_B and self.grad_lora_B_count > 1:
            tail.append(n * rank)
        if self.grad_y_pass is not None and need_bias and self.grad_bias_count > 1:
            tail.append(n)
        if self.grad_lora_A_pass is not None and self.grad_lora_A_count > 1:
            tail.append(rank * k)
        self.tail_sum = _sum_launch(tail)

        # --- dW = dYᵀ·x, only for a trainable base
        self.grad_weight_gemm = None
        if need_weight and n > 0 and k > 0:
            tune = None
            if _autotune_enabled(device):
                tune = (("grad_weight", device, dtype, n, k, _bucket(m)),
                        self._scratch_gemm(grad_y, x, k, grad_weight=True))
            self.grad_weight_gemm = _matmul_launch(n, k, m, 0, has_bias=False, has_lora=False, has_dropout=False,
                                                   config=cfgs.grad_weight, max_block_r=cfgs.max_block_r,
                                                   precision=precision, tune=tune)
            self.grad_weight_ints = (n, k, m, 0, grad_y.stride(1), grad_y.stride(0), x.stride(0), x.stride(1), k, 1,
                                     0, 0, 0, 0, 0)

    def _plan_grad_input(self, grad_y, weight, lora_A, cfgs, precision, has_dropout) -> None:
        """Plans the dX GEMM keep ⊙ (dS·A)/(1-p) + dY·W (a subclass plans another kind of W: ops.quantized)."""
        m, n, k, rank, device, dtype = self.m, self.n, self.k, self.rank, grad_y.device, lora_A.dtype
        tune = None
        if _autotune_enabled(device):
            tune = (("grad_input", device, dtype, _bucket(m), k, n), self._scratch_gemm(grad_y, weight, k))
        dora = self._grad_input_dora()
        max_block_r = cfgs.grad_input_block_cap()
        if dora[2] and _consumer_fp32(grad_y):  # two accumulators: a TF32 rank block of 32 spilled 4 B on sm86/89
            max_block_r = min(max_block_r, 16)
        self.grad_x_gemm = _matmul_launch(m, k, n, rank, has_bias=False, has_lora=True,
                                          has_dropout=has_dropout and self.dora is None,
                                          config=_dora_gemm_config(cfgs.grad_input, dora[2], dtype),
                                          max_block_r=max_block_r, precision=precision, tune=tune, dora=dora)
        self.grad_x_ints = (m, k, n, rank, grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
                            k, 1, 0, rank, 1, lora_A.stride(0), lora_A.stride(1))

    def _grad_input_dora(self) -> Tuple[int, bool, bool]:
        """(COL_SCALE, KEEP_Z, DORA_DROPOUT) of the dX GEMM: DoRA's prologue dY' = c ⊙ dY, and with dropout
        the masked second accumulator (which replaces the LoRA term's own mask)."""
        return NO_DORA if self.dora is None else (2, False, self.has_dropout)

    @staticmethod
    def _scratch_gemm(grad_y, other, k, grad_weight=False):
        """A launcher of a plain GEMM with tile ``cfg`` on a scratch output, for autotuning."""
        def launch(cfg):
            if grad_weight:  # dYᵀ (N, M) · x (M, K)
                m_, n_, red = grad_y.shape[1], k, grad_y.shape[0]
                strides = (grad_y.stride(1), grad_y.stride(0), other.stride(0), other.stride(1))
            else:  # dY (M, N) · W (N, K)
                m_, n_, red = grad_y.shape[0], k, grad_y.shape[1]
                strides = (grad_y.stride(0), grad_y.stride(1), other.stride(0), other.stride(1))
            c = torch.empty((m_, n_), device=grad_y.device, dtype=grad_y.dtype)
            _matmul_launch(m_, n_, red, 0, has_bias=False, has_lora=False, has_dropout=False, config=cfg,
                           max_block_r=64, precision=_input_precision(grad_y.dtype))(
                grad_y, other, c, c, c, c, m_, n_, red, 0, *strides, n_, 1, 0, 0, 0, 0, 0, 1.0, *_gemm_tail(c, None, 0.0))
        return launch

    def __call__(self, grad_y, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, col_scale=None, z=None):
        """The five LoRA gradients, and for DoRA dc (N,) fp32 (None unless planned) as a sixth."""
        need_x, need_weight, need_bias, need_lora_A, need_lora_B = self.needs
        need_grad_col_scale = self.dora is not None and self.dora.need_grad_col_scale
        m, n, k, rank = self.m, self.n, self.k, self.rank
        grad_col_scale = torch.empty((n,), device=grad_y.device, dtype=torch.float32) if need_grad_col_scale else None
        device, dtype = grad_y.device, lora_A.dtype
        inv_keep = 1.0 / (1.0 - dropout_p)
        grad_x = grad_weight = grad_bias = grad_lora_A = grad_lora_B = None
        grad_s = torch.empty((m, rank), device=device, dtype=dtype) if self.need_grad_s else None
        if need_lora_B:
            grad_lora_B = torch.empty((n, rank), device=device, dtype=dtype)
        if need_bias:
            grad_bias = torch.empty((n,), device=device, dtype=dtype)
        tail = []
        env = launch_env()

        if self.grad_y_pass is not None:  # an output the pass does not compute gets dY as a placeholder pointer
            grad_lora_B_ws = (self._workspace(self.grad_lora_B_count, (n, rank), grad_lora_B, tail) if need_lora_B
                              else grad_y)
            grad_bias_ws = self._workspace(self.grad_bias_count, (n,), grad_bias, tail) if need_bias else grad_y
            first = []  # summed right after the pass: dS's and dc's partials
            grad_s_ws = self._workspace(self.grad_s_count, (m, rank), grad_s, first) if self.need_grad_s else grad_y
            grad_col_scale_ws = (self._workspace(self.grad_bias_count, (n,), grad_col_scale, first)
                                 if need_grad_col_scale else None)
            # A tensor scaling (mixed batch): dB = dYᵀ·S' at scale 1 (S' already scaled), dS' = (dY·B) ⊙ Scale.
            mixed = isinstance(scaling, torch.Tensor)
            self.grad_y_pass.run(env, grad_y, lora_B, s if need_lora_B else grad_y, grad_s_ws, grad_lora_B_ws,
                                 grad_bias_ws, *self.grad_y_pass_ints, 1.0 if mixed else float(scaling),
                                 *_dy_tail(grad_y, col_scale, z if need_grad_col_scale else None, grad_col_scale_ws))
            if self.grad_s_sum is not None:
                self.grad_s_sum.run(env, *_sum_args(first))
            if mixed and grad_s is not None:
                grad_s.mul_(scaling)

        if need_x:
            grad_x = torch.empty((m, k), device=device, dtype=dtype)
            if self.grad_x_gemm is not None:
                if self.dora is None:  # LoRA: the LoRA term keep ⊙ (dS·A)/(1-p) is masked and scaled itself
                    lora_scale, tail_ = inv_keep if dropout_p > 0 else 1.0, _gemm_tail(grad_x, seed, dropout_p)
                else:  # DoRA: c and the mask enter through the prologue and the second accumulator
                    lora_scale, tail_ = 1.0, _gemm_tail(grad_x, seed, dropout_p, col_scale)
                self._run_grad_input(env, grad_y, weight, grad_x, grad_s, lora_A, lora_scale, tail_)

        if need_lora_A:
            grad_lora_A = torch.empty((rank, k), device=device, dtype=dtype)
            if self.grad_lora_A_pass is not None:
                grad_lora_A_ws = self._workspace(self.grad_lora_A_count, (rank, k), grad_lora_A, tail)
                self.grad_lora_A_pass.run(env, grad_s, x, grad_lora_A_ws, *self.grad_lora_A_ints,
                                          seed if dropout_p > 0 else x, float(dropout_p), inv_keep)
        if self.tail_sum is not None:
            self.tail_sum.run(env, *_sum_args(tail))

        if need_weight:
            grad_weight = torch.empty((n, k), device=device, dtype=dtype)
            if self.grad_weight_gemm is not None:
                self.grad_weight_gemm.run(env, grad_y, x, grad_weight, grad_weight, grad_weight, grad_weight,
                                          *self.grad_weight_ints, 1.0, *_gemm_tail(grad_weight, None, 0.0))
            else:
                grad_weight.zero_()
        if self.dora is not None:
            return grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B, grad_col_scale
        return grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B

    def _run_grad_input(self, env, grad_y, weight, grad_x, grad_s, lora_A, lora_scale, tail) -> None:
        """Launches the planned dX GEMM (``tail``: :func:`_gemm_tail`'s arguments)."""
        self.grad_x_gemm.run(env, grad_y, weight, grad_x, grad_x, grad_s, lora_A, *self.grad_x_ints, lora_scale, *tail)

    @staticmethod
    def _workspace(count: int, shape: Tuple[int, ...], out: torch.Tensor, tail: list) -> torch.Tensor:
        """Where ``count`` partial sums of ``out`` go: ``out`` itself for a single partial (the kernels index
        it as (1, *shape)), else a fp32 workspace (count, *shape), queued in ``tail`` to be summed into ``out``."""
        if count == 1:
            return out
        ws = torch.empty((count, *shape), device=out.device, dtype=torch.float32)
        tail.append((ws, out))
        return ws


def backward(
    grad_y: torch.Tensor,
    x: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    s: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float,
    seed,
    needs_grad: Sequence[bool],
) -> Grads:
    """Fused backward: gradients ``(grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B)``, None where
    ``needs_grad`` is False.

    Args:
        grad_y: dY (M, N), any strides. x: (M, K), needed for dA and dW (else may be None).
        weight: (N, K), needed for dX. lora_A: (r, K). lora_B: (N, r). s: S from ``forward``, needed for dB.
        scaling, dropout_p, seed: as given to ``forward``; the mask is regenerated from ``seed``. With a
            tensor scaling (mixed batch), s is S' and dB = dYᵀ·S', dS = (dY·B) ⊙ scaling.
        needs_grad: five booleans for (x, weight, bias, lora_A, lora_B).

    Returns:
        dX = dY·W + keep ⊙ (dS·A)/(1-p) with dS = s·dY·B; dW = dYᵀ·x; dbias = Σ_rows dY; dA = dSᵀ·x̃;
        dB = s·dYᵀ·S. Deterministic (fixed-order partial sums, no atomics).
    """
    needs = tuple(bool(v) for v in needs_grad)
    need_x, need_weight, need_bias, need_lora_A, need_lora_B = needs
    m, n = grad_y.shape
    rank, k = lora_A.shape
    dtype = lora_A.dtype
    if grad_y.dtype != dtype:  # tl.dot needs both operands in one dtype
        grad_y = grad_y.to(dtype)
    device = grad_y.device

    if m == 0:  # nothing to launch: empty dX, zero sums
        def zeros(*shape):
            return torch.zeros(shape, device=device, dtype=dtype)
        return (zeros(0, k) if need_x else None, zeros(n, k) if need_weight else None,
                zeros(n) if need_bias else None, zeros(rank, k) if need_lora_A else None,
                zeros(n, rank) if need_lora_B else None)

    has_dropout = dropout_p > 0
    key = call_key("backward", device, dtype, (grad_y, x, weight, lora_A, lora_B, s), (has_dropout, needs))
    plan = cached(_BACKWARD_PLANS, key,
                   lambda: _BackwardPlan(grad_y, x, weight, lora_A, lora_B, s, needs, has_dropout))
    with device_guard(grad_y):
        return plan(grad_y, x, weight, lora_A, lora_B, s, scaling, dropout_p,
                    seed_tensor(seed, device) if has_dropout else None)


def dropout_mask(seed, shape: Sequence[int], dropout_p: float, device: torch.device) -> torch.Tensor:
    """The keep-mask the kernels regenerate for ``seed``: True where an element of x survives dropout.

    Args:
        seed: the dropout seed given to ``forward``/``backward`` (a one-element int64 tensor, or an int).
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
    with device_guard(out):
        _dropout_mask_kernel[(triton.cdiv(m, block), triton.cdiv(k, block))](
            out, m, k, out.stride(0), out.stride(1), seed_tensor(seed, out.device), float(dropout_p),
            BLOCK_M=block, BLOCK_K=block,
        )
    return out.view(shape)
