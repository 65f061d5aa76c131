"""Segmented many-adapter LoRA on Triton: every batch row uses one adapter of a layer's pool, or none, and pays
only its own adapter's rank (issue #21; the contract is the spec of ``lora_kernels/segmented.py``).

    y[m] += s_i · (x̃[m]·A_iᵀ)·B_iᵀ,     x̃ = keep ⊙ x / (1 - p_i),     i = row_slot[m // T]

Storage. x (M, K) is B batch rows of T tokens (M = B·T). The pool keeps every adapter in two stores, one slot
(row) per adapter: ``a_store`` (P, R_cap·K) holds A_i (r_i, K) row-major in its first r_i·K elements (element
(j, k) at j·K + k, "A layout"), ``b_store`` (P, R_cap·N) holds B_i (N, r_i) row-major in its first N·r_i
elements (element (n, j) at n·r_i + j, "B layout": the stride over n is the slot's own rank). The rest of a
slot is never read. S and dS are (M, R) with R = ``plan.rank_bound``; their columns j >= r_i are zero.

The plan (any object with these attributes, :class:`lora_kernels.segmented.SegmentPlan`): ``row_slot`` int32
(B,) (-1 = no adapter), ``tokens_per_row`` T, ``rank_bound`` R, ``slot_rank`` int32 (P,), ``slot_scaling``
fp32 (P,), ``slot_p`` fp32 (P,), ``dropout`` (bool), ``rows_by_slot`` int32 (B,) (rows sorted by slot, stable)
and ``slot_row_start`` int32 (P + 1,) (CSR offsets into it).

Kernels (three, each used by two primitives; one launch per primitive)::

    _segmented_shrink_kernel   out (M, R) = factor · Σ_k in[m, k] · W_i[j, k]      grid (B, token blocks)
        segmented_shrink:  in = keep ⊙ x, W = A_i (A layout), factor = 1/(1-p_i) with dropout
        segmented_grad_s:  in = dY,       W = B_iᵀ (B layout), factor = s_i [· 1/(1-p_i)]
    _segmented_expand_kernel   out (M, C) += [keep ⊙] factor · S[m, :r_i] · W_i    grid (B, token blocks, C tiles)
        segmented_expand:  S,  W = B_iᵀ (B layout, (j, n) at n·r_i + j), factor = s_i, C = N
        segmented_grad_x:  dS, W = A_i (A layout), factor = 1, keep mask on dX, C = K
    _segmented_grad_kernel     G_i (r_i, C) = factor · Σ_{m in rows of i} L[m, :r_i]ᵀ · in[m]   grid (P, C tiles, R_cap blocks)
        segmented_grad_a:  L = dS, in = keep ⊙ x, stored in A layout (dA_i (r_i, K))
        segmented_grad_b:  L = S,  in = dY, factor = s_i, stored in B layout (dB_i (N, r_i))

Programs and slots. The shrink and expand grids run over (batch row, block of that row's tokens), so each
program has one slot, one rank and one dropout probability; it loops only over its slot's rank blocks (a row
with slot -1 loops over none: the shrink writes its zeros, the expand leaves ``out`` untouched). The grad
kernel runs per (slot, column tile, rank block): it walks the slot's rows through the CSR (``rows_by_slot``
in order, T tokens each, BLOCK_M at a time) into one fp32 accumulator, a fixed order (no atomics, bitwise
reproducible), and writes its slot's whole row of the gradient store: the r_i·C used elements, zeros in the
rest; a slot without rows gets zeros.

Dropout. keep(m, k) is :func:`lora_kernels.ops.lora_linear._keep_mask` at the global token index m and
column k with p = slot_p[slot(m)]: per program, p is one number (a program never spans two batch rows), so
the mask is exactly the single-adapter path's mask for that row's p. The mask multiplies x exactly; 1/(1-p)
scales the fp32 accumulator (in S and in dS, so dX and dA take the mask without the factor).

Numerics. fp32, fp16 and bf16 inputs; ``tl.dot`` accumulates in fp32 (IEEE for fp32 unless torch allows TF32,
as in :mod:`lora_kernels.ops.lora_linear`); each output is rounded once to its pointer's dtype (S, dS in the
input's dtype, the gradient stores in the store's dtype; ``out`` of the expand kernels in its own dtype: the
sum out + term is formed in fp32).

Sizes. Any T (token blocks do not divide it: masked), K, N (masked edges), ranks 1..R_cap mixed in one batch,
rank_bound up to any size (rank blocks of at most 64, looped). Block sizes: :func:`lora_kernels.ops.configs.segmented_blocks`.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from . import configs as _configs
from .launch import Launch, cached, call_key, device_guard, seed_tensor
from .lora_linear import _keep_mask

# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _slot_of_row(row_slot_ptr, slot_rank_ptr, slot_scaling_ptr, slot_p_ptr, b, R,
                 SCALE_BY_SLOT: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """(slot, rank, factor, p) of batch row ``b``: slot -1 gives rank 0; factor = [s_i ·] [1/(1-p_i)]."""
    slot = tl.load(row_slot_ptr + b)
    has = slot >= 0
    safe = tl.maximum(slot, 0)
    rank = tl.minimum(tl.load(slot_rank_ptr + safe, mask=has, other=0), R)
    factor = 1.0
    if SCALE_BY_SLOT:
        factor = tl.load(slot_scaling_ptr + safe, mask=has, other=0.0).to(tl.float32)
    p = tl.load(slot_p_ptr + safe, mask=has, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        factor = factor / (1.0 - p)
    return safe, rank, factor, p


@triton.jit
def _segmented_shrink_kernel(
    # pointers
    in_ptr, store_ptr, out_ptr, row_slot_ptr, slot_rank_ptr, slot_scaling_ptr, slot_p_ptr, seed_ptr,
    # sizes
    T, K, R,
    # strides
    stride_in_m, stride_in_k, stride_store_slot, stride_store_e, stride_out_m, stride_out_r,
    # meta-parameters
    B_LAYOUT: tl.constexpr, MASK_INPUT: tl.constexpr, SCALE_BY_SLOT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """out (M, R) = factor · [keep ⊙] in (M, K) · W_iᵀ for the BLOCK_M tokens of batch row b (slot i, rank r).

    W_i (r, K) is read from the slot's row of the store: element (j, k) at k·r + j (``B_LAYOUT``: B_i (K, r)
    row-major, so W_i = B_iᵀ) or j·K + k (A_i (r, K)). Columns j >= r of out and every column of a row with
    slot -1 are written as zeros. Grid (B, cdiv(T, BLOCK_M)).
    """
    b = tl.program_id(0)
    pid_t = tl.program_id(1)
    slot, rank, factor, p = _slot_of_row(row_slot_ptr, slot_rank_ptr, slot_scaling_ptr, slot_p_ptr, b, R,
                                         SCALE_BY_SLOT, HAS_DROPOUT)
    offs_t = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
    t_mask = offs_t < T
    offs_m = b.to(tl.int64) * T + offs_t  # global token index: the dropout mask's row
    rows = b.to(tl.int64) * T + offs_t % T  # wrapped inside the batch row: in-bounds loads, the store drops the rest
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_R)
    store_base = store_ptr + slot.to(tl.int64) * stride_store_slot
    if MASK_INPUT:
        seed = tl.load(seed_ptr)

    # --- the slot's rank blocks, x streamed over K once per block (once for r <= BLOCK_R)
    for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):
        offs_r = r0 + offs_j
        r_mask = offs_r < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < K
            a = tl.load(in_ptr + rows[:, None] * stride_in_m + ks[None, :].to(tl.int64) * stride_in_k,
                        mask=k_mask[None, :], other=0.0)
            if MASK_INPUT:
                a = tl.where(_keep_mask(seed, offs_m, ks, p), a, 0.0)
            if B_LAYOUT:  # (BLOCK_K, BLOCK_R) = W_iᵀ = B_i rows
                elems = ks[:, None].to(tl.int64) * rank + offs_r[None, :]
            else:
                elems = offs_r[None, :].to(tl.int64) * K + ks[:, None]
            w_t = tl.load(store_base + elems * stride_store_e, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            acc = tl.dot(a, w_t, acc, input_precision=INPUT_PRECISION)
        acc = acc * factor
        out_ptrs = out_ptr + offs_m[:, None] * stride_out_m + offs_r[None, :] * stride_out_r
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & (offs_r[None, :] < R))

    # --- zeros beyond the slot's rank blocks (every column for slot -1)
    zeros = tl.zeros((BLOCK_M, BLOCK_R), dtype=out_ptr.dtype.element_ty)
    for r0 in tl.range(tl.cdiv(rank, BLOCK_R) * BLOCK_R, R, BLOCK_R, num_stages=1):
        offs_r = r0 + offs_j
        out_ptrs = out_ptr + offs_m[:, None] * stride_out_m + offs_r[None, :] * stride_out_r
        tl.store(out_ptrs, zeros, mask=t_mask[:, None] & (offs_r[None, :] < R))


@triton.jit
def _segmented_expand_kernel(
    # pointers
    s_ptr, store_ptr, out_ptr, row_slot_ptr, slot_rank_ptr, slot_scaling_ptr, slot_p_ptr, seed_ptr,
    # sizes
    T, C, R,
    # strides
    stride_s_m, stride_s_r, stride_store_slot, stride_store_e, stride_out_m, stride_out_c,
    # meta-parameters
    B_LAYOUT: tl.constexpr, SCALE_BY_SLOT: tl.constexpr, MASK_OUTPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """out (M, C) += [keep ⊙] factor · S[:, :r] · W_i for the BLOCK_M tokens of batch row b and a C tile.

    W_i (r, C): element (j, c) at c·r + j (``B_LAYOUT``: B_i (C, r) row-major, W_i = B_iᵀ) or j·C + c
    (A_i (r, C)). factor = s_i with ``SCALE_BY_SLOT``; ``MASK_OUTPUT`` applies keep(m, c) at the slot's p.
    A row with slot -1 reads and writes nothing. Grid (B, cdiv(T, BLOCK_M), cdiv(C, BLOCK_C)).
    """
    b = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_c = tl.program_id(2)
    slot, rank, factor, p = _slot_of_row(row_slot_ptr, slot_rank_ptr, slot_scaling_ptr, slot_p_ptr, b, R,
                                         SCALE_BY_SLOT, False)
    if rank > 0:  # slot -1 (rank 0): the row's LoRA term is zero, out stays as it is
        offs_t = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
        t_mask = offs_t < T
        offs_m = b.to(tl.int64) * T + offs_t
        rows = b.to(tl.int64) * T + offs_t % T
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        cols = (offs_c % C).to(tl.int64)  # wrapped: in-bounds loads, the store drops columns >= C
        offs_j = tl.arange(0, BLOCK_R)
        store_base = store_ptr + slot.to(tl.int64) * stride_store_slot

        # --- the slot's rank blocks (one for r <= BLOCK_R): not pipelined, the loop is that short
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):
            offs_r = r0 + offs_j
            r_mask = offs_r < rank
            s = tl.load(s_ptr + rows[:, None] * stride_s_m + offs_r[None, :] * stride_s_r, mask=r_mask[None, :],
                        other=0.0)
            if B_LAYOUT:
                elems = cols[None, :] * rank + offs_r[:, None]
            else:
                elems = offs_r[:, None].to(tl.int64) * C + cols[None, :]
            w = tl.load(store_base + elems * stride_store_e, mask=r_mask[:, None], other=0.0)
            acc = tl.dot(s, w, acc, input_precision=INPUT_PRECISION)

        # --- epilogue: scale, mask, add to out in fp32, one rounding
        acc = acc * factor
        if MASK_OUTPUT:
            acc = tl.where(_keep_mask(tl.load(seed_ptr), offs_m, offs_c, p), acc, 0.0)
        out_ptrs = out_ptr + offs_m[:, None] * stride_out_m + offs_c[None, :].to(tl.int64) * stride_out_c
        mask = t_mask[:, None] & c_mask[None, :]
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segmented_grad_kernel(
    # pointers
    left_ptr, in_ptr, out_ptr, rows_by_slot_ptr, slot_row_start_ptr, slot_rank_ptr, slot_scaling_ptr, slot_p_ptr,
    seed_ptr,
    # sizes
    T, C, R, R_CAP,
    # strides
    stride_left_m, stride_left_r, stride_in_m, stride_in_c, stride_out_slot, stride_out_e,
    # meta-parameters
    B_LAYOUT: tl.constexpr, MASK_INPUT: tl.constexpr, SCALE_BY_SLOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """G_i (r, C) = factor · Σ_{m in rows of slot i} L[m, :r]ᵀ · [keep ⊙] in[m] for one (C tile, rank block).

    L (M, R), in (M, C); the slot's rows are rows_by_slot[slot_row_start[i]:slot_row_start[i+1]], T tokens
    each, accumulated in that order in fp32. The slot's row of out gets G_i at c·r + j (``B_LAYOUT``: G_iᵀ
    (C, r) row-major) or j·C + c, and zeros at j·C + c for r <= j < R_CAP (the rest of the slot); a slot
    without rows is all zeros. Grid (P, cdiv(C, BLOCK_C), cdiv(R_CAP, BLOCK_R)).
    """
    slot = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_r = tl.program_id(2)
    rank = tl.minimum(tl.maximum(tl.load(slot_rank_ptr + slot), 0), R_CAP)  # the slot's layout
    read_rank = tl.minimum(rank, R)  # S/dS hold R columns
    start = tl.load(slot_row_start_ptr + slot)
    end = tl.load(slot_row_start_ptr + slot + 1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    cols = (offs_c % C).to(tl.int64)
    r_mask = offs_r < read_rank
    tiles_per_row = tl.cdiv(T, BLOCK_M)
    # a rank block at or past the slot's rank has nothing to sum: only zeros to write
    tiles = tl.where(pid_r * BLOCK_R < read_rank, (end - start) * tiles_per_row, 0)
    factor = 1.0
    if SCALE_BY_SLOT:
        factor = tl.load(slot_scaling_ptr + slot).to(tl.float32)
    if MASK_INPUT:
        seed = tl.load(seed_ptr)
        p = tl.load(slot_p_ptr + slot).to(tl.float32)

    # --- (row, token block) pairs of the slot in a fixed order, one loop (pipelined across rows)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for tile in range(0, tiles):
        b = tl.load(rows_by_slot_ptr + start + tile // tiles_per_row).to(tl.int64)
        offs_t = (tile % tiles_per_row) * BLOCK_M + tl.arange(0, BLOCK_M)
        t_mask = offs_t < T
        offs_m = b * T + offs_t
        left = tl.load(left_ptr + offs_m[:, None] * stride_left_m + offs_r[None, :] * stride_left_r,
                       mask=t_mask[:, None] & r_mask[None, :], other=0.0)
        a = tl.load(in_ptr + offs_m[:, None] * stride_in_m + cols[None, :] * stride_in_c, mask=t_mask[:, None],
                    other=0.0)
        if MASK_INPUT:
            a = tl.where(_keep_mask(seed, offs_m, offs_c, p), a, 0.0)
        acc = tl.dot(tl.trans(left), a, acc, input_precision=INPUT_PRECISION)

    # --- epilogue: the used r·C elements, then zeros in the rest of the slot's row
    acc = acc * factor
    out_base = out_ptr + slot.to(tl.int64) * stride_out_slot
    if B_LAYOUT:
        elems = offs_c[None, :].to(tl.int64) * rank + offs_r[:, None]
    else:
        elems = offs_r[:, None].to(tl.int64) * C + offs_c[None, :]
    tl.store(out_base + elems * stride_out_e, acc.to(out_ptr.dtype.element_ty),
             mask=(offs_r[:, None] < rank) & c_mask[None, :])
    tail = offs_r[:, None].to(tl.int64) * C + offs_c[None, :]
    tl.store(out_base + tail * stride_out_e, tl.zeros((BLOCK_R, BLOCK_C), dtype=out_ptr.dtype.element_ty),
             mask=(offs_r[:, None] >= rank) & (offs_r[:, None] < R_CAP) & c_mask[None, :])


# ----------------------------------------------------------------------------------------------- launchers

_PLANS: Dict[tuple, Launch] = {}


def clear_plans() -> None:
    """Forget every cached launch (configs changed under them, or to free their compiled handles)."""
    _PLANS.clear()


def _launch(kind: str, fn, grid, meta: dict, tensors, ints, args) -> None:
    """Launches ``fn`` through a cached :class:`~lora_kernels.ops.launch.Launch` (keyed by what Triton
    specialises on: dtypes, shapes, strides, alignments, the integer arguments, the meta-parameters)."""
    if min(grid) == 0:
        return
    device = tensors[0].device
    key = call_key(kind, device, tensors[0].dtype, tensors, (grid, ints, tuple(meta.items())))
    launch = cached(_PLANS, key, lambda: Launch(fn, grid, meta))
    with device_guard(tensors[0]):
        launch(*args)


def _plan_tensors(plan, device: torch.device):
    """(row_slot, slot_rank, slot_scaling, slot_p) of ``plan``, checked."""
    tensors = (plan.row_slot, plan.slot_rank, plan.slot_scaling, plan.slot_p)
    for name, t in zip(("row_slot", "slot_rank", "slot_scaling", "slot_p"), tensors):
        if t.device != device:
            raise ValueError(f"plan.{name} must be on {device}, got {t.device}")
    if plan.slot_rank.numel() != plan.slot_scaling.numel() or plan.slot_rank.numel() != plan.slot_p.numel():
        raise ValueError(f"plan.slot_rank, slot_scaling and slot_p must have one entry per slot, got "
                         f"{plan.slot_rank.numel()}, {plan.slot_scaling.numel()} and {plan.slot_p.numel()}")
    return tensors


def _check_tokens(name: str, t: torch.Tensor, plan) -> int:
    """B·T for a 2-D (M, ·) tensor whose rows are the plan's tokens."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (tokens, features), got shape {tuple(t.shape)}")
    m = plan.row_slot.numel() * int(plan.tokens_per_row)
    if t.shape[0] != m:
        raise ValueError(f"{name} must have batch rows x tokens_per_row = {plan.row_slot.numel()} x "
                         f"{plan.tokens_per_row} = {m} rows, got {t.shape[0]}")
    return m


