"""The Triton backend (lora_kernels/ops/lora_linear.py) against the float64 reference.

Without CUDA the kernels run on Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1), which cannot
do bf16 ``tl.dot``: bf16 cases run only on a GPU. Shapes are small (tens to ~200 per dimension) so the whole
file stays within a few minutes on a 2-core CPU; odd sizes make every tile edge and every rank padding
path run. Each comparison feeds the reference the exact mask the kernels generate (``dropout_mask``).
"""
import contextlib
import math

import pytest
import torch

from helpers import TOLERANCES, assert_close
from lora_kernels import lora_linear, lora_linear_reference
from lora_kernels.backends import draw_seed_tensor

ops = pytest.importorskip("lora_kernels.ops.lora_linear")
launch = pytest.importorskip("lora_kernels.ops.launch")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="bf16 tl.dot and large memory need a GPU (the interpreter lacks bf16)")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)]
NAMES = ("x", "weight", "bias", "lora_A", "lora_B")
ONLY_DX = (True, False, False, False, False)
ONLY_DA = (False, False, False, True, False)

# Small blocks, every reduction split over programs: exercises the fp32 partial-sum workspaces and their
# fixed-order reduction, which the default interpreter configs (32-blocks, no splits) never use.
_B16 = ops.KernelConfig(16, 16, 16, group_m=2)
SPLIT_CONFIGS = ops.LoRAKernelConfigs(_B16, _B16, _B16, _B16, _B16, _B16, max_block_r=16, target_programs=256,
                                      min_split_tiles=1)


