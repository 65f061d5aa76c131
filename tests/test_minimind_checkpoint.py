"""minimind.checkpoint: save / load round trips in both layouts, the config read from weights alone, and load
errors that list every missing, unexpected and misshapen key."""
import pytest
import torch

from helpers import tiny_minimind
from minimind.checkpoint import infer_config, load_minimind, read_state_dict, save_minimind
from minimind.model import MiniMindForCausalLM


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_load_roundtrip(tmp_path, suffix):
    model = tiny_minimind("minimind3", True, num_attention_heads=2, num_key_value_heads=1, head_dim=12)
    path = tmp_path / f"m{suffix}"
    save_minimind(model, path)
    sd, stored = read_state_dict(path)
    if suffix == ".safetensors":
        assert stored["head_dim"] == 12 and "lm_head.weight" not in sd  # tied: stored once
    else:
        assert stored is None and "lm_head.weight" in sd  # MiniMind's own layout: both tied keys
    # A .pth holds weights only: the RoPE table length is not in them.
    loaded = load_minimind(path) if suffix == ".safetensors" else load_minimind(path, max_position_embeddings=64)
    assert loaded.config == model.config
    ids = torch.randint(3, 97, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not list(tmp_path.glob("*.tmp"))


def test_infer_config_from_weights_alone():
    model = tiny_minimind("minimind2", True, num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    cfg = infer_config(model.state_dict(), vocab_size=97)
    for field in ("arch", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "use_moe", "n_routed_experts", "n_shared_experts", "use_qk_norm"):
        assert getattr(cfg, field) == getattr(model.config, field), field
    with pytest.raises(ValueError, match="cannot split q_proj"):
        infer_config(model.state_dict(), num_attention_heads=5)


def test_load_fails_listing_missing_unexpected_and_misshapen_keys(tmp_path):
    sd = tiny_minimind().state_dict()
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    sd["model.norm.weight"] = torch.ones(31)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        load_minimind(path, config=tiny_minimind().config)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected keys (1): model.layers.0.self_attn.rotary.weight" in msg
    assert "model.norm.weight (31,) != expected (32,)" in msg


def test_load_errors_for_wrong_config_and_bad_files(tmp_path):
    path = tmp_path / "m.pth"
    save_minimind(tiny_minimind(), path)
    with pytest.raises(ValueError, match="missing keys .*experts"):
        load_minimind(path, use_moe=True)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_minimind(tmp_path / "nope.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a dict of tensors"):
        load_minimind(tmp_path / "list.pth")
    torch.save({"model": torch.load(path, weights_only=True), "optimizer": {}}, tmp_path / "resume.pth")
    assert isinstance(load_minimind(tmp_path / "resume.pth"), MiniMindForCausalLM)  # MiniMind's resume checkpoints
