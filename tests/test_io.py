"""save_lora / load_lora: round trips, metadata, and loads that fail without touching the model."""
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from lora_kernels import FusedLoRALinear, load_lora, lora_state_dict, replace_linear_with_fused_lora, save_lora
from test_replace import D, TinyLM


def adapted_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = TinyLM()
    torch.manual_seed(100)  # the same base for every call; the adapters below vary with `seed`
    model.load_state_dict(TinyLM().state_dict())
    torch.manual_seed(seed)
    replace_linear_with_fused_lora(model, **{"rank": 4, "alpha": 8, "target_modules": "all-linear", **kwargs})
    for p in lora_state_dict(model).values():
        p.normal_(0, 0.3)
    return model.eval()


def base_model():
    torch.manual_seed(100)
    return TinyLM().eval()


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


def assert_unchanged(model, snapshot, types):
    assert {n: type(m) for n, m in model.named_modules()} == types
    state = model.state_dict()
    assert state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in snapshot)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()}


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
    state, types = snapshot(target)
    with pytest.raises(ValueError) as err:
        load_lora(target, tmp_path / "a.safetensors")
    text = str(err.value)
    assert "layers.0.k_proj: no such module" in text
    assert "layers.1.up_proj: file has lora_A (4, 16), lora_B (40, 4); the model needs (4, 16), (48, 4)" in text
    assert "layers.1.down_proj" in text
    assert_unchanged(target, state, types)


def test_strict_lists_layers_missing_from_the_file(tmp_path):
    saved = adapted_model(target_modules="square")
    save_lora(saved, tmp_path / "a.safetensors")
    target = adapted_model(seed=3, target_modules="all-linear")
    state, types = snapshot(target)
    with pytest.raises(ValueError, match="layers.0.up_proj: LoRA layer in the model but not in the file"):
        load_lora(target, tmp_path / "a.safetensors")
    assert_unchanged(target, state, types)
    load_lora(target, tmp_path / "a.safetensors", strict=False)  # loads the square layers only
    assert torch.equal(target.layers[0].q_proj.lora_A, saved.layers[0].q_proj.lora_A)
    assert torch.equal(target.layers[0].up_proj.lora_A, state["layers.0.up_proj.lora_A"])


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
