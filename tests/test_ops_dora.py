"""The Triton DoRA kernels (lora_kernels/ops/dora.py) against a float64 formula and the torch backend's DoRA.

The op is the column-scaled LoRA linear of lora_kernels.dora (c fp32, one group of rows)::

    S = x̃·Aᵀ,  u = s·S·Bᵀ,  Z = x̃·Wᵀ + u,  y = x·Wᵀ + b + (c − 1) ⊙ Z + u

and the weight norm ‖W + s·B·A‖ per row. The float64 formula is differentiated by autograd (every gradient,
dc included) on the same rounded inputs and the kernels' own dropout mask; the torch backend's
``KERNEL_MASK`` twin is run with the same seed. Without CUDA the kernels run on Triton's CPU interpreter
(fp32/fp16: the interpreter's bf16 tl.dot is wrong). Shapes are small and odd so every tile edge and rank
padding path runs.
"""
import math

import pytest
import torch

from helpers import assert_close

ops = pytest.importorskip("lora_kernels.ops.dora")
lora_ops = pytest.importorskip("lora_kernels.ops.lora_linear")
from lora_kernels.dora import dora_linear  # noqa: E402
from lora_kernels.reference import dora_linear_reference  # noqa: E402
from lora_kernels.backends import draw_seed_tensor  # noqa: E402
from lora_kernels.backends.torch import KERNEL_MASK  # noqa: E402
from lora_kernels.backends.triton import kernels  # noqa: E402
from lora_kernels.quant import quantize  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="bf16 tl.dot needs a GPU (the interpreter lacks bf16)")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)]
GRADS = ("x", "weight", "bias", "lora_A", "lora_B", "col_scale")
SEED = 1234
SCALING = 0.75

