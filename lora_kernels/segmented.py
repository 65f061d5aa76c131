"""Many adapters in one batch, each batch row at its own adapter's rank: the segmented path of mixed batches.

    y[m] = x[m]·Wᵀ + b + s_a · (x̃[m]·A_aᵀ)·B_aᵀ,     a = the adapter of token m's batch row (or none)

:func:`lora_kernels.lora_linear_mixed` concatenates the adapters along the rank for a few adapters; with many,
every row would pay the sum of all ranks. Here the adapters live in stacked storage (a store, one slot per
adapter: :class:`lora_kernels.pool.AdapterPool` for a layer's adapters, or a store stacked for one call),
and a :class:`SegmentPlan` says which slot each batch row uses. The backward's gradients of every slot come
back as views of one gradient store, so nothing is split or copied per adapter.

Per call (notation of :mod:`lora_kernels.backends.torch`; x (M, K) with M = B·T: B batch rows of T tokens)::

    S  = x̃ · A_slotᵀ                     (M, R)   each token at its slot's rank r, 0 beyond; kept for backward
    y  = x·Wᵀ + b ;  y += s_slot·S·B_slotᵀ
    dS = s_slot · dY·B_slot (· 1/(1-p))    dX = dY·W + keep ⊙ (dS·A_slot)
    dA_i = Σ_{rows of slot i} dSᵀ·(keep ⊙ x)      dB_i = s_i · Σ_{rows of slot i} dYᵀ·S

The six primitives (``segmented_shrink``, ``_expand``, ``_grad_s``, ``_grad_x``, ``_grad_a``, ``_grad_b``) are
the :class:`lora_kernels.backends.base.SegmentedBackend` contract: the torch backend runs them as one
batched matmul per distinct rank (``plan.groups``), the Triton kernels (:mod:`lora_kernels.ops.segmented`)
one program per block of a row's tokens over that row's rank rounded up to the rank block (the batch's
largest rank as a power of two, 16 to 64; :func:`lora_kernels.ops.configs.segmented_blocks`).

Dropout: token m's mask is the one the single-adapter path draws for row m at the same seed and that row's
adapter's p, so a batch row gets the same mask whichever path runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .backends.base import Seed
from .backends.torch import _base_grad_input, _base_linear


class RowGroup(NamedTuple):
    """The batch rows of one rank, for the torch backend's batched matmuls.

    ``rows`` (b,) int64 (None: every batch row, in order), ``slots`` (b,) int64 their slots, ``scale`` (b,)
    fp32 their adapters' scalings (0 for a row outside the group), ``valid`` (b,) 1/0 for a group over every
    row that some rows do not belong to (None: all belong)."""

    rank: int
    rows: Optional[torch.Tensor]
    slots: torch.Tensor
    scale: torch.Tensor
    valid: Optional[torch.Tensor]


@dataclass(frozen=True)
class SegmentPlan:
    """Which slot each batch row uses, and what the kernels need to find its rows (device tensors).

    Attributes:
        batch_rows, tokens_per_row: B and T; x is (B·T, K).
        rank_bound: R, the largest rank of the slots used: the width of S and dS.
        row_slot: (B,) int32, the slot of each batch row, -1 for none.
        slot_rank, slot_scaling, slot_p: (P,) int32 / fp32 / fp32 per slot of the store.
        dropout: False when no token is dropped (eval, or every used p is 0).
        dropout_p: the drop probability per token: a float when all rows share it, else (M,) float64.
        row_p: (B,) float64 drop probability per batch row (0 without adapter).
        rows_by_slot: (B,) int32 batch rows sorted by slot (stable), rows without adapter last.
        slot_row_start: (P + 1,) int32, CSR offsets: the rows of slot i are rows_by_slot[start[i]:start[i+1]].
        groups: the torch backend's rank groups (:class:`RowGroup`).
    """

    batch_rows: int
    tokens_per_row: int
    rank_bound: int
    row_slot: torch.Tensor
    slot_rank: torch.Tensor
    slot_scaling: torch.Tensor
    slot_p: torch.Tensor
    dropout: bool
    dropout_p: Union[float, torch.Tensor]
    row_p: torch.Tensor
    rows_by_slot: torch.Tensor
    slot_row_start: torch.Tensor
    groups: Tuple[RowGroup, ...]


class RowLayout(NamedTuple):
    """What a plan takes from the batch and not from the store: each row's slot (B,) int64 (-1: none), and,
    when known on the host, the same as a list (it lets the torch backend group rows by rank exactly)."""

    row_slot: torch.Tensor
    host: Optional[Tuple[int, ...]]


def row_layout(row_slot: torch.Tensor, host: Optional[Sequence[int]] = None) -> RowLayout:
    """A :class:`RowLayout`; on the CPU the host list is read from the tensor itself (no device to wait on)."""
    if host is None and row_slot.device.type == "cpu":
        host = row_slot.tolist()
    return RowLayout(row_slot.to(torch.int64), None if host is None else tuple(int(s) for s in host))


def build_plan(layout: RowLayout, tokens_per_row: int, slot_ranks: Sequence[int], slot_scalings: Sequence[float],
               slot_ps: Sequence[float], used_slots: Sequence[int], training: bool) -> SegmentPlan:
    """The plan of a batch over a store with ``len(slot_ranks)`` slots (host lists per slot: rank, scaling,
    dropout p; a free slot has rank 0). ``used_slots`` are the slots some row uses (host knowledge: their
    ranks bound S). No host synchronisation: everything per row is computed with device ops, except that a
    host list in ``layout`` groups rows by rank exactly."""
    row_slot = layout.row_slot
    device = row_slot.device
    batch = row_slot.shape[0]
    slots = len(slot_ranks)
    ranks = sorted({slot_ranks[s] for s in used_slots})
    ps = [float(slot_ps[s]) if training else 0.0 for s in used_slots]
    valid = row_slot >= 0
    safe = row_slot.clamp(min=0)
    slot_rank = torch.tensor(list(slot_ranks), dtype=torch.int32).to(device)
    slot_scaling = torch.tensor([float(s) for s in slot_scalings], dtype=torch.float32).to(device)
    slot_p = torch.tensor([float(p) if training else 0.0 for p in slot_ps], dtype=torch.float64).to(device)
    row_scale = torch.where(valid, slot_scaling.index_select(0, safe), 0.0)
    row_p = torch.where(valid, slot_p.index_select(0, safe), 0.0)
    dropout = any(p > 0 for p in ps)
    # A row without adapter may take any mask (its dS is 0), so one p for the adapters is one p for all.
    if len(set(ps)) <= 1:
        dropout_p: Union[float, torch.Tensor] = ps[0] if ps else 0.0
    else:
        dropout_p = row_p.repeat_interleave(tokens_per_row)
    order = torch.argsort(torch.where(valid, row_slot, slots), stable=True)
    # Rows per slot by a scatter into a fixed size (bincount and boolean indexing would wait for the device).
    counts = torch.zeros(slots + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, torch.where(valid, row_slot, slots), torch.ones_like(row_slot))
    start = torch.zeros(slots + 1, dtype=torch.int64, device=device)
    start[1:] = torch.cumsum(counts[:slots], 0)
    return SegmentPlan(
        batch_rows=batch, tokens_per_row=tokens_per_row, rank_bound=max(ranks, default=0),
        row_slot=row_slot.to(torch.int32), slot_rank=slot_rank, slot_scaling=slot_scaling,
        slot_p=slot_p.float(), dropout=dropout, dropout_p=dropout_p, row_p=row_p,
        rows_by_slot=order.to(torch.int32), slot_row_start=start.to(torch.int32),
        groups=_rank_groups(layout, ranks, slot_ranks, safe, row_scale),
    )


def _rank_groups(layout: RowLayout, ranks: List[int], slot_ranks: Sequence[int], safe: torch.Tensor,
                 row_scale: torch.Tensor) -> Tuple[RowGroup, ...]:
    """One group per distinct rank: its rows exactly when the slots are known on the host; otherwise every
    row, masked to the group's rows (no host synchronisation, each group paying the whole batch)."""
    device = safe.device
    if layout.host is not None:
        groups = []
        for rank in ranks:
            rows = [b for b, s in enumerate(layout.host) if s >= 0 and slot_ranks[s] == rank]
            if len(rows) == len(layout.host):  # every row: no gather, no scatter
                groups.append(RowGroup(rank, None, safe, row_scale, None))
                continue
            index = torch.tensor(rows, dtype=torch.int64).to(device)
            groups.append(RowGroup(rank, index, safe.index_select(0, index), row_scale.index_select(0, index), None))
        return tuple(groups)
    row_rank = torch.tensor(list(slot_ranks), dtype=torch.int64).to(device).index_select(0, safe)
    has_slot = row_scale != 0
    groups = []
    for rank in ranks:
        member = ((row_rank == rank) & has_slot).float()
        groups.append(RowGroup(rank, None, safe, row_scale * member, member if len(ranks) > 1 else None))
    return tuple(groups)


