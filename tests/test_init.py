"""PiSSA and OLoRA (lora_kernels/init.py and FusedLoRALinear's residual initialisations).

The initial output is the base's; A, B and the residual base are PEFT's own (its layer, on the same W); after
simulated training, the adapter saved by us (converted to a rank-2r LoRA) loads in PEFT onto the ORIGINAL
base with our logits, and matches what PEFT's own conversion writes.
"""
import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from helpers import assert_close, needs_peft, tiny_transformers
from lora_kernels import (
    FusedLoRALinear,
    LoRAConfig,
    delete_adapter,
    load_lora,
    load_peft_adapter,
    lora_state_dict,
    replace_linear_with_fused_lora,
    save_lora,
    save_peft_adapter,
)
from lora_kernels.init import converted_config

INITS = ["pissa", "olora", "pissa_niter_2"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def linear(in_features, out_features, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def peft_layer(base: nn.Linear, init, rank, alpha, use_rslora=False):
    """PEFT's own lora.Linear with init_lora_weights=init around ``base`` (which it rewrites in place)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora, init_lora_weights=init)
    return Linear(base, "default", config=config, r=rank, lora_alpha=alpha)


# ------------------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rank", [1, 2, 5, 16])
@pytest.mark.parametrize("shape,bias", [((37, 23), True), ((19, 45), False), ((16, 16), True)])
def test_initial_output_is_the_base(init, rank, shape, bias):
    base = linear(*shape, bias=bias)
    original = copy.deepcopy(base)
    x = torch.randn(7, shape[0])
    layer = FusedLoRALinear.from_linear(base, rank=rank, alpha=2 * rank + 1, init=init, backend="torch")
    assert_close(layer(x), original(x), torch.float32, f"{init} rank {rank}")
    # As in PEFT, the shared nn.Linear now holds the residual, and A, B hold the principal directions.
    assert base.weight is layer.weight and not torch.equal(base.weight, original.weight)
    merged = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    assert_close(merged, original.weight, torch.float32, "W_res + s·B·A")
    assert layer.lora_B.abs().sum() > 0 and layer.lora_A.abs().sum() > 0


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_constructor_and_dora(init, use_dora):
    torch.manual_seed(3)
    layer = FusedLoRALinear(29, 21, rank=6, alpha=4, init=init, use_dora=use_dora, backend="torch")
    # The constructor initialises W first: the adapter reads the real weight, not the empty tensor.
    original = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    x = torch.randn(5, 29)
    assert_close(layer(x), nn.functional.linear(x, original, layer.bias), torch.float32, "output")
    if use_dora:  # m = ‖W_res + s·B·A‖ = ‖W‖, taken after the residual is in place
        assert_close(layer.lora_magnitude, original.norm(dim=1), torch.float32, "magnitude")


def test_dora_magnitude_is_the_residual_plus_adapter_norm_from_linear():
    base = linear(33, 18)
    original = copy.deepcopy(base)
    layer = FusedLoRALinear.from_linear(base, rank=4, init="pissa", use_dora=True, backend="torch")
    assert_close(layer.lora_magnitude, original.weight.norm(dim=1), torch.float32, "magnitude")
    x = torch.randn(6, 33)
    assert_close(layer(x), original(x), torch.float32, "DoRA output")


@needs_peft
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rank,alpha,use_rslora", [(1, 1, False), (4, 8, False), (7, 5, True), (16, 32, False)])
def test_factors_and_residual_are_peft_s(monkeypatch, init, rank, alpha, use_rslora):
    import peft.tuners.lora.layer as peft_lora_layer

    svd_lowrank = torch.svd_lowrank

    def seeded_svd_lowrank(*args, **kwargs):  # pissa_niter_<n>: the same random test matrix in both
        torch.manual_seed(11)
        return svd_lowrank(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded_svd_lowrank)
    monkeypatch.setattr(peft_lora_layer, "svd_lowrank", seeded_svd_lowrank)
    base = linear(41, 27, seed=5)
    peft_base = copy.deepcopy(base)
    ours = FusedLoRALinear.from_linear(base, rank=rank, alpha=alpha, use_rslora=use_rslora, init=init,
                                       backend="torch")
    peft = peft_layer(peft_base, init, rank, alpha, use_rslora)
    assert_close(ours.lora_A, peft.lora_A["default"].weight, torch.float32, "lora_A")
    assert_close(ours.lora_B, peft.lora_B["default"].weight, torch.float32, "lora_B")
    assert_close(ours.weight, peft.base_layer.weight, torch.float32, "residual base weight")
    x = torch.randn(4, 41)
    assert_close(ours(x), peft(x), torch.float32, "output")


def test_low_precision_residual_uses_the_stored_factors():
    # bf16 A, B: the residual is taken with the rounded factors, so only the residual's own rounding remains.
    base = linear(40, 24, seed=2, dtype=torch.bfloat16)
    original = base.weight.detach().float().clone()
    layer = FusedLoRALinear.from_linear(base, rank=8, init="pissa", backend="torch")
    assert layer.lora_A.dtype == torch.bfloat16
    merged = layer.weight.float() + layer.scaling * layer.lora_B.float() @ layer.lora_A.float()
    assert_close(merged, original, torch.bfloat16, "W_res + s·B·A")


def test_reset_and_delete_put_the_base_back():
    base = linear(30, 20, seed=4)
    original = base.weight.detach().clone()
    layer = FusedLoRALinear.from_linear(base, rank=5, init="pissa", backend="torch")
    first_A = layer.lora_A.detach().clone()
    layer.reset_lora_parameters()  # decomposes W again, not the residual
    assert_close(layer.lora_A, first_A, torch.float32, "lora_A after a second reset")
    assert_close(layer.weight + layer.scaling * layer.lora_B @ layer.lora_A, original, torch.float32, "W")
    layer.add_adapter("other", LoRAConfig(rank=3, init="olora"))
    layer.delete_adapter("other")
    layer.delete_adapter("default")
    assert_close(base.weight, original, torch.float32, "W after delete_adapter")


def test_initial_factors_are_buffers_outside_the_state_dict():
    layer = FusedLoRALinear.from_linear(linear(24, 18), rank=3, init="olora", backend="torch")
    layer.add_adapter("other", LoRAConfig(rank=2, init="pissa"))
    assert layer.lora_initial_of("default")[0].shape == (3, 24)
    assert layer.lora_initial_of("other")[1].shape == (18, 2)
    assert not any("initial" in key for key in layer.state_dict())
    moved = copy.deepcopy(layer).double()
    assert moved.lora_initial_of("other")[0].dtype == torch.float64
    plain = FusedLoRALinear.from_linear(linear(24, 18), rank=3, backend="torch")
    assert plain.lora_initial_of() is None


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_1"])
def test_config_accepts_the_inits(init):
    assert LoRAConfig(init=init).init == init


@pytest.mark.parametrize("init", ["PiSSA", "pissa_niter_", "pissa_niter_x", "olora2", "loftq"])
def test_config_refuses_other_inits(init):
    with pytest.raises(ValueError, match="init must be one of"):
        LoRAConfig(init=init)


def test_rank_above_the_smaller_side_is_refused():
    with pytest.raises(ValueError, match=r"rank must be <= min\(in_features, out_features\) = 6"):
        FusedLoRALinear.from_linear(linear(20, 6), rank=7, init="pissa")


# ------------------------------------------------------------------------------------- quantized base


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_base_is_refused_with_what_to_do(fmt):
    layer = FusedLoRALinear.from_linear(linear(64, 32), rank=4, backend="torch", quantize=fmt)
    with pytest.raises(ValueError, match=rf"quantized \('{fmt}'\).*from_linear\(linear, init='pissa', quantize"):
        layer.add_adapter("p", LoRAConfig(rank=4, init="pissa"))
    assert list(layer.lora_configs) == ["default"]  # nothing was added


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_qpissa_decomposes_the_dense_weight_and_quantizes_the_residual(init):
    base = linear(64, 32, seed=7)
    original = copy.deepcopy(base)
    dense = FusedLoRALinear.from_linear(copy.deepcopy(base), rank=4, init=init, backend="torch")
    layer = FusedLoRALinear.from_linear(base, rank=4, init=init, backend="torch", quantize="nf4", use_dora=True)
    assert torch.equal(base.weight, original.weight)  # a quantized layer never writes into the linear
    assert torch.equal(layer.lora_A, dense.lora_A) and torch.equal(layer.lora_B, dense.lora_B)
    residual = layer.qweight.dequantize(torch.float32)
    # The residual (small after PiSSA's principal part is removed) loses less to NF4 than W itself would.
    assert (residual - dense.weight).abs().max() < 0.5 * dense.weight.abs().max()
    norm = (residual + layer.scaling * layer.lora_B @ layer.lora_A).norm(dim=1)
    assert_close(layer.lora_magnitude, norm, torch.float32, "magnitude of the quantized residual")


# ------------------------------------------------------------------------------------- saving


def llama_with(init, **kwargs):
    model = tiny_transformers("llama").eval()
    replace_linear_with_fused_lora(model, target_modules=LLAMA_TARGETS, init=init, backend="torch", **kwargs)
    return model


def train_a_little(model, seed=1):
    """A perturbation of every A and B, as training would make."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.add_(torch.randn_like(p) * 0.05 * p.abs().max())


IDS = torch.arange(20).view(2, 10) % 64


@pytest.mark.parametrize("init", INITS)
def test_initial_llama_logits_are_the_base_s(init):
    expected = tiny_transformers("llama").eval()(IDS).logits
    model = llama_with(init, rank=4, alpha=8)
    assert_close(model(IDS).logits, expected, torch.float32, "logits")


@needs_peft
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("settings", [dict(rank=4, alpha=8),
                                      dict(rank=4, alpha=6, use_rslora=True, rank_pattern={"down_proj": 2},
                                           alpha_pattern={"k_proj": 3})])
def test_converted_adapter_loads_in_peft_onto_the_original_base(tmp_path, init, settings):
    from peft import PeftModel

    model = llama_with(init, **settings)
    train_a_little(model)
    save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 2 * settings["rank"]
    loaded = PeftModel.from_pretrained(tiny_transformers("llama").eval(), tmp_path).eval()
    assert_close(loaded(IDS).logits, model(IDS).logits, torch.float32, "logits")

    # Our own format, onto the original base too.
    save_lora(model, tmp_path / "ours.safetensors")
    ours = load_lora(tiny_transformers("llama").eval(), tmp_path / "ours.safetensors", backend="torch")
    assert_close(ours(IDS).logits, model(IDS).logits, torch.float32, "logits (save_lora)")


@needs_peft
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_as_is_adapter_loads_in_peft_by_decomposing_again(tmp_path, init):
    from peft import PeftModel

    model = llama_with(init, rank=4, alpha=8)
    train_a_little(model)
    save_peft_adapter(model, tmp_path, convert_to_lora=False)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["init_lora_weights"], config["r"]) == (init, 4)
    loaded = PeftModel.from_pretrained(tiny_transformers("llama").eval(), tmp_path).eval()
    assert_close(loaded(IDS).logits, model(IDS).logits, torch.float32, "logits")
    save_lora(model, tmp_path / "as_is.safetensors", convert_to_lora=False)
    assert load_file(str(tmp_path / "as_is.safetensors"))["model.layers.0.self_attn.q_proj.lora_A"].shape[0] == 4
    # and in ours, as PEFT loads it: the original base decomposed again, then the file's A and B
    ours = load_peft_adapter(tiny_transformers("llama").eval(), tmp_path, backend="torch")
    assert_close(ours(IDS).logits, model(IDS).logits, torch.float32, "logits (load_peft_adapter)")
    layer = ours.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_configs["default"].init == init and layer.lora_initial_of() is not None


@needs_peft
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_s_as_is_adapter_loads_without_peft(tmp_path, init):
    """PEFT's own save_pretrained of a PiSSA / OLoRA model (init_lora_weights kept): our loader decomposes the
    original base as PeftModel.from_pretrained does, before anything else changes; a randomized init is refused."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_transformers("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                                       init_lora_weights=init))
    torch.manual_seed(1)
    with torch.no_grad():  # training, a little: PEFT's own A and B moved
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05 * p.abs().max())
    peft_model.save_pretrained(tmp_path)
    expected = PeftModel.from_pretrained(tiny_transformers("llama").eval(), tmp_path).eval()(IDS).logits
    assert (expected - tiny_transformers("llama").eval()(IDS).logits).abs().max() > 1e-3  # the adapter matters
    ours = load_peft_adapter(tiny_transformers("llama").eval(), tmp_path, backend="torch")
    assert_close(ours(IDS).logits, expected, torch.float32, "logits")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, init_lora_weights="pissa_niter_4")))
    base = tiny_transformers("llama").eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="pissa_niter_4.*randomized"):
        load_peft_adapter(base, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


@needs_peft
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_is_peft_s(tmp_path, init):
    """PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) on the same trained A, B writes
    the same tensors and the same r / lora_alpha as ours."""
    from peft import LoraConfig, get_peft_model

    model = llama_with(init, rank=4, alpha=6)
    train_a_little(model)
    peft = get_peft_model(tiny_transformers("llama").eval(),
                          LoraConfig(r=4, lora_alpha=6, target_modules=LLAMA_TARGETS, init_lora_weights=init))
    peft.save_pretrained(tmp_path / "initial")
    trained = lora_state_dict(model)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                path = name.replace("base_model.model.", "").replace(".default.weight", "")
                p.copy_(trained[path])
    peft.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    save_peft_adapter(model, tmp_path / "ours")

    theirs, ours = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "ours"))
    assert sorted(theirs) == sorted(ours)
    for key in theirs:
        assert_close(ours[key], theirs[key], torch.float32, key)
    their_config, our_config = (json.loads((tmp_path / d / "adapter_config.json").read_text())
                                for d in ("peft", "ours"))
    for field in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert our_config[field] == their_config[field], field


def test_converted_config_keeps_the_scaling():
    for config in (LoRAConfig(rank=4, alpha=6, init="pissa"), LoRAConfig(rank=3, alpha=5, use_rslora=True,
                                                                          init="olora")):
        converted = converted_config(config)
        assert converted.rank == 2 * config.rank and converted.init == "kaiming"
        assert converted.scaling == pytest.approx(config.scaling, rel=1e-12)


def test_conversion_without_the_initial_factors_is_refused(tmp_path):
    model = llama_with("pissa", rank=2)
    layer = model.model.layers[0].self_attn.q_proj
    layer.lora_initial_A, layer.lora_initial_B = None, None  # what a layer rebuilt from a state dict lacks
    with pytest.raises(ValueError, match=r"q_proj: adapter 'default' has init='pissa'.*convert_to_lora=False"):
        save_lora(model, tmp_path / "a.safetensors")
    save_lora(model, tmp_path / "a.safetensors", convert_to_lora=False)


def test_model_level_delete_gives_back_the_original_model():
    expected = tiny_transformers("llama").eval()(IDS).logits
    model = llama_with("olora", rank=3)
    train_a_little(model)
    delete_adapter(model, "default")
    assert_close(model(IDS).logits, expected, torch.float32, "logits after delete_adapter")


def test_model_level_refusals_change_nothing():
    model = tiny_transformers("llama").eval()
    before = copy.deepcopy(model.state_dict())
    # k_proj / v_proj are 32 -> 16: rank 20 fits q_proj (32 -> 32) only.
    with pytest.raises(ValueError, match=r"k_proj: init='olora' .* = 16 .*got rank 20"):
        replace_linear_with_fused_lora(model, target_modules=["q_proj", "k_proj"], rank=20, init="olora")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    replace_linear_with_fused_lora(model, target_modules=["q_proj"], rank=2, quantize="nf4")
    from lora_kernels import add_adapter

    with pytest.raises(ValueError, match=r"q_proj: init='pissa' writes the residual .* quantized \('nf4'\)"):
        add_adapter(model, "p", target_modules=["q_proj", "o_proj"], config=LoRAConfig(rank=2, init="pissa"))
    assert model.model.layers[0].self_attn.q_proj.adapter_names == ["default"]
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)


def test_replace_refused_for_a_custom_forward_gives_the_weights_back():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(12, 12), Custom(12, 12))
    before = [m.weight.detach().clone() for m in model]
    with pytest.raises(TypeError, match="own forward"):
        replace_linear_with_fused_lora(model, target_modules="all-linear", rank=3, init="pissa")
    for module, weight in zip(model, before):
        assert type(module) in (nn.Linear, Custom)
        assert_close(module.weight, weight, torch.float32, "weight")


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_converted_layer_on_the_original_base_is_the_trained_layer(init, use_dora):
    """The conversion's maths at one layer: rank 2r on W gives W_res + s·B·A (a DoRA magnitude carries over,
    since ‖W + s'·B'·A'‖ = ‖W_res + s·B·A‖)."""
    from lora_kernels.init import converted_adapters

    base = linear(26, 19, seed=9)
    original = copy.deepcopy(base)
    layer = FusedLoRALinear.from_linear(base, rank=3, alpha=5, use_rslora=True, init=init, use_dora=use_dora,
                                        backend="torch")
    torch.manual_seed(2)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B) + ((layer.lora_magnitude,) if use_dora else ()):
            p.add_(torch.randn_like(p) * 0.1 * p.abs().max())
    config, lora_A, lora_B = converted_adapters({"layer": layer}, "default")["layer"]
    plain = FusedLoRALinear.from_linear(original, config=config, backend="torch")
    with torch.no_grad():
        plain.lora_A.copy_(lora_A)
        plain.lora_B.copy_(lora_B)
        if use_dora:
            plain.lora_magnitude.copy_(layer.lora_magnitude)
    x = torch.randn(8, 26)
    assert (plain.rank, plain.use_rslora) == (6, True) and plain.scaling == pytest.approx(layer.scaling)
    assert_close(plain.eval()(x), layer.eval()(x), torch.float32, "output")
