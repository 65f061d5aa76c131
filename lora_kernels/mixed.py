"""Mixed batches: one adapter per row of a batch, in one fused pass over the shared base.

    y[i] = x[i]·Wᵀ + b + s_a · (dropout_a(x[i])·A_aᵀ)·B_aᵀ,     a = the adapter of batch row i (or none)

``with mixed_adapters(model, names): model(x)`` gives every row of the batch (the leading dimension of each
LoRA layer's input) its own adapter, or ``None`` for the base alone, as PEFT's ``adapter_names=[...]`` does
for inference, and it trains too: each adapter's ``lora_A`` / ``lora_B`` get gradients from their own rows.

Design (one call of the ordinary fused backends, no loop over adapters, no copy of x per adapter). The
adapters a layer runs are concatenated along the rank, ``A_cat = [A_1; ...; A_n]`` (Σr, K) and
``B_cat = [B_1, ..., B_n]`` (N, Σr), with ``torch.cat``, so autograd splits dA_cat / dB_cat back into each
adapter's gradient. A per-(row, rank-column) scale ``Scale`` (M, Σr) holds s_a on the columns of row m's
adapter a and 0 elsewhere (a row with ``None``: all 0), and the backends take it as their ``scaling``::

    S' = (keep ⊙ x)·A_catᵀ/(1-p) ⊙ Scale      (M, Σr)   kept for backward
    y  = x·Wᵀ + b + S'·B_catᵀ                  (M, N)    one GEMM: base and every row's LoRA term
    dB_cat = dYᵀ·S',  dS' = (dY·B_cat) ⊙ Scale,  dX = dY·W + keep ⊙ (dS'·A_cat)/(1-p),  dA_cat = dS'ᵀ·x̃

Cost: the low-rank GEMMs run over Σr columns instead of one adapter's r, i.e. 2·M·K·Σr + 2·M·N·Σr extra
FLOPs beside the base's 2·M·K·N: for four rank-16 adapters on a 4096x4096 layer that is 2·64·(K+N) / (2·K·N)
= 3.1% of the base instead of 0.8%. Negligible for a few adapters; with many, every row would pay the sum of
all ranks, so :func:`lora_linear_mixed` switches to the segmented path (:mod:`lora_kernels.segmented`: each
row at its own adapter's rank, the adapters in stacked storage) when :func:`segments_pay` predicts it cheaper
(from three adapters of equal rank up). Both paths give the same results; ``segmented=True`` / ``False``
forces one. DoRA adapters always take the concatenation.

Dropout. The mask is a pure function of (seed, row, column), drawn once per call: row m gets exactly the
mask the single-adapter path would give it at the same seed. Adapters with the same dropout p run on any
backend; when the mixed adapters' p differ (in training), the Triton kernels (one p per launch) are not used
and the torch backend runs the batch with one drop threshold per row, the same masks and results.

Backends: ``"triton"`` and ``"torch"`` run the concatenated pass above or the segmented one; ``"eager"`` runs
:func:`lora_kernels.reference.lora_linear_mixed_reference`, which loops over adapters. ``torch.compile``
traces the concatenated pass's autograd Function; the segmented path runs eagerly under it (a graph break).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .backends import backend_for, draw_seed_tensor, resolve_backend
from .backends import torch as torch_backend
from .dora import dora_impl, scaled_lora_linear, weight_norm
from .functional import _autocast_enabled, _eager_inputs, _LoRALinearFunction, _outside_autocast, _quantized, _rows
from .pool import Slots, stack_adapters
from .reference import lora_linear_mixed_reference, lora_linear_stacked_reference
from .segmented import build_plan, row_layout, segmented_forward, segmented_lora_linear


class AdapterTerm(NamedTuple):
    """One adapter of a mixed call: ``lora_A`` (r, K), ``lora_B`` (N, r), its scale and dropout probability, and
    a DoRA adapter's magnitude m (N,) (None: plain LoRA)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout_p: float = 0.0
    magnitude: Optional[torch.Tensor] = None


