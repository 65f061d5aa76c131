"""lora_kernels/ops/segmented.py: the six segmented primitives on Triton's interpreter against a float64 loop
over batch rows (each row's A and B read from its store slot, the dropout mask of the single-adapter path at
that row's p).

Cases: 1, 4, 6 and 64 slots; mixed ranks 1-64 (and 100 under a rank bound of 128: two rank blocks); rows with
slot -1; slots no row uses (their gradients must be zero); T = 1, T below and above a token block and not a
multiple of one; K and N not multiples of the column blocks; dropout on and off (slot probabilities that are
not zero with dropout off must be ignored); fp32 and fp16. bf16 is compiled by the compile gate only (the
interpreter's bf16 ``tl.dot`` is wrong upstream). The unused part of every store slot is NaN: a kernel that
reads it fails.
"""
import dataclasses
import types

import pytest
import torch

from lora_kernels.backends.torch import KERNEL_MASK
from lora_kernels.ops import segmented as seg
from lora_kernels.testing import assert_close

SEED = 1234


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    row_slot: tuple  # per batch row, -1 = no adapter
    slot_rank: tuple  # per slot of the pool (used or not)
    tokens: int  # T
    k: int
    n: int
    rank_bound: int = 0  # 0: the largest used rank
    rank_capacity: int = 0  # 0: the largest rank of the pool


def _many_slots():
    ranks = (4, 8, 12, 16, 32, 64)
    slot_rank = tuple(ranks[i % len(ranks)] for i in range(64))
    row_slot = tuple(-1 if b % 9 == 4 else (b * 7) % 64 for b in range(64))
    return Case("64 slots", row_slot, slot_rank, tokens=1, k=24, n=20)


CASES = [
    Case("1 slot", (0, 0, 0), (8,), tokens=5, k=40, n=24),
    Case("4 slots", (2, -1, 0, 3, 2, 1), (4, 16, 12, 32), tokens=7, k=37, n=20),
    Case("unused slots", (4, 1, 1, -1), (5, 64, 3, 7, 1, 9), tokens=20, k=33, n=70, rank_capacity=70),
    _many_slots(),
    Case("rank bound 128", (0, 1, 0), (100, 7), tokens=3, k=30, n=18, rank_bound=128),
    Case("loose bound", (1, 0, -1), (3, 33), tokens=17, k=16, n=16, rank_bound=40),
]


def _plan(case: Case, dropout: bool):
    """A stand-in for lora_kernels.segmented.SegmentPlan with the spec's attributes."""
    row_slot = torch.tensor(case.row_slot, dtype=torch.int32)
    slots = len(case.slot_rank)
    used = sorted({s for s in case.row_slot if s >= 0})
    rank_bound = case.rank_bound or max(case.slot_rank[s] for s in used)
    order = sorted(range(len(case.row_slot)), key=lambda b: (case.row_slot[b] < 0, case.row_slot[b]))
    counts = [sum(1 for s in case.row_slot if s == i) for i in range(slots)]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return types.SimpleNamespace(
        row_slot=row_slot, tokens_per_row=case.tokens, rank_bound=rank_bound,
        slot_rank=torch.tensor(case.slot_rank, dtype=torch.int32),
        slot_scaling=torch.tensor([0.5 + 0.25 * (i % 5) for i in range(slots)], dtype=torch.float32),
        slot_p=torch.tensor([(0.1, 0.25, 0.0, 0.5)[i % 4] for i in range(slots)], dtype=torch.float32),
        dropout=dropout, rows_by_slot=torch.tensor(order, dtype=torch.int32),
        slot_row_start=torch.tensor(starts, dtype=torch.int32))


def _capacity(case: Case) -> int:
    return case.rank_capacity or max(max(case.slot_rank), case.rank_bound)


def _store(case: Case, width: int, dtype, layout: str, gen) -> torch.Tensor:
    """(P, R_cap·width): slot i's A_i (r, width) or B_i (width, r) row-major in front, NaN behind."""
    cap = _capacity(case)
    store = torch.full((len(case.slot_rank), cap * width), float("nan"))
    for i, r in enumerate(case.slot_rank):
        store[i, :r * width] = torch.randn(r * width, generator=gen) / (width ** 0.5 if layout == "A" else r ** 0.5)
    return store.to(dtype)