def _check_store(name: str, store: torch.Tensor, plan, width: int, dtype: torch.dtype) -> None:
    slots = plan.slot_rank.numel()
    if store.dim() != 2 or store.shape[0] != slots or store.shape[1] < plan.rank_bound * width:
        raise ValueError(f"{name} must be (slots, R_cap*{width}) with {slots} slots and R_cap >= rank_bound "
                         f"{plan.rank_bound}, got shape {tuple(store.shape)}")
    if store.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {store.dtype}")


def _seed(seed, device: torch.device) -> torch.Tensor:
    if seed is None:
        raise ValueError("plan.dropout is set: the forward's dropout seed is needed, got None")
    return seed_tensor(seed, device)


def _rank_capacity(plan, rank_capacity: Optional[int]) -> int:
    cap = rank_capacity if rank_capacity is not None else getattr(plan, "rank_capacity", None)
    cap = int(plan.rank_bound if cap is None else cap)
    if cap < plan.rank_bound:
        raise ValueError(f"rank_capacity must be >= rank_bound {plan.rank_bound}, got {cap}")
    return cap


def _shrink(kind: str, inp: torch.Tensor, store: torch.Tensor, plan, seed, b_layout: bool) -> torch.Tensor:
    """The shrink kernel's launch for :func:`segmented_shrink` (A layout) and :func:`segmented_grad_s` (B)."""
    m = _check_tokens("x" if not b_layout else "grad_y", inp, plan)
    width, rank_bound, device = inp.shape[1], int(plan.rank_bound), inp.device
    _check_store("b_store" if b_layout else "a_store", store, plan, width, inp.dtype)
    row_slot, slot_rank, slot_scaling, slot_p = _plan_tensors(plan, device)
    out = torch.empty((m, rank_bound), device=device, dtype=inp.dtype)
    if out.numel() == 0:
        return out
    dropout = bool(plan.dropout)
    blocks = _configs.segmented_blocks("shrink", inp.dtype, plan.tokens_per_row, rank_bound)
    seed_t = _seed(seed, device) if dropout and not b_layout else inp
    grid = (row_slot.numel(), triton.cdiv(plan.tokens_per_row, blocks.block_m))
    ints = (int(plan.tokens_per_row), width, rank_bound, *inp.stride(), *store.stride(), *out.stride())
    meta = dict(B_LAYOUT=b_layout, MASK_INPUT=dropout and not b_layout, SCALE_BY_SLOT=b_layout,
                HAS_DROPOUT=dropout, BLOCK_M=blocks.block_m, BLOCK_K=blocks.block_n, BLOCK_R=blocks.block_r,
                INPUT_PRECISION=_configs._input_precision(inp.dtype), num_warps=blocks.num_warps,
                num_stages=blocks.num_stages)
    tensors = (inp, store, out, row_slot, slot_rank, slot_scaling, slot_p, seed_t)
    _launch(kind, _segmented_shrink_kernel, grid, meta, tensors, ints, (*tensors, *ints))
    return out