@functools.lru_cache(maxsize=256)
def _scale_table(ranks: Tuple[int, ...], scalings: Tuple[float, ...], device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """(n + 1, Σr): row a holds s_a on adapter a's rank columns and 0 elsewhere; the last row (no adapter)
    is all 0. Cached, so a layer called again with the same adapters copies nothing to the device."""
    table = torch.zeros((len(ranks) + 1, sum(ranks)), dtype=torch.float64)
    start = 0
    for a, (rank, scaling) in enumerate(zip(ranks, scalings)):
        table[a, start:start + rank] = scaling
        start += rank
    return table.to(device=device, dtype=dtype)



def _adapters_scale_table(adapters: Sequence[AdapterTerm], x: torch.Tensor) -> torch.Tensor:
    """:func:`_scale_table` of ``adapters`` (their ranks and scales), on x's device in x's dtype."""
    return _scale_table(tuple(t.lora_A.shape[0] for t in adapters), tuple(float(t.scaling) for t in adapters),
                        x.device, x.dtype)


def _reference_terms(adapters: Sequence[AdapterTerm], dtype: torch.dtype) -> list:
    """``adapters`` as the references (:mod:`lora_kernels.reference`) take them: (A, B, scale), A and B in
    ``dtype``, and a DoRA adapter's magnitude (in ``dtype``) fourth."""
    return [(t.lora_A.to(dtype), t.lora_B.to(dtype), float(t.scaling))
            + (() if t.magnitude is None else (t.magnitude.to(dtype),)) for t in adapters]


def _dora_row_scales(adapters: Sequence[AdapterTerm], weight, x: torch.Tensor, index: torch.Tensor,
                     backend: str) -> torch.Tensor:
    """The column scale of a mixed batch with DoRA adapters, (B, N) fp32: row i gets its adapter's
    g = m / ‖W + s·B·A‖ (1 for a LoRA adapter and for no adapter), differentiable in each m."""
    ones = torch.ones(weight.shape[0], dtype=torch.float32, device=x.device)
    table = [ones if t.magnitude is None else
             t.magnitude.float() / weight_norm(weight, t.lora_A.to(x.dtype), t.lora_B.to(x.dtype), float(t.scaling),
                                               backend)
             for t in adapters]
    return torch.stack(table + [ones]).index_select(0, index)

def _row_index(row_adapter: Union[torch.Tensor, Sequence[Optional[int]]], num_adapters: int, batch: int,
               device: torch.device) -> torch.Tensor:
    """``row_adapter`` as an int64 (batch,) tensor on ``device`` with -1 / None mapped to ``num_adapters``."""
    if not isinstance(row_adapter, torch.Tensor):
        values = [-1 if a is None else int(a) for a in row_adapter]
        bad = [a for a in values if not -1 <= a < num_adapters]
        if bad:
            raise ValueError(f"row_adapter entries must be in [-1, {num_adapters}) (or None), got {bad[0]}")
        row_adapter = torch.tensor(values, dtype=torch.int64)
    if row_adapter.dim() != 1 or row_adapter.shape[0] != batch:
        raise ValueError(f"row_adapter must have one entry per row of x's leading dimension ({batch}), "
                         f"got shape {tuple(row_adapter.shape)}")
    row_adapter = row_adapter.to(device=device, dtype=torch.int64)
    return torch.where(row_adapter < 0, num_adapters, row_adapter)


def lora_linear_mixed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    adapters: Sequence[AdapterTerm],
    row_adapter: Union[torch.Tensor, Sequence[Optional[int]]],
    training: bool = True,
    backend: str = "auto",
    segmented: Union[str, bool] = "auto",
    store: Optional[Slots] = None,
) -> torch.Tensor:
    """LoRA linear over a batch whose rows use different adapters (see the module docstring).

    Args:
        x: (B, ..., in_features), B >= 0 rows (the leading dimension; the rest are flattened per row).
        weight, bias: the shared base, as for :func:`lora_kernels.lora_linear` (a quantized base too).
        adapters: the adapters the batch uses, each an :class:`AdapterTerm` (ranks, scales, dropout may
            differ).
        row_adapter: (B,) the index into ``adapters`` of each row, -1 (or None in a list) for the base alone;
            an int64 tensor on x's device avoids a copy per call.
        training: dropout is applied only when True.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"``.
        segmented: ``"auto"`` picks the segmented path (:mod:`lora_kernels.segmented`, each row at its own
            rank) or the concatenation by :func:`segments_pay`; True / False force one (DoRA adapters always
            run the concatenation).
        store: where the adapters already sit in stacked storage (a layer's
            :class:`lora_kernels.pool.AdapterPool`), ``store.slots[a]`` the slot of ``adapters[a]``; None
            stacks them for the call when the segmented path runs.

    Returns:
        (B, ..., out_features) in x's dtype.

    Raises:
        ValueError: x has no leading dimension, ``row_adapter`` has another length than B or an index
            outside [-1, len(adapters)), shapes that do not fit, an unknown ``segmented``.
    """
    if x.dim() < 2:
        raise ValueError(f"a mixed batch needs x of shape (B, ..., in_features), got shape {tuple(x.shape)}")
    if _autocast_enabled(x.device.type):  # as lora_linear: compute in the autocast dtype, with autocast off
        return _outside_autocast(lora_linear_mixed, x, weight, bias, adapters, row_adapter, training, backend,
                                 segmented, store)
    plan = _kept_plan(store, x, training) if segmented is not False else None
    if plan is not None:  # a layer's pool inside mixed_adapters, called before with these rows: checked then
        name = resolve_backend(backend, x)
        return _run_segmented(x, weight, bias, adapters, plan, store, name,
                              draw_seed_tensor(x.device) if plan.dropout else None)

    batch, n = x.shape[0], len(adapters)
    index = _row_index(row_adapter, n, batch, x.device)
    out_features = weight.shape[0]
    for a, term in enumerate(adapters):
        if term.lora_A.dim() != 2 or tuple(term.lora_B.shape) != (out_features, term.lora_A.shape[0]) \
                or term.lora_A.shape[1] != x.shape[-1]:
            raise ValueError(f"adapter {a}: lora_A {tuple(term.lora_A.shape)} and lora_B {tuple(term.lora_B.shape)} "
                             f"do not fit a {x.shape[-1]}->{out_features} layer")
    if segmented not in ("auto", True, False):
        raise ValueError(f"segmented must be 'auto', True or False, got {segmented!r}")
    name = resolve_backend(backend, x)
    ps = [float(term.dropout_p) if training else 0.0 for term in adapters]
    if n == 0:
        if _quantized(weight):
            return weight.linear(_rows(x), bias).view(*x.shape[:-1], out_features)
        return F.linear(x, weight, bias)
    seed = draw_seed_tensor(x.device) if any(p > 0 for p in ps) else None

    if name == "eager":
        dense, masks, realised = _eager_inputs(x, weight, seed, ps)
        terms = _reference_terms(adapters, x.dtype)
        return lora_linear_mixed_reference(x, dense, bias, terms, index.masked_fill(index == n, -1), masks, realised)

    dora = any(t.magnitude is not None for t in adapters)
    layout = row_layout(index.masked_fill(index == n, -1))
    if takes_segments(adapters, layout.host, segmented):
        return _segmented(x, weight, bias, adapters, layout, training, name, store, seed)
    uniform_p = len(set(ps)) == 1
    impl = backend_for(backend, name, _quantized(weight))
    if name == "triton" and not uniform_p:
        # The kernels take one p per launch; the torch backend with the kernels' own mask thresholds per row.
        impl = torch_backend.KERNEL_MASK
    rows_per_entry = _rows(x).shape[0] // batch if batch else 0
    table = _adapters_scale_table(adapters, x)
    scale = table.index_select(0, index).repeat_interleave(rows_per_entry, dim=0)  # (M, Σr)
    if uniform_p:
        dropout_p = ps[0]
    else:  # per-row probabilities, float64 so that each row's threshold is computed as for a float p
        p_table = torch.tensor(ps + [0.0], dtype=torch.float64, device=x.device)
        dropout_p = p_table.index_select(0, index).repeat_interleave(rows_per_entry)
    lora_As, lora_Bs = [t.lora_A for t in adapters], [t.lora_B for t in adapters]
    if dora:  # DoRA rows: one column scale per batch row (G = B)
        col_scale = _dora_row_scales(adapters, weight, x, index, backend)
        lora_A, lora_B = _concatenated(lora_As, lora_Bs, x.dtype)
        impl = torch_backend.KERNEL_MASK if impl is torch_backend.KERNEL_MASK else dora_impl(backend, name,
                                                                                              _quantized(weight))
        return scaled_lora_linear(x, weight, bias, lora_A, lora_B, col_scale, scale, dropout_p, seed, backend, impl)
    return _scaled_lora_linear(x, weight, bias, lora_As, lora_Bs, scale, dropout_p, seed, impl)