_B16 = lora_ops.KernelConfig(16, 16, 16, group_m=2)
# Small blocks, every reduction split over programs: the dS and dc partial sums and their fixed-order reduction.
SPLIT_CONFIGS = lora_ops.LoRAKernelConfigs(_B16, _B16, _B16, _B16, _B16, _B16, max_block_r=16, target_programs=256,
                                           min_split_tiles=1)


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 at IEEE precision (torch's default), whatever another test set."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def make_inputs(m, k, n, r, dtype, bias=True, seed=0):
    """x (m, k), W (n, k), b (n,), A (r, k), B (n, r) in ``dtype``, c (1, n) fp32 around 1 (some below 0)."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(m, k, generator=g),
        "weight": torch.randn(n, k, generator=g) / math.sqrt(k),
        "bias": torch.randn(n, generator=g) if bias else None,
        "lora_A": torch.randn(r, k, generator=g) / math.sqrt(k),
        "lora_B": torch.randn(n, r, generator=g) / math.sqrt(r),
    }
    t = {name: (v.to(DEVICE, dtype) if v is not None else None) for name, v in t.items()}
    t["col_scale"] = (1.0 + 0.5 * torch.randn(1, n, generator=g)).to(DEVICE)
    return t


def formula64(t, keep, p, absolute=False):
    """(y, S, Z) of the column-scaled LoRA linear in float64. ``absolute``: every input by its magnitude and
    c − 1 by |c − 1| (its leaf is then c − 1 itself): the summed terms' magnitudes, for the tolerance scale."""
    x, w, a, b_ = t["x"], t["weight"], t["lora_A"], t["lora_B"]
    c_minus_1 = t["col_scale"] if absolute else t["col_scale"] - 1.0
    x_lora = x if keep is None else x * keep.double() / (1.0 - p)
    s = x_lora @ a.t()
    u = SCALING * s @ b_.t()
    z = x_lora @ w.t() + u
    y = x @ w.t() + c_minus_1 * z + u
    if t["bias"] is not None:
        y = y + t["bias"]
    return y, s, z


def reference(inputs, grad_y, keep, p, wanted):
    """y, S, Z and the ``wanted`` gradients in float64, and their magnitudes (the tolerance scales)."""
    out = []
    for absolute in (False, True):
        t = {}
        for name, v in inputs.items():
            if v is None:
                t[name] = None
                continue
            v = v.detach().double()
            if absolute:
                v = (v - 1.0).abs() if name == "col_scale" else v.abs()
            t[name] = v.requires_grad_(name in wanted)
        y, s, z = formula64(t, keep, p, absolute)
        g = grad_y.double().abs() if absolute else grad_y.double()
        grads = torch.autograd.grad(y, [t[n] for n in wanted], g) if wanted else []
        out.append(((y, s, z), dict(zip(wanted, grads))))
    return out


def check_case(m, k, n, r, dtype, bias, p, wanted, keep_z=True, quant=None):
    """Forward (y, S, Z) and the ``wanted`` gradients of the kernels against the float64 formula, and against
    the torch backend's DoRA on the same seed."""
    wanted = tuple(w for w in wanted if bias or w != "bias")
    inputs = make_inputs(m, k, n, r, dtype, bias=bias)
    weight = inputs["weight"]
    if quant is not None:  # the formula sees the dequantized W the kernels see
        weight = quantize(inputs["weight"].float(), quant.split("-")[0], double_quant=quant.endswith("-dq"))
        inputs["weight"] = weight.dequantize(dtype)
    keep_z = keep_z or "col_scale" in wanted
    grad_y = torch.randn(m, n, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    keep = ops.dropout_mask(SEED, (m, k), p, DEVICE) if p > 0 else None
    args = (inputs["x"], weight, inputs["bias"], inputs["lora_A"], inputs["lora_B"], SCALING, inputs["col_scale"])
    y, s, z = ops.forward(*args, p, SEED, keep_z)
    needs = tuple(name in wanted for name in GRADS)
    grads = ops.backward(grad_y, inputs["x"], weight, inputs["lora_A"], inputs["lora_B"], s, z, inputs["col_scale"],
                         SCALING, p, SEED, needs)
    ((y64, s64, z64), g64), ((y_abs, s_abs, z_abs), g_abs) = reference(inputs, grad_y, keep, p, wanted)
    assert y.dtype == dtype and (z is None) == (not keep_z)
    assert_close(y, y64, dtype, "y", magnitude=y_abs)
    assert_close(s, s64, dtype, "S", magnitude=s_abs)
    if keep_z:
        assert_close(z, z64, dtype, "Z", magnitude=z_abs)
    for name, grad in zip(GRADS, grads):
        if name not in wanted:
            assert grad is None, name
            continue
        assert grad.dtype == (torch.float32 if name == "col_scale" else dtype), name
        assert_close(grad, g64[name], dtype, f"d{name}", magnitude=g_abs[name])

    # the torch backend's DoRA, same seed: same results within the dtype's tolerance
    y_t, s_t, z_t = KERNEL_MASK.dora_forward(*args, p, SEED, keep_z)
    assert_close(y, y_t, dtype, "y vs torch", magnitude=y_abs)
    grads_t = KERNEL_MASK.dora_backward(grad_y, inputs["x"], weight, inputs["lora_A"], inputs["lora_B"], s_t, z_t,
                                        inputs["col_scale"], SCALING, p, SEED, needs)
    for name, grad, grad_t in zip(GRADS, grads, grads_t):
        if name in wanted:
            assert_close(grad, grad_t, dtype, f"d{name} vs torch", magnitude=g_abs[name])


ALL = GRADS
FROZEN = ("x", "bias", "lora_A", "lora_B", "col_scale")
# (M, K, N, rank, bias, dropout p, gradients): odd sizes off the 16/32 blocks, M = 1, ranks 1, 3, 16, 17, 64 and
# 100 (looped in rank blocks), a trainable base with and without dropout, dc not asked for (Z not kept).
CASES = [
    (1, 17, 9, 1, True, 0.3, FROZEN),
    (37, 45, 29, 3, True, 0.0, ALL),
    (64, 64, 48, 16, False, 0.0, FROZEN),
    (105, 33, 50, 17, True, 0.25, ALL),
    (129, 40, 70, 64, True, 0.5, FROZEN),
    (70, 150, 33, 100, False, 0.2, FROZEN),
    (48, 31, 20, 5, True, 0.4, ("weight", "bias", "col_scale")),
    (40, 24, 18, 8, True, 0.1, ("x", "lora_A", "lora_B")),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,r,bias,p,wanted", CASES)
def test_matches_float64_and_torch(m, k, n, r, bias, p, wanted, dtype):
    check_case(m, k, n, r, dtype, bias, p, wanted)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_z_not_kept(p):
    """keep_z=False: no Z, the same y; a backward without dc never reads Z."""
    check_case(23, 19, 21, 4, torch.float32, True, p, ("x", "lora_A", "lora_B"), keep_z=False)


@pytest.mark.parametrize("p", [0.0, 0.35])
def test_split_reductions(p):
    """16-blocks with every reduction split: dc's per-row-block partials and dS's per-split ones, summed in one
    fixed-order launch."""
    with lora_ops.override_configs(SPLIT_CONFIGS):
        check_case(53, 70, 41, 37, torch.float32, True, p, ALL)


@pytest.mark.parametrize("quant", ["nf4", "nf4-dq", "int8"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_quantized_base(quant, p):
    """NF4 (with and without double quantization) and int8 bases: the quantized GEMMs with DoRA's flags."""
    check_case(45, 70, 38, 6, torch.float32, True, p, FROZEN, quant=quant)


def test_quantized_base_fp16():
    check_case(33, 64, 40, 16, torch.float16, False, 0.2, FROZEN, quant="nf4")


def test_gradients_bitwise_reproducible():
    inputs = make_inputs(61, 50, 43, 9, torch.float32)
    grad_y = torch.randn(61, 43, generator=torch.Generator().manual_seed(3))
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"], SCALING,
            inputs["col_scale"])
    with lora_ops.override_configs(SPLIT_CONFIGS):
        y, s, z = ops.forward(*args, 0.2, SEED, True)
        runs = [ops.backward(grad_y, inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"], s, z,
                             inputs["col_scale"], SCALING, 0.2, SEED, (True,) * 6) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,r", [(29, 45, 1), (70, 33, 17), (40, 130, 64), (21, 50, 100)])
def test_weight_norm(n, k, r, dtype):
    """‖W + s·B·A‖ per row from W·Aᵀ, ‖W_n‖² and the Gram, against the norm of the formed matrix in float64."""
    t = make_inputs(1, k, n, r, dtype)
    w, a, b = (t[name] for name in ("weight", "lora_A", "lora_B"))
    norm = ops.weight_norm(w, a, b, SCALING)
    expected = torch.linalg.vector_norm(w.double() + SCALING * b.double() @ a.double(), dim=1)
    assert norm.dtype == torch.float32 and norm.shape == (n,)
    assert_close(norm, expected, dtype, "norm")
    assert_close(norm, KERNEL_MASK.weight_norm(w, a, b, SCALING), dtype, "norm vs torch")


@pytest.mark.parametrize("quant", ["nf4", "nf4-dq", "int8"])
def test_weight_norm_quantized(quant):
    """A quantized W read in place (tiles dequantized in registers): the norm of dequant(W) + s·B·A."""
    t = make_inputs(1, 70, 37, 12, torch.float32)
    qweight = quantize(t["weight"], quant.split("-")[0], double_quant=quant.endswith("-dq"))
    norm = ops.weight_norm(qweight, t["lora_A"], t["lora_B"], SCALING)
    dense = qweight.dequantize(torch.float64)
    expected = torch.linalg.vector_norm(dense + SCALING * t["lora_B"].double() @ t["lora_A"].double(), dim=1)
    assert_close(norm, expected, torch.float32, "norm")


def test_weight_norm_of_zero_B_is_the_row_norm():
    t = make_inputs(1, 40, 30, 8, torch.float32)
    norm = ops.weight_norm(t["weight"], t["lora_A"], torch.zeros_like(t["lora_B"]), SCALING)
    assert_close(norm, torch.linalg.vector_norm(t["weight"].double(), dim=1), torch.float32, "norm")


def test_several_groups_run_on_torch():
    """A column scale with G > 1 groups (a mixed batch): the kernels refuse it by name, the backend runs the
    torch backend for that call (no warning, not remembered as a failure)."""
    t = make_inputs(12, 20, 16, 4, torch.float32)
    c = (1.0 + 0.5 * torch.randn(3, 16, generator=torch.Generator().manual_seed(5))).to(DEVICE)
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, c, 0.2, SEED, True)
    with pytest.raises(ValueError, match="col_scale"):
        ops.forward(*args)
    backend = kernels(strict=True)
    y, s, z = backend.dora_forward(*args)
    y_t, s_t, z_t = KERNEL_MASK.dora_forward(*args)
    assert torch.equal(y, y_t) and torch.equal(z, z_t)
    grads = backend.dora_backward(torch.ones_like(y), t["x"], t["weight"], t["lora_A"], t["lora_B"], s, z, c,
                                  SCALING, 0.2, SEED, (True,) * 6)
    assert grads[5].shape == (3, 16) and not backend.failed


def test_empty_batch():
    t = make_inputs(1, 12, 8, 4, torch.float32)
    x = t["x"][:0]
    y, s, z = ops.forward(x, t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, t["col_scale"], 0.0, SEED,
                          True)
    assert y.shape == (0, 8) and s.shape == (0, 4) and z.shape == (0, 8)
    grads = ops.backward(y, x, t["weight"], t["lora_A"], t["lora_B"], s, z, t["col_scale"], SCALING, 0.0, SEED,
                         (True,) * 6)
    assert grads[0].shape == (0, 12) and torch.count_nonzero(grads[5]) == 0 and grads[5].shape == (1, 8)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_dora_linear_on_the_kernels_matches_peft_maths(p):
    """End to end: ``dora_linear(backend="triton")`` (weight norm, column scale, forward and backward kernels)
    against PEFT's maths (B·A formed) in float64 on the kernels' mask, magnitude gradient included."""
    t = make_inputs(30, 40, 24, 8, torch.float32)
    magnitude = torch.linalg.vector_norm(t["weight"] + SCALING * t["lora_B"] @ t["lora_A"], dim=1) * 1.1
    names = ("x", "lora_A", "lora_B", "bias", "magnitude")
    leaves = {name: (magnitude if name == "magnitude" else t[name]).clone().requires_grad_() for name in names}
    torch.manual_seed(11)
    y = dora_linear(leaves["x"], t["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
                    leaves["magnitude"], SCALING, dropout_p=p, backend="triton")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(y, [leaves[n] for n in names], grad_y)
    torch.manual_seed(11)
    keep = ops.dropout_mask(draw_seed_tensor(DEVICE), (30, 40), p, DEVICE) if p > 0 else None
    leaves64 = {n: v.detach().double().requires_grad_() for n, v in leaves.items()}
    y64 = dora_linear_reference(leaves64["x"], t["weight"].double(), leaves64["bias"], leaves64["lora_A"],
                                leaves64["lora_B"], leaves64["magnitude"], SCALING, keep, p)
    grads64 = torch.autograd.grad(y64, [leaves64[n] for n in names], grad_y.double())
    assert_close(y, y64, torch.float32, "y")
    for name, grad, grad64 in zip(names, grads, grads64):
        assert_close(grad, grad64, torch.float32, f"d{name}")