def _ieee_fp32_matmuls():
    """IEEE fp32 matmuls through both torch APIs, leaving a state that either API can read (torch's legacy
    getters raise after the new ``fp32_precision`` API was used, unless the new API set it last)."""
    if hasattr(torch.backends, "fp32_precision"):
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.set_float32_matmul_precision("highest")


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 is checked at IEEE precision (PyTorch's default "highest"), whatever another test set."""
    _ieee_fp32_matmuls()
    yield
    _ieee_fp32_matmuls()


def make_inputs(lead, k, n, r, dtype, bias=True, seed=0):
    """x (*lead, k), W (n, k), b (n,), A (r, k), B (n, r) in `dtype` on DEVICE, B non-zero."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(*lead, k, generator=g),
        "weight": torch.randn(n, k, generator=g) / math.sqrt(max(k, 1)),
        "bias": torch.randn(n, generator=g) if bias else None,
        "lora_A": torch.randn(r, k, generator=g) / math.sqrt(max(k, 1)),
        "lora_B": torch.randn(n, r, generator=g) / math.sqrt(r),
    }
    return {name: (v.to(device=DEVICE, dtype=dtype) if v is not None else None) for name, v in t.items()}


def reference_grads(inputs, grad_out, scaling, mask, p, wanted):
    """y and the gradients of `wanted` from the reference in float64 on the same rounded inputs."""
    t64 = {n: (v.detach().double().requires_grad_(n in wanted) if v is not None else None) for n, v in inputs.items()}
    y = lora_linear_reference(**t64, scaling=scaling, dropout_mask=mask, dropout_p=p)
    grads = torch.autograd.grad(y, [t64[n] for n in wanted], grad_out.double()) if wanted else []
    return y, dict(zip(wanted, grads))


def run_backend(inputs, grad_out, scaling, p, wanted, seed):
    """y and the gradients of `wanted` through ``lora_linear(backend="triton")``, dropout seed `seed`."""
    t = {n: (v.detach().clone().requires_grad_(n in wanted) if v is not None else None) for n, v in inputs.items()}
    torch.manual_seed(seed)
    y = lora_linear(**t, scaling=scaling, dropout_p=p, backend="triton")
    grads = torch.autograd.grad(y, [t[n] for n in wanted], grad_out) if wanted else []
    return y, dict(zip(wanted, grads))


def seed_drawn_by_op(seed):
    """The dropout seed ``lora_linear`` draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return draw_seed_tensor(DEVICE)


def check_against_reference(lead, k, n, r, dtype, bias, p, wanted, scaling=0.75, tolerance=None):
    """Forward and the ``wanted`` gradients vs the float64 reference, within ``TOLERANCES[tolerance or dtype]``."""
    tolerance = tolerance or dtype
    inputs = make_inputs(lead, k, n, r, dtype, bias=bias)
    grad_out = torch.randn(*lead, n, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    mask = ops.dropout_mask(seed_drawn_by_op(1234), (*lead, k), p, DEVICE) if p > 0 else None
    y, grads = run_backend(inputs, grad_out, scaling, p, wanted, seed=1234)
    y_ref, grads_ref = reference_grads(inputs, grad_out, scaling, mask, p, wanted)
    assert y.dtype == dtype and tuple(y.shape) == (*lead, n)
    assert_close(y, y_ref, tolerance, "y")
    for name in wanted:
        assert grads[name].dtype == dtype
        assert_close(grads[name], grads_ref[name], tolerance, f"d{name}")


# (leading dims of x, K, N, rank, bias, dropout p, gradients asked for): odd sizes that are not multiples of
# the 16/32 blocks, M = 0 and 1, several leading dims, ranks 1, 3, 16, 17, 64 and above 64 (rank looped in
# blocks), frozen and trainable base weight.
FROZEN = ("x", "lora_A", "lora_B")
ALL = ("x", "weight", "bias", "lora_A", "lora_B")
CASES = [
    ((0,), 24, 16, 4, True, 0.0, ALL),
    ((1,), 17, 9, 1, True, 0.3, FROZEN),
    ((1,), 64, 48, 16, False, 0.0, ALL),
    ((37,), 45, 29, 3, True, 0.0, FROZEN),
    ((3, 5, 7), 33, 50, 17, True, 0.25, ALL),
    ((2, 61), 96, 80, 16, False, 0.1, FROZEN),
    ((129,), 40, 130, 64, True, 0.5, ALL),
    ((70,), 150, 33, 100, False, 0.2, FROZEN),
    ((200,), 70, 190, 8, True, 0.0, ("lora_A", "lora_B")),
    ((48,), 31, 20, 5, True, 0.4, ("weight", "bias")),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n,r,bias,p,wanted", CASES)
def test_matches_reference(lead, k, n, r, bias, p, wanted, dtype):
    wanted = tuple(w for w in wanted if bias or w != "bias")
    check_against_reference(lead, k, n, r, dtype, bias, p, wanted)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n,r,p", [((53,), 70, 41, 37, 0.25), ((90,), 100, 120, 3, 0.0)])
def test_split_reductions_match_reference(lead, k, n, r, p, dtype):
    """Small blocks with every reduction split over programs: the fp32 partial sums and their reduction."""
    with ops.override_configs(SPLIT_CONFIGS):
        check_against_reference(lead, k, n, r, dtype, True, p, ALL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_dy_row_blocks_match_reference(dtype):
    """The dY pass at sm90's wide-layer row block (configs.WIDE_DY_ROWS = 256, 8 warps): two row blocks (the
    second partial), three column tiles (the last partial), a rank that is not a power of two, db."""
    from lora_kernels.ops.configs import WIDE_DY_ROWS

    b32 = ops.KernelConfig(32, 32, 32, group_m=4)
    wide = ops.LoRAKernelConfigs(b32, b32, b32, b32, ops.KernelConfig(WIDE_DY_ROWS, 64, 0, num_warps=8), b32,
                                 max_block_r=64, target_programs=1)
    with ops.override_configs(wide):
        check_against_reference((300,), 40, 130, 17, dtype, True, 0.25, ALL)


def test_non_contiguous_inputs_and_grad():
    """x, weights and dY with arbitrary strides (sliced, transposed, stride-0) are read in place."""
    dtype, scaling, p, seed = torch.float32, 0.5, 0.3, 99
    torch.manual_seed(0)
    base = make_inputs((50,), 2 * 36, 40, 6, dtype)
    x = base["x"][:, ::2]                                                            # (50, 36), strides (72, 2)
    weight = torch.randn(36, 40, device=DEVICE, dtype=dtype).t()                     # (40, 36), strides (1, 40)
    lora_A = torch.randn(36, 6, device=DEVICE, dtype=dtype).t() / 6                  # (6, 36) transposed
    lora_B = base["lora_B"]
    bias = torch.randn(80, device=DEVICE, dtype=dtype)[::2]                          # stride 2
    grad_y = torch.randn(1, 40, device=DEVICE, dtype=dtype).expand(50, 40)           # row stride 0
    assert not x.is_contiguous() and not weight.is_contiguous() and not lora_A.is_contiguous()

    y, s = ops.forward(x, weight, bias, lora_A, lora_B, scaling, p, seed)
    grads = ops.backward(grad_y, x, weight, lora_A, lora_B, s, scaling, p, seed, (True,) * 5)
    inputs = dict(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    mask = ops.dropout_mask(seed, x.shape, p, DEVICE)
    y_ref, grads_ref = reference_grads(inputs, grad_y, scaling, mask, p, NAMES)
    assert_close(y, y_ref, dtype, "y")
    for name, g in zip(NAMES, grads):
        assert_close(g, grads_ref[name], dtype, f"d{name}")


def test_lora_linear_3d_strided_input():
    """A permuted 3-D input through the public op (functional reshapes it to 2-D)."""
    dtype = torch.float16
    inputs = make_inputs((6, 5), 40, 24, 4, dtype)
    inputs["x"] = inputs["x"].reshape(5, 6, 40).transpose(0, 1)  # (6, 5, 40), not contiguous
    grad_out = torch.randn(6, 5, 24, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    mask = ops.dropout_mask(seed_drawn_by_op(5), (6, 5, 40), 0.2, DEVICE)
    y, grads = run_backend(inputs, grad_out, 2.0, 0.2, ALL, seed=5)
    y_ref, grads_ref = reference_grads(inputs, grad_out, 2.0, mask, 0.2, ALL)
    assert_close(y, y_ref, dtype, "y")
    for name in ALL:
        assert_close(grads[name], grads_ref[name], dtype, f"d{name}")


@pytest.mark.parametrize("needs", [(True, False, False, True, True), (False, False, False, True, True),
                                   (True, False, False, False, False), (False, True, True, False, False),
                                   (False, False, False, False, True), (False, False, True, False, False)])
def test_only_requested_gradients(needs):
    """None for every gradient not asked for; the others still exact (x/W/S may be absent when unused)."""
    dtype, scaling, p, seed = torch.float32, 1.5, 0.2, 3
    t = make_inputs((33,), 20, 18, 2, dtype)
    y, s = ops.forward(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], scaling, p, seed)
    grad_y = torch.randn_like(y)
    need_x, need_w, _, need_a, need_bb = needs
    grads = ops.backward(grad_y, t["x"] if (need_w or need_a) else None, t["weight"] if need_x else None,
                         t["lora_A"], t["lora_B"], s if need_bb else None, scaling, p, seed, needs)
    wanted = tuple(name for name, need in zip(NAMES, needs) if need)
    _, grads_ref = reference_grads(t, grad_y, scaling, ops.dropout_mask(seed, (33, 20), p, DEVICE), p, wanted)
    for name, need, g in zip(NAMES, needs, grads):
        if need:
            assert_close(g, grads_ref[name], dtype, f"d{name}")
        else:
            assert g is None, f"d{name} was not asked for"


@pytest.mark.parametrize("m,k,n", [(0, 12, 8), (5, 0, 8), (5, 12, 0)])
def test_empty_dimensions(m, k, n):
    """M = 0 launches nothing; K = 0 or N = 0 give the right empty or zero results."""
    t = make_inputs((m,), k, n, 3, torch.float32)
    y, s = ops.forward(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.5, 0.1, 1)
    assert tuple(y.shape) == (m, n) and tuple(s.shape) == (m, 3)
    grad_y = torch.randn(m, n, device=DEVICE)
    grads = ops.backward(grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], s, 0.5, 0.1, 1, (True,) * 5)
    y_ref, ref = reference_grads(t, grad_y, 0.5, ops.dropout_mask(1, (m, k), 0.1, DEVICE), 0.1, NAMES)
    assert_close(y, y_ref, torch.float32, "y")
    for name, g in zip(NAMES, grads):
        expected = ref.get(name, torch.zeros(t[name].shape, dtype=torch.float64))  # no gradient flows: zeros
        assert_close(g, expected, torch.float32, f"d{name}")


def test_dropout_same_mask_in_every_kernel():
    """Read the mask back out of the forward (S), dX and dA kernels and compare it with ``dropout_mask``,
    under two different block configurations: the mask depends on (seed, row, col) only.

    With M = K = N = r, A = B = I, W = 0 and scaling 1: S = x̃; dY = I gives dS = I and dA = x̃; dY = 1 gives
    dS = 1 and dX = keep/(1-p). x has no zeros, so the non-zeros of S, dA and dX are exactly the kept elements.
    """
    size, p, seed = 40, 0.5, 2024
    eye = torch.eye(size, device=DEVICE)
    x = torch.rand(size, size, device=DEVICE) + 0.5
    zeros = torch.zeros(size, size, device=DEVICE)
    expected = ops.dropout_mask(seed, (size, size), p, DEVICE)
    for configs in (None, SPLIT_CONFIGS):
        with ops.override_configs(configs) if configs else contextlib.nullcontext():
            _, s = ops.forward(x, zeros, None, eye, eye, 1.0, p, seed)
            _, _, _, da, _ = ops.backward(eye, x, zeros, eye, eye, s, 1.0, p, seed, ONLY_DA)
            dx, *_ = ops.backward(torch.ones_like(x), x, zeros, eye, eye, s, 1.0, p, seed, ONLY_DX)
        assert torch.equal(s != 0, expected), "forward S kernel"
        assert torch.equal(da != 0, expected), "dA kernel"
        assert torch.equal(dx != 0, expected), "dX kernel"
        assert torch.allclose(s[expected], x[expected] / (1 - p))


def test_dropout_finite_differences():
    """With dropout on, the gradients of x and A equal directional finite differences of the forward under
    the same torch.manual_seed: forward and backward saw the same mask. y is linear in x and in A for a
    fixed mask, so a unit step gives the exact directional derivative up to fp32 rounding."""
    p, scaling = 0.5, 0.8
    t = make_inputs((24,), 36, 20, 5, torch.float32)
    grad_out = torch.randn(24, 20, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _, grads = run_backend(t, grad_out, scaling, p, ("x", "lora_A"), seed=77)

    def loss(**changed):
        kw = {**t, **changed}
        torch.manual_seed(77)
        with torch.no_grad():
            return (lora_linear(**kw, scaling=scaling, dropout_p=p, backend="triton").double() * grad_out).sum()

    g = torch.Generator().manual_seed(2)
    for name in ("x", "lora_A"):
        v = torch.randn(t[name].shape, generator=g).to(DEVICE)
        fd = (loss(**{name: t[name] + v}) - loss(**{name: t[name] - v})) / 2
        analytic = (grads[name].double() * v).sum()
        assert abs(fd - analytic) <= 1e-4 * (grads[name].double().abs() * v.abs()).sum(), (name, fd, analytic)
    # A mask redrawn in backward would be independent of the forward's: the check above would then fail
    # (the LoRA part of dX would use different columns). Guard that this mask matters at all:
    torch.manual_seed(78)
    other = lora_linear(**t, scaling=scaling, dropout_p=p, backend="triton")
    torch.manual_seed(77)
    same = lora_linear(**t, scaling=scaling, dropout_p=p, backend="triton")
    assert not torch.equal(other, same)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_binomial_bounds(p):
    """The number of kept elements in n draws is Binomial(n, 1 - p): within 5 standard deviations
    (a false failure has probability < 1e-6)."""
    n_rows, n_cols = 256, 512
    keep = ops.dropout_mask(12345, (n_rows, n_cols), p, DEVICE)
    n = keep.numel()
    kept = keep.sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) <= 5 * sigma, f"kept {kept} of {n}, expected {n * (1 - p):.0f} ± {5 * sigma:.0f}"


def test_mask_has_no_visible_correlations():
    """At p = 0.5, neighbouring columns, neighbouring rows and the same element under neighbouring seeds
    agree half of the time (each agreement count is Binomial(pairs, 1/2); bound 5 sigma), and the seed
    fully determines the mask."""
    shape = (256, 256)
    a = ops.dropout_mask(7, shape, 0.5, DEVICE)
    b = ops.dropout_mask(8, shape, 0.5, DEVICE)
    assert torch.equal(a, ops.dropout_mask(7, shape, 0.5, DEVICE))
    for name, u, v in (("columns", a[:, 1:], a[:, :-1]), ("rows", a[1:], a[:-1]), ("seeds", a, b),
                       ("rows 2^k apart", a[128:], a[:128])):
        pairs = u.numel()
        agree = (u == v).sum().item()
        assert abs(agree - pairs / 2) <= 5 * math.sqrt(pairs / 4), f"{name}: {agree} of {pairs} agree"


@pytest.mark.parametrize("p", [0.5, 0.1])
def test_mask_joint_drop_rates_on_a_large_mask(p):
    """On a 2048x2048 mask (the torch twin of the kernels' mask: bit-identical, tested above), the joint drop
    rate of two elements is p² for neighbours and for elements 2^k apart in rows and columns, diagonally,
    and across seeds: each count is Binomial(pairs, p²), bounded at 6 sigma (a false failure has
    probability ~1e-9 per count)."""
    drop = ~torch_backend.KERNEL_MASK.dropout_mask(torch.tensor([2024]), (2048, 2048), p, torch.device("cpu"))
    other = ~torch_backend.KERNEL_MASK.dropout_mask(torch.tensor([2025]), (2048, 2048), p, torch.device("cpu"))
    n = drop.numel()
    assert abs(drop.sum().item() - n * p) <= 6 * math.sqrt(n * p * (1 - p))
    pairs = {"seeds": (drop, other), "diagonal": (drop[1:, 1:], drop[:-1, :-1]),
             "anti-diagonal": (drop[1:, :-1], drop[:-1, 1:])}
    for lag in (1, 2, 3, 16, 64, 1024):
        pairs[f"columns {lag} apart"] = (drop[:, lag:], drop[:, :-lag])
        pairs[f"rows {lag} apart"] = (drop[lag:], drop[:-lag])
    q = p * p
    for name, (u, v) in pairs.items():
        both, count = (u & v).sum().item(), u.numel()
        assert abs(both - count * q) <= 6 * math.sqrt(count * q * (1 - q)), f"{name}: {both} of {count}"


def test_mask_prefix_is_stable():
    """Element (row, col) of the mask does not depend on the tensor's shape (it is a function of
    (seed, row, col) only), so any sub-rectangle of a larger mask is the smaller mask."""
    big = ops.dropout_mask(31, (70, 90), 0.3, DEVICE)
    assert torch.equal(big[:33, :45], ops.dropout_mask(31, (33, 45), 0.3, DEVICE))
    assert ops.dropout_mask(31, (3, 4, 5), 0.3, DEVICE).shape == (3, 4, 5)
    assert bool(ops.dropout_mask(31, (8, 8), 0.0, DEVICE).all())


def test_gradients_bitwise_reproducible():
    """Two runs with the same inputs and seed give bitwise-identical outputs and gradients (no atomics),
    including with every reduction split over programs."""
    t = make_inputs((75,), 60, 50, 6, torch.float16)
    grad_y = torch.randn(75, 50, generator=torch.Generator().manual_seed(4)).to(DEVICE, torch.float16)

    def once():
        y, s = ops.forward(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.3, 0.1, 11)
        return (y, s) + tuple(ops.backward(grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], s, 0.3, 0.1, 11,
                                           (True,) * 5))

    for configs in (None, SPLIT_CONFIGS):
        with ops.override_configs(configs) if configs else contextlib.nullcontext():
            first, second = once(), once()
        for u, v in zip(first, second):
            assert torch.equal(u, v)


def test_int64_offsets():
    """Rows of x and dY that start past 2³¹ elements: every kernel computes its addresses in int64.

    x and dY are views into one 4 GiB fp16 buffer with a row stride of 2³⁰ + 7 elements; only the few pages
    they touch are ever committed (the interpreter also copies nothing for CPU tensors)."""
    m, k, n, r, row_stride = 3, 40, 24, 5, 2**30 + 7
    try:
        storage = torch.empty(row_stride * (m - 1) + 128, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError) as err:  # pragma: no cover - depends on the machine
        pytest.skip(f"cannot reserve a 4 GiB buffer: {err}")
    t = make_inputs((m,), k, n, r, torch.float16)
    x = storage.as_strided((m, k), (row_stride, 1))
    grad_y = storage.as_strided((m, n), (row_stride, 1), storage_offset=64)
    x.copy_(t["x"])
    grad_y.copy_(torch.randn(m, n, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.float16))
    assert x.stride(0) * (m - 1) >= 2**31

    p, seed, scaling = 0.2, 5, 0.5
    y, s = ops.forward(x, t["weight"], t["bias"], t["lora_A"], t["lora_B"], scaling, p, seed)
    grads = ops.backward(grad_y, x, t["weight"], t["lora_A"], t["lora_B"], s, scaling, p, seed, (True,) * 5)
    dense = {**t, "x": x.clone()}
    y_ref, grads_ref = reference_grads(dense, grad_y.clone(), scaling, ops.dropout_mask(seed, (m, k), p, DEVICE),
                                       p, NAMES)
    assert_close(y, y_ref, torch.float16, "y")
    for name, g in zip(NAMES, grads):
        assert_close(g, grads_ref[name], torch.float16, f"d{name}")
    del storage


@needs_cuda
def test_int64_offsets_large_tensors():  # pragma: no cover - GPU only
    """M·K and M·N past 2³¹ with dense tensors (about 12 GiB of GPU memory)."""
    k, n, r = 64, 64, 16
    m = 2**31 // k + 37
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    t = make_inputs((1,), k, n, r, torch.bfloat16)
    y, s = ops.forward(x, t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.5, 0.1, 3)
    tail = slice(m - 100, m)
    mask = ops.dropout_mask(3, (m, k), 0.1, x.device)[tail]
    y_ref = lora_linear_reference(x[tail].double(), t["weight"].double(), t["bias"].double(), t["lora_A"].double(),
                                  t["lora_B"].double(), 0.5, mask, 0.1)
    assert_close(y[tail], y_ref, torch.bfloat16, "y tail")
    grad_y = torch.zeros_like(y)
    grad_y[tail] = 1
    dx, *_ = ops.backward(grad_y, x, t["weight"], t["lora_A"], t["lora_B"], s, 0.5, 0.1, 3, ONLY_DX)
    ds = 0.5 * grad_y[tail].double() @ t["lora_B"].double()
    dx_ref = grad_y[tail].double() @ t["weight"].double() + mask.double() * (ds @ t["lora_A"].double()) / 0.9
    assert_close(dx[tail], dx_ref, torch.bfloat16, "dx tail")


def test_config_cache_is_per_bucket_and_splits_are_sane():
    """Configs are looked up per shape bucket (a new M in the same bucket reuses the entry); fp32 precision
    follows torch's matmul precision; splits cover every tile exactly once."""
    a = ops.kernel_configs(DEVICE, torch.float16, 300, 64, 64, 16)
    b = ops.kernel_configs(DEVICE, torch.float16, 400, 64, 64, 16)
    assert a is b
    assert ops._input_precision(torch.float32) == "ieee" and ops._input_precision(torch.float16) == "ieee"
    torch.set_float32_matmul_precision("high")  # TF32 for fp32, as torch.mm does (restored by the fixture)
    assert ops._input_precision(torch.float32) == "tf32"
    for programs, tiles, target, min_tiles in [(1, 100, 64, 4), (64, 7, 32, 1), (3, 1, 100, 1), (5, 50, 7, 2)]:
        splits, per = launch.split_reduction(programs, tiles, target, min_tiles)
        assert splits >= 1 and (splits - 1) * per < tiles <= splits * per


def test_autotune_times_once_per_bucket():
    """The opt-in GEMM tuner times the candidates once per key and then only looks the choice up."""
    calls = []

    def timer(fn):
        fn()
        return {64: 3.0, 128: 1.0}.get(calls[-1].block_m, 2.0)

    default = ops.KernelConfig(128, 128, 64)
    key = ("test", object())
    chosen = ops._tuned_gemm(key, default, calls.append, timer)
    n_calls = len(calls)
    assert n_calls >= 2 and chosen.block_m == 128
    assert ops._tuned_gemm(key, default, calls.append, timer) is chosen and len(calls) == n_calls
    assert not ops._autotune_enabled(torch.device("cpu"))


def test_tolerances_are_the_shared_ones():
    """This file states no tolerance of its own."""
    assert set(TOLERANCES) >= {torch.float32, torch.float16, torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# The torch backend's kernel-mask twin, the bf16 refusal on the interpreter, and the fallback of "auto".

from lora_kernels import functional  # noqa: E402
from lora_kernels.backends import torch as torch_backend  # noqa: E402
from lora_kernels.backends.triton import kernels  # noqa: E402


@pytest.mark.parametrize("shape,p,seed", [((37, 53), 0.3, 7), ((5, 4, 19), 0.05, 2**31 - 2), ((64, 8), 0.9, 0)])
def test_torch_twin_of_the_kernel_mask_is_bit_identical(shape, p, seed):
    # The torch backend stands in for the kernels (fallback, and every non-CPU device) with this mask: it must
    # be the kernels' own, element for element, or a forward by the kernels and a backward by torch disagree.
    kernels = ops.dropout_mask(seed, shape, p, DEVICE)
    twin = torch_backend.KERNEL_MASK.dropout_mask(torch.tensor([seed]), shape, p, DEVICE)
    assert torch.equal(kernels, twin)
    assert 0 < (~kernels).sum() < kernels.numel()


@pytest.mark.skipif(CUDA, reason="the refusal is for Triton's CPU interpreter")
def test_bf16_is_refused_on_the_interpreter_with_the_reason():
    inputs = make_inputs((4,), 16, 8, 2, torch.bfloat16)
    with pytest.raises(RuntimeError, match="interpreter computes bf16 tl.dot wrongly"):
        lora_linear(**inputs, scaling=1.0, backend="triton")


@pytest.fixture
def fresh_plans():
    """Launch plans hold the kernels they were built with: a patched kernel needs plans built anew."""
    ops.clear_plans()
    yield
    ops.clear_plans()


class _FailingLaunch:
    """Stands in for a @triton.jit kernel whose launch fails as an out-of-resources launch does."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise RuntimeError("out of resource: shared memory, Required: 294912, Hardware limit: 232448")
        return launch


@pytest.fixture
def auto_means_triton(monkeypatch, fresh_plans):
    """backend='auto' picks the kernels for these (CPU, interpreted) tensors, as it would for CUDA ones, and
    every configuration starts unfailed."""
    resolve = functional.resolve_backend
    monkeypatch.setattr(functional, "resolve_backend", lambda b, x: "triton" if b == "auto" else resolve(b, x))
    monkeypatch.setattr(kernels(strict=False), "failed", set())


@pytest.mark.parametrize("broken", ["_lora_matmul_kernel", "_lora_da_kernel"])  # forward+dX, or dA alone
def test_auto_warns_once_and_falls_back_to_torch_when_a_kernel_fails(broken, monkeypatch, auto_means_triton):
    failing = _FailingLaunch()
    monkeypatch.setattr(ops, broken, failing)
    inputs = make_inputs((30,), 24, 16, 4, torch.float32)
    grad_out = torch.randn(30, 16, device=DEVICE)
    wanted = ("x", "lora_A", "lora_B")
    with pytest.warns(RuntimeWarning, match=r"failed for x \(M<=32, 24\) -> \(16\), rank 4, torch.float32") as record:
        runs = [run_backend_named(inputs, grad_out, 0.7, 0.3, wanted, seed=11, backend="auto") for _ in range(3)]
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1  # once per configuration
    assert failing.launches == 1  # later calls go straight to the torch backend
    # The results are the torch backend's, with the kernels' mask: exactly the reference on that mask.
    mask = ops.dropout_mask(seed_drawn_by_op(11), (30, 24), 0.3, DEVICE)
    y_ref, grads_ref = reference_grads(inputs, grad_out, 0.7, mask, 0.3, wanted)
    for y, grads in runs:
        assert_close(y, y_ref, torch.float32, "y")
        for name in wanted:
            assert_close(grads[name], grads_ref[name], torch.float32, f"d{name}")


def test_triton_backend_raises_with_the_configuration_when_a_kernel_fails(monkeypatch, fresh_plans):
    monkeypatch.setattr(ops, "_lora_matmul_kernel", _FailingLaunch())
    inputs = make_inputs((5,), 12, 8, 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"Triton forward kernels failed for x \(M<=8, 12\) -> \(8\), rank 2.*"
                                            r"out of resource"):
        lora_linear(**inputs, scaling=1.0, backend="triton")


def run_backend_named(inputs, grad_out, scaling, p, wanted, seed, backend):
    """y and the gradients of `wanted` through ``lora_linear(backend=backend)``, dropout seed `seed`."""
    t = {n: (v.detach().clone().requires_grad_(n in wanted) if v is not None else None) for n, v in inputs.items()}
    torch.manual_seed(seed)
    y = lora_linear(**t, scaling=scaling, dropout_p=p, backend=backend)
    grads = torch.autograd.grad(y, [t[n] for n in wanted], grad_out)
    return y, dict(zip(wanted, grads))


def test_output_may_be_changed_in_place_with_the_kernels():
    inputs = make_inputs((3, 4), 16, 16, 4, torch.float32)
    wanted = ("x", "lora_A", "lora_B")
    t = {n: (v.detach().clone().requires_grad_(n in wanted) if v is not None else None) for n, v in inputs.items()}
    residual = torch.randn(3, 4, 16, device=DEVICE)
    h = lora_linear(**t, scaling=0.5, backend="triton")
    h += residual  # MiniMind's block does exactly this after o_proj
    grad_out = torch.randn(3, 4, 16, device=DEVICE)
    grads = dict(zip(wanted, torch.autograd.grad(h, [t[n] for n in wanted], grad_out)))
    y_ref, grads_ref = reference_grads(inputs, grad_out, 0.5, None, 0.0, wanted)
    assert_close(h, y_ref + residual.double(), torch.float32, "y")
    for name in wanted:
        assert_close(grads[name], grads_ref[name], torch.float32, f"d{name}")

def _tf32_legacy_precision():
    torch.set_float32_matmul_precision("high")


def _tf32_allow_tf32():
    torch.backends.cuda.matmul.allow_tf32 = True


def _tf32_matmul_fp32_precision():
    torch.backends.cuda.matmul.fp32_precision = "tf32"


def _tf32_global_fp32_precision():
    torch.backends.cuda.matmul.fp32_precision = "none"  # inherit the global setting (the fixture set "ieee")
    torch.backends.fp32_precision = "tf32"


TF32_SETTERS = [_tf32_legacy_precision, _tf32_allow_tf32]
if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9: the new API, whose use breaks the old getters
    TF32_SETTERS += [_tf32_matmul_fp32_precision, _tf32_global_fp32_precision]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("set_tf32", TF32_SETTERS, ids=lambda f: f.__name__[6:])
def test_tf32_through_every_torch_api(set_tf32, dtype):
    """TF32 set through any torch API: fp32 inputs get TF32 dots (and the TF32 configs), other dtypes are
    untouched, and the results stay within the TF32 tolerance (fp32: the interpreter computes in full fp32,
    a GPU in TF32) or the dtype's own."""
    set_tf32()
    assert ops._input_precision(torch.float32) == "tf32"
    assert ops._input_precision(dtype) == ("tf32" if dtype == torch.float32 else "ieee")
    for other in (torch.float32, torch.float16, torch.bfloat16):  # the config lookup asks too (it raised)
        ops.kernel_configs(DEVICE, other, 4096, 4096, 4096, 16)
    check_against_reference((33,), 40, 24, 5, dtype, True, 0.25, ALL,
                            tolerance="tf32" if dtype == torch.float32 else dtype)
    _ieee_fp32_matmuls()
    assert ops._input_precision(torch.float32) == "ieee"


def test_autotune_skips_only_out_of_resources():
    """A candidate that does not fit the GPU is skipped silently; any other failure is skipped with a
    warning naming the candidate, never swallowed."""
    from triton.runtime.errors import OutOfResources

    default = ops.KernelConfig(128, 128, 64)
    candidates = ops._configs.autotune_candidates(default)
    too_big, broken = candidates[0], candidates[1]

    def timer(fn):
        cfg = fn()
        if cfg == too_big:
            raise OutOfResources(300_000, 232_448, "shared memory")
        if cfg == broken:
            raise ValueError("a real bug")
        return float(cfg.block_n)  # the narrowest healthy tile wins

    with pytest.warns(RuntimeWarning) as record:
        chosen = ops._tuned_gemm(("skip-test", object()), default, lambda cfg: cfg, timer)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and str(broken) in messages[0] and "a real bug" in messages[0]
    healthy = [c for c in candidates if c not in (too_big, broken)]
    assert chosen in healthy and chosen.block_n == min(c.block_n for c in healthy)
