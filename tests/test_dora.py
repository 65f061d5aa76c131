"""DoRA (lora_kernels.dora and FusedLoRALinear(use_dora=True)) against the float64 reference: the op on both
CPU backends, odd shapes, ranks 1-64, dropout on the same seeded mask, quantized bases, mixed batches of DoRA
and LoRA rows, several active adapters, merge/unmerge, torch.compile, and what is kept for backward.

The reference (lora_kernels.reference.dora_linear_reference) is PEFT's maths with B·A formed and the norm
taken of the full W + s·B·A; the fused backends take the norm from low-rank terms and never form B·A."""
import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from helpers import assert_close
from lora_kernels import (AdapterTerm, FusedLoRALinear, LoRAConfig, lora_linear_mixed, merge_and_unload, quant,
                          replace_linear_with_fused_lora)
from lora_kernels.backends import draw_seed_tensor
from lora_kernels.backends import torch as torch_backend
from lora_kernels.dora import dora_linear, weight_norm
from lora_kernels.memory import saved_activation_bytes
from lora_kernels.reference import dora_linear_reference, lora_linear_mixed_reference

CPU = torch.device("cpu")
# (leading dims of x, in_features K, out_features N, rank r): M = 0 and 1, rank 1, odd sizes, 3-D x.
SHAPES = [((0,), 16, 8, 2), ((1,), 7, 5, 1), ((3, 5), 33, 17, 3), ((2, 3, 4), 31, 45, 7), ((129,), 40, 24, 13)]
NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")


