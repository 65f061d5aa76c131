"""lora_linear (torch and eager backends) against the float64 reference, plus its input checks and memory."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, make_peft_linear
from lora_kernels import lora_linear, lora_linear_reference
from lora_kernels.backends import draw_seed_tensor
from lora_kernels.backends import torch as torch_backend
from lora_kernels.memory import saved_activation_bytes

# (leading dims of x, in_features K, out_features N, rank r): odd sizes, M = 0 and 1, rank 1, ranks that
# are not powers of two, several leading dimensions.
SHAPES = [
    ((0,), 16, 8, 2),
    ((1,), 7, 5, 1),
    ((3, 5), 33, 17, 3),
    ((64,), 64, 64, 16),
    ((2, 3, 4), 31, 45, 7),
    ((129,), 40, 24, 13),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(lead, k, n, r, dtype, bias=True, seed=0, grads=("x", "lora_A", "lora_B")):
    """Random inputs in `dtype` (B non-zero so the LoRA path matters) with requires_grad as asked."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(*lead, k, generator=g),
        "weight": torch.randn(n, k, generator=g) / math.sqrt(k),
        "bias": torch.randn(n, generator=g) if bias else None,
        "lora_A": torch.randn(r, k, generator=g) / math.sqrt(k),
        "lora_B": torch.randn(n, r, generator=g) / math.sqrt(r),
    }
    return {name: (v.to(dtype).requires_grad_(name in grads) if v is not None else None) for name, v in t.items()}


