"""A quantized frozen base (QLoRA): forward and every gradient equal the reference on the dequantized weight.

Both fused backends (the torch backend, dequantizing row chunks; the Triton kernels, dequantizing W tiles in
their GEMMs, here on the CPU interpreter) against the eager reference evaluated in float64 on
``QuantizedWeight.dequantize(dtype)``, with the backend's own dropout mask.
"""
import copy
import io
import math

import pytest
import torch
import torch.nn as nn

from helpers import TOLERANCES, assert_close, bnb_nf4_weight, checked_bitsandbytes
from lora_kernels import FusedLoRALinear, lora_linear, lora_summary, merge_and_unload, replace_linear_with_fused_lora
from lora_kernels.backends import torch as torch_backend
from lora_kernels.quant import quantize, weight_bytes
from lora_kernels.reference import lora_linear_reference

QUANT = [("nf4", False), ("nf4", True), ("int8", False)]
QUANT_IDS = ["nf4", "nf4-dq", "int8"]
# (M, K, N, rank): odd sizes, blocks of 64 spanning rows of W (K % 64 != 0), ranks 1 to 64
SHAPES = [(5, 33, 17, 1), (13, 70, 45, 7), (33, 64, 96, 16), (7, 129, 31, 64)]


def _triton_ops():
    try:
        from lora_kernels.ops import lora_linear as ops, quantized
    except ImportError as err:  # pragma: no cover - triton is installed wherever the suite runs
        pytest.skip(f"Triton does not import here: {err}")
    return ops, quantized


def _backend(name):
    if name == "torch":
        return torch_backend.DEFAULT, torch_backend.DEFAULT.dropout_mask, torch_backend.effective_dropout_p
    ops, quantized = _triton_ops()
    return quantized, ops.dropout_mask, lambda p: p