# The segmented path's fixed cost beside the concatenation, in rank columns per token: its extra passes (a
# gather of each row's adapter, batched matmuls per rank, the gradients summed per slot; on a GPU three more
# launches). 16 puts the switch between two adapters of equal rank (the concatenation: 2r columns, no extra
# pass) and four, where both measure and predict the segmented path cheaper: benchmarks/many_adapters.py on
# the CPU, 4 rank-16 adapters, 1.07x one adapter against the concatenation's 1.20x; benchmarks/cost_model.py,
# H100/A100 at 512-768 wide, 0.79-0.86x the concatenation's time (at 4096 wide within 3% of it).
SEGMENT_OVERHEAD_RANKS = 16


def segments_pay(adapters: Sequence[AdapterTerm], row_slots: Optional[Sequence[int]] = None) -> bool:
    """True when the segmented path is predicted cheaper than the concatenation: the concatenation pays Σr
    rank columns on every token, the segmented path each row's own rank (the largest when the rows are not
    known on the host) plus :data:`SEGMENT_OVERHEAD_RANKS`."""
    ranks = [t.lora_A.shape[0] for t in adapters]
    if len(ranks) < 2:
        return False
    if row_slots:
        own = sum(ranks[a] if a >= 0 else 0 for a in row_slots) / len(row_slots)
    else:
        own = max(ranks)
    return sum(ranks) > own + SEGMENT_OVERHEAD_RANKS