def run(fn, inputs, grad_out):
    """Output and gradients of fn(**inputs) for the upstream gradient grad_out."""
    y = fn(**inputs)
    names = [n for n, v in inputs.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(y, [inputs[n] for n in names], grad_out) if names and y.numel() else []
    return y, dict(zip(names, grads))


def reference64(inputs, scaling, mask, p):
    """The reference evaluated in float64 on the same (already rounded) inputs."""
    inputs64 = {n: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
                for n, v in inputs.items()}
    return lambda grad_out: run(
        lambda **kw: lora_linear_reference(**kw, scaling=scaling, dropout_mask=mask, dropout_p=p),
        inputs64, grad_out.double())


def magnitudes64(inputs, scaling, mask, p, grad_out):
    """Σ|terms| of the output and of every gradient: the reference on the absolute values of all inputs.

    Every quantity is a sum of products of inputs, so evaluating it on |inputs| (and |scaling|) gives the
    sum of the magnitudes of its terms, the scale that rounding error follows when terms cancel.
    """
    absolute = {n: (v.detach().abs().requires_grad_(v.requires_grad) if v is not None else None)
                for n, v in inputs.items()}
    return reference64(absolute, abs(scaling), mask, p)(grad_out.abs())


@pytest.mark.parametrize("backend", ["torch", "eager"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_reference(backend, dtype, lead, k, n, r, bias, p):
    inputs = make_inputs(lead, k, n, r, dtype, bias=bias, grads=("x", "lora_A", "lora_B", "weight", "bias"))
    scaling = 0.75
    m = math.prod(lead)
    torch.manual_seed(1234)
    seed = draw_seed_tensor(torch.device("cpu"))  # what the op draws on the CPU
    mask = torch_backend.dropout_mask(seed, (m, k), p, torch.device("cpu")).view(*lead, k) if p else None
    grad_out = torch.randn(*lead, n, generator=torch.Generator().manual_seed(7)).to(dtype)

    torch.manual_seed(1234)  # the op draws the same seed as above
    y, grads = run(lambda **kw: lora_linear(**kw, scaling=scaling, dropout_p=p, backend=backend), inputs, grad_out)
    # The torch backend rounds p to a multiple of 2^-16 and scales by that p (see effective_dropout_p).
    y_ref, grads_ref = reference64(inputs, scaling, mask, torch_backend.effective_dropout_p(p))(grad_out)

    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    assert set(grads) == set(grads_ref)
    for name in grads:
        assert grads[name].dtype == dtype
        assert_close(grads[name], grads_ref[name], dtype, f"d{name}")


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_non_contiguous_input(backend):
    inputs = make_inputs((6, 9), 20, 12, 4, torch.float32)
    inputs["x"] = inputs["x"].detach().transpose(0, 1).requires_grad_()  # (9, 6, 20), not contiguous
    assert not inputs["x"].is_contiguous()
    grad_out = torch.randn(9, 6, 12)
    y, grads = run(lambda **kw: lora_linear(**kw, scaling=2.0, backend=backend), inputs, grad_out)
    y_ref, grads_ref = reference64(inputs, 2.0, None, 0.0)(grad_out)
    assert_close(y, y_ref, torch.float32, "y")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], torch.float32, f"d{name}")


def test_one_dimensional_input_like_nn_linear():
    inputs = make_inputs((), 10, 6, 2, torch.float32)
    y = lora_linear(**inputs, scaling=1.0, backend="torch")
    assert y.shape == (6,)
    assert_close(y, lora_linear_reference(**{k: v.double() if v is not None else None for k, v in inputs.items()},
                                          scaling=1.0), torch.float32, "y")


def test_dropout_is_reproducible_and_follows_the_seed():
    inputs = make_inputs((50,), 24, 16, 4, torch.float32)
    grad_out = torch.randn(50, 16)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(run(lambda **kw: lora_linear(**kw, scaling=1.0, dropout_p=0.5, backend="torch"), inputs, grad_out))
    (y1, g1), (y2, g2), (y3, _) = outs
    assert torch.equal(y1, y2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert not torch.equal(y1, y3)


def test_eval_mode_means_no_dropout():
    inputs = make_inputs((8,), 12, 10, 3, torch.float32)
    y = lora_linear(**inputs, scaling=1.0, dropout_p=0.9, training=False, backend="torch")
    assert torch.equal(y, lora_linear(**inputs, scaling=1.0, dropout_p=0.0, backend="torch"))


def test_forward_and_backward_use_the_same_mask():
    # With dropout on, the gradient with respect to x must be the derivative of the forward actually
    # computed; a different mask in backward would break the finite-difference check.
    inputs = make_inputs((3,), 6, 5, 2, torch.float64, bias=False, grads=("x",))
    inputs["lora_B"] = inputs["lora_B"].detach() * 10  # make the LoRA path dominate

    def f(x):
        torch.manual_seed(0)  # the same seed, hence the same mask, in every evaluation
        return lora_linear(x, inputs["weight"], None, inputs["lora_A"], inputs["lora_B"], 1.5, 0.5, backend="torch")

    assert torch.autograd.gradcheck(f, (inputs["x"],))


def test_autocast_on_cpu_computes_in_bf16_and_keeps_param_grads_fp32():
    inputs = make_inputs((16,), 32, 24, 4, torch.float32, grads=("x", "lora_A", "lora_B"))
    grad_out = torch.randn(16, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(**inputs, scaling=1.0, backend="torch")
    assert y.dtype == torch.bfloat16
    da, db = torch.autograd.grad(y, [inputs["lora_A"], inputs["lora_B"]], grad_out.bfloat16())
    assert da.dtype == db.dtype == torch.float32
    _, grads_ref = reference64(inputs, 1.0, None, 0.0)(grad_out)
    assert_close(da, grads_ref["lora_A"], torch.bfloat16, "dA")
    assert_close(db, grads_ref["lora_B"], torch.bfloat16, "dB")


def test_fp32_adapters_on_half_base_are_cast():
    inputs = make_inputs((8,), 16, 16, 4, torch.float16)
    inputs["lora_A"] = inputs["lora_A"].detach().float().requires_grad_()
    inputs["lora_B"] = inputs["lora_B"].detach().float().requires_grad_()
    y = lora_linear(**inputs, scaling=1.0, backend="torch")
    assert y.dtype == torch.float16
    (da,) = torch.autograd.grad(y.sum(), [inputs["lora_A"]])
    assert da.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# Bytes saved for backward


def saved_bytes(fn, params):
    return saved_activation_bytes(fn, params)[1]


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_saves_only_base_activations_plus_s(p):
    m, k, n, r = 256, 64, 48, 8
    inputs = make_inputs((m,), k, n, r, torch.float32, grads=("x", "lora_A", "lora_B"))
    params = [inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"]]
    ours = saved_bytes(lambda: lora_linear(**inputs, scaling=1.0, dropout_p=p, backend="torch"), params)
    # A linear layer being trained keeps x (for its weight gradient), as LoRA must (for dA); the frozen
    # base alone keeps no activation at all.
    trained_w = inputs["weight"].detach().requires_grad_()
    base = saved_bytes(lambda: F.linear(inputs["x"], trained_w, inputs["bias"]), params + [trained_w])
    assert base == m * k * 4
    # ... and we add only S = x̃·Aᵀ, whatever the dropout, plus the 8-byte seed tensor when there is dropout.
    assert ours == base + m * r * 4 + (8 if p > 0 else 0)


def test_saves_less_than_peft_with_dropout():
    pytest.importorskip("peft")
    m, k, n, r = 256, 64, 48, 8
    linear = torch.nn.Linear(k, n)
    layer = make_peft_linear(linear, r=r, alpha=r, dropout=0.1)
    x = torch.randn(m, k, requires_grad=True)
    peft_bytes = saved_bytes(lambda: layer(x), list(layer.parameters()))
    ours = saved_bytes(
        lambda: lora_linear(x, linear.weight, linear.bias, layer.lora_A["default"].weight,
                            layer.lora_B["default"].weight, 1.0, dropout_p=0.1, backend="torch"),
        list(layer.parameters()))
    # PEFT keeps x, the dropout mask and the dropped-out copy of x (plus S); we keep x, S and the 8-byte seed.
    assert ours == m * k * 4 + m * r * 4 + 8
    assert peft_bytes >= ours + m * k * 4


# ---------------------------------------------------------------------------------------------------
# Bad input


def good_inputs():
    return make_inputs((4,), 8, 6, 2, torch.float32)


@pytest.mark.parametrize("change,error,words", [
    (lambda t: t.update(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "floating-point"),
    (lambda t: t.update(x=torch.ones(4, 9)), ValueError, "in_features=8"),
    (lambda t: t.update(lora_A=torch.ones(2, 9)), ValueError, "lora_A"),
    (lambda t: t.update(lora_B=torch.ones(6, 3)), ValueError, "lora_B"),
    (lambda t: t.update(bias=torch.ones(5)), ValueError, "bias"),
    (lambda t: t.update(weight=t["weight"].detach().double()), TypeError, "dtype"),
])
def test_bad_input_is_named(change, error, words):
    inputs = good_inputs()
    change(inputs)
    with pytest.raises(error, match=words):
        lora_linear(**inputs, scaling=1.0, backend="torch")


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_dropout(p):
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(**good_inputs(), scaling=1.0, dropout_p=p)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        lora_linear(**good_inputs(), scaling=1.0, backend="cuda")


# ---------------------------------------------------------------------------------------------------
# Property test: any shape hypothesis can think of (within a small budget) matches the reference.

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    k=st.integers(1, 40),
    n=st.integers(1, 40),
    r=st.integers(1, 12),
    bias=st.booleans(),
    p=st.sampled_from([0.0, 0.2, 0.7]),
    # Scales fp32 can represent usefully: a 1e-224 scale underflows to 0 in fp32 but not in the fp64 reference.
    scaling=st.one_of(st.just(0.0), st.floats(0.01, 4), st.floats(-4, -0.01)),
)
def test_any_shape_matches_reference(lead, k, n, r, bias, p, scaling):
    inputs = make_inputs(tuple(lead), k, n, r, torch.float32, bias=bias, grads=("x", "lora_A", "lora_B", "weight"))
    torch.manual_seed(99)
    seed = draw_seed_tensor(torch.device("cpu"))  # what the op draws on the CPU
    m = math.prod(lead)
    mask = torch_backend.dropout_mask(seed, (m, k), p, torch.device("cpu")).view(*lead, k) if p else None
    grad_out = torch.randn(*lead, n)
    torch.manual_seed(99)
    y, grads = run(lambda **kw: lora_linear(**kw, scaling=scaling, dropout_p=p, backend="torch"), inputs, grad_out)
    p_eff = torch_backend.effective_dropout_p(p)
    y_ref, grads_ref = reference64(inputs, scaling, mask, p_eff)(grad_out)
    # Small random cases sum a few terms of mixed sign: the bound follows the terms' magnitudes.
    y_mag, grads_mag = magnitudes64(inputs, scaling, mask, p_eff, grad_out)
    assert_close(y, y_ref, torch.float32, "y", magnitude=y_mag)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], torch.float32, f"d{name}", magnitude=grads_mag[name])


# ---------------------------------------------------------------------------------------------------
# Where nn.Linear works, lora_linear works: in-place changes of the output, empty features, meta tensors.


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_output_may_be_changed_in_place_like_minimind_residual(backend):
    # MiniMind's block does `hidden_states += residual` on o_proj's output; nn.Linear and PEFT allow it.
    inputs = make_inputs((2, 5), 12, 12, 3, torch.float32, grads=("x", "lora_A", "lora_B"))
    residual = torch.randn(2, 5, 12)
    grad_out = torch.randn(2, 5, 12)

    def block(**kw):
        h = lora_linear(**kw, scaling=0.5, backend=backend)
        h += residual
        return h

    y, grads = run(block, inputs, grad_out)
    y_ref, grads_ref = reference64(inputs, 0.5, None, 0.0)(grad_out)
    assert_close(y, y_ref + residual.double(), torch.float32, "y")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], torch.float32, f"d{name}")