def _inputs(m, k, n, r, dtype, fmt, dq, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = quantize(torch.randn(n, k, generator=g) / math.sqrt(k), fmt, dq)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    a = (torch.randn(r, k, generator=g) / math.sqrt(k)).to(dtype)
    bb = (torch.randn(n, r, generator=g) / math.sqrt(r)).to(dtype)
    return q, x, b, a, bb


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("fmt,dq", QUANT, ids=QUANT_IDS)
@pytest.mark.parametrize("m,k,n,r", SHAPES)
@pytest.mark.parametrize("bias,p", [(True, 0.0), (False, 0.3)], ids=["bias", "dropout"])
def test_matches_reference_on_dequantized_weight(backend, dtype, fmt, dq, m, k, n, r, bias, p):
    impl, mask_of, realised = _backend(backend)
    q, x, b, a, bb = _inputs(m, k, n, r, dtype, fmt, dq, bias)
    scaling, seed = 0.75, 1234
    y, s = impl.forward(x, q, b, a, bb, scaling, p, seed)
    grad_y = torch.randn(m, n, generator=torch.Generator().manual_seed(7)).to(dtype)
    needs = (True, False, bias, True, True)
    grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B = impl.backward(grad_y, x, q, a, bb, s, scaling, p,
                                                                             seed, needs)
    assert grad_weight is None

    mask = mask_of(seed, (m, k), p, torch.device("cpu")) if p else None
    leaves = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    w64 = q.dequantize(dtype).double()
    y_ref = lora_linear_reference(leaves[0], w64, b.double() if bias else None, leaves[1], leaves[2], scaling, mask,
                                  realised(p))
    grad_x_ref, grad_lora_A_ref, grad_lora_B_ref = torch.autograd.grad(y_ref, leaves, grad_y.double())
    assert_close(y, y_ref, dtype, "y")
    assert_close(grad_x, grad_x_ref, dtype, "dx")
    assert_close(grad_lora_A, grad_lora_A_ref, dtype, "dA")
    assert_close(grad_lora_B, grad_lora_B_ref, dtype, "dB")
    if bias:
        assert_close(grad_bias, grad_y.double().sum(0), dtype, "db")


@pytest.mark.parametrize("fmt,dq", QUANT, ids=QUANT_IDS)
def test_triton_dequantized_tile_equals_dequantize(fmt, dq):
    """With A = 0, B = 0 and x = I the forward kernel writes W's dequantized tiles themselves: for fp32 the
    kernel's dequantization is QuantizedWeight.dequantize's up to an FMA in double quantization's absmax."""
    _, quantized = _triton_ops()
    n, k = 45, 70
    q = quantize(torch.randn(n, k), fmt, dq)
    y, _ = quantized.forward(torch.eye(k), q, None, torch.zeros(1, k), torch.zeros(n, 1), 1.0, 0.0, 0)
    expected = q.dequantize(torch.float32).t()
    if dq:
        assert (y - expected).abs().max() <= 2 * torch.finfo(torch.float32).eps * expected.abs().max()
    else:
        assert torch.equal(y, expected)


@pytest.mark.parametrize("fmt,dq", QUANT, ids=QUANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bias,p", [(True, 0.0), (False, 0.3)], ids=["bias", "dropout"])
def test_dequantize_once_path_equals_in_loop_and_reference(monkeypatch, fmt, dq, dtype, bias, p):
    """Above the crossover (lowered here to M = 16: the interpreter has no rule of its own) W is dequantized
    once into a temporary and the 16-bit kernels run: the same outputs and gradients as the in-loop path and
    the reference, and the temporary is gone after each call."""
    import weakref

    from lora_kernels.ops import configs

    _, quantized = _triton_ops()
    m, k, n, r = 33, 70, 45, 7  # K % 64 != 0: NF4 blocks span rows of W
    q, x, b, a, bb = _inputs(m, k, n, r, dtype, fmt, dq, bias)
    grad_y = torch.randn(m, n, generator=torch.Generator().manual_seed(7)).to(dtype)
    scaling, seed, needs = 0.75, 1234, (True, False, bias, True, True)

    def run():
        y, s = quantized.forward(x, q, b, a, bb, scaling, p, seed)
        return (y, *quantized.backward(grad_y, x, q, a, bb, s, scaling, p, seed, needs))

    in_loop = run()
    temporaries = []
    original = quantized.dequantize

    def spy(qweight, out_dtype):
        w = original(qweight, out_dtype)
        temporaries.append(weakref.ref(w))
        return w

    monkeypatch.setattr(quantized, "dequantize", spy)
    monkeypatch.setitem(configs.DEQUANT_ONCE, (fmt, None), configs.DequantOnce(min_m=m + 1, fixed_cost=0.0))
    below = run()  # M = 33 < 34: still in the loop
    assert not temporaries
    monkeypatch.setitem(configs.DEQUANT_ONCE, (fmt, None), configs.DequantOnce(min_m=16, fixed_cost=17.0 * n * k))
    once = run()
    assert len(temporaries) == 2, "forward and dX each dequantize W once"
    assert all(ref() is None for ref in temporaries), "the 16-bit temporary outlives its call"

    mask = _triton_ops()[0].dropout_mask(seed, (m, k), p, torch.device("cpu")) if p else None
    leaves = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    y_ref = lora_linear_reference(leaves[0], q.dequantize(dtype).double(), b.double() if bias else None, leaves[1],
                                  leaves[2], scaling, mask, p)
    grad_x_ref, grad_lora_A_ref, grad_lora_B_ref = torch.autograd.grad(y_ref, leaves, grad_y.double())
    for name, got, loop, ref in zip(("y", "dx", "dW", "db", "dA", "dB"), once, in_loop,
                                    (y_ref, grad_x_ref, None, grad_y.double().sum(0) if bias else None, grad_lora_A_ref,
                                     grad_lora_B_ref)):
        if ref is None:
            assert got is None and loop is None, name
            continue
        assert_close(got, ref, dtype, name)
        assert_close(got, loop.double(), dtype, f"{name} (vs in-loop)")
    assert all(torch.equal(u, v) for u, v in zip(below, in_loop) if u is not None)


def test_dequantize_once_rule_switches_at_its_crossover(monkeypatch):
    """configs.dequantize_once: NF4 on sm90 switches at min_m + fixed_cost / (N·K) rows, never for int8 or on
    sm80. (Whether that crossover is the right one is tests/test_cost_model.py's question.)"""
    from lora_kernels.ops import configs

    gpu = torch.device("cuda", 0)
    rule = configs.DEQUANT_ONCE[("nf4", 9)]
    for width in (768, 4096):
        first = math.ceil(rule.min_m + rule.fixed_cost / (width * width))
        for capability, fmt, m, expected in [((9, 0), "nf4", first - 1, False), ((9, 0), "nf4", first, True),
                                             ((9, 0), "nf4", 64, False), ((9, 0), "int8", 8192, False),
                                             ((9, 0), "int8", 32768, False), ((8, 0), "nf4", 32768, False)]:
            monkeypatch.setattr(configs, "_device_info", lambda device, c=capability: (c, 132))
            assert configs.dequantize_once(gpu, fmt, m, width, width) is expected, (capability, fmt, m, width)


def test_quantized_plans_see_the_gpu_they_compile_for(monkeypatch):
    """The quantized GEMMs' launches are planned for the device's capability: in TF32 on sm86/sm89 decode tiles
    and int8 tiles take 8 warps (4 spill there, per the compile gate), on sm80 the same shapes keep 4. (The
    plans only pick launches; nothing is compiled or run.)"""
    ops, quantized = _triton_ops()
    from lora_kernels.ops import configs

    monkeypatch.setattr(configs, "_tf32", lambda: True)
    warps = {}
    for capability in ((8, 0), (8, 6), (8, 9)):
        monkeypatch.setattr(configs, "_device_info", lambda device, c=capability: (c, 84))
        for fmt, m in (("nf4", 1), ("nf4", 17), ("int8", 512), ("nf4", 512)):
            q = quantize(torch.randn(64, 64), fmt)
            x = torch.randn(m, 64)
            a, b = torch.randn(8, 64), torch.randn(64, 8)
            forward = quantized._ForwardPlan(x, q, None, a, b, False)
            backward = quantized._BackwardPlan(torch.randn(m, 64), x, q, a, b, torch.randn(m, 8),
                                               (True, False, False, True, True), False)
            warps[capability, fmt, m] = (forward.matmul.meta["num_warps"], backward.grad_x_gemm.meta["num_warps"])
    for fmt, m in (("nf4", 1), ("nf4", 17), ("int8", 512)):
        assert warps[(8, 6), fmt, m] == warps[(8, 9), fmt, m] == (8, 8), (fmt, m)
        assert warps[(8, 0), fmt, m] == (4, 4), (fmt, m)
    assert warps[(8, 6), "nf4", 512] == warps[(8, 0), "nf4", 512]


@pytest.mark.parametrize("fmt,dq", QUANT, ids=QUANT_IDS)
def test_dequantize_kernel_equals_dequantize(fmt, dq):
    """The dequantize-once kernel writes QuantizedWeight.dequantize's W (up to double quantization's FMA)."""
    _, quantized = _triton_ops()
    q = quantize(torch.randn(45, 70), fmt, dq)
    for dtype in (torch.float32, torch.float16):
        got, expected = quantized.dequantize(q, dtype), q.dequantize(dtype)
        assert got.dtype == dtype and got.shape == (45, 70)
        if dq:
            assert (got.float() - expected.float()).abs().max() <= 2 * torch.finfo(dtype).eps * expected.abs().max()
        else:
            assert torch.equal(got, expected)


def test_sm80_tf32_decode_tile_is_the_one_without_spills():
    """The compile gate's one quantized spill (sm80, TF32 int8 forward at M = 1: 20 B with a 16x64x32 tile,
    4 warps) is gone with K blocks of 16 (64 bytes of fp32), which the decode heuristic now gives off sm90's
    tensor cores: ptxas -v shows 56 registers and no spill for int8, NF4 and NF4-dq. A K block of 32 there
    would bring the spill back."""
    from lora_kernels.ops import configs

    _, quantized = _triton_ops()
    q = quantize(torch.zeros(4096, 4096), "int8")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32
    try:
        cfgs = configs._heuristic_configs((8, 0), 108, torch.float32, 1, 4096, 4096, 16, True)
        for w_t, cfg in ((True, cfgs.forward), (False, cfgs.grad_input)):
            launch = quantized._qmatmul_launch(1, 4096, 4096, 16, q, w_t=w_t, has_bias=w_t, has_dropout=False,
                                               config=cfg, max_block_r=cfgs.max_block_r, dtype=torch.float32)
            assert launch.meta["INPUT_PRECISION"] == "tf32"
            assert (launch.meta["BLOCK_M"], launch.meta["BLOCK_K"]) == (16, 16), launch.meta
    finally:
        torch.set_float32_matmul_precision(previous)


def test_torch_backend_dequantizes_in_chunks(monkeypatch):
    """A layer wider than the chunk never dequantizes all of W at once, and gives the same result."""
    q, x, b, a, bb = _inputs(6, 40, 300, 4, torch.float32, "nf4", False, True)
    seen = []
    original = type(q).dequantize

    def spy(self, dtype=torch.float32, rows=None):
        out = original(self, dtype, rows)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(type(q), "dequantize", spy)
    monkeypatch.setattr("lora_kernels.quant.CHUNK_ELEMENTS", 40 * 64)
    y_ref = x @ original(q).t() + b + 0.5 * (x @ a.t()) @ bb.t()
    y, s = torch_backend.DEFAULT.forward(x, q, b, a, bb, 0.5, 0.0, 0)
    assert max(seen) <= 40 * 64 < 300 * 40
    assert_close(y, y_ref, torch.float32, "y")


# ------------------------------------------------------------------------------------------------ module


@pytest.mark.parametrize("fmt,dq", QUANT, ids=QUANT_IDS)
def test_module_state_dict_to_deepcopy(fmt, dq):
    torch.manual_seed(0)
    layer = FusedLoRALinear(70, 45, rank=4, quantize=fmt, double_quant=dq, backend="torch")
    nn.init.normal_(layer.lora_B)
    layer.eval()
    x = torch.randn(3, 70)
    y = layer(x)
    assert layer.weight is None
    assert {n for n, _ in layer.named_parameters()} == {"bias", "lora_A", "lora_B", "weight_data"}
    assert not layer.weight_data.requires_grad and not layer.weight_data.is_floating_point()
    names = {n for n in layer.state_dict()}
    assert {"weight_data", "weight_absmax"} <= names and ("weight_absmax2" in names) == dq

    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = FusedLoRALinear(70, 45, rank=4, quantize=fmt, double_quant=dq, backend="torch").eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), y)

    clone = copy.deepcopy(layer)
    assert torch.equal(clone(x), y) and clone.weight_data.data_ptr() != layer.weight_data.data_ptr()

    half = copy.deepcopy(layer).to(torch.float16)  # the scales and codebooks stay fp32, the codes unchanged
    assert half.lora_A.dtype == torch.float16 and half.weight_absmax.dtype == layer.weight_absmax.dtype
    assert torch.equal(half.weight_data, layer.weight_data)
    assert all(t.dtype == getattr(layer, n).dtype for n, t in half.named_buffers())


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_from_linear_and_autograd_through_the_module(fmt):
    torch.manual_seed(1)
    linear = nn.Linear(33, 17)
    layer = FusedLoRALinear.from_linear(linear, rank=3, dropout=0.2, quantize=fmt, backend="torch")
    nn.init.normal_(layer.lora_B)
    assert linear.weight.shape == (17, 33), "the original linear is left unchanged"
    x = torch.randn(2, 4, 33, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    y.square().sum().backward()
    # the same through the eager reference (autograd on the dequantized weight, the same mask)
    x2 = x.detach().clone().requires_grad_()
    a2, b2 = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B))
    torch.manual_seed(5)
    y2 = lora_linear(x2, layer.qweight, layer.bias.detach(), a2, b2, layer.scaling, 0.2, backend="eager")
    y2.square().sum().backward()
    atol = TOLERANCES[torch.float32]  # fp32 fused vs fp32 eager: the fp32 bar, as an absolute one here
    assert torch.allclose(y, y2, atol=atol) and torch.allclose(x.grad, x2.grad, atol=atol)
    assert torch.allclose(layer.lora_A.grad, a2.grad, atol=atol)
    assert torch.allclose(layer.lora_B.grad, b2.grad, atol=atol)