def _a(store, i, r, k):
    return store[i, :r * k].double().view(r, k)


def _b(store, i, r, n):
    return store[i, :n * r].double().view(n, r)


def _keep(case: Case, plan, width: int):
    """The kernels' keep-mask (M, width): the single-adapter hash mask at each token's slot's p."""
    m = len(case.row_slot) * case.tokens
    if not plan.dropout:
        return torch.ones(m, width, dtype=torch.float64)
    p = torch.tensor([float(plan.slot_p[s]) if s >= 0 else 0.0 for s in case.row_slot]).repeat_interleave(case.tokens)
    return (~KERNEL_MASK.drop_mask(SEED, (m, width), p, torch.device("cpu"))).double()


def _rows(case: Case, b: int) -> slice:
    return slice(b * case.tokens, (b + 1) * case.tokens)


def _inv_keep(plan, i):
    return 1.0 / (1.0 - float(plan.slot_p[i])) if plan.dropout else 1.0


def _inputs(case: Case, dtype, gen):
    m = len(case.row_slot) * case.tokens
    x = torch.randn(m, case.k, generator=gen).to(dtype)
    grad_y = torch.randn(m, case.n, generator=gen).to(dtype)
    return x, grad_y


def _small(case: Case, plan, dtype, gen) -> torch.Tensor:
    """An (M, R) operand for the expand and grad kernels: zero beyond each row's rank, as S and dS are."""
    m = len(case.row_slot) * case.tokens
    s = torch.randn(m, plan.rank_bound, generator=gen)
    for b, i in enumerate(case.row_slot):
        s[_rows(case, b), (case.slot_rank[i] if i >= 0 else 0):] = 0
    return s.to(dtype)


PARAMS = [pytest.param(case, dtype, dropout, id=f"{case.name}-{str(dtype)[6:]}-{'dropout' if dropout else 'plain'}")
          for case in CASES for dtype in (torch.float32, torch.float16) for dropout in (False, True)]


@pytest.mark.parametrize("case,dtype,dropout", PARAMS)
def test_shrink_and_grad_s(case, dtype, dropout):
    gen = torch.Generator().manual_seed(0)
    plan = _plan(case, dropout)
    x, grad_y = _inputs(case, dtype, gen)
    a_store, b_store = _store(case, case.k, dtype, "A", gen), _store(case, case.n, dtype, "B", gen)
    keep = _keep(case, plan, case.k)
    m, rb = x.shape[0], plan.rank_bound
    s_ref, s_mag, ds_ref, ds_mag = (torch.zeros(m, rb, dtype=torch.float64) for _ in range(4))
    for b, i in enumerate(case.row_slot):
        if i < 0:
            continue
        r, rows = case.slot_rank[i], _rows(case, b)
        a, bb = _a(a_store, i, r, case.k), _b(b_store, i, r, case.n)
        xs = x[rows].double() * keep[rows] * _inv_keep(plan, i)
        s_ref[rows, :r], s_mag[rows, :r] = xs @ a.t(), xs.abs() @ a.abs().t()
        scale = float(plan.slot_scaling[i]) * _inv_keep(plan, i)
        ds_ref[rows, :r] = scale * grad_y[rows].double() @ bb
        ds_mag[rows, :r] = scale * grad_y[rows].double().abs() @ bb.abs()

    s = seg.segmented_shrink(x, a_store, plan, SEED)
    assert s.dtype == dtype and s.shape == (m, rb)
    assert_close(s, s_ref, dtype, "S", magnitude=s_mag)
    grad_s = seg.segmented_grad_s(grad_y, b_store, plan)
    assert grad_s.dtype == dtype and grad_s.shape == (m, rb)
    assert_close(grad_s, ds_ref, dtype, "dS", magnitude=ds_mag)
    for b, i in enumerate(case.row_slot):  # exact zeros where the contract says zero
        r = case.slot_rank[i] if i >= 0 else 0
        assert (s[_rows(case, b), r:] == 0).all() and (grad_s[_rows(case, b), r:] == 0).all()