def _forward(x2d, weight, bias, a_store, b_store, plan: SegmentPlan, seed, impl) -> Tuple[torch.Tensor, torch.Tensor]:
    s = impl.segmented_shrink(x2d, a_store, plan, seed)
    y = _base_linear(x2d, weight, bias)
    impl.segmented_expand(s, b_store, plan, y)
    return y, s


def segmented_forward(x2d: torch.Tensor, weight, bias: Optional[torch.Tensor], a_store: torch.Tensor,
                      b_store: torch.Tensor, plan: SegmentPlan, seed: Optional[Seed], impl) -> torch.Tensor:
    """y (M, N) of the segmented path without autograd (inference: no Function, no parameters to route)."""
    return _forward(x2d, weight, bias, a_store, b_store, plan, seed, impl)[0]


class _SegmentedLoRAFunction(torch.autograd.Function):
    """The segmented LoRA linear over a store; the adapters' own parameters come last (``*params``: A_0, B_0,
    A_1, B_1, ... of ``used``'s slots) so that autograd hands each its gradient, a view of the gradient
    store. The stores themselves are read, never differentiated."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, a_store, b_store, plan, used, seed, impl, *params):
        y, s = _forward(x2d, weight, bias, a_store, b_store, plan, seed, impl)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_params = any(ctx.needs_input_grad[9:])
        ctx.save_for_backward(x2d if (need_weight or need_params) else None,
                              weight if need_x and isinstance(weight, torch.Tensor) else None,
                              s if need_params else None)
        ctx.qweight = weight if need_x and not isinstance(weight, torch.Tensor) else None
        ctx.a_store, ctx.b_store, ctx.plan, ctx.used, ctx.seed, ctx.impl = a_store, b_store, plan, used, seed, impl
        ctx.param_dtypes = tuple(p.dtype for p in params)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight, s = ctx.saved_tensors
        weight = ctx.qweight if ctx.qweight is not None else weight
        impl, plan, seed = ctx.impl, ctx.plan, ctx.seed
        grad_y = grad_y.contiguous()
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        param_needs = ctx.needs_input_grad[9:]
        grad_x = grad_weight = grad_bias = None
        need_s = need_x or any(param_needs[0::2])
        grad_s = impl.segmented_grad_s(grad_y, ctx.b_store, plan) if need_s else None
        if need_x:
            grad_x = _base_grad_input(grad_y, weight)
            impl.segmented_grad_x(grad_s, ctx.a_store, plan, seed, grad_x)
        if need_weight:
            grad_weight = torch.mm(grad_y.t(), x2d)
        if need_bias:
            grad_bias = grad_y.sum(0)
        param_grads: List[Optional[torch.Tensor]] = [None] * len(param_needs)
        if any(param_needs[0::2]):
            store = impl.segmented_grad_a(grad_s, x2d, plan, seed, rank_capacity=ctx.a_store.shape[1] // x2d.shape[1])
            for i, (slot, rank) in enumerate(ctx.used):
                if param_needs[2 * i]:
                    grad = store[slot, :rank * x2d.shape[1]].view(rank, x2d.shape[1])
                    param_grads[2 * i] = grad.to(ctx.param_dtypes[2 * i])
        if any(param_needs[1::2]):
            store = impl.segmented_grad_b(grad_y, s, plan, rank_capacity=ctx.b_store.shape[1] // grad_y.shape[1])
            out_features = grad_y.shape[1]
            for i, (slot, rank) in enumerate(ctx.used):
                if param_needs[2 * i + 1]:
                    grad = store[slot, :out_features * rank].view(out_features, rank)
                    param_grads[2 * i + 1] = grad.to(ctx.param_dtypes[2 * i + 1])
        return (grad_x, grad_weight, grad_bias, None, None, None, None, None, None, *param_grads)


def segmented_lora_linear(x2d: torch.Tensor, weight, bias: Optional[torch.Tensor], a_store: torch.Tensor,
                          b_store: torch.Tensor, plan: SegmentPlan, used: Sequence[Tuple[int, int]],
                          params: Sequence[torch.Tensor], seed: Optional[Seed], impl) -> torch.Tensor:
    """y (M, N) of the segmented path (see the module docstring). ``used``: (slot, rank) of each adapter whose
    parameters ``params`` (A, B per adapter, in that order) receive gradients."""
    return _SegmentedLoRAFunction.apply(x2d, weight, bias, a_store, b_store, plan, tuple(used), seed, impl, *params)