def test_quantized_errors_name_the_problem():
    layer = FusedLoRALinear(8, 8, rank=2, quantize="nf4")
    with pytest.raises(RuntimeError, match="to_linear"):
        layer.merge()
    with pytest.raises(ValueError, match="already quantized"):
        layer.quantize_base("int8")
    with pytest.raises(ValueError, match="got 'int4'"):
        FusedLoRALinear(8, 8, rank=2, quantize="int4")
    with pytest.raises(ValueError, match=r"\(4, 8\) does not fit"):
        FusedLoRALinear(8, 8, rank=2).use_quantized(quantize(torch.ones(4, 8), "nf4"), torch.float32)


def _llama_like(dim=256, hidden=688, layers=2, vocab=512, dtype=torch.bfloat16):
    """A small Llama-style stack of linears (q, k, v, o, gate, up, down per layer), embeddings and head."""
    blocks = nn.ModuleList()
    for _ in range(layers):
        blocks.append(nn.ModuleDict({name: nn.Linear(i, o, bias=False) for name, i, o in (
            ("q_proj", dim, dim), ("k_proj", dim, dim // 4), ("v_proj", dim, dim // 4), ("o_proj", dim, dim),
            ("gate_proj", dim, hidden), ("up_proj", dim, hidden), ("down_proj", hidden, dim))}))
    model = nn.ModuleDict({"embed_tokens": nn.Embedding(vocab, dim), "layers": blocks,
                           "lm_head": nn.Linear(dim, vocab, bias=False)})
    return model.to(dtype)


def test_nf4_weight_bytes_of_a_llama_like_model():
    """Every projection in NF4 (embeddings and head stay bf16, as in QLoRA): linear weights ≤ 0.30× bf16."""
    model = _llama_like()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    dense = sum(model.get_submodule(n).weight.numel() * 2 for n in linears)
    replace_linear_with_fused_lora(model, rank=8, target_modules=linears, quantize="nf4", double_quant=True)
    quantized = sum(model.get_submodule(n).qweight.nbytes for n in linears)
    assert quantized <= 0.30 * dense, f"NF4 bytes {quantized} > 0.30 x bf16 bytes {dense}"
    summary = lora_summary(model)
    assert summary.weight_bytes == weight_bytes(model) and summary.weight_bytes < sum(
        p.numel() * 2 for p in _llama_like().parameters())


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_merge_and_unload_dequantizes_and_merges(fmt):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 40))
    replace_linear_with_fused_lora(model, rank=4, quantize=fmt, backend="torch")
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B, std=0.1)
    model.eval()
    x = torch.randn(5, 40)
    expected = model(x)
    merge_and_unload(model)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.float32
    assert torch.allclose(model(x), expected, atol=TOLERANCES[torch.float32])  # fp32 merged vs unmerged


