"""PEFT's adapter format both ways, fuse_peft_model, and the PEFT features we refuse.

Round trips go through PEFT itself (``PeftModel.from_pretrained`` / ``save_pretrained``) when it is
installed; reading and writing files must also work without it.
"""
import copy
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from helpers import (
    V,
    adapted_model,
    assert_close,
    assert_load_refused,
    base_model,
    load_file_into_base,
    load_peft,
    nan_at,
    peft_dir,
    set_config,
    truncated,
)
from lora_kernels import (
    FusedLoRALinear,
    fuse_peft_model,
    load_peft_adapter,
    lora_state_dict,
    replace_linear_with_fused_lora,
    save_peft_adapter,
)

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
IDS = torch.arange(12).view(2, 6) % V


def ours_with_mixed_layers():
    """Two ranks, two alphas, one rsLoRA layer: what rank_pattern / alpha_pattern must carry."""
    model = base_model()
    torch.manual_seed(1)
    replace_linear_with_fused_lora(model, rank=4, alpha=8, target_modules=["q_proj", "o_proj", "layers.0.up_proj"])
    replace_linear_with_fused_lora(model, rank=2, alpha=3, target_modules=["layers.1.up_proj"])
    replace_linear_with_fused_lora(model, rank=4, alpha=6, use_rslora=True, target_modules=["k_proj"])
    for p in lora_state_dict(model).values():
        p.normal_(0, 0.3)
    return model.eval()


def peft_model(config_kwargs, seed=2):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base_model(), LoraConfig(**config_kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return model


def loss_of(model):
    return model(IDS).logsumexp(-1).mean()


def lora_grads_by_path(model):
    """{module path: (dA, dB)} for ours and for PEFT (whose path has lora_A.default.weight)."""
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        path = name.replace("base_model.model.", "").replace(".default.weight", "")
        grads[path] = p.grad
    return grads


def test_import_needs_neither_peft_nor_transformers():
    code = "import sys, lora_kernels; print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_files_round_trip_without_peft(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails
    model = ours_with_mixed_layers()
    save_peft_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 8, False)
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "up_proj"]
    assert config["rank_pattern"] == {"layers.1.up_proj": 2}
    # rsLoRA layers get the alpha that gives their scaling under the file's use_rslora=False: 6/√4 = 12/4.
    assert config["alpha_pattern"] == {"layers.0.k_proj": 12, "layers.1.k_proj": 12, "layers.1.up_proj": 3}
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.layers.0.q_proj.lora_A.weight" in keys and len(keys) == 2 * 8

    fresh = load_peft_adapter(base_model(), tmp_path)
    assert_close(fresh(IDS), model(IDS), torch.float32, "logits")
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_pickled_bin_is_read_with_weights_only(tmp_path, monkeypatch):
    model = ours_with_mixed_layers()
    save_peft_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    fresh = load_peft_adapter(base_model(), tmp_path)
    assert calls and calls[0].get("weights_only") is True
    assert_close(fresh(IDS), model(IDS), torch.float32, "logits")


