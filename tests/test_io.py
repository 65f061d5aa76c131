"""save_lora / load_lora: round trips, metadata, and loads that fail without touching the model."""
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from helpers import (
    D,
    Q0,
    TinyLM,
    adapted_model,
    assert_load_refused,
    assert_unchanged,
    base_model,
    dora_model,
    lk_file,
    load_file_into_adapted,
    load_file_into_base,
    model_with_custom_linear,
    nan_at,
    pickled_payload,
    set_layer,
    snapshot,
    truncated,
)
from lora_kernels import FusedLoRALinear, load_lora, lora_state_dict, replace_linear_with_fused_lora, save_lora
from lora_kernels.testing import assert_close


IDS = torch.arange(10).view(2, 5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_round_trip_into_a_plain_model(tmp_path, suffix):
    model = adapted_model(use_rslora=True, dropout=0.1)
    path = tmp_path / f"adapter{suffix}"
    save_lora(model, path)
    fresh = load_lora(base_model(), path)
    layer = fresh.layers[0].up_proj
    assert isinstance(layer, FusedLoRALinear)
    assert (layer.rank, layer.alpha, layer.use_rslora, layer.dropout) == (4, 8.0, True, 0.1)
    assert torch.equal(fresh(IDS), model(IDS))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_metadata(tmp_path):
    model = adapted_model(target_modules="square")
    save_lora(model, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "lora_kernels"
    targets = json.loads(meta["targets"])
    assert targets == sorted(f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "o_proj"))
    assert json.loads(meta["layers"])["layers.0.q_proj"] == {"rank": 4, "alpha": 8.0, "use_rslora": False,
                                                             "dropout": 0.0}
    assert keys == {f"{t}.{w}" for t in targets for w in ("lora_A", "lora_B")}


def test_load_into_existing_adapters_takes_the_file_alpha(tmp_path):
    model = adapted_model(seed=1)
    save_lora(model, tmp_path / "a.safetensors")
    other = adapted_model(seed=2, alpha=2)
    assert not torch.equal(other(IDS), model(IDS))
    load_lora(other, tmp_path / "a.safetensors")
    assert other.layers[0].q_proj.alpha == 8.0
    assert torch.equal(other(IDS), model(IDS))


def test_adapter_of_another_model_fails_and_changes_nothing(tmp_path):
    model = adapted_model()
    save_lora(model, tmp_path / "a.safetensors")

    class Wider(TinyLM):
        def __init__(self):
            super().__init__()
            self.layers[1].up_proj = nn.Linear(D, 48)
            self.layers[1].down_proj = nn.Linear(48, D)
            del self.layers[0].k_proj

    target = Wider()
    before = snapshot(target)
    with pytest.raises(ValueError) as err:
        load_lora(target, tmp_path / "a.safetensors")
    text = str(err.value)
    assert "layers.0.k_proj: no such module" in text
    assert "layers.1.up_proj: file has lora_A (4, 16), lora_B (40, 4); the model needs (4, 16), (48, 4)" in text
    assert "layers.1.down_proj" in text
    assert_unchanged(target, before)


def test_strict_lists_layers_missing_from_the_file(tmp_path):
    saved = adapted_model(target_modules="square")
    save_lora(saved, tmp_path / "a.safetensors")
    target = adapted_model(seed=3, target_modules="all-linear")
    before = snapshot(target)
    with pytest.raises(ValueError, match="layers.0.up_proj: LoRA layer in the model but not in the file"):
        load_lora(target, tmp_path / "a.safetensors")
    assert_unchanged(target, before)
    load_lora(target, tmp_path / "a.safetensors", strict=False)  # loads the square layers only
    assert torch.equal(target.layers[0].q_proj.lora_A, saved.layers[0].q_proj.lora_A)
    assert torch.equal(target.layers[0].up_proj.lora_A, before[0]["layers.0.up_proj.lora_A"])


def test_rank_mismatch_with_existing_adapter(tmp_path):
    save_lora(adapted_model(rank=4), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"the model needs \(2, 16\)"):
        load_lora(adapted_model(rank=2), tmp_path / "a.safetensors")


def test_merged_layer_is_refused(tmp_path):
    model = adapted_model()
    save_lora(model, tmp_path / "a.safetensors")
    model.layers[0].q_proj.merge()
    with pytest.raises(ValueError, match="merged"):
        load_lora(model, tmp_path / "a.safetensors")


def test_missing_file_and_model_without_adapters(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lora(base_model(), tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="no FusedLoRALinear"):
        save_lora(base_model(), tmp_path / "a.safetensors")


def test_pth_is_loaded_without_unpickling_objects(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"layers.0.q_proj.lora_A": Payload()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        load_lora(base_model(), path)


def test_plain_tensor_dict_pth(tmp_path):
    model = adapted_model(alpha=None, target_modules=["q_proj"])
    torch.save(lora_state_dict(model), tmp_path / "flat.pth")
    fresh = load_lora(base_model(), tmp_path / "flat.pth")
    assert fresh.layers[1].q_proj.scaling == 1.0  # no metadata: alpha = rank
    assert torch.equal(fresh(IDS), model(IDS))


def test_foreign_keys_are_refused(tmp_path):
    torch.save({"model.layers.0.q_proj.lora.A.weight": torch.zeros(2, D)}, tmp_path / "minimind.pth")
    with pytest.raises(ValueError, match="not a lora_kernels adapter"):
        load_lora(base_model(), tmp_path / "minimind.pth")


def test_saved_files_get_ordinary_permissions(tmp_path):
    save_lora(adapted_model(), tmp_path / "a.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_load_under_a_name_adds_an_adapter_of_the_files_rank(tmp_path):
    from lora_kernels import adapter_names, set_adapter

    torch.manual_seed(0)
    source = replace_linear_with_fused_lora(TinyLM(), rank=2, alpha=4)
    with torch.no_grad():
        for _, layer in source.named_modules():
            if isinstance(layer, FusedLoRALinear):
                layer.lora_B.normal_()
    save_lora(source, tmp_path / "a.safetensors")
    model = replace_linear_with_fused_lora(TinyLM(), rank=8)  # other ranks: "default" stays as it is
    load_lora(model, tmp_path / "a.safetensors", adapter_name="qa")
    q = model.layers[0].q_proj
    assert adapter_names(model) == ["default", "qa"] and (q.rank, q.lora_configs["qa"].rank) == (8, 2)
    assert q.lora_configs["qa"].lora_alpha == 4.0
    assert torch.equal(q.lora_params("qa")[1], source.layers[0].q_proj.lora_B)
    set_adapter(model, "qa")
    assert q.active_adapters == ["qa"]


# ---------------------------------------------------------------------------------------------------
# DoRA adapters: the magnitude beside A and B, use_dora in the layer settings


def float64_outputs(model, ids=IDS):
    """``model``'s logits computed in float64 on a copy (the reference the round trips compare with)."""
    import copy

    return copy.deepcopy(model).double()(ids)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_dora_round_trip_into_a_plain_model(tmp_path, suffix):
    saved = dora_model(dropout=0.1)
    path = tmp_path / f"dora{suffix}"
    save_lora(saved, path)
    fresh = load_lora(base_model(), path)
    layer = fresh.layers[1].k_proj  # a non-square layer: m is (8,), not (in_features,)
    assert layer.lora_configs["default"].use_dora and layer.lora_magnitude.shape == (8,)
    assert (layer.rank, layer.alpha, layer.dropout) == (4, 8.0, 0.1)
    state, expected = lora_state_dict(fresh), lora_state_dict(saved)
    assert state.keys() == expected.keys() and sum(k.endswith(".lora_magnitude") for k in state) == 10
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert_close(fresh(IDS).double(), float64_outputs(saved), torch.float32, "logits after the round trip")


def test_dora_metadata_and_keys(tmp_path):
    save_lora(dora_model(target_modules="square"), tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        magnitude = f.get_tensor(f"{Q0}.lora_magnitude")
    targets = json.loads(meta["targets"])
    assert json.loads(meta["layers"])[Q0] == {"rank": 4, "alpha": 8.0, "use_rslora": False, "dropout": 0.0,
                                              "use_dora": True}
    assert keys == {f"{t}.{w}" for t in targets for w in ("lora_A", "lora_B", "lora_magnitude")}
    assert magnitude.shape == (D,)


def test_dora_loads_under_a_new_adapter_name(tmp_path):
    from lora_kernels import adapter_names, set_adapter

    saved = dora_model(seed=1)
    save_lora(saved, tmp_path / "dora.safetensors")
    model = adapted_model(seed=2, rank=2)  # a plain LoRA "default" of another rank
    before = float64_outputs(model)
    load_lora(model, tmp_path / "dora.safetensors", adapter_name="dora")
    q = model.layers[0].q_proj
    assert adapter_names(model) == ["default", "dora"] and q.lora_configs["dora"].use_dora
    assert not q.lora_configs["default"].use_dora and q.lora_magnitude is None
    assert torch.equal(q.lora_magnitude_of("dora"), saved.layers[0].q_proj.lora_magnitude)
    assert "layers.0.q_proj.lora_adapters.dora.lora_magnitude" in model.state_dict()
    assert_close(model(IDS).double(), before, torch.float32, "the new adapter is inactive")
    set_adapter(model, "dora")
    assert_close(model(IDS).double(), float64_outputs(saved), torch.float32, "logits with the loaded DoRA adapter")


def test_dora_file_replaces_an_existing_dora_adapter(tmp_path):
    saved = dora_model(seed=1, alpha=12)
    save_lora(saved, tmp_path / "dora.safetensors")
    model = dora_model(seed=2)
    parameter = model.layers[0].q_proj.lora_magnitude
    load_lora(model, tmp_path / "dora.safetensors")
    assert model.layers[0].q_proj.lora_magnitude is parameter  # loaded in place: an optimizer keeps its tensors
    assert model.layers[0].q_proj.alpha == 12.0
    assert_close(model(IDS).double(), float64_outputs(saved), torch.float32, "logits after loading over DoRA")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dora_adapter_of_a_residual_init_loads_onto_the_original_base(tmp_path, init):
    """PiSSA / OLoRA with DoRA: the file holds the rank-2r LoRA for the original base and the trained magnitude
    (unchanged by the conversion: ‖W_res + s·B·A‖ = ‖W + s'·B'·A'‖), so it loads onto the original base."""
    import copy

    original = base_model()
    model = replace_linear_with_fused_lora(copy.deepcopy(original), rank=4, alpha=8, target_modules="all-linear",
                                           init=init, use_dora=True).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # "trained": A, B and the magnitudes away from their initial values
        for p in lora_state_dict(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    save_lora(model, tmp_path / "dora.safetensors")
    loaded = load_lora(copy.deepcopy(original), tmp_path / "dora.safetensors")
    assert loaded.layers[0].q_proj.rank == 8 and loaded.layers[0].q_proj.lora_configs["default"].use_dora
    assert_close(loaded(IDS).double(), float64_outputs(model), torch.float32, f"{init} + DoRA on the original base")


# ---------------------------------------------------------------------------------------------------
# read_adapter: one reader that tells the formats apart


def test_read_adapter_tells_the_formats_apart(tmp_path):
    from lora_kernels import save_peft_adapter
    from lora_kernels.io import FORMAT, MINIMIND_FORMAT, PEFT_FORMAT, read_adapter
    from minimind.lora_io import save_minimind_lora

    model = adapted_model(alpha=12, dropout=0.1)
    state = lora_state_dict(model)
    for suffix in (".safetensors", ".pth"):
        ours = read_adapter(save_to(model, tmp_path / f"ours{suffix}"))
        assert ours.format == FORMAT
        assert {k: v for m, ab in ours.modules().items() for k, v in ((f"{m}.{n}", t) for n, t in ab.items())}.keys() \
            == state.keys()
        assert all(torch.equal(ours.tensors[k], v) for k, v in state.items())
        config = ours.layer_config("layers.0.up_proj", 4)
        assert (config.rank, config.alpha, config.dropout) == (4, 12, 0.1)
    save_minimind_lora(model, tmp_path / "minimind.pth")
    assert read_adapter(tmp_path / "minimind.pth").format == MINIMIND_FORMAT
    save_peft_adapter(model, tmp_path / "peft")
    assert read_adapter(tmp_path / "peft").format == PEFT_FORMAT
    torch.save(state, tmp_path / "flat.pth")  # a plain dict of our tensor names, no metadata
    flat = read_adapter(tmp_path / "flat.pth")
    assert flat.format is None and flat.layer_config("layers.0.up_proj", 4).scaling == 1.0  # alpha = rank


def test_minimind_load_adapter_reads_the_file_once(tmp_path, monkeypatch):
    import atomic_io
    from lora_kernels import io
    from minimind.lora_io import load_adapter, save_minimind_lora

    model = adapted_model()
    save_lora(model, tmp_path / "ours.safetensors")
    save_minimind_lora(model, tmp_path / "minimind.pth")
    opened = []

    def counting(path):
        opened.append(path)
        return atomic_io.read_tensor_file(path)

    monkeypatch.setattr(io, "read_tensor_file", counting)
    for name in ("ours.safetensors", "minimind.pth"):
        opened.clear()
        load_adapter(base_model(), tmp_path / name)
        assert len(opened) == 1, (name, opened)


def save_to(model, path):
    save_lora(model, path)
    return path


# ---------------------------------------------------------------------------------------------------
# Bad files: (case id, build(tmp_path) -> (model, load), exception, words the message must contain)

LOADER_CASES = [
    ("missing file", load_file_into_base(lambda t: t / "nope.safetensors"), FileNotFoundError, ["nope.safetensors"]),
    ("directory instead of a file", load_file_into_base(lambda t: t), FileNotFoundError, ["not a file"]),
    ("truncated safetensors", load_file_into_base(lambda t: truncated(lk_file(t))), ValueError,
     ["a.safetensors", "cannot read"]),
    ("truncated pth", load_file_into_base(lambda t: truncated(lk_file(t, "a.pth"))), ValueError, ["a.pth"]),
    ("pickle payload", load_file_into_base(lambda t: pickled_payload(t / "evil.pth")), ValueError,
     ["evil.pth", "weights_only"]),
    ("garbage bytes", load_file_into_base(lambda t: (t / "g.pt").write_bytes(b"not a tensor file" * 9) and t / "g.pt"),
     ValueError, ["g.pt"]),
    ("NaN in lora_B", load_file_into_base(lambda t: lk_file(t, tensors=nan_at(f"{Q0}.lora_B"))), ValueError,
     [f"{Q0}.lora_B", "non-finite", "a.safetensors"]),
    ("inf in lora_A", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d[f"{Q0}.lora_A"].fill_(float("inf")))), ValueError, [f"{Q0}.lora_A", "non-finite"]),
    ("integer tensor", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d.update({f"{Q0}.lora_A": d[f"{Q0}.lora_A"].long()}))), ValueError,
     [f"{Q0}.lora_A", "torch.int64"]),
    ("metadata layers not JSON", load_file_into_base(lambda t: lk_file(
        t, meta=lambda layers, m: m.update(layers_raw="{oops"))), ValueError, ["'layers'", "not valid JSON"]),
    ("metadata layers a list", load_file_into_base(lambda t: lk_file(
        t, meta=lambda layers, m: m.update(layers_raw="[1, 2]"))), ValueError, ["'layers'", "list"]),
    ("dropout 5.0 on layer 1 only", load_file_into_base(lambda t: lk_file(
        t, meta=set_layer("layers.1.up_proj", "dropout", 5.0))), ValueError, ["layers.1.up_proj", "dropout", "5.0"]),
    ("alpha NaN", load_file_into_base(lambda t: lk_file(t, meta=set_layer(Q0, "alpha", float("nan")))), ValueError,
     [Q0, "alpha", "nan"]),
    ("alpha 0 into existing layers", load_file_into_adapted(lambda t: lk_file(t, meta=set_layer(Q0, "alpha", 0))),
     ValueError, [Q0, "alpha", "got 0"]),
    ("alpha negative into existing layers", load_file_into_adapted(lambda t: lk_file(
        t, meta=set_layer("layers.1.o_proj", "alpha", -8))), ValueError, ["layers.1.o_proj", "alpha", "-8"]),
    ("use_rslora as a string", load_file_into_adapted(lambda t: lk_file(t, meta=set_layer(Q0, "use_rslora", "false"))),
     ValueError, [Q0, "use_rslora", "'false'"]),
    ("rank as a string", load_file_into_base(lambda t: lk_file(t, meta=set_layer(Q0, "rank", "4"))), ValueError,
     [Q0, "rank", "'4'"]),
    ("rank contradicting lora_A", load_file_into_base(lambda t: lk_file(t, meta=set_layer(Q0, "rank", 16))), ValueError,
     [Q0, "rank", "16"]),
    ("layer settings not an object", load_file_into_base(lambda t: lk_file(
        t, meta=lambda layers, m: layers.update({Q0: [4, 8]}))), ValueError, [Q0, "[4, 8]"]),
    ("newer format_version", load_file_into_base(lambda t: lk_file(
        t, meta=lambda layers, m: m.update(format_version="7"))), ValueError, ["format_version", "'7'"]),
    ("unexpected key", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d.update({"layers.0.q_proj.weight": torch.zeros(D, D)}))), ValueError,
     ["layers.0.q_proj.weight"]),
    ("lora_A without lora_B", load_file_into_base(lambda t: lk_file(t, tensors=lambda d: d.pop(f"{Q0}.lora_B"))),
     ValueError, [Q0, "without"]),
    ("wrong shape", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d.update({f"{Q0}.lora_A": torch.zeros(4, D + 1)}))), ValueError, [Q0, "(4, 17)"]),
    ("module not in the model", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d.update({"layers.7.q_proj.lora_A": torch.zeros(4, D),
                                       "layers.7.q_proj.lora_B": torch.zeros(D, 4)}))), ValueError,
     ["layers.7.q_proj", "no such module"]),
    ("adapter on an embedding", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d.update({"embed.lora_A": torch.zeros(4, D), "embed.lora_B": torch.zeros(D, 4)}))),
     ValueError, ["embed", "Embedding"]),
    ("nn.Linear subclass with its own forward", lambda t: (model_with_custom_linear(), lambda m: load_lora(
        m, lk_file(t))), ValueError, [Q0, "ScaledLinear", "allow_custom_forward"]),
    ("DoRA magnitude of the wrong shape", load_file_into_base(lambda t: lk_file(
        t, model=dora_model, tensors=lambda d: d.update({f"{Q0}.lora_magnitude": torch.ones(D + 1)}))), ValueError,
     [Q0, "lora_magnitude (17,)", "(16,)"]),
    ("DoRA magnitude without use_dora", load_file_into_base(lambda t: lk_file(
        t, model=dora_model, meta=lambda layers, m: layers[Q0].pop("use_dora"))), ValueError,
     [Q0, "lora_magnitude", "use_dora: true"]),
    ("DoRA magnitude in a plain LoRA file", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d.update({f"{Q0}.lora_magnitude": torch.ones(D)}))), ValueError,
     [Q0, "lora_magnitude", "use_dora: true"]),
    ("use_dora without a magnitude", load_file_into_base(lambda t: lk_file(
        t, model=dora_model, tensors=lambda d: d.pop(f"{Q0}.lora_magnitude"))), ValueError,
     [Q0, "use_dora: true", f"no {Q0}.lora_magnitude"]),
    ("use_dora as a string", load_file_into_base(lambda t: lk_file(
        t, model=dora_model, meta=set_layer(Q0, "use_dora", "true"))), ValueError, [Q0, "use_dora", "'true'"]),
    ("NaN in a DoRA magnitude", load_file_into_base(lambda t: lk_file(
        t, model=dora_model, tensors=lambda d: d[f"{Q0}.lora_magnitude"].__setitem__(0, float("nan")))),
     ValueError, [f"{Q0}.lora_magnitude", "non-finite"]),
    ("a DoRA magnitude alone", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d.update({"layers.1.up_proj.lora_magnitude": torch.ones(40)}) or
        d.pop("layers.1.up_proj.lora_A"))), ValueError, ["layers.1.up_proj", "lora_magnitude alone"]),
    ("DoRA file onto an existing plain LoRA adapter", load_file_into_adapted(lambda t: lk_file(t, model=dora_model)),
     ValueError, [Q0, "the file's adapter is DoRA", "'default' is plain LoRA", "adapter_name"]),
    ("plain LoRA file onto an existing DoRA adapter", load_file_into_base(
        lambda t: lk_file(t), model=lambda: dora_model(seed=5)), ValueError,
     [Q0, "the file's adapter is plain LoRA", "'default' is DoRA"]),
    ("pth metadata not strings", load_file_into_base(lambda t: torch.save(
        {"tensors": lora_state_dict(adapted_model()), "metadata": {"layers": 5}}, t / "m.pth") or t / "m.pth"),
     ValueError, ["m.pth", "metadata"]),
]


@pytest.mark.parametrize("build,exception,words", [c[1:] for c in LOADER_CASES], ids=[c[0] for c in LOADER_CASES])
def test_loader_refuses_and_changes_nothing(tmp_path, build, exception, words):
    assert_load_refused(tmp_path, build, exception, words)
