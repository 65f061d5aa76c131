"""MiniMind checkpoint files: read (``.pth`` from MiniMind, or our ``.safetensors``), infer the config, load
strictly, save atomically.

``load_minimind(path)`` reads real MiniMind checkpoints of both generations with MiniMind's key names
(``weights_only=True``; ``module.``/``_orig_mod.`` prefixes removed); ``save_minimind`` writes MiniMind's
``.pth`` layout or safetensors with the config in the metadata.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from atomic_io import atomic_write, load_weights_only

from .model import MiniMindConfig, MiniMindForCausalLM

# safetensors metadata key under which `save_minimind` stores the config as JSON.
CONFIG_METADATA_KEY = "minimind_config"
# The tiny base model shipped with the package (made by `python -m minimind.pretrain`).
BUNDLED_BASE = Path(__file__).resolve().parent / "assets" / "base.safetensors"

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_WRAPPER_PREFIX = re.compile(r"^(module\.|_orig_mod\.)+")


def strip_wrapper_prefix(key: str) -> str:
    """Drop the ``module.`` (DDP) / ``_orig_mod.`` (``torch.compile``) prefixes from a parameter name."""
    return _WRAPPER_PREFIX.sub("", key)


def read_state_dict(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """Read a MiniMind checkpoint: ``.pth``/``.pt`` (``weights_only=True``) or ``.safetensors``.

    A ``.pth`` holding a training checkpoint (``{"model": state_dict, ...}``) is unwrapped, and
    ``module.`` / ``_orig_mod.`` prefixes from DDP or ``torch.compile`` are removed.

    Args:
        path: the file.

    Returns:
        (state_dict, config dict stored in the file's metadata or None).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no tensor dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    config = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        sd = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                sd[k] = f.get_tensor(k)
        if CONFIG_METADATA_KEY in meta:
            config = json.loads(meta[CONFIG_METADATA_KEY])
    else:
        sd = load_weights_only(path)
        if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
            sd = sd["model"]
        if isinstance(sd, dict) and isinstance(sd.get("config"), dict) and isinstance(sd.get("state_dict"), dict):
            sd, config = sd["state_dict"], sd["config"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state_dict), got {type(sd).__name__}")
    sd = {strip_wrapper_prefix(k): v for k, v in sd.items()}
    return sd, config


def infer_config(state_dict: Dict[str, torch.Tensor], **overrides) -> MiniMindConfig:
    """Infer a ``MiniMindConfig`` from MiniMind weights.

    The weights tell: vocab and hidden size, layer count, q/k norm (=> ``arch="minimind3"``, and
    head_dim from the norm's size), FFN size, MoE (expert count, shared experts) and untied
    ``lm_head``. They do not tell the head count of a MiniMind2 model (q_proj is (H*D, C)): it
    defaults to MiniMind's 8 heads unless ``num_attention_heads`` or ``head_dim`` is overridden.

    Args:
        state_dict: MiniMind key names.
        **overrides: config fields to force (e.g. ``num_attention_heads=16``, ``rope_theta=1e4``).

    Returns:
        The inferred config.

    Raises:
        ValueError: the dict is not a MiniMind checkpoint or its shapes are inconsistent.
    """
    sd = state_dict
    emb = sd.get("model.embed_tokens.weight", sd.get("lm_head.weight"))
    if emb is None or "model.layers.0.self_attn.q_proj.weight" not in sd:
        raise ValueError("not a MiniMind checkpoint: no model.embed_tokens.weight / model.layers.0.self_attn.q_proj.weight")
    vocab, hidden = emb.shape
    n_layers = 1 + max(int(m.group(1)) for m in map(_LAYER_KEY.match, sd) if m)
    p = "model.layers.0."
    q_out = sd[p + "self_attn.q_proj.weight"].shape[0]
    k_out = sd[p + "self_attn.k_proj.weight"].shape[0]
    has_qk_norm = p + "self_attn.q_norm.weight" in sd
    cfg = dict(arch="minimind3" if has_qk_norm else "minimind2", vocab_size=vocab, hidden_size=hidden,
               num_hidden_layers=n_layers, use_qk_norm=has_qk_norm)
    if has_qk_norm:
        cfg["head_dim"] = sd[p + "self_attn.q_norm.weight"].shape[0]
    cfg.update({k: v for k, v in overrides.items() if k in ("arch", "head_dim", "num_attention_heads")})
    if "head_dim" in cfg and "num_attention_heads" not in cfg:
        cfg["num_attention_heads"] = q_out // cfg["head_dim"]
    heads = cfg.setdefault("num_attention_heads", 8)
    head_dim = cfg.setdefault("head_dim", q_out // heads)
    if heads * head_dim != q_out or k_out % head_dim:
        raise ValueError(
            f"cannot split q_proj ({q_out} outputs) / k_proj ({k_out} outputs) into heads of size {head_dim} "
            f"with {heads} query heads: pass num_attention_heads or head_dim"
        )
    cfg["num_key_value_heads"] = k_out // head_dim
    experts = {int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.0\.mlp\.experts\.(\d+)\.", k))}
    if experts:
        shared = {int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", k))}
        cfg.update(use_moe=True, n_routed_experts=max(experts) + 1, n_shared_experts=len(shared))
        cfg["intermediate_size"] = sd[p + "mlp.experts.0.gate_proj.weight"].shape[0]
    elif p + "mlp.gate_proj.weight" in sd:
        cfg["intermediate_size"] = sd[p + "mlp.gate_proj.weight"].shape[0]
    both_heads = "lm_head.weight" in sd and "model.embed_tokens.weight" in sd
    if both_heads and not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
        cfg["tie_word_embeddings"] = False
    cfg.update(overrides)
    return MiniMindConfig(**cfg)


def _key_report(title: str, keys: List[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{title} ({len(keys)}): {shown}"


def load_state_dict_strict(model: MiniMindForCausalLM, state_dict: Dict[str, torch.Tensor], source: str = "checkpoint"):
    """Copy MiniMind weights into ``model``, requiring every key to match by name and shape.

    With tied embeddings either of ``lm_head.weight`` / ``model.embed_tokens.weight`` may be absent.
    Tensors are cast to the model's dtype.

    Args:
        model: the model to fill.
        state_dict: the weights.
        source: name used in error messages (e.g. the file path).

    Raises:
        ValueError: listing every missing, unexpected and misshapen key.
    """
    expected = model.state_dict()
    sd = dict(state_dict)
    if model.config.tie_word_embeddings:
        for a, b in (("lm_head.weight", "model.embed_tokens.weight"), ("model.embed_tokens.weight", "lm_head.weight")):
            if a not in sd and b in sd:
                sd[a] = sd[b]
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshapen = [f"{k} {tuple(sd[k].shape)} != expected {tuple(expected[k].shape)}"
                 for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    problems = [_key_report(t, ks) for t, ks in (("missing keys", missing), ("unexpected keys", unexpected),
                                                 ("shape mismatches", misshapen)) if ks]
    if problems:
        c = model.config
        raise ValueError(
            f"{source} does not match a MiniMind model (arch={c.arch}, hidden={c.hidden_size}, "
            f"layers={c.num_hidden_layers}, heads={c.num_attention_heads}/{c.num_key_value_heads}, moe={c.use_moe}):"
            "\n  " + "\n  ".join(problems)
        )
    model.load_state_dict(sd, strict=True)


def load_minimind(
    path: Union[str, os.PathLike, None] = None,
    config: Optional[MiniMindConfig] = None,
    dtype: Optional[torch.dtype] = None,
    **overrides,
) -> MiniMindForCausalLM:
    """Load a MiniMind checkpoint (``.pth`` from MiniMind itself, or our ``.safetensors``).

    The config is, in order: ``config`` if given; else the one stored in the file's metadata
    (``save_minimind`` writes it); else inferred from the weights (``infer_config``), with
    ``overrides`` applied on top.

    Args:
        path: checkpoint file; None loads the tiny base model bundled with the package.
        config: the exact config, when the weights alone do not determine it.
        dtype: parameter dtype (default float32, whatever the file stores).
        **overrides: config fields passed to ``infer_config`` / applied to the stored config.

    Returns:
        The model in eval mode on CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: keys missing, unexpected or of the wrong shape for the config (all listed).
    """
    path = BUNDLED_BASE if path is None else path
    sd, stored = read_state_dict(path)
    if config is None:
        config = MiniMindConfig.from_dict({**stored, **overrides}) if stored else infer_config(sd, **overrides)
    model = MiniMindForCausalLM(config)
    load_state_dict_strict(model, sd, source=str(path))
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def save_minimind(model: MiniMindForCausalLM, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None):
    """Save weights under MiniMind's key names, atomically (temp file + ``os.replace``).

    ``.safetensors`` stores the config as JSON metadata (key ``minimind_config``) and, with tied
    embeddings, only ``model.embed_tokens.weight``; any other suffix writes a ``torch.save``'d
    plain state_dict exactly like MiniMind's own checkpoints (both tied keys present).

    Args:
        model: the model.
        path: destination file.
        dtype: cast floating tensors to this dtype (e.g. ``torch.float16``) when given.
    """
    path = Path(path)
    sd = {k: v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()
          for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        meta = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=meta))
    else:
        atomic_write(path, lambda tmp: torch.save(sd, tmp))