@pytest.mark.parametrize("backend", ["torch", "eager"])
@pytest.mark.parametrize("k,n", [(0, 6), (7, 0), (0, 0)])
def test_zero_in_or_out_features_like_nn_linear(backend, k, n):
    x = torch.randn(3, 4, k, requires_grad=True)
    linear = torch.nn.Linear(k, n)
    lora_A = torch.randn(2, k, requires_grad=True)
    lora_B = torch.randn(n, 2, requires_grad=True)
    y = lora_linear(x, linear.weight, linear.bias, lora_A, lora_B, 1.0, dropout_p=0.1, backend=backend)
    expected = linear(x)  # with no input features the output is the bias; with no outputs it is empty
    assert y.shape == expected.shape == (3, 4, n)
    assert torch.equal(y, expected)
    grad_x, grad_a, grad_b = torch.autograd.grad(y.sum(), [x, lora_A, lora_B], allow_unused=True)
    assert grad_x.shape == x.shape and grad_a.shape == lora_A.shape and grad_b.shape == lora_B.shape
    # With K = 0 or N = 0 every sum that makes a LoRA gradient is empty.
    assert not grad_a.any() and not grad_b.any() and not grad_x.any()


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_meta_tensors_give_shapes_without_compute(p):
    from lora_kernels import FusedLoRALinear

    layer = FusedLoRALinear(16, 8, rank=4, dropout=p, device="meta")
    y = layer(torch.empty(2, 3, 16, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 3, 8)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"), reason="no Triton here"))])
def test_double_backward_says_to_use_the_eager_backend(backend):
    inputs = make_inputs((5,), 6, 4, 2, torch.float32, grads=("x", "lora_A", "lora_B"))
    y = lora_linear(**inputs, scaling=1.0, backend=backend)
    (grad_x,) = torch.autograd.grad(y.square().sum(), [inputs["x"]], create_graph=True)
    # The first-order gradient is still right under create_graph=True ...
    _, grads_ref = reference64(inputs, 1.0, None, 0.0)(2 * y.detach())
    assert_close(grad_x, grads_ref["x"], torch.float32, "dx")
    # ... and differentiating it again names the way out.
    with pytest.raises(RuntimeError, match="backend='eager'"):
        grad_x.square().sum().backward()


def test_double_backward_through_the_eager_backend_matches_the_reference():
    inputs = make_inputs((5,), 6, 4, 2, torch.float64, grads=("x", "lora_A", "lora_B"))
    grad_a = {}
    for name, fn in (("eager", lambda **kw: lora_linear(**kw, scaling=1.5, backend="eager")),
                     ("reference", lambda **kw: lora_linear_reference(**kw, scaling=1.5))):
        y = fn(**inputs)
        (grad_x,) = torch.autograd.grad(y.square().sum(), [inputs["x"]], create_graph=True)
        (grad_a[name],) = torch.autograd.grad(grad_x.square().sum(), [inputs["lora_A"]])
    assert grad_a["eager"].abs().max() > 0
    assert_close(grad_a["eager"], grad_a["reference"], torch.float64, "d²/dA")


def test_float64_gets_exact_results_from_auto_and_a_clear_error_from_triton():
    inputs = make_inputs((7,), 9, 5, 3, torch.float64, grads=("x", "lora_A", "lora_B"))
    grad_out = torch.randn(7, 5, dtype=torch.float64)
    y, grads = run(lambda **kw: lora_linear(**kw, scaling=2.0, backend="auto"), inputs, grad_out)
    y_ref, grads_ref = reference64(inputs, 2.0, None, 0.0)(grad_out)
    assert_close(y, y_ref, torch.float64, "y")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], torch.float64, f"d{name}")
    with pytest.raises(TypeError, match="float32, float16 and bfloat16, got torch.float64"):
        lora_linear(**inputs, scaling=2.0, backend="triton")