def test_dora_files_round_trip_without_peft(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    model = adapted_model(use_dora=True)  # B drawn after m = ‖W‖ was set: g = m / ‖W + s·B·A‖ is not 1
    save_peft_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.layers.0.q_proj.lora_magnitude_vector" in keys and len(keys) == 3 * 10

    fresh = load_peft_adapter(base_model(), tmp_path)
    layer, original = fresh.layers[1].k_proj, model.layers[1].k_proj
    assert layer.lora_configs["default"].use_dora and torch.equal(layer.lora_magnitude, original.lora_magnitude)
    assert_close(fresh(IDS), model(IDS), torch.float32, "logits")


def test_adapter_mixing_dora_and_lora_layers_is_not_saved(tmp_path):
    model = base_model()
    replace_linear_with_fused_lora(model, rank=2, alpha=4, use_dora=True, target_modules=["q_proj"])
    replace_linear_with_fused_lora(model, rank=2, alpha=4, target_modules=["k_proj"])
    with pytest.raises(ValueError, match=r"DoRA on 2 layers \(\['layers.0.q_proj'.*plain LoRA on 2 "
                                         r"\(\['layers.0.k_proj'.*one use_dora for all its layers"):
        save_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@needs_peft
def test_ours_to_peft(tmp_path):
    from peft import PeftModel

    model = ours_with_mixed_layers()
    save_peft_adapter(model, tmp_path)
    loaded = PeftModel.from_pretrained(base_model(), tmp_path).eval()
    assert_close(loaded(IDS), model(IDS), torch.float32, "logits")


@needs_peft
@pytest.mark.parametrize("safe_serialization,use_rslora", [(True, False), (False, True)])
def test_peft_to_ours_outputs_and_gradients(tmp_path, safe_serialization, use_rslora):
    peft = peft_model(dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=use_rslora,
                           rank_pattern={"layers.0.k_proj": 2}, alpha_pattern={"down_proj": 5}))
    peft.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    ours = load_peft_adapter(base_model(), tmp_path)
    layer = ours.layers[0].k_proj
    assert isinstance(layer, FusedLoRALinear) and (layer.rank, layer.alpha, layer.use_rslora) == (2, 8.0, use_rslora)
    assert ours.layers[1].down_proj.alpha == 5.0

    peft.eval()
    assert_close(ours(IDS), peft(IDS), torch.float32, "logits")
    loss_of(ours).backward()
    loss_of(peft).backward()
    expected, got = lora_grads_by_path(peft), lora_grads_by_path(ours)
    assert sorted(got) == sorted(expected) and len(got) == 12  # only LoRA weights are trainable, as in PEFT
    for name in expected:
        assert_close(got[name], expected[name], torch.float32, name)


@needs_peft
def test_continue_training_then_back_to_peft(tmp_path):
    from peft import PeftModel

    targets = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]
    peft_model(dict(r=4, lora_alpha=16, target_modules=targets)).save_pretrained(tmp_path / "start")
    ours = load_peft_adapter(base_model(), tmp_path / "start").train()
    before = {k: v.clone() for k, v in lora_state_dict(ours).items()}
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_of(ours).backward()
        opt.step()
    assert all(not torch.equal(before[k], v) for k, v in lora_state_dict(ours).items())

    save_peft_adapter(ours, tmp_path / "trained")
    loaded = PeftModel.from_pretrained(base_model(), tmp_path / "trained").eval()
    assert_close(loaded(IDS), ours.eval()(IDS), torch.float32, "logits")


@needs_peft
def test_fuse_peft_model_trains_like_peft(tmp_path):
    from peft import PeftModel

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "down_proj"], lora_dropout=0.0)
    reference, fused = peft_model(config), peft_model(config)
    params = [p for p in fused.parameters() if p.requires_grad]
    opt_fused = torch.optim.AdamW(params, lr=1e-2)  # made before fusing: it must keep working
    opt_ref = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    peft_A = fused.base_model.model.layers[0].q_proj.lora_A["default"].weight

    assert fuse_peft_model(fused) is fused
    layer = fused.base_model.model.layers[0].q_proj
    assert isinstance(layer, FusedLoRALinear) and layer.lora_A is peft_A  # parameters are shared, not copied
    assert [p for p in fused.parameters() if p.requires_grad] == params
    for step in range(3):
        losses = []
        for model, opt in ((reference, opt_ref), (fused, opt_fused)):
            opt.zero_grad()
            loss = loss_of(model)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_close(losses[1], losses[0], torch.float32, f"loss at step {step}")

    save_peft_adapter(fused, tmp_path)
    loaded = PeftModel.from_pretrained(base_model(), tmp_path).eval()
    assert_close(loaded(IDS), fused.eval()(IDS), torch.float32, "logits")