# ---------------------------------------------------------------------------------- bitsandbytes interop


def _peft_on_bnb(double_quant, use_dora=False):
    """A PEFT LoRA (or DoRA) model whose bases are bitsandbytes' Linear4bit (NF4) and Linear8bitLt, quantized on the
    CPU."""
    bnb = checked_bitsandbytes()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    q, v = nn.Linear(70, 45), nn.Linear(70, 45, bias=False)
    l4 = bnb.nn.Linear4bit(70, 45, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                           compress_statistics=double_quant)
    l4.load_state_dict(q.state_dict())
    l8 = bnb.nn.Linear8bitLt(70, 45, bias=False, has_fp16_weights=False, threshold=0.0)
    l8.load_state_dict(v.state_dict())
    model = nn.ModuleDict({"q": l4.to("cpu"), "v": l8.to("cpu")})
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False,
                                            use_dora=use_dora))
    return bnb, peft


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
def test_fuse_peft_model_reuses_bitsandbytes_packed_data(double_quant):
    bnb, peft = _peft_on_bnb(double_quant)
    from lora_kernels import fuse_peft_model

    inner = peft.base_model.model
    l4, l8 = inner["q"].base_layer, inner["v"].base_layer
    x = torch.randn(6, 70)
    w4 = bnb_nf4_weight(l4.weight.data, l4.weight.quant_state)  # from the packed data, not bitsandbytes' math
    w8 = l8.weight.CB.double() * l8.weight.SCB.double()[:, None] / 127
    lora = {k: (inner[k].lora_A["default"].weight.double(), inner[k].lora_B["default"].weight.double(),
                inner[k].scaling["default"]) for k in ("q", "v")}
    expected = {"q": x.double() @ w4.t() + l4.bias.double(), "v": x.double() @ w8.t()}
    for k, (a, b, s) in lora.items():
        expected[k] = expected[k] + s * (x.double() @ a.t()) @ b.t()

    fuse_peft_model(peft, backend="torch")
    fq, fv = inner["q"], inner["v"]
    assert (fq.quantize, fv.quantize) == ("nf4", "int8")
    assert fq.weight_data.data_ptr() == l4.weight.data.data_ptr(), "NF4 codes shared, not requantized"
    assert fv.weight_data.data_ptr() == l8.weight.CB.data_ptr()
    # one fp32 rounding of each dequantized value against the float64 definition: not a dtype tolerance
    assert torch.allclose(fq.qweight.dequantize().double(), w4, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert_close(fq(x), expected["q"], torch.float32, "q")
        assert_close(fv(x), expected["v"], torch.float32, "v")
    # the adapters are PEFT's own parameters, still trainable; the quantized bases have none
    assert fq.lora_A.requires_grad and fq.lora_A.shape == (4, 70)
    assert not any(p.requires_grad for n, p in peft.named_parameters() if "lora_" not in n)


def test_fuse_peft_model_dora_on_bitsandbytes():
    """PEFT's DoRA on NF4 and int8 bases (the magnitudes moved off their initial norms): after the conversion, the
    layers share PEFT's magnitudes and give PEFT's outputs and gradients (A, B, m)."""
    _, peft = _peft_on_bnb(double_quant=False, use_dora=True)
    from lora_kernels import fuse_peft_model

    inner = peft.base_model.model
    params = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in params.items():
            if "lora_magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(6, 70, generator=torch.Generator().manual_seed(2))

    def run():
        outputs = {k: inner[k](x) for k in ("q", "v")}
        sum((o * o).sum() for o in outputs.values()).backward()
        grads = {n: p.grad.clone() for n, p in params.items()}
        peft.zero_grad()
        return outputs, grads

    expected, expected_grads = run()
    magnitude = inner["q"].lora_magnitude_vector["default"].weight
    fuse_peft_model(peft, backend="torch")
    assert inner["q"].quantize == "nf4" and inner["q"].lora_magnitude is magnitude
    outputs, grads = run()
    for k in ("q", "v"):
        assert_close(outputs[k], expected[k], torch.float32, k)
    assert len(grads) == 6
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], torch.float32, f"grad of {name}")


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
def test_fuse_peft_model_after_bitsandbytes_repacked_for_its_cpu_kernel(double_quant):
    """An eval forward on an AVX-512 CPU makes bitsandbytes repack a Linear4bit (its CPU layout, absmax in bf16,
    double quantization folded in); converting it then must read that layout and leave the layer working."""
    bnb = checked_bitsandbytes()
    from peft import LoraConfig, get_peft_model

    from lora_kernels import fuse_peft_model

    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    l4 = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                           compress_statistics=double_quant)
    l4.load_state_dict(linear.state_dict())
    peft = get_peft_model(nn.ModuleDict({"q": l4.to("cpu")}), LoraConfig(r=4, lora_alpha=8, target_modules=["q"],
                                                                         init_lora_weights=False)).eval()
    original = l4.weight.data.clone()  # the row-major packing
    x = torch.randn(5, 128)
    with torch.no_grad():
        peft.base_model.model["q"](x)  # bitsandbytes may repack here
    state = l4.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):  # a CPU without AVX-512 bf16: repack by hand
        l4.weight.data, state = bnb.functional._convert_weight_packed_for_cpu(l4.weight.data, state)
        l4.weight.quant_state = state
    # the original codes with the absmax the repack left (bf16, (K/64, N)): what the layer computes with now
    w_now = bnb_nf4_weight(original, state, absmax=state.absmax.t().reshape(-1))
    data, layout = l4.weight.data.clone(), state.packing_format_for_cpu

    fuse_peft_model(peft, backend="torch")
    layer = peft.base_model.model["q"]
    assert layer.quantize == "nf4"
    # one fp32 rounding of each dequantized value against the float64 definition: not a dtype tolerance
    assert torch.allclose(layer.qweight.dequantize().double(), w_now, rtol=0, atol=1e-6)
    a, b, s = layer.lora_A.double(), layer.lora_B.double(), layer.scaling
    with torch.no_grad():
        for _ in range(2):  # the forward after the conversion, and the one after that
            expected = x.double() @ w_now.t() + linear.bias.double() + s * (x.double() @ a.t()) @ b.t()
            assert_close(layer(x), expected, torch.float32, "q")
    assert torch.equal(l4.weight.data, data) and l4.weight.quant_state.packing_format_for_cpu == layout, \
        "the bitsandbytes layer was changed"