@pytest.mark.parametrize("case,dtype,dropout", PARAMS)
def test_expand_and_grad_x(case, dtype, dropout):
    gen = torch.Generator().manual_seed(1)
    plan = _plan(case, dropout)
    a_store, b_store = _store(case, case.k, dtype, "A", gen), _store(case, case.n, dtype, "B", gen)
    s, grad_s = _small(case, plan, dtype, gen), _small(case, plan, dtype, gen)
    m = s.shape[0]
    y0 = torch.randn(m, case.n, generator=gen).to(dtype)
    dx0 = torch.randn(m, 2 * case.k, generator=gen).to(dtype)[:, ::2]  # a strided grad_x
    keep = _keep(case, plan, case.k)
    y_ref, y_mag = y0.double().clone(), y0.double().abs()
    dx_ref, dx_mag = dx0.double().clone(), dx0.double().abs()
    for b, i in enumerate(case.row_slot):
        if i < 0:
            continue
        r, rows = case.slot_rank[i], _rows(case, b)
        a, bb = _a(a_store, i, r, case.k), _b(b_store, i, r, case.n)
        scaling = float(plan.slot_scaling[i])
        y_ref[rows] += scaling * s[rows, :r].double() @ bb.t()
        y_mag[rows] += scaling * s[rows, :r].double().abs() @ bb.abs().t()
        dx_ref[rows] += keep[rows] * (grad_s[rows, :r].double() @ a)
        dx_mag[rows] += keep[rows] * (grad_s[rows, :r].double().abs() @ a.abs())

    y = y0.clone()
    assert seg.segmented_expand(s, b_store, plan, y) is None
    assert_close(y, y_ref, dtype, "y", magnitude=y_mag)
    dx = dx0.clone()
    seg.segmented_grad_x(grad_s, a_store, plan, SEED, dx)
    assert_close(dx, dx_ref, dtype, "dX", magnitude=dx_mag)
    for b, i in enumerate(case.row_slot):  # rows without an adapter are untouched, bit for bit
        if i < 0:
            assert torch.equal(y[_rows(case, b)], y0[_rows(case, b)])
            assert torch.equal(dx[_rows(case, b)], dx0[_rows(case, b)])


@pytest.mark.parametrize("case,dtype,dropout", PARAMS)
def test_grad_a_and_grad_b(case, dtype, dropout):
    gen = torch.Generator().manual_seed(2)
    plan = _plan(case, dropout)
    x, grad_y = _inputs(case, dtype, gen)
    s, grad_s = _small(case, plan, dtype, gen), _small(case, plan, dtype, gen)
    keep = _keep(case, plan, case.k)
    cap, slots = _capacity(case), len(case.slot_rank)
    ga_ref, ga_mag = torch.zeros(slots, cap * case.k, dtype=torch.float64), torch.zeros(slots, cap * case.k, dtype=torch.float64)
    gb_ref, gb_mag = torch.zeros(slots, cap * case.n, dtype=torch.float64), torch.zeros(slots, cap * case.n, dtype=torch.float64)
    for b, i in enumerate(case.row_slot):
        if i < 0:
            continue
        r, rows = case.slot_rank[i], _rows(case, b)
        xs = x[rows].double() * keep[rows]
        ga_ref[i, :r * case.k] += (grad_s[rows, :r].double().t() @ xs).flatten()
        ga_mag[i, :r * case.k] += (grad_s[rows, :r].double().abs().t() @ xs.abs()).flatten()
        scaling = float(plan.slot_scaling[i])
        gb_ref[i, :case.n * r] += scaling * (grad_y[rows].double().t() @ s[rows, :r].double()).flatten()
        gb_mag[i, :case.n * r] += scaling * (grad_y[rows].double().abs().t() @ s[rows, :r].double().abs()).flatten()

    ga = seg.segmented_grad_a(grad_s, x, plan, SEED, rank_capacity=cap)
    assert ga.dtype == dtype and ga.shape == (slots, cap * case.k)
    gb = seg.segmented_grad_b(grad_y, s, plan, rank_capacity=cap)
    assert gb.dtype == dtype and gb.shape == (slots, cap * case.n)
    for i in range(slots):  # per slot: the magnitude of its own sums sets its scale
        r = case.slot_rank[i]
        assert_close(ga[i, :r * case.k], ga_ref[i, :r * case.k], dtype, f"dA slot {i}", magnitude=ga_mag[i, :r * case.k])
        assert_close(gb[i, :case.n * r], gb_ref[i, :case.n * r], dtype, f"dB slot {i}", magnitude=gb_mag[i, :case.n * r])
        # the rest of a slot, and every slot without rows (its used part too), is exactly zero
        assert (ga[i, r * case.k:] == 0).all() and (gb[i, case.n * r:] == 0).all()
        if i not in case.row_slot:
            assert (ga[i] == 0).all() and (gb[i] == 0).all()


