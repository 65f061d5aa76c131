"""Named adapters (add/set/delete, several active at once, merging, IO per adapter) and LoRAConfig."""
import gc
import json
import weakref

import pytest
import torch
import torch.nn as nn

from helpers import TinyLM, assert_close, needs_peft, two_peft_adapters
from lora_kernels import (
    FusedLoRALinear,
    LoRAConfig,
    active_adapters,
    adapter_names,
    add_adapter,
    delete_adapter,
    iter_lora_layers,
    load_lora,
    load_peft_adapter,
    lora_state_dict,
    merge_lora,
    replace_linear_with_fused_lora,
    save_lora,
    save_peft_adapter,
    set_adapter,
    triton_available,
    unmerge_lora,
)

BACKENDS = ["torch", "eager"] + (["triton"] if triton_available() else [])


def randomize_b(model, seed=3):
    """Non-zero B for every adapter, so each adapter changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            for name in layer.adapter_names:
                layer.lora_params(name)[1].normal_(0, 0.3)
    return model


def two_adapter_model():
    """TinyLM with "default" (rank 4, alpha 8) on the square layers and "b" (rank 2, alpha 3, rsLoRA) on
    q_proj and up_proj: q_proj carries both, with different ranks."""
    torch.manual_seed(0)
    model = replace_linear_with_fused_lora(TinyLM(), rank=4, alpha=8)
    add_adapter(model, "b", target_modules=["q_proj", "up_proj"], config=LoRAConfig(rank=2, alpha=3, use_rslora=True))
    return randomize_b(model).eval()


def ids(seed=0):
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(seed))


@pytest.mark.filterwarnings("ignore:rank .* at least as many parameters:UserWarning")
def test_design_doc_rank_example_on_minimind():
    # train_lora.md §10.3: {'attention': 8, 'mlp': 16, 'default': 4} -- "attn" / "mlp" in the path picks the rank.
    from minimind.checkpoint import load_minimind

    model = load_minimind()
    replace_linear_with_fused_lora(model, rank=4, rank_pattern={".*attn.*": 8, ".*mlp.*": 16},
                                   target_modules="all-linear")
    ranks = {name: layer.rank for name, layer in iter_lora_layers(model)}
    assert ranks and all(r == (8 if ".self_attn." in n else 16 if ".mlp." in n else 4) for n, r in ranks.items())
    assert {8, 16} <= set(ranks.values())
    torch.manual_seed(0)
    model = replace_linear_with_fused_lora(TinyLM(), rank=4, rank_pattern={"q_proj": 8}, target_modules="all-linear")
    assert {n: l.rank for n, l in iter_lora_layers(model)}["layers.0.k_proj"] == 4  # the default


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "peft"])
def test_rank_pattern_model_saves_and_reloads_with_the_same_ranks(tmp_path, fmt):
    torch.manual_seed(0)
    model = replace_linear_with_fused_lora(TinyLM(), rank=4, alpha=8, target_modules="all-linear",
                                           rank_pattern={"up_proj": 6, r"layers\.1\.q_proj": 2},
                                           alpha_pattern={"down_proj": 3})
    randomize_b(model).eval()
    settings = {n: (l.rank, l.alpha) for n, l in iter_lora_layers(model)}
    assert settings["layers.0.up_proj"] == (6, 8.0) and settings["layers.1.q_proj"] == (2, 8.0)
    assert settings["layers.0.down_proj"] == (4, 3.0) and settings["layers.0.q_proj"] == (4, 8.0)
    torch.manual_seed(0)
    fresh = TinyLM().eval()
    if fmt == "peft":
        save_peft_adapter(model, tmp_path)
        load_peft_adapter(fresh, tmp_path)
    else:
        save_lora(model, tmp_path / f"a.{fmt}")
        load_lora(fresh, tmp_path / f"a.{fmt}")
    assert {n: (l.rank, l.alpha) for n, l in iter_lora_layers(fresh)} == settings
    assert_close(fresh(ids()), model(ids()), torch.float32, "reloaded logits")


# ---------------------------------------------------------------------------------------------------
# Switching


def test_set_adapter_back_and_forth_allocates_nothing():
    model = two_adapter_model()
    outputs = {}
    for names in (["default"], ["b"], ["default", "b"], []):
        set_adapter(model, names)
        outputs[tuple(names)] = model(ids())
    assert not torch.equal(outputs[("default",)], outputs[("b",)])
    before = sorted((name, p.data_ptr(), p.untyped_storage().nbytes()) for name, p in model.named_parameters())
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for i in range(1000):
        set_adapter(model, ["default", "b"][i % 2])
        set_adapter(model, ["default", "b"])
    after = sorted((name, p.data_ptr(), p.untyped_storage().nbytes()) for name, p in model.named_parameters())
    assert after == before and {p.untyped_storage().data_ptr() for p in model.parameters()} == storages
    for names, expected in outputs.items():
        set_adapter(model, list(names))
        assert torch.equal(model(ids()), expected), names


def test_model_level_names_and_active_adapters():
    model = two_adapter_model()
    assert adapter_names(model) == ["default", "b"] and active_adapters(model) == ["default"]
    q = model.layers[0].q_proj
    assert q.adapter_names == ["default", "b"] and q.lora_params("b")[0].shape == (2, 16)
    set_adapter(model, "b")
    assert active_adapters(model) == ["b"]
    assert model.layers[0].o_proj.active_adapters == [] and q.active_adapters == ["b"]
    # A layer without "b" runs its base alone.
    x = torch.randn(3, 16)
    o = model.layers[0].o_proj
    assert torch.equal(o(x), nn.functional.linear(x, o.weight, o.bias))


def test_active_adapters_are_one_fused_call(monkeypatch):
    import lora_kernels.modules as modules

    calls, stacked = [], []
    real, real_stacked = modules.lora_linear, modules.lora_linear_stacked
    monkeypatch.setattr(modules, "lora_linear", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    monkeypatch.setattr(modules, "lora_linear_stacked", lambda x, w, b, terms, **k:
                        stacked.append([t.lora_A for t in terms]) or real_stacked(x, w, b, terms, **k))
    layer = two_adapter_model().layers[0].q_proj
    term = []
    monkeypatch.setattr(type(layer), "_lora_term", lambda self, x, name, weight: term.append(name) or 0)
    layer(torch.randn(2, 16))
    assert calls == [layer.lora_A] and term == [] and stacked == []
    layer.set_adapter(["b", "default"])  # the same dropout: one call over both
    layer(torch.randn(2, 16))
    assert calls == [layer.lora_A] and term == [] and stacked == [[layer.lora_params("b")[0], layer.lora_A]]
    # Training with different dropout p: the first adapter fused, the other added eagerly.
    layer.lora_configs["default"] = layer.lora_configs["default"].replace(dropout=0.1)
    layer.train()
    calls.clear(), stacked.clear()
    layer(torch.randn(2, 16))
    assert calls == [layer.lora_params("b")[0]] and term == ["default"] and stacked == []


def reference64(layer, x, names):
    """float64: x·Wᵀ + b + Σ_names s·(x·Aᵀ)·Bᵀ."""
    x64 = x.detach().double()
    y = nn.functional.linear(x64, layer.weight.double(), None if layer.bias is None else layer.bias.double())
    for name in names:
        a, b = (p.detach().double() for p in layer.lora_params(name))
        y = y + layer.lora_configs[name].scaling * (x64 @ a.t()) @ b.t()
    return y


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_active_adapters_add_up(backend):
    torch.manual_seed(0)
    layer = FusedLoRALinear(24, 16, rank=4, alpha=8, backend=backend)
    layer.add_adapter("b", LoRAConfig(rank=2, alpha=3, use_rslora=True))
    layer.add_adapter("c", LoRAConfig(rank=8, alpha=2, init="kaiming"))
    randomize_b(layer)
    layer.set_adapter(["default", "b", "c"])
    x = torch.randn(3, 5, 24, requires_grad=True)
    y = layer(x)
    assert_close(y, reference64(layer, x, ["default", "b", "c"]), torch.float32, "y")
    # Every adapter's gradient: the float64 reference differentiated by autograd.
    grad = torch.randn_like(y)
    y.backward(grad)
    params64 = {n: [p.detach().double().requires_grad_() for p in layer.lora_params(n)] for n in layer.adapter_names}
    x64 = x.detach().double().requires_grad_()
    y64 = nn.functional.linear(x64, layer.weight.double(), layer.bias.double())
    for name, (a, b) in params64.items():
        y64 = y64 + layer.lora_configs[name].scaling * (x64 @ a.t()) @ b.t()
    y64.backward(grad.double())
    assert_close(x.grad, x64.grad, torch.float32, "dx")
    for name, (a, b) in params64.items():
        got_a, got_b = layer.lora_params(name)
        assert_close(got_a.grad, a.grad, torch.float32, f"d{name}.A")
        assert_close(got_b.grad, b.grad, torch.float32, f"d{name}.B")
    # Each alone is its own term.
    for name in layer.adapter_names:
        layer.set_adapter(name)
        assert_close(layer(x), reference64(layer, x, [name]), torch.float32, f"y[{name}]")


def test_inactive_adapter_gets_no_gradient_and_dropout_applies_per_adapter():
    layer = FusedLoRALinear(16, 16, rank=4, dropout=0.5)
    layer.add_adapter("b", LoRAConfig(rank=2, dropout=0.0))
    randomize_b(layer)
    layer.set_adapter("b")
    layer(torch.randn(4, 16)).sum().backward()
    assert layer.lora_A.grad is None and layer.lora_params("b")[0].grad is not None
    layer.set_adapter(["b", "default"])  # default's dropout is its own (0.5): train and eval differ
    x = torch.randn(4, 16)
    torch.manual_seed(1)
    train = layer(x)
    layer.eval()
    assert not torch.allclose(train, layer(x))


# ---------------------------------------------------------------------------------------------------
# Merging, deleting, errors


@pytest.mark.parametrize("keep_original", [True, False])
def test_merging_two_active_adapters_equals_unmerged(keep_original):
    model = two_adapter_model()
    set_adapter(model, ["default", "b"])
    weights = {n: l.weight.detach().clone() for n, l in iter_lora_layers(model)}
    expected = model(ids())
    merge_lora(model, keep_original=keep_original)
    assert all(layer.merged for _, layer in iter_lora_layers(model))
    assert_close(model(ids()), expected, torch.float32, "merged logits")
    with pytest.raises(RuntimeError, match="merged"):
        set_adapter(model, "b")
    unmerge_lora(model)
    for name, layer in iter_lora_layers(model):
        assert_close(layer.weight, weights[name], torch.float32, name)
    assert_close(model(ids()), expected, torch.float32, "unmerged logits")


def test_delete_adapter_frees_its_parameters():
    model = two_adapter_model()
    set_adapter(model, ["default", "b"])
    b_params = [weakref.ref(p) for _, l in iter_lora_layers(model) if "b" in l.lora_configs for p in l.lora_params("b")]
    assert len(b_params) == 8
    n_params = sum(p.numel() for p in model.parameters())
    delete_adapter(model, "b")
    gc.collect()
    assert all(ref() is None for ref in b_params)
    assert adapter_names(model) == ["default"] and active_adapters(model) == ["default"]
    assert n_params - sum(p.numel() for p in model.parameters()) == 2 * (2 * (16 + 16) + 2 * (16 + 40))
    # up_proj only had "b": it is a plain nn.Linear again, sharing its weight.
    assert type(model.layers[0].up_proj) is nn.Linear
    assert not any("lora_adapters" in k for k in model.state_dict())
    delete_adapter(model, "default")
    assert adapter_names(model) == [] and not list(iter_lora_layers(model))


def test_deleting_the_active_adapter_activates_the_first_left():
    model = two_adapter_model()
    set_adapter(model, "default")
    delete_adapter(model, "default")
    assert active_adapters(model) == ["b"]


def test_errors_name_the_adapter(tmp_path):
    model = two_adapter_model()
    for call in (lambda: set_adapter(model, ["default", "nope"]), lambda: delete_adapter(model, "nope"),
                 lambda: save_lora(model, tmp_path / "x.safetensors", adapter_name="nope"),
                 lambda: lora_state_dict(model, "nope")):
        with pytest.raises(ValueError, match=r"no adapter named 'nope' in the model \(it has \['default', 'b'\]\)"):
            call()
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        add_adapter(model, "b", config=LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="adapter name .* got 'a.b'"):
        add_adapter(model, "a.b")
    with pytest.raises(ValueError, match="no adapter named 'x' in this layer"):
        model.layers[0].q_proj.set_adapter("x")
    # Rank mismatch on load: a rank-4 file into the rank-2 adapter "b".
    save_lora(model, tmp_path / "default.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers.0.q_proj: file has lora_A \(4, 16\).*for adapter 'b'"):
        load_lora(model, tmp_path / "default.safetensors", adapter_name="b", strict=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Several adapters and no "default": the name must be given.
    delete_adapter(model, "default")
    add_adapter(model, "c", config=LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"adapters \['b', 'c'\] and none named 'default'; pass adapter_name"):
        save_lora(model, tmp_path / "y.safetensors")


def test_default_adapter_is_backward_compatible():
    model = two_adapter_model()
    q = model.layers[0].q_proj
    assert isinstance(q.lora_A, nn.Parameter) and q.lora_A.shape == (4, 16) and q.scaling == 2.0
    keys = set(model.state_dict())
    assert {"layers.0.q_proj.lora_A", "layers.0.q_proj.lora_adapters.b.lora_A", "layers.0.up_proj.lora_adapters.b.lora_B"} <= keys
    assert "layers.0.o_proj.lora_adapters.b.lora_A" not in keys
    twin = two_adapter_model()
    randomize_b(twin, seed=9)
    twin.load_state_dict(model.state_dict())
    for names in (["default"], ["b"]):
        set_adapter(model, names), set_adapter(twin, names)
        assert torch.equal(model(ids()), twin(ids()))
    # A single-adapter model's state dict is what it always was.
    single = replace_linear_with_fused_lora(TinyLM(), rank=2)
    assert {k for k in single.state_dict() if "lora" in k} == {
        f"layers.{i}.{m}.lora_{h}" for i in range(2) for m in ("q_proj", "o_proj") for h in "AB"}


# ---------------------------------------------------------------------------------------------------
# Files per adapter


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_save_and_load_lora_by_adapter_name(tmp_path, suffix):
    model = two_adapter_model()
    save_lora(model, tmp_path / f"b.{suffix}", adapter_name="b")
    save_lora(model, tmp_path / f"d.{suffix}")
    meta = load_lora.__globals__["read_lora_file"](tmp_path / f"b.{suffix}")[1]
    assert json.loads(meta["targets"]) == ["layers.0.q_proj", "layers.0.up_proj", "layers.1.q_proj", "layers.1.up_proj"]
    torch.manual_seed(0)
    fresh = TinyLM().eval()
    load_lora(fresh, tmp_path / f"d.{suffix}")
    load_lora(fresh, tmp_path / f"b.{suffix}", adapter_name="qa")
    assert adapter_names(fresh) == ["default", "qa"] and active_adapters(fresh) == ["default"]
    assert fresh.layers[0].q_proj.lora_configs["qa"] == LoRAConfig(rank=2, alpha=3, use_rslora=True)
    for ours, theirs in ((["default"], ["default"]), (["b"], ["qa"]), (["default", "b"], ["default", "qa"])):
        set_adapter(model, ours), set_adapter(fresh, theirs)
        assert_close(fresh(ids()), model(ids()), torch.float32, str(ours))


def test_minimind_files_per_adapter(tmp_path):
    from minimind.lora_io import load_adapter, save_minimind_lora

    model = two_adapter_model()
    save_minimind_lora(model, tmp_path / "b.pth", adapter_name="b")
    torch.manual_seed(0)
    fresh = replace_linear_with_fused_lora(TinyLM(), rank=4, alpha=8).eval()
    load_adapter(fresh, tmp_path / "b.pth", adapter_name="tr")
    assert fresh.layers[0].up_proj.lora_configs["tr"].scaling == 1.0  # MiniMind's LoRA: scaling folded into B
    set_adapter(model, "b"), set_adapter(fresh, "tr")
    assert_close(fresh(ids()), model(ids()), torch.float16, "MiniMind-format adapter (fp16 file)")


def test_save_peft_adapter_layout(tmp_path):
    model = two_adapter_model()
    save_peft_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "b" / "adapter_config.json").is_file()
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 3, True)
    torch.manual_seed(0)
    fresh = TinyLM().eval()
    load_peft_adapter(fresh, tmp_path / "b", adapter_name="b")
    set_adapter(model, "b")
    assert_close(fresh(ids()), model(ids()), torch.float32, "adapter b via PEFT's format")


# ---------------------------------------------------------------------------------------------------
# PEFT parity on a tiny transformers Llama


@needs_peft
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_two_peft_adapters_match_peft_and_round_trip(tmp_path):
    import copy

    from peft import PeftModel

    base, peft, ours = two_peft_adapters(tmp_path, up_rank=3)
    assert ours.model.layers[0].mlp.up_proj.lora_configs["tr"].rank == 3
    assert ours.model.layers[0].self_attn.v_proj.adapter_names == ["default", "tr"]
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name in ("default", "tr"):
            peft.set_adapter(name)
            set_adapter(ours, name)
            assert_close(ours(x).logits, peft(x).logits, torch.float32, f"logits with {name}")
        peft.base_model.set_adapter(["default", "tr"])
        set_adapter(ours, ["default", "tr"])
        assert_close(ours(x).logits, peft(x).logits, torch.float32, "logits with both")

    save_peft_adapter(ours, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "tr"]
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    back.load_adapter(tmp_path / "ours" / "tr", adapter_name="tr")
    back.eval()
    with torch.no_grad():
        for name in ("default", "tr"):
            back.set_adapter(name)
            set_adapter(ours, name)
            assert_close(back(x).logits, ours(x).logits, torch.float32, f"PEFT reading our {name}")


def test_param_groups_cover_every_adapter():
    from lora_kernels import lora_param_groups

    model = two_adapter_model()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in lora_param_groups(model, lr=1e-3, loraplus_lr_ratio=4)}
    for _, layer in iter_lora_layers(model):
        for name in layer.adapter_names:
            a, b = layer.lora_params(name)
            assert id(a) in groups["lora_A"] and id(b) in groups["lora_B"]
    assert "other" not in groups


# ---------------------------------------------------------------------------------------------------
# add_adapter with DoRA


def test_add_adapter_with_dora_beside_a_plain_lora_adapter():
    """A DoRA adapter added to a LoRA model: on existing layers (q_proj) and on newly wrapped ones (up_proj),
    its magnitude starts at ‖W‖ per row (so it leaves the output unchanged), it computes PEFT's DoRA (the
    float64 reference) when active, and only its parameters get gradients then."""
    from lora_kernels.reference import dora_linear_reference

    torch.manual_seed(0)
    model = replace_linear_with_fused_lora(TinyLM(), rank=4, alpha=8).eval()  # "default" on q_proj, o_proj
    before = model(ids()).detach()
    add_adapter(model, "dora", target_modules=["q_proj", "up_proj"], config=LoRAConfig(rank=2, alpha=4, use_dora=True))
    q, up = model.layers[0].q_proj, model.layers[0].up_proj
    assert up.adapter_names == ["dora"] and q.adapter_names == ["default", "dora"]
    assert active_adapters(model) == ["default"] and up.active_adapters == []  # new: inactive
    for layer in (q, up):
        assert layer.lora_configs["dora"].use_dora and layer.lora_magnitude_of("dora").requires_grad
        assert_close(layer.lora_magnitude_of("dora").double(), layer.weight.double().norm(dim=1), torch.float32,
                     "a fresh magnitude is the row norm of W")
    assert_close(model(ids()), before, torch.float32, "the inactive DoRA adapter changes nothing")
    set_adapter(model, [])
    base = model(ids()).detach()
    set_adapter(model, "dora")
    assert_close(model(ids()), base, torch.float32, "a fresh DoRA adapter (B = 0, m = ‖W‖) leaves the base")

    randomize_b(model)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            if "dora" in layer.adapter_names:
                layer.lora_magnitude_of("dora").mul_(1.5)
    model.train()
    x = torch.randn(3, 16, requires_grad=True)
    y = q(x)
    a, b = q.lora_params("dora")
    expected = dora_linear_reference(x.double(), q.weight.double(), None, a.double(), b.double(),
                                     q.lora_magnitude_of("dora").double(), q.lora_configs["dora"].scaling)
    assert_close(y.double(), expected, torch.float32, "DoRA adapter 'dora' against the float64 reference")
    y.square().sum().backward()
    assert all(p.grad is not None for p in (a, b, q.lora_magnitude_of("dora")))
    assert q.lora_A.grad is None and q.lora_B.grad is None  # "default" is not active


def test_add_adapter_with_dora_to_a_model_without_adapters(tmp_path):
    torch.manual_seed(0)
    model = TinyLM().eval()
    add_adapter(model, "dora", target_modules="square", config=LoRAConfig(rank=2, use_dora=True))
    assert active_adapters(model) == ["dora"]  # the model's first adapter is active
    randomize_b(model)
    save_lora(model, tmp_path / "dora.safetensors")
    torch.manual_seed(0)
    fresh = load_lora(TinyLM().eval(), tmp_path / "dora.safetensors", adapter_name="dora")
    assert_close(fresh(ids()), model(ids()), torch.float32, "a DoRA adapter added by name, saved and loaded")