def test_merge_and_unload_requantizes_on_request():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(70, 70))
    replace_linear_with_fused_lora(model, rank=4, quantize="nf4", backend="torch")
    nn.init.normal_(model[0].lora_B, std=0.1)
    merged = model[0].to_linear().weight.detach()
    merge_and_unload(model, quantize="nf4")
    layer = model[0]
    assert isinstance(layer, FusedLoRALinear) and layer.quantize == "nf4" and not layer.lora_B.any()
    assert torch.equal(layer.qweight.dequantize(), quantize(merged, "nf4").dequantize())
    # the rounding stated in merge_and_unload's docstring: at most 0.152 x the block's absmax (half the gap -1 to -0.696)
    err = (layer.qweight.dequantize() - merged).abs()
    absmax = quantize(merged, "nf4").absmax
    f = torch.arange(merged.numel())
    assert torch.all(err.reshape(-1) <= 0.152 * absmax[f // 64] + 1e-7)


def test_trainer_quantize_flag():
    from minimind.cli import CLIError
    from minimind.train_lora import parse_args

    assert parse_args(["--fused", "--quantize", "nf4"]).quantize == "nf4"
    assert parse_args([]).quantize is None
    with pytest.raises(CLIError, match="--quantize int8 needs --fused"):
        parse_args(["--quantize", "int8"])