def test_grads_are_deterministic_and_default_to_the_rank_bound():
    case = CASES[1]
    plan = _plan(case, True)
    gen = torch.Generator().manual_seed(3)
    x, grad_y = _inputs(case, torch.float32, gen)
    s, grad_s = _small(case, plan, torch.float32, gen), _small(case, plan, torch.float32, gen)
    first = seg.segmented_grad_a(grad_s, x, plan, SEED)
    assert first.shape == (4, plan.rank_bound * case.k)
    assert torch.equal(first, seg.segmented_grad_a(grad_s, x, plan, SEED))
    plan.rank_capacity = 40  # a plan that carries the store's capacity
    assert seg.segmented_grad_b(grad_y, s, plan).shape == (4, 40 * case.n)


def test_dropout_mask_matches_the_single_adapter_kernels():
    """With one slot at p, the shrink's mask is the single-adapter path's mask (lora_linear.dropout_mask)."""
    from lora_kernels.ops.lora_linear import dropout_mask

    case = Case("1 slot", (0, 0), (16,), tokens=9, k=40, n=8)
    plan = _plan(case, True)
    plan.slot_p[0] = 0.3
    a_store = torch.eye(16, 40).reshape(1, -1).contiguous()  # S[:, j] = x̃[:, j]: the mask shows through
    x = torch.ones(18, 40)
    s = seg.segmented_shrink(x, a_store, plan, SEED)
    keep = dropout_mask(SEED, (18, 40), 0.3, torch.device("cpu"))[:, :16]
    assert torch.equal(s != 0, keep)
    assert torch.allclose(s[keep], torch.full_like(s[keep], 1 / 0.7))


def test_checks_name_what_does_not_fit():
    case = CASES[0]
    plan = _plan(case, False)
    gen = torch.Generator().manual_seed(4)
    x, _ = _inputs(case, torch.float32, gen)
    a_store = _store(case, case.k, torch.float32, "A", gen)
    with pytest.raises(ValueError, match="rows"):
        seg.segmented_shrink(x[:-1], a_store, plan, SEED)
    with pytest.raises(TypeError, match="dtype"):
        seg.segmented_shrink(x.half(), a_store, plan, SEED)
    with pytest.raises(ValueError, match="R_cap"):
        seg.segmented_shrink(x, a_store[:, :4], plan, SEED)
    with pytest.raises(ValueError, match="rank_capacity"):
        seg.segmented_grad_a(torch.zeros(x.shape[0], plan.rank_bound), x, plan, SEED, rank_capacity=2)
    with pytest.raises(ValueError, match="seed"):
        seg.segmented_shrink(x, a_store, _plan(case, True), None)


def test_expand_adds_in_the_output_dtype():
    """fp16 S and B into an fp32 y: the sum is formed in fp32 and stored as fp32 (the output pointer's dtype)."""
    case = CASES[1]
    plan = _plan(case, False)
    gen = torch.Generator().manual_seed(5)
    b_store = _store(case, case.n, torch.float16, "B", gen)
    s = _small(case, plan, torch.float16, gen)
    y0 = torch.randn(s.shape[0], case.n, generator=gen)
    y = y0.clone()
    seg.segmented_expand(s, b_store, plan, y)
    ref = y0.double().clone()
    for b, i in enumerate(case.row_slot):
        if i >= 0:
            r, rows = case.slot_rank[i], _rows(case, b)
            ref[rows] += float(plan.slot_scaling[i]) * s[rows, :r].double() @ _b(b_store, i, r, case.n).t()
    assert y.dtype == torch.float32
    assert_close(y, ref, torch.float32, "y (fp32 out)")