def _expand(kind: str, s: torch.Tensor, store: torch.Tensor, plan, seed, out: torch.Tensor, b_layout: bool) -> None:
    """The expand kernel's launch for :func:`segmented_expand` (B layout) and :func:`segmented_grad_x` (A)."""
    m = _check_tokens("s" if b_layout else "grad_s", s, plan)
    _check_tokens("out" if b_layout else "grad_x", out, plan)
    rank_bound, width, device = int(plan.rank_bound), out.shape[1], s.device
    if s.shape[1] != rank_bound:
        raise ValueError(f"S/dS must be (M, rank_bound) = ({m}, {rank_bound}), got {tuple(s.shape)}")
    _check_store("b_store" if b_layout else "a_store", store, plan, width, s.dtype)
    row_slot, slot_rank, slot_scaling, slot_p = _plan_tensors(plan, device)
    if out.device != device:
        raise ValueError(f"out must be on {device}, got {out.device}")
    masked = bool(plan.dropout) and not b_layout
    blocks = _configs.segmented_blocks("expand", s.dtype, plan.tokens_per_row, rank_bound)
    seed_t = _seed(seed, device) if masked else s
    grid = (row_slot.numel(), triton.cdiv(plan.tokens_per_row, blocks.block_m), triton.cdiv(width, blocks.block_n))
    ints = (int(plan.tokens_per_row), width, rank_bound, *s.stride(), *store.stride(), *out.stride())
    meta = dict(B_LAYOUT=b_layout, SCALE_BY_SLOT=b_layout, MASK_OUTPUT=masked, BLOCK_M=blocks.block_m,
                BLOCK_C=blocks.block_n, BLOCK_R=blocks.block_r, INPUT_PRECISION=_configs._input_precision(s.dtype),
                num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    tensors = (s, store, out, row_slot, slot_rank, slot_scaling, slot_p, seed_t)
    _launch(kind, _segmented_expand_kernel, grid, meta, tensors, ints, (*tensors, *ints))


def _grad(kind: str, left: torch.Tensor, inp: torch.Tensor, plan, seed, b_layout: bool,
          rank_capacity: Optional[int]) -> torch.Tensor:
    """The grad kernel's launch for :func:`segmented_grad_a` (A layout) and :func:`segmented_grad_b` (B)."""
    m = _check_tokens("grad_s" if not b_layout else "s", left, plan)
    _check_tokens("x" if not b_layout else "grad_y", inp, plan)
    rank_bound, width, device = int(plan.rank_bound), inp.shape[1], inp.device
    if left.shape[1] != rank_bound:
        raise ValueError(f"S/dS must be (M, rank_bound) = ({m}, {rank_bound}), got {tuple(left.shape)}")
    if left.dtype != inp.dtype:
        raise TypeError(f"S/dS and the input must share a dtype, got {left.dtype} and {inp.dtype}")
    cap = _rank_capacity(plan, rank_capacity)
    row_slot, slot_rank, slot_scaling, slot_p = _plan_tensors(plan, device)
    slots = slot_rank.numel()
    if plan.rows_by_slot.numel() != row_slot.numel() or plan.slot_row_start.numel() != slots + 1:
        raise ValueError(f"plan.rows_by_slot must be ({row_slot.numel()},) and plan.slot_row_start "
                         f"({slots + 1},), got {tuple(plan.rows_by_slot.shape)} and {tuple(plan.slot_row_start.shape)}")
    out = torch.empty((slots, cap * width), device=device, dtype=inp.dtype)
    if out.numel() == 0:
        return out
    if m == 0:
        return out.zero_()
    masked = bool(plan.dropout) and not b_layout
    blocks = _configs.segmented_blocks("grad", inp.dtype, plan.tokens_per_row, rank_bound)
    seed_t = _seed(seed, device) if masked else inp
    grid = (slots, triton.cdiv(width, blocks.block_n), triton.cdiv(cap, blocks.block_r))
    ints = (int(plan.tokens_per_row), width, rank_bound, cap, *left.stride(), *inp.stride(), *out.stride())
    meta = dict(B_LAYOUT=b_layout, MASK_INPUT=masked, SCALE_BY_SLOT=b_layout, BLOCK_M=blocks.block_m,
                BLOCK_C=blocks.block_n, BLOCK_R=blocks.block_r, INPUT_PRECISION=_configs._input_precision(inp.dtype),
                num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    tensors = (left, inp, out, plan.rows_by_slot, plan.slot_row_start, slot_rank, slot_scaling, slot_p, seed_t)
    _launch(kind, _segmented_grad_kernel, grid, meta, tensors, ints, (*tensors, *ints))
    return out


# ----------------------------------------------------------------------------------------------- primitives


def segmented_shrink(x: torch.Tensor, a_store: torch.Tensor, plan, seed) -> torch.Tensor:
    """S (M, R) = x̃·A_iᵀ per token, i the token's slot: S[m, j] = Σ_k x̃[m, k] A_i[j, k] for j < r_i, 0 beyond
    and for rows with slot -1; x̃ = keep ⊙ x / (1 - p_i) with ``plan.dropout``.

    Args:
        x: (M, K), M = B·T, any strides. a_store: (P, R_cap·K) in x's dtype. plan: a ``SegmentPlan``.
        seed: the dropout seed (a one-element int64 tensor, or an int); unused without ``plan.dropout``.

    Returns:
        S (M, plan.rank_bound) in x's dtype.

    Raises:
        ValueError / TypeError: shapes, devices or dtypes that do not fit the plan.
    """
    return _shrink("seg_shrink", x, a_store, plan, seed, b_layout=False)


def segmented_expand(s: torch.Tensor, b_store: torch.Tensor, plan, out: torch.Tensor) -> None:
    """out (M, N) += s_i · S[m, :r_i]·B_iᵀ per token, in place; rows with slot -1 are left as they are.

    Args:
        s: S (M, R) from :func:`segmented_shrink`. b_store: (P, R_cap·N) in S's dtype. plan: a ``SegmentPlan``.
        out: (M, N), any dtype and strides (the sum is formed in fp32 and rounded once).
    """
    _expand("seg_expand", s, b_store, plan, None, out, b_layout=True)


def segmented_grad_s(grad_y: torch.Tensor, b_store: torch.Tensor, plan) -> torch.Tensor:
    """dS (M, R): dS[m, j] = s_i · Σ_n dY[m, n] B_i[n, j] · (1/(1-p_i) with ``plan.dropout``) for j < r_i, 0
    beyond and for rows with slot -1.

    Args:
        grad_y: dY (M, N) (cast to b_store's dtype if it differs). b_store: (P, R_cap·N). plan: a ``SegmentPlan``.

    Returns:
        dS (M, plan.rank_bound) in b_store's dtype.
    """
    if grad_y.dtype != b_store.dtype:  # tl.dot needs one dtype (autograd may hand dY in another)
        grad_y = grad_y.to(b_store.dtype)
    return _shrink("seg_grad_s", grad_y, b_store, plan, None, b_layout=True)


def segmented_grad_x(grad_s: torch.Tensor, a_store: torch.Tensor, plan, seed, grad_x: torch.Tensor) -> None:
    """grad_x (M, K) += keep ⊙ dS[m, :r_i]·A_i per token, in place (keep = 1 without ``plan.dropout``; the
    1/(1-p) is in dS); rows with slot -1 are left as they are.

    Args:
        grad_s: dS (M, R) from :func:`segmented_grad_s`. a_store: (P, R_cap·K) in dS's dtype.
        plan: a ``SegmentPlan``. seed: the forward's dropout seed. grad_x: (M, K), any dtype and strides.
    """
    _expand("seg_grad_x", grad_s, a_store, plan, seed, grad_x, b_layout=False)


def segmented_grad_a(grad_s: torch.Tensor, x: torch.Tensor, plan, seed, *,
                     rank_capacity: Optional[int] = None) -> torch.Tensor:
    """dA per slot: slot i's first r_i·K elements = Σ_{m in rows of i} dS[m, :r_i]ᵀ (keep ⊙ x)[m] as (r_i, K)
    row-major, zeros in the rest of the slot and in slots without rows. Deterministic (fixed order, no atomics).

    Args:
        grad_s: dS (M, R). x: (M, K) in dS's dtype. plan: a ``SegmentPlan``. seed: the forward's dropout seed.
        rank_capacity: R_cap of the store (default: ``plan.rank_capacity`` if the plan has one, else
            ``plan.rank_bound``).

    Returns:
        ga_store (P, R_cap·K) in x's dtype.
    """
    return _grad("seg_grad_a", grad_s, x, plan, seed, b_layout=False, rank_capacity=rank_capacity)


def segmented_grad_b(grad_y: torch.Tensor, s: torch.Tensor, plan, *,
                     rank_capacity: Optional[int] = None) -> torch.Tensor:
    """dB per slot: slot i's first N·r_i elements = s_i · Σ_{m in rows of i} dY[m]ᵀ S[m, :r_i] as (N, r_i)
    row-major, zeros in the rest of the slot and in slots without rows. Deterministic.

    Args:
        grad_y: dY (M, N) (cast to S's dtype if it differs). s: S (M, R) from :func:`segmented_shrink`.
        plan: a ``SegmentPlan``. rank_capacity: as for :func:`segmented_grad_a`.

    Returns:
        gb_store (P, R_cap·N) in S's dtype.
    """
    if grad_y.dtype != s.dtype:
        grad_y = grad_y.to(s.dtype)
    return _grad("seg_grad_b", s, grad_y, plan, None, b_layout=True, rank_capacity=rank_capacity)