def takes_segments(adapters: Sequence[AdapterTerm], row_slots: Optional[Sequence[int]],
                   segmented: Union[str, bool] = "auto") -> bool:
    """Whether :func:`lora_linear_mixed` runs ``adapters`` on the segmented path: never with a DoRA adapter;
    forced by ``segmented=True``; under ``"auto"`` when :func:`segments_pay` and the stores can stack them."""
    if any(t.magnitude is not None for t in adapters) or segmented is False:
        return False
    return segmented is True or segments_pay(adapters, row_slots) and _plain(adapters)


def _plain(adapters: Sequence[AdapterTerm]) -> bool:
    """True when every adapter tensor is a plain tensor (not FSDP2's DTensor): what the stores can stack."""
    return all(type(t.lora_A.data) is torch.Tensor and type(t.lora_B.data) is torch.Tensor for t in adapters)


def _segmented_impl(name: str, x: torch.Tensor):
    """The primitives of the segmented path: the Triton kernels where they run, else the torch backend (with
    the kernels' mask wherever the kernels would have run, so that masks agree across a fallback)."""
    if name == "triton":
        from .backends.triton import segmented_kernels
        kernels = segmented_kernels()
        if kernels is not None:
            return kernels
        return torch_backend.KERNEL_MASK
    return torch_backend.DEFAULT


def _tokens_per_row(x: torch.Tensor) -> int:
    return x.numel() // (x.shape[0] * x.shape[-1]) if x.shape[0] and x.shape[-1] else 0


def _kept_plan(store: Optional[Slots], x: torch.Tensor, training: bool):
    """The plan a layer's slots keep for this batch shape (None: none yet, or no kept plans)."""
    if store is None or not store.plans:
        return None
    return store.plans.get((_tokens_per_row(x), training, x.device))