def make_inputs(lead, k, n, r, dtype, bias=True, seed=0, grads=NAMES):
    """Random inputs (B non-zero, m away from ‖W‖ so that g ≠ 1 matters) in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) / math.sqrt(k)
    t = {
        "x": torch.randn(*lead, k, generator=g),
        "weight": weight,
        "bias": torch.randn(n, generator=g) if bias else None,
        "lora_A": torch.randn(r, k, generator=g) / math.sqrt(k),
        "lora_B": torch.randn(n, r, generator=g) / math.sqrt(r),
        "magnitude": weight.norm(dim=1) * (0.5 + torch.rand(n, generator=g)),
    }
    return {name: (v.to(dtype).requires_grad_(name in grads) if v is not None else None) for name, v in t.items()}


def outputs_and_grads(fn, inputs, grad_out):
    y = fn(**inputs)
    names = [n for n, v in inputs.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(y, [inputs[n] for n in names], grad_out) if names and y.numel() else []
    return y, dict(zip(names, grads))


def as64(inputs):
    return {n: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
            for n, v in inputs.items()}


def seeded_mask(shape, p, seed=1234):
    """The seed the op draws after ``torch.manual_seed(seed)`` on the CPU, and the mask it regenerates."""
    torch.manual_seed(seed)
    drawn = draw_seed_tensor(CPU)
    m, k = math.prod(shape[:-1]), shape[-1]
    return torch_backend.dropout_mask(drawn, (m, k), p, CPU).view(shape) if p else None


def check_against_reference(inputs, scaling, p, backend, dtype):
    x = inputs["x"]
    mask = seeded_mask(tuple(x.shape), p)
    realised = torch_backend.DEFAULT.realised_p(p, CPU)
    grad_out = torch.randn(*x.shape[:-1], inputs["weight"].shape[0]).to(dtype)
    torch.manual_seed(1234)
    got, got_grads = outputs_and_grads(
        lambda **kw: dora_linear(**kw, scaling=scaling, dropout_p=p, backend=backend), inputs, grad_out)
    expected, expected_grads = outputs_and_grads(
        lambda **kw: dora_linear_reference(**kw, scaling=scaling, dropout_mask=mask, dropout_p=realised),
        as64(inputs), grad_out.double())
    assert got.dtype == dtype
    assert_close(got, expected, dtype, "y")
    assert set(got_grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        assert got_grads[name].dtype == inputs[name].dtype, name
        assert_close(got_grads[name], grad, dtype, "d" + name)


@pytest.mark.parametrize("backend", ["torch", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,k,n,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_reference(backend, dtype, lead, k, n, r, bias, p):
    """Forward and all six gradients (base trainable too), with and without dropout on the same mask."""
    check_against_reference(make_inputs(lead, k, n, r, dtype, bias=bias), 0.75, p, backend, dtype)


@pytest.mark.parametrize("rank", [1, 8, 64])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_ranks_up_to_64_with_a_frozen_base(rank, p):
    inputs = make_inputs((2, 37), 80, 72, rank, torch.float32, grads=("x", "lora_A", "lora_B", "magnitude"))
    check_against_reference(inputs, 2.0 / rank, p, "torch", torch.float32)


@pytest.mark.parametrize("rank", [1, 5, 64])
def test_weight_norm_from_low_rank_terms_is_the_norm_of_w_plus_sba(rank):
    inputs = make_inputs((1,), 70, 33, rank, torch.float32)
    w, a, b = (inputs[n].detach() for n in ("weight", "lora_A", "lora_B"))
    expected = torch.linalg.vector_norm(w.double() + 1.5 * b.double() @ a.double(), dim=1)
    assert_close(weight_norm(w, a, b, 1.5), expected, torch.float32, "norm")
    # fp16 W read a chunk of rows at a time, accumulated in fp32
    assert_close(weight_norm(w.half(), a.half(), b.half(), 1.5),
                 torch.linalg.vector_norm(w.half().double() + 1.5 * b.half().double() @ a.half().double(), dim=1),
                 torch.float32, "norm fp16 inputs")


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_quantized_base_matches_the_reference_on_the_dequantized_weight(fmt, p):
    inputs = make_inputs((3, 11), 64, 40, 4, torch.float32, grads=("x", "lora_A", "lora_B", "magnitude"))
    qweight = quant.quantize(inputs["weight"].detach(), fmt)
    dense = qweight.dequantize(torch.float32)
    x = inputs["x"]
    mask = seeded_mask(tuple(x.shape), p)
    grad_out = torch.randn(3, 11, 40)
    rest = {n: inputs[n] for n in ("x", "bias", "lora_A", "lora_B", "magnitude")}
    torch.manual_seed(1234)
    got, got_grads = outputs_and_grads(
        lambda **kw: dora_linear(weight=qweight, **kw, scaling=0.5, dropout_p=p, backend="torch"), rest, grad_out)
    expected, expected_grads = outputs_and_grads(
        lambda **kw: dora_linear_reference(weight=dense.double(), **kw, scaling=0.5, dropout_mask=mask,
                                           dropout_p=torch_backend.DEFAULT.realised_p(p, CPU)),
        as64(rest), grad_out.double())
    assert_close(got, expected, torch.float32, "y")
    for name, grad in expected_grads.items():
        assert_close(got_grads[name], grad, torch.float32, "d" + name)


def test_magnitude_trains_through_g_only_and_the_norm_is_detached():
    """Doubling m doubles g: with no dropout the output's DoRA part scales by 2 exactly (the norm does not
    move with m), and the gradient of m is Σ_rows dY ⊙ (x·Wᵀ + s·S·Bᵀ) / ‖W + s·B·A‖."""
    inputs = make_inputs((6,), 12, 9, 2, torch.float64, bias=False, grads=("magnitude",))
    y1 = dora_linear(**inputs, scaling=1.0, backend="torch")
    doubled = dict(inputs, magnitude=inputs["magnitude"].detach() * 2)
    assert_close(dora_linear(**doubled, scaling=1.0, backend="torch"), 2 * y1.detach(), torch.float64, "2m")
    (grad_m,) = torch.autograd.grad(y1.sum(), inputs["magnitude"])
    w, a, b, x = (inputs[n].detach() for n in ("weight", "lora_A", "lora_B", "x"))
    merged = w + b @ a
    assert_close(grad_m, (x @ merged.t()).sum(0) / merged.norm(dim=1), torch.float64, "dm")


def test_bad_magnitudes_are_refused():
    inputs = make_inputs((4,), 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match=r"magnitude must have shape \(out_features,\) = \(6,\), got \(5,\)"):
        dora_linear(**dict(inputs, magnitude=torch.ones(5)), scaling=1.0)
    with pytest.raises(ValueError, match="magnitude must have shape"):
        dora_linear(**dict(inputs, magnitude=None), scaling=1.0)


# ------------------------------------------------------------------------------------------- the layer


def dora_layer(k=24, n=20, rank=4, dropout=0.0, bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = FusedLoRALinear(k, n, bias=bias, rank=rank, alpha=2 * rank, dropout=dropout, use_dora=True,
                            backend="torch", **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(torch.rand(n) + 0.5)
    return layer


def test_a_new_dora_layer_starts_at_its_base_and_m_at_the_row_norms():
    torch.manual_seed(0)
    linear = torch.nn.Linear(30, 14)
    layer = FusedLoRALinear.from_linear(linear, rank=4, use_dora=True, init="kaiming")
    x = torch.randn(5, 30)
    assert_close(layer.lora_magnitude, linear.weight.detach().double().norm(dim=1), torch.float32, "m")
    assert_close(layer(x), linear(x).double(), torch.float32, "y")
    assert layer.lora_magnitude.requires_grad and not layer.weight.requires_grad
    assert "use_dora=True" in repr(layer)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_a_quantized_dora_layer_starts_at_its_quantized_base(fmt):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = FusedLoRALinear.from_linear(linear, rank=4, use_dora=True, quantize=fmt)
    dense = layer.qweight.dequantize(torch.float32)
    assert_close(layer.lora_magnitude, dense.double().norm(dim=1), torch.float32, "m = ‖dequantized W‖")
    x = torch.randn(3, 64)
    assert_close(layer(x), (x.double() @ dense.double().t() + linear.bias.double()), torch.float32, "y")


def layer_reference(layer, x, names):
    """The float64 sum of every active adapter's term over the base (each DoRA adapter's own g)."""
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    y = x.double() @ w.t() + b
    for name in names:
        a, bb = (p.detach().double() for p in layer.lora_params(name))
        config, magnitude = layer.lora_configs[name], layer.lora_magnitude_of(name)
        term = config.scaling * (x.double() @ a.t()) @ bb.t()
        if magnitude is not None:
            g = magnitude.detach().double() / (w + config.scaling * bb @ a).norm(dim=1)
            term = (g - 1) * (x.double() @ w.t()) + g * term
        y = y + term
    return y


def test_several_active_adapters_add_their_terms_and_merge_round_trips():
    layer = dora_layer(rank=3)
    layer.add_adapter("plain", LoRAConfig(rank=2, alpha=3))
    layer.add_adapter("second", LoRAConfig(rank=5, use_dora=True))
    with torch.no_grad():
        for name in ("plain", "second"):
            layer.lora_params(name)[1].normal_()
        layer.lora_magnitude_of("second").mul_(1.3)
    names = ["default", "plain", "second"]
    layer.set_adapter(names)
    layer.eval()
    x = torch.randn(4, 7, 24)
    expected = layer_reference(layer, x, names)
    assert_close(layer(x), expected, torch.float32, "y")
    for keep_original in (True, False):
        layer.merge(keep_original=keep_original)
        assert_close(layer(x), expected, torch.float32, f"merged (keep_original={keep_original})")
        layer.unmerge()
        assert_close(layer(x), expected, torch.float32, f"unmerged (keep_original={keep_original})")
    assert_close(layer.to_linear()(x), expected, torch.float32, "to_linear")


def test_dora_gradients_of_a_layer_reach_a_b_and_m():
    layer = dora_layer(dropout=0.0)
    x = torch.randn(3, 24)
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude]
    got = torch.autograd.grad(layer(x).square().sum(), params)
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    a, bb, m = (p.detach().double().requires_grad_() for p in params)
    y = dora_linear_reference(x.double(), w, b, a, bb, m, layer.scaling)
    for g, e, name in zip(got, torch.autograd.grad(y.square().sum(), [a, bb, m]), ("dA", "dB", "dm")):
        assert_close(g, e, torch.float32, name)


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_mixed_batch_of_dora_and_lora_rows_matches_a_loop_over_adapters(backend):
    """Rows with a DoRA adapter, a LoRA adapter, another DoRA adapter with another dropout p, and none."""
    g = torch.Generator().manual_seed(3)
    k, n = 20, 18
    weight, bias = torch.randn(n, k, generator=g) / 5, torch.randn(n, generator=g)
    specs = [(3, 0.1, True), (2, 0.1, False), (4, 0.3, True)]
    adapters = []
    for rank, p, use_dora in specs:
        a = (torch.randn(rank, k, generator=g) / 5).requires_grad_()
        b = torch.randn(n, rank, generator=g).requires_grad_()
        m = (weight.norm(dim=1) * (0.5 + torch.rand(n, generator=g))).requires_grad_() if use_dora else None
        adapters.append(AdapterTerm(a, b, 0.5 * rank, p, m))
    x = torch.randn(5, 3, k, generator=g).requires_grad_()
    rows = [0, 1, -1, 2, 0]
    grad_out = torch.randn(5, 3, n, generator=g)
    torch.manual_seed(7)
    y = lora_linear_mixed(x, weight, bias, adapters, rows, training=True, backend=backend)
    params = [x] + [t for term in adapters for t in (term.lora_A, term.lora_B, term.magnitude) if t is not None]
    got = torch.autograd.grad(y, params, grad_out)
    torch.manual_seed(7)
    seed = draw_seed_tensor(CPU)
    ps = torch.tensor([0.1, 0.1, 0.0, 0.3, 0.1], dtype=torch.float64).repeat_interleave(3)
    mask = torch_backend.dropout_mask(seed, (15, k), ps, CPU).view(5, 3, k)
    realised = [torch_backend.DEFAULT.realised_p(p, CPU) for _, p, _ in specs]
    params64 = [t.detach().double().requires_grad_() for t in params]
    x64, rest = params64[0], iter(params64[1:])
    terms = []
    for _, _, use_dora in specs:
        a, b = next(rest), next(rest)
        terms.append((a, b, 0.5 * a.shape[0]) + ((next(rest),) if use_dora else ()))
    masks = [mask] * len(specs)
    expected = lora_linear_mixed_reference(x64, weight.double(), bias.double(), terms, torch.tensor(rows), masks,
                                           realised)
    assert_close(y, expected, torch.float32, "y")
    names = ["dx"] + [f"{a}{i}" for i, (_, _, d) in enumerate(specs) for a in ("dA", "dB") + (("dm",) if d else ())]
    for g_, e, name in zip(got, torch.autograd.grad(expected, params64, grad_out.double()), names):
        assert_close(g_, e, torch.float32, name)


def test_dora_keeps_one_output_sized_tensor_more_than_lora_and_only_while_m_trains():
    x = torch.randn(64, 32)
    lora = FusedLoRALinear(32, 48, rank=4, backend="torch")
    dora = FusedLoRALinear(32, 48, rank=4, backend="torch", use_dora=True)
    _, lora_bytes = saved_activation_bytes(lambda: lora(x), lora.parameters())
    _, dora_bytes = saved_activation_bytes(lambda: dora(x), dora.parameters())
    # Z (M, N) fp32, then two (N,) vectors (c, and the norm that dm = dc / n reads); nothing the size of x or W
    assert 64 * 48 * 4 <= dora_bytes - lora_bytes <= 64 * 48 * 4 + 2 * 48 * 4
    dora.lora_magnitude.requires_grad_(False)
    _, frozen_bytes = saved_activation_bytes(lambda: dora(x), dora.parameters())
    assert lora_bytes <= frozen_bytes <= lora_bytes + 48 * 4  # no Z: the column scale c (N,) at most


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compiles_fullgraph_with_the_gradients_of_eager_mode(fresh_dynamo, dropout):
    layer = dora_layer(dropout=dropout)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude]
    for seed in range(2):
        x = torch.randn(2, 5, 24)
        results = []
        for fn in (compiled, layer):
            xi = x.clone().requires_grad_()
            torch.manual_seed(seed)
            y = fn(xi)
            results.append([y, *torch.autograd.grad(y.square().sum(), [xi, *params])])
        for got, expected, name in zip(*results, ["y", "dx", "dA", "dB", "dm"]):
            assert_close(got, expected, torch.float32, name)
    assert counter.frame_count == 1


def test_autocast_computes_in_the_autocast_dtype_and_returns_fp32_gradients():
    inputs = make_inputs((4, 6), 16, 12, 3, torch.float32, grads=("x", "lora_A", "lora_B", "magnitude"))
    grad_out = torch.randn(4, 6, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = outputs_and_grads(lambda **kw: dora_linear(**kw, scaling=1.0, backend="torch"), inputs,
                                           grad_out.bfloat16())
    assert got.dtype == torch.bfloat16
    rounded = {n: (v.detach().bfloat16().double().requires_grad_(v.requires_grad) if v is not None else None)
               for n, v in inputs.items()}
    rounded["magnitude"] = inputs["magnitude"].detach().double().requires_grad_()  # m stays fp32 (g is fp32)
    expected, expected_grads = outputs_and_grads(lambda **kw: dora_linear_reference(**kw, scaling=1.0), rounded,
                                                 grad_out.bfloat16().double())
    assert_close(got, expected, torch.bfloat16, "y")
    for name, grad in expected_grads.items():
        assert got_grads[name].dtype == torch.float32, name
        assert_close(got_grads[name], grad, torch.bfloat16, "d" + name)


@pytest.mark.parametrize("fmt", [None, "nf4"])
def test_merge_and_unload_gives_plain_linears_with_the_dora_outputs(fmt):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 32))
    replace_linear_with_fused_lora(model, rank=4, target_modules="all-linear", use_dora=True, quantize=fmt)
    for name, param in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(param, 0, 0.1)
        if name.endswith("lora_magnitude"):
            param.data.mul_(1 + 0.3 * torch.rand_like(param))
    x = torch.randn(6, 32)
    with torch.no_grad():
        expected = model(x).double()
        merge_and_unload(model)
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    with torch.no_grad():
        assert_close(model(x), expected, torch.float32, "merged")