class Nested(nn.Module):
    """`q` at the top and `inner.q` below: a plain path "q" in rank_pattern would also match "inner.q"."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.inner = nn.Module()
        self.inner.q = nn.Linear(8, 8)

    def forward(self, x):
        return self.inner.q(self.k(self.q(x)))


@needs_peft
def test_pattern_keys_match_one_layer_only(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = Nested()
    ours = replace_linear_with_fused_lora(copy.deepcopy(base), rank=2, alpha=2, target_modules="q")  # regex: "q" only
    replace_linear_with_fused_lora(ours, rank=3, alpha=6, target_modules=["inner.q", "k"])
    for p in lora_state_dict(ours).values():
        p.normal_()
    save_peft_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["rank_pattern"] == {"^q": 2}
    x = torch.randn(5, 8)
    assert_close(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)(x), ours(x), torch.float32, "output")
    assert_close(load_peft_adapter(copy.deepcopy(base), tmp_path)(x), ours(x), torch.float32, "output")


# ---------------------------------------------------------------------------------------------------
# Refusals


def write_adapter(directory, config_changes=(), tensors=None):
    """A valid one-layer adapter directory, with `config_changes` applied to its config."""
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}
    config.update(dict(config_changes))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    if tensors is None:
        tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(2, 16),
                   "base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(16, 2)}
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@pytest.mark.parametrize("changes,words", [
    ({"peft_type": "IA3"}, "only LoRA adapters"),
    ({"alora_invocation_tokens": [1, 2]}, "aLoRA"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out.*Conv1D"),
    ({"init_lora_weights": "pissa_niter_16"}, "init_lora_weights='pissa_niter_16'.*rewrites the base weights"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'.*rewrites the base weights"),
    ({"bias": "lora_only"}, "trained base biases"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_unsupported_config_is_named(tmp_path, changes, words):
    model = base_model()
    with pytest.raises(ValueError, match=words):
        load_peft_adapter(model, write_adapter(tmp_path, changes))
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())


@pytest.mark.parametrize("module,key_a,shape_a,words", [
    ("embed", "lora_embedding_A", (2, V), "embedding"),
    ("conv", "lora_A.weight", (2, 16, 1), "convolution"),
])
def test_embedding_and_conv_lora_are_refused(tmp_path, module, key_a, shape_a, words):
    model = base_model()
    model.conv = nn.Conv1d(16, 16, 1)
    tensors = {f"base_model.model.{module}.{key_a}": torch.zeros(shape_a)}
    with pytest.raises(ValueError, match=words):
        load_peft_adapter(model, write_adapter(tmp_path, tensors=tensors))


def test_adapter_that_does_not_fit_changes_nothing(tmp_path):
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(2, 16),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(16, 2),
               "base_model.model.layers.0.nope.lora_A.weight": torch.zeros(2, 16),
               "base_model.model.layers.0.nope.lora_B.weight": torch.zeros(16, 2)}
    model = base_model()
    with pytest.raises(ValueError, match="layers.0.nope: no such module"):
        load_peft_adapter(model, write_adapter(tmp_path, tensors=tensors))
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())
    with pytest.raises(ValueError, match="rank 2, the config says 4"):
        load_peft_adapter(model, write_adapter(tmp_path / "b", {"r": 4}))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(model, tmp_path / "missing")


@needs_peft
def test_peft_variant_and_embedding_adapters_are_refused(tmp_path):
    alora = peft_model(dict(r=2, target_modules=["q_proj"], alora_invocation_tokens=[1, 2]))
    alora.save_pretrained(tmp_path / "alora")
    with pytest.raises(ValueError, match="aLoRA"):
        load_peft_adapter(base_model(), tmp_path / "alora")
    with pytest.raises(ValueError, match="layers.0.q_proj: a LoRA variant other than DoRA .ALoraLinearVariant"):
        fuse_peft_model(alora)

    embedding = peft_model(dict(r=2, target_modules=["embed", "q_proj"]))
    embedding.save_pretrained(tmp_path / "embedding")
    with pytest.raises(ValueError, match="embed.*embedding"):
        load_peft_adapter(base_model(), tmp_path / "embedding")
    with pytest.raises(ValueError, match="embed: a PEFT Embedding layer"):
        fuse_peft_model(embedding)
    assert not any(isinstance(m, FusedLoRALinear) for m in embedding.modules())  # nothing changed


@needs_peft
def test_fused_peft_model_with_modules_to_save_is_not_saved_half(tmp_path):
    model = fuse_peft_model(peft_model(dict(r=2, target_modules=["q_proj"], modules_to_save=["layers.0.norm"])))
    with pytest.raises(ValueError, match="modules_to_save"):
        save_peft_adapter(model, tmp_path)


def test_peft_config_becomes_one_lora_config():
    from lora_kernels import LoRAConfig
    from lora_kernels.peft_format import peft_lora_config

    config = peft_lora_config({"r": 8, "lora_alpha": 16.0, "lora_dropout": None, "use_rslora": True,
                               "rank_pattern": {"up_proj": 4}, "alpha_pattern": {}})
    assert config == LoRAConfig(rank=8, alpha=16.0, use_rslora=True, rank_pattern={"up_proj": 4})
    assert config.for_module("layers.0.up_proj").scaling == 16.0 / 2.0  # rsLoRA: alpha / √4


# ---------------------------------------------------------------------------------------------------
# Bad adapter directories: (case id, build(tmp_path) -> (model, load), exception, words)

PEFT_A = "base_model.model.layers.1.up_proj.lora_A.weight"


def magnitudes(extra=0, skip=None):
    """A tensors edit: a DoRA magnitude (ones, out_features + ``extra``) beside every lora_B but ``skip``'s."""
    def edit(data):
        for key in [k for k in data if k.endswith(".lora_B.weight")]:
            module = key[:-len(".lora_B.weight")]
            if module != skip:
                data[f"{module}.lora_magnitude_vector"] = torch.ones(data[key].shape[0] + extra)
    return edit