@torch.compiler.disable
def _segmented(x, weight, bias, adapters: Sequence[AdapterTerm], layout, training: bool, name: str,
               store: Optional[Slots], seed: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`lora_linear_mixed` on the segmented path (:mod:`lora_kernels.segmented`). Under torch.compile it
    runs eagerly (a graph break): the plan and the pool are host-side bookkeeping."""
    if store is None or store.a_store.dtype != x.dtype and name == "triton":
        store = stack_adapters([(t.lora_A, t.lora_B) for t in adapters], x.dtype)
    tokens = _tokens_per_row(x)
    plan = _plan(store, adapters, layout, tokens, training, x.device)
    if store.plans is not None:  # a layer's pool inside mixed_adapters: the row layout is fixed
        store.plans[(tokens, training, x.device)] = plan
    return _run_segmented(x, weight, bias, adapters, plan, store, name, seed)


@torch.compiler.disable
def _run_segmented(x, weight, bias, adapters: Sequence[AdapterTerm], plan, store: Slots, name: str,
                   seed: Optional[torch.Tensor]) -> torch.Tensor:
    x2d = _rows(x)
    impl = _segmented_impl(name, x)
    if not torch.is_grad_enabled() or not (x.requires_grad or _requires_grad(weight) or _requires_grad(bias)
                                           or any(t.lora_A.requires_grad or t.lora_B.requires_grad for t in adapters)):
        y = segmented_forward(x2d, weight, bias, store.a_store, store.b_store, plan, seed, impl)
    else:
        params = [p for t in adapters for p in (t.lora_A, t.lora_B)]
        used = [(slot, t.lora_A.shape[0]) for slot, t in zip(store.slots, adapters)]
        y = segmented_lora_linear(x2d, weight, bias, store.a_store, store.b_store, plan, used, params, seed, impl)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def _requires_grad(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def _plan(store: Slots, adapters: Sequence[AdapterTerm], layout, tokens: int, training: bool, device):
    """The :class:`lora_kernels.segmented.SegmentPlan` of a batch whose rows use ``adapters`` (``layout``: each
    row's index into them) sitting in ``store``."""
    slots = store.slots
    count = store.a_store.shape[0]
    scalings, ps = [0.0] * count, [0.0] * count
    for slot, term in zip(slots, adapters):
        scalings[slot], ps[slot] = float(term.scaling), float(term.dropout_p)
    slot_table = torch.tensor(list(slots) + [-1], dtype=torch.int64).to(device)
    row_slot = slot_table.index_select(0, layout.row_slot.masked_fill(layout.row_slot < 0, len(slots)))
    host = None if layout.host is None else tuple(slots[a] if a >= 0 else -1 for a in layout.host)
    return build_plan(row_layout(row_slot, host), tokens, store.ranks, scalings, ps, slots, training)


def _concatenated(lora_As, lora_Bs, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A_cat (Σr, K), B_cat (N, Σr))`` in ``dtype``; autograd splits their gradients back per adapter."""
    return torch.cat([a.to(dtype) for a in lora_As]), torch.cat([b.to(dtype) for b in lora_Bs], dim=1)


def _scaled_lora_linear(x, weight, bias, lora_As, lora_Bs, scale, dropout_p, seed, impl) -> torch.Tensor:
    """One fused call over the concatenated adapters with a tensor ``scale`` ((M, Σr) or (1, Σr))."""
    lora_A, lora_B = _concatenated(lora_As, lora_Bs, x.dtype)
    y = _LoRALinearFunction.apply(_rows(x), weight, bias, lora_A, lora_B, scale, dropout_p, seed, impl)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def lora_linear_stacked(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    adapters: Sequence[AdapterTerm],
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Several adapters on every row (PEFT's several active adapters, whose terms add up) in one fused call:
    the concatenation above with one scale row for all rows. They share one dropout p, hence one mask (each
    adapter sees the mask it would draw alone at that seed).

    Args:
        x, weight, bias, training, backend: as for :func:`lora_linear_mixed` (x may have any leading shape).
        adapters: the adapters whose terms add up on every row.

    Returns:
        x·Wᵀ + b + Σ_a s_a·(dropout(x)·A_aᵀ)·B_aᵀ, of shape (..., out_features).

    Raises:
        ValueError: (in training) the adapters' dropout probabilities differ; the caller adds such terms
            separately.
    """
    ps = {float(t.dropout_p) if training else 0.0 for t in adapters}
    if len(ps) != 1:
        raise ValueError(f"stacked adapters must share one dropout probability, got {sorted(ps)}")
    name = resolve_backend(backend, x)
    dropout_p = ps.pop()
    seed = draw_seed_tensor(x.device) if dropout_p > 0 else None
    if name == "eager":  # the reference's terms, one per adapter, on the shared mask
        dense, (mask,), (realised,) = _eager_inputs(x, weight, seed, [dropout_p])
        terms = _reference_terms(adapters, x.dtype)
        return lora_linear_stacked_reference(x, dense, bias, terms, mask, realised)
    table = _adapters_scale_table(adapters, x)
    scale = table[:-1].sum(0, keepdim=True)  # (1, Σr): every adapter's scale on its own columns
    return _scaled_lora_linear(x, weight, bias, [t.lora_A for t in adapters], [t.lora_B for t in adapters], scale,
                               dropout_p, seed, backend_for(backend, name, _quantized(weight)))
