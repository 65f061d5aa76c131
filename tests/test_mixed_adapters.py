"""Mixed batches (lora_kernels.mixed): each row of a batch with its own adapter, in one fused pass.

The bar: a mixed batch's output and every gradient equal per-adapter separate runs of the single-adapter
path on the same rows, under the same seed (so the same dropout masks).
"""

import pytest
import torch
import torch.nn as nn

from helpers import assert_close, needs_peft, tiny_minimind, two_peft_adapters
from lora_kernels import (
    AdapterTerm,
    LoRAConfig,
    active_adapters,
    add_adapter,
    iter_lora_layers,
    lora_linear_mixed,
    lora_linear_reference,
    merge_lora,
    mixed_adapters,
    replace_linear_with_fused_lora,
    set_adapter,
    triton_available,
)

BACKENDS = ["torch", "eager"] + (["triton"] if triton_available() else [])
NAMES = ["default", None, "b", "c", "default", "b"]  # rows 1: base alone; "c" lives on one layer only


class Stack(nn.Module):
    """Three linears with a GELU between: 12 -> 10 -> 9 -> 8."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 10)
        self.mid = nn.Linear(10, 9, bias=False)
        self.down = nn.Linear(9, 8)

    def forward(self, x):
        h = self.up(x)
        h = h + self.mid(nn.functional.gelu(h))[..., :1]  # an in-place-free residual of a LoRA output
        return self.down(nn.functional.gelu(self.mid(nn.functional.gelu(h))))


def three_adapter_model(backend, dropouts=(0.0, 0.0, 0.0), dtype=torch.float32, train_base=True):
    """"default" (rank 4, alpha 8), "b" (rank 2, alpha 3, rsLoRA) and "c" (rank 3, alpha 5, on ``up`` only),
    with non-zero B; the base trainable (``train_base``) so its gradients are checked too."""
    torch.manual_seed(0)
    model = replace_linear_with_fused_lora(Stack(), target_modules=["up", "mid", "down"], backend=backend,
                                           config=LoRAConfig(rank=4, alpha=8, dropout=dropouts[0]))
    add_adapter(model, "b", config=LoRAConfig(rank=2, alpha=3, use_rslora=True, dropout=dropouts[1]))
    add_adapter(model, "c", target_modules=["up"], config=LoRAConfig(rank=3, alpha=5, dropout=dropouts[2]))
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            for name in layer.adapter_names:
                layer.lora_params(name)[1].normal_(0, 0.3)
    for _, layer in iter_lora_layers(model):
        layer.weight.requires_grad_(train_base)
        if layer.bias is not None:
            layer.bias.requires_grad_(train_base)
    return model.to(dtype).train()


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def run_mixed(model, x, names, grad_out, seed=5):
    model.zero_grad()
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    with mixed_adapters(model, names):
        y = model(x)
    y.backward(grad_out)
    return y.detach(), x.grad, grads(model)


def run_separately(model, x, names, grad_out, seed=5):
    """Each adapter (and the base alone) over the whole batch with the single-adapter path, from the same seed;
    its rows of the output and of dX kept, its loss restricted to its rows, gradients summed over the runs."""
    model.zero_grad()
    y_all, dx_all = None, torch.zeros_like(x)
    for name in dict.fromkeys(names):
        rows = torch.tensor([n == name for n in names])
        set_adapter(model, [] if name is None else name)
        xs = x.clone().requires_grad_()
        torch.manual_seed(seed)
        y = model(xs)
        (y * grad_out * rows.view(-1, *[1] * (y.dim() - 1)).to(y.dtype)).sum().backward()
        y_all = torch.zeros_like(y) if y_all is None else y_all
        y_all[rows] = y[rows].detach()
        dx_all[rows] = xs.grad[rows]
    set_adapter(model, "default")
    return y_all, dx_all, grads(model)


def check_equal(mixed, separate, dtype, what):
    (y, dx, g), (y_ref, dx_ref, g_ref) = mixed, separate
    assert_close(y, y_ref, dtype, f"{what}: output")
    assert_close(dx, dx_ref, dtype, f"{what}: dX")
    assert sorted(g) == sorted(g_ref), f"{what}: gradients of {sorted(g)} != {sorted(g_ref)}"
    for name in g_ref:
        assert_close(g[name], g_ref[name], dtype, f"{what}: grad of {name}")


DROPOUTS = {"none": (0.0, 0.0, 0.0), "same_p": (0.25, 0.25, 0.25), "different_p": (0.3, 0.1, 0.0)}


@pytest.mark.parametrize("dropout", list(DROPOUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_equals_separate_runs_fp32(backend, dropout):
    model = three_adapter_model(backend, DROPOUTS[dropout])
    x = torch.randn(len(NAMES), 3, 12, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(len(NAMES), 3, 8, generator=torch.Generator().manual_seed(2))
    mixed = run_mixed(model, x, NAMES, grad_out)
    check_equal(mixed, run_separately(model, x, NAMES, grad_out), torch.float32, f"{backend}, dropout {dropout}")
    # Every adapter got a gradient, and only from its own rows: "c" (row 3) lives on `up` alone.
    g = mixed[2]
    assert {"up.lora_adapters.c.lora_A", "up.lora_adapters.b.lora_B", "down.lora_A"} <= set(g)
    assert not any(".c." in name and not name.startswith("up.") for name in g)
    if dropout != "none":  # the masks really drop: eval (no dropout) gives another output
        model.eval()
        with torch.no_grad(), mixed_adapters(model, NAMES):
            assert (model(x) - mixed[0]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_mixed_batch_equals_separate_runs_fp16(backend):
    model = three_adapter_model(backend, DROPOUTS["same_p"], dtype=torch.float16)
    x = torch.randn(len(NAMES), 5, 12, generator=torch.Generator().manual_seed(1)).half()
    grad_out = torch.randn(len(NAMES), 5, 8, generator=torch.Generator().manual_seed(2)).half()
    check_equal(run_mixed(model, x, NAMES, grad_out), run_separately(model, x, NAMES, grad_out), torch.float16,
                f"{backend} fp16")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_mixed_batch_on_a_quantized_base_equals_separate_runs(backend):
    model = three_adapter_model(backend, DROPOUTS["same_p"], train_base=False)
    for _, layer in iter_lora_layers(model):
        layer.quantize_base("nf4")
    x = torch.randn(len(NAMES), 3, 12, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(len(NAMES), 3, 8, generator=torch.Generator().manual_seed(2))
    check_equal(run_mixed(model, x, NAMES, grad_out), run_separately(model, x, NAMES, grad_out), torch.float32,
                f"{backend}, NF4 base")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_a_mixed_batch_is_one_fused_call_per_layer_call(backend, monkeypatch):
    import lora_kernels.mixed as mixed

    ranks = []
    real = mixed._LoRALinearFunction.apply
    monkeypatch.setattr(mixed._LoRALinearFunction, "apply",
                        lambda *args: ranks.append(args[3].shape[0]) or real(*args))
    model = three_adapter_model(backend)
    with mixed_adapters(model, NAMES):
        model(torch.randn(len(NAMES), 2, 12)).sum().backward()
    # up (default 4 + b 2 + c 3), mid twice and down (default 4 + b 2): one call each, at rank Σr
    assert ranks == [9, 6, 6, 6]


def test_mixed_batch_in_eval_and_no_grad_equals_per_adapter_outputs():
    model = three_adapter_model("torch", DROPOUTS["same_p"], train_base=False).eval()
    x = torch.randn(len(NAMES), 2, 12)
    with torch.no_grad():
        with mixed_adapters(model, NAMES):
            y = model(x)
        for i, name in enumerate(NAMES):
            set_adapter(model, [] if name is None else name)
            assert_close(y[i], model(x[i:i + 1])[0], torch.float32, f"row {i} ({name})")


def test_functional_mixed_equals_the_reference_loop_in_float64():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 7, dtype=torch.float64)
    weight, bias = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    terms = [AdapterTerm(torch.randn(r, 7, dtype=torch.float64), torch.randn(5, r, dtype=torch.float64), s)
             for r, s in ((3, 0.5), (1, 2.0))]
    rows = [1, None, 0, 1]
    y = lora_linear_mixed(x, weight, bias, terms, rows, backend="torch")
    for i, a in enumerate(rows):
        expected = (nn.functional.linear(x[i], weight, bias) if a is None else
                    lora_linear_reference(x[i], weight, bias, terms[a].lora_A, terms[a].lora_B, terms[a].scaling))
        assert_close(y[i], expected, torch.float64, f"row {i}")
    with pytest.raises(ValueError, match=r"one entry per row of x's leading dimension \(4\), got shape \(3,\)"):
        lora_linear_mixed(x, weight, bias, terms, [0, 1, 0], backend="torch")
    with pytest.raises(ValueError, match=r"must be in \[-1, 2\).*got 2"):
        lora_linear_mixed(x, weight, bias, terms, [0, 1, 2, 0], backend="torch")


# ---------------------------------------------------------------------------------------------------
# The context manager's contract


def test_wrong_leading_size_names_the_layer_the_size_and_len_names():
    model = three_adapter_model("torch")
    with mixed_adapters(model, ["default", "b", None]):
        with pytest.raises(ValueError, match=r"layer 'up'.*shape \(4, 2, 12\) with leading size 4, but len\(names\) = 3"):
            model(torch.randn(4, 2, 12))
        with pytest.raises(ValueError, match=r"layer 'up'.*shape \(12,\) with no leading \(batch\) dimension, "
                                             r"but len\(names\) = 3"):
            model(torch.randn(12))


def test_unknown_or_bad_names_and_nesting_are_refused_and_nothing_leaks():
    model = three_adapter_model("torch")
    with pytest.raises(ValueError, match=r"no adapter named 'zz' in the model \(it has \['default', 'b', 'c'\]\)"):
        with mixed_adapters(model, ["default", "zz"]):
            pass
    with pytest.raises(TypeError, match="got the string 'default'"):
        with mixed_adapters(model, "default"):
            pass
    with pytest.raises(TypeError, match=r"names\[1\] must be an adapter name or None, got int 3"):
        with mixed_adapters(model, ["b", 3]):
            pass
    with mixed_adapters(model, ["b"]):
        with pytest.raises(RuntimeError, match="do not nest: layer 'up'"):
            with mixed_adapters(model, ["c"]):
                pass
    assert all(layer._mixed is None for _, layer in iter_lora_layers(model))
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"):
        with mixed_adapters(model, ["b"]):
            pass


def test_leaving_the_context_restores_the_active_adapters_even_after_an_error():
    model = three_adapter_model("torch").eval()
    set_adapter(model, ["b", "c"])
    x = torch.randn(2, 12)
    with torch.no_grad():
        before = model(x)
        with pytest.raises(ZeroDivisionError):
            with mixed_adapters(model, ["default", None]):
                set_adapter(model, "default")
                1 / 0
        assert active_adapters(model) == ["b", "c"]
        assert torch.equal(model(x), before)


def test_several_active_adapters_are_one_call_equal_to_the_reference():
    """set_adapter([a, b]) runs the concatenation with one scale row; the same dropout p shares one mask,
    so the torch backend equals the eager one (the reference's terms, the same seeded mask) in training."""
    x = torch.randn(3, 4, 12, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(2))
    results = {}
    for backend in BACKENDS:
        for dropout in ("none", "same_p"):
            model = three_adapter_model(backend, DROPOUTS[dropout])
            set_adapter(model, ["default", "b", "c"])
            xs = x.clone().requires_grad_()
            torch.manual_seed(7)
            y = model(xs)
            y.backward(grad_out)
            results[backend, dropout] = (y.detach(), xs.grad, grads(model))
    for (backend, dropout), result in results.items():
        if backend == "eager" or (backend == "triton" and dropout != "none"):  # the kernels' mask is another one
            continue
        check_equal(result, results["eager", dropout], torch.float32, f"{backend} stacked, dropout {dropout}")


# ---------------------------------------------------------------------------------------------------
# PEFT parity and MiniMind


@needs_peft
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_mixed_batch_matches_peft_adapter_names(tmp_path):
    base, peft, ours = two_peft_adapters(tmp_path)
    x = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft(x, adapter_names=["tr", "default", "__base__", "tr"]).logits
        with mixed_adapters(ours, ["tr", "default", None, "tr"]):
            got = ours(x).logits
    assert_close(got, expected, torch.float32, "logits of a mixed batch")
    # Not blind: each row differs from the other adapters' logits for it.
    assert (expected[0] - expected[1]).abs().max() > 1e-3


def test_minimind_mixed_batch_trains_each_adapter_on_its_own_rows():
    model = tiny_minimind()
    replace_linear_with_fused_lora(model, config=LoRAConfig(rank=4, alpha=8, dropout=0.1), backend="torch")
    add_adapter(model, "qa", config=LoRAConfig(rank=2, alpha=4, dropout=0.1))
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            for name in layer.adapter_names:
                layer.lora_params(name)[1].normal_(0, 0.1)
    model.train()
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    names = ["qa", "default", None]

    def losses(logits):  # one loss per row, so each run can weigh its own rows
        return nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    model.zero_grad()
    torch.manual_seed(3)
    with mixed_adapters(model, names):
        mixed_loss = losses(model(ids).logits)
    mixed_loss.sum().backward()
    mixed = grads(model)
    model.zero_grad()
    separate_loss = torch.zeros(3)
    for name in ("qa", "default"):
        set_adapter(model, name)
        torch.manual_seed(3)
        row_loss = losses(model(ids).logits)
        rows = torch.tensor([n == name for n in names])
        (row_loss * rows).sum().backward()
        separate_loss[rows] = row_loss[rows].detach()
    set_adapter(model, [])
    separate_loss[2] = losses(model(ids).logits)[2].detach()
    assert_close(mixed_loss.detach(), separate_loss, torch.float32, "per-row losses")
    separate = grads(model)
    assert sorted(mixed) == sorted(separate) and any("qa" in name for name in mixed)
    for name in separate:
        assert_close(mixed[name], separate[name], torch.float32, f"grad of {name}")