def peft_dora_dir(tensors=magnitudes()):
    """A directory builder: the PEFT adapter of adapted_model() with use_dora: true, its tensors edited."""
    return lambda t: peft_dir(t, config=set_config(use_dora=True), tensors=tensors)


LOADER_CASES = [
    ("PEFT config missing", load_peft(lambda t: t), FileNotFoundError, ["adapter_config.json"]),
    ("PEFT config not JSON", load_peft(lambda t: peft_dir(t, config=lambda c: "{r: 4")), ValueError,
     ["adapter_config.json", "not valid JSON"]),
    ("PEFT config a list", load_peft(lambda t: peft_dir(t, config=lambda c: [c])), ValueError,
     ["adapter_config.json", "list"]),
    ('PEFT r "16"', load_peft(lambda t: peft_dir(t, config=set_config(r="4"))), ValueError,
     ["adapter_config.json", "r must be an integer >= 1", "'4'"]),
    ("PEFT r 0", load_peft(lambda t: peft_dir(t, config=set_config(r=0))), ValueError, ["r must be", "got 0"]),
    ("PEFT lora_alpha NaN", load_peft(lambda t: peft_dir(t, config=set_config(lora_alpha=float("nan")))), ValueError,
     ["lora_alpha", "nan"]),
    ("PEFT lora_alpha 0", load_peft(lambda t: peft_dir(t, config=set_config(lora_alpha=0))), ValueError,
     ["lora_alpha", "got 0"]),
    ("PEFT lora_alpha null", load_peft(lambda t: peft_dir(t, config=set_config(lora_alpha=None))), ValueError,
     ["lora_alpha", "None"]),
    ('PEFT use_rslora "false"', load_peft(lambda t: peft_dir(t, config=set_config(use_rslora="false"))), ValueError,
     ["use_rslora", "'false'"]),
    ("PEFT lora_dropout 5", load_peft(lambda t: peft_dir(t, config=set_config(lora_dropout=5))), ValueError,
     ["lora_dropout", "5"]),
    ("PEFT bad alpha_pattern entry on one layer", load_peft(lambda t: peft_dir(
        t, config=set_config(alpha_pattern={"layers.1.q_proj": "x"}))), ValueError,
     ["alpha_pattern['layers.1.q_proj']", "'x'"]),
    ("PEFT negative rank_pattern entry", load_peft(lambda t: peft_dir(
        t, config=set_config(rank_pattern={"up_proj": -4}))), ValueError, ["rank_pattern['up_proj']", "-4"]),
    ("PEFT rank_pattern a list", load_peft(lambda t: peft_dir(t, config=set_config(rank_pattern=["q_proj"]))),
     ValueError, ["rank_pattern must be an object"]),
    ("PEFT hostile rank_pattern key", load_peft(lambda t: peft_dir(
        t, config=set_config(rank_pattern={"(.*.*.*)*X": 4}))), ValueError, ["rank_pattern", "(.*.*.*)*X"]),
    ("PEFT invalid regex key", load_peft(lambda t: peft_dir(t, config=set_config(alpha_pattern={"q_(proj": 2}))),
     ValueError, ["q_(proj", "regular expression"]),
    ("PEFT other peft_type", load_peft(lambda t: peft_dir(t, config=set_config(peft_type="IA3"))), ValueError,
     ["peft_type", "IA3"]),
    ("PEFT DoRA without magnitudes", load_peft(peft_dora_dir(tensors=None)), ValueError,
     ["layers.0.q_proj: no lora_magnitude_vector, but the config has use_dora: true"]),
    ("PEFT DoRA layer without its magnitude",
     load_peft(peft_dora_dir(magnitudes(skip="base_model.model.layers.1.up_proj"))), ValueError,
     ["layers.1.up_proj: no lora_magnitude_vector"]),
    ("PEFT magnitude without use_dora", load_peft(lambda t: peft_dir(t, tensors=magnitudes())), ValueError,
     ["layers.0.q_proj: a DoRA magnitude (lora_magnitude_vector), but the config has use_dora: false"]),
    ("PEFT magnitude of the wrong shape", load_peft(peft_dora_dir(magnitudes(extra=1))), ValueError,
     ["layers.0.k_proj: lora_magnitude_vector has shape (9,), the layer needs (8,)"]),
    ("PEFT magnitude without A and B", load_peft(peft_dora_dir(lambda data: data.update(
        {"base_model.model.layers.0.norm.lora_magnitude_vector": torch.ones(16)}) or magnitudes()(data))), ValueError,
     ["layers.0.norm: lora_magnitude_vector without lora_A / lora_B"]),
    ('PEFT use_dora "yes"', load_peft(lambda t: peft_dir(t, config=set_config(use_dora="yes"))), ValueError,
     ["use_dora must be true or false", "'yes'"]),
    ("PEFT DoRA into a plain LoRA adapter", load_file_into_base(peft_dora_dir(), loader=load_peft_adapter,
                                                                model=lambda: adapted_model(seed=5)), ValueError,
     ["adapter 'default' is plain LoRA in the model and DoRA in the file"]),
    ("PEFT weights missing", load_peft(lambda t: (peft_dir(t) / "adapter_model.safetensors").unlink()
                                       or t / "peft"), FileNotFoundError, ["adapter_model.safetensors"]),
    ("PEFT truncated weights", load_peft(lambda t: truncated(peft_dir(t) / "adapter_model.safetensors").parent),
     ValueError, ["adapter_model.safetensors"]),
    ("PEFT NaN weight", load_peft(lambda t: peft_dir(t, tensors=nan_at(PEFT_A))), ValueError, [PEFT_A, "non-finite"]),
    ("PEFT rank contradicting r", load_peft(lambda t: peft_dir(t, config=set_config(r=2))), ValueError,
     ["rank 4", "the config says 2"]),
]


@pytest.mark.parametrize("build,exception,words", [c[1:] for c in LOADER_CASES], ids=[c[0] for c in LOADER_CASES])
def test_loader_refuses_and_changes_nothing(tmp_path, build, exception, words):
    assert_load_refused(tmp_path, build, exception, words)
