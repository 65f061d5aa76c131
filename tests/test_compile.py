"""torch.compile(fullgraph=True) through FusedLoRALinear: no graph break, no recompile per call, and the
outputs and gradients of eager mode.

Under compile, lora_linear runs as the custom ops lora_kernels::lora_linear_forward / _backward, which call
the same backend as eager mode. The dropout seed is drawn with torch.randint inside the graph: `aot_eager`
draws it from the default generator exactly as eager mode does; Inductor generates random numbers its own
way unless torch._inductor.config.fallback_random is set, so the equality tests set it (as one must for
F.dropout too).
"""
import importlib.util
import os

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

import lora_kernels.backends.triton as triton_backend
import lora_kernels.functional as functional
from helpers import assert_close, tiny_transformers
from lora_kernels import FusedLoRALinear, replace_linear_with_fused_lora, triton_available

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")  # Inductor's own


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def adapted_layer(backend="torch", dropout=0.2, k=16, n=12):
    torch.manual_seed(0)
    layer = FusedLoRALinear(k, n, rank=4, alpha=8, dropout=dropout, backend=backend)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def outputs_and_grads(fn, x, params, seed):
    """fn(x) and the gradients of a non-trivial loss w.r.t. x and params, with the RNG at `seed`."""
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    y = fn(x)
    return [y, *torch.autograd.grad(y.square().sum(), [x, *params])]


def assert_same(got, expected, names):
    for g, e, name in zip(got, expected, names):
        assert_close(g, e, torch.float32, name)


def test_inductor_matches_eager_with_dropout_and_compiles_once():
    layer = adapted_layer()
    layer.bias.requires_grad_(True)  # W frozen (the default), the bias trained so that its gradient is checked too
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    params = [layer.lora_A, layer.lora_B, layer.bias]
    with torch._inductor.config.patch(fallback_random=True):
        for seed in range(3):  # a new seed per call must not recompile
            x = torch.randn(2, 5, 16)
            got = outputs_and_grads(compiled, x, params, seed)
            expected = outputs_and_grads(layer, x, params, seed)
            assert_same(got, expected, ["y", "dx", "dA", "dB", "db"])
    assert counter.frame_count == 1


def test_inductor_dropout_is_reproducible_under_manual_seed():
    layer = adapted_layer(dropout=0.5)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    x = torch.randn(8, 16)
    runs = [outputs_and_grads(compiled, x, [layer.lora_A], seed) for seed in (3, 3, 4)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0])  # another seed, another mask
    assert counter.frame_count == 1


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_llama_with_our_layers_compiles_fullgraph(use_dora):
    model = tiny_transformers("llama")
    replace_linear_with_fused_lora(model, rank=4, alpha=8, dropout=0.1, target_modules="all-linear", backend="torch",
                                   use_dora=use_dora)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            nn.init.normal_(p, 0, 0.1)
    counter = CompileCounterWithBackend("aot_eager")  # Dynamo + AOTAutograd: what fullgraph is about
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        results = []
        for fn in (compiled, model):
            torch.manual_seed(seed)
            loss = fn(input_ids=ids, labels=ids).loss
            results.append([loss, *torch.autograd.grad(loss, params)])
        assert_same(results[0], results[1], ["loss"] + [f"grad {i}" for i in range(len(params))])
    assert counter.frame_count == 1


def test_eager_calls_keep_the_autograd_function(monkeypatch):
    # The custom op costs Python dispatch time on every call; eager mode must not pay it.
    def fail(*args, **kwargs):
        raise AssertionError("the custom op was used outside torch.compile")

    monkeypatch.setattr(functional, "_lora_linear_custom_op", fail)
    layer = adapted_layer()
    layer(torch.randn(3, 16, requires_grad=True)).sum().backward()


def count_calls(monkeypatch, module, names=("forward", "backward")):
    """Wraps module.forward / module.backward to count their calls; returns the live counts."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        def counted(*args, _real=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.skipif(not triton_available(), reason="triton or lora_kernels.ops cannot be imported")
def test_compiled_layer_runs_our_triton_kernels(monkeypatch):
    """On CUDA with backend="auto" (aot_eager and Inductor), else on Triton's CPU interpreter."""
    if torch.cuda.is_available():
        device, backend, compilers = "cuda", "auto", ["aot_eager", "inductor"]
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device, backend, compilers = "cpu", "triton", ["aot_eager"]
    else:
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    layer = adapted_layer(backend=backend, k=24, n=20).to(device)
    x = torch.randn(6, 24, device=device)
    params = [layer.lora_A, layer.lora_B]
    expected = outputs_and_grads(layer, x, params, seed=0)
    for compiler in compilers:
        torch._dynamo.reset()
        calls = count_calls(monkeypatch, triton_backend._triton_module())
        with torch._inductor.config.patch(fallback_random=True):
            got = outputs_and_grads(torch.compile(layer, fullgraph=True, backend=compiler), x, params, seed=0)
        monkeypatch.undo()
        assert calls == {"forward": 1, "backward": 1}, compiler
        assert_same(got, expected, [f"{compiler} {name}" for name in ("y", "dx", "dA", "dB")])


def test_compiled_training_step_graph_has_no_cpu_rng_and_no_host_sync():
    """CUDA-graph readiness, as far as a CPU can show it: the graph that torch.compile's AOTAutograd builds
    for a training step (traced here on the meta device, standing in for CUDA) draws the dropout seed on x's
    device, feeds that tensor to both LoRA ops, and reads no value on the host (no .item())."""
    from unittest import mock

    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, weight, bias, lora_A, lora_B):
        y = functional.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, dropout_p=0.1, backend="auto")
        return torch.autograd.grad(y.square().sum(), [lora_A, lora_B])

    meta = torch.device("meta")
    args = [torch.empty(2, 8, 16, device=meta), torch.empty(12, 16, device=meta), torch.empty(12, device=meta),
            torch.empty(4, 16, device=meta, requires_grad=True), torch.empty(12, 4, device=meta, requires_grad=True)]
    with mock.patch("torch.compiler.is_compiling", return_value=True):  # the path Dynamo takes
        graph = make_fx(step, tracing_mode="fake")(*args).graph
    nodes = list(graph.nodes)
    targets = [str(n.target) for n in nodes]
    seeds = [n for n in nodes if "randint" in str(n.target)]
    assert len(seeds) == 1 and seeds[0].kwargs["device"] == meta  # one draw per call, on x's device
    lora_ops = [n for n in nodes if "lora_kernels" in str(n.target)]
    assert len(lora_ops) == 2 and all(seeds[0] in n.args for n in lora_ops)  # forward and backward, one seed
    assert not any("local_scalar_dense" in t or t.endswith(".item") for t in targets)
    assert not any(n.kwargs.get("device") == torch.device("cpu") for n in nodes)
