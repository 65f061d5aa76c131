"""HF PEFT's LoRA adapter format, both ways: :func:`save_peft_adapter` and :func:`load_peft_adapter`.

An adapter directory, as ``peft.PeftModel.save_pretrained`` writes it:

* ``adapter_config.json``: PEFT's ``LoraConfig``: ``peft_type = "LORA"``, ``r``, ``lora_alpha``,
  ``lora_dropout``, ``target_modules``, ``use_rslora``, ``bias``, ``task_type``, and ``rank_pattern`` /
  ``alpha_pattern``, which map module-path patterns to the rank / alpha of layers that differ from ``r`` /
  ``lora_alpha``. A pattern ``key`` applies to a module path that matches the regular expression
  ``(.*\\.)?(key)$``; the first matching key wins.
* ``adapter_model.safetensors`` (or a pickled ``adapter_model.bin``): tensors named
  ``base_model.model.<module path>.lora_A.weight`` (rank, in_features) and ``... .lora_B.weight``
  (out_features, rank), the layout of :class:`FusedLoRALinear`'s ``lora_A`` / ``lora_B``, so no transpose.
  PEFT's scale is ours: ``lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``.
* DoRA (``use_dora: true``, one flag for every layer of the adapter): also ``... .lora_magnitude_vector``
  (out_features,), the magnitude m (no ``.weight`` suffix in the file: PEFT drops it on saving and adds it
  back on loading), our ``lora_magnitude``.

Plain LoRA and DoRA on ``nn.Linear`` layers are supported. The other PEFT LoRA variants, LoRA on
embeddings or convolutions, ``fan_in_fan_out`` (GPT-2's ``Conv1D``), trained biases, ``modules_to_save``
and initialisations that rewrite the base weights in a way we do not repeat (``pissa_niter_<n>``, which is
randomized, CorDA, LoftQ, ...) are refused with a message naming them when loading. A file saved as-is with
``init_lora_weights: "pissa"`` or ``"olora"`` loads as PEFT loads it: each new adapter decomposes its layer's
base first (the residual stays in the base), then takes the file's A and B. Our own PiSSA / OLoRA adapters are
saved converted to a plain LoRA for the original base by default, as PEFT's
``path_initial_model_for_weight_conversion`` does (:mod:`lora_kernels.init`).
Reading and writing files needs neither ``peft`` nor ``transformers``. The
conversion of a live ``PeftModel`` (:func:`lora_kernels.fuse_peft_model`, which needs ``peft``) is in
:mod:`lora_kernels.peft_live`.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from atomic_io import atomic_write, read_json_object, read_tensor_file

from .adapters import adapter_names as _adapter_names
from .config import (DEFAULT_ADAPTER, LoRAConfig, check_adapter_name, is_alpha_value, is_finite_number, is_rank_value,
                     is_residual_init, lora_scaling, pattern_problems)
from .config import pattern_value as _pattern_value
from .init import converted_adapters
from .io import apply_lora_tensors, check_tensors
from .modules import FusedLoRALinear
from .replace import iter_lora_layers, mark_only_lora_as_trainable

PathLike = Union[str, os.PathLike]
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<leaf>lora_[AB])\.weight")
# DoRA's magnitude: PEFT writes "<module>.lora_magnitude_vector" and also reads the ".weight" form.
_MAGNITUDE_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_magnitude_vector(\.weight)?")
MAGNITUDE_SUFFIX = "lora_magnitude_vector"

# LoraConfig fields that select a LoRA variant with a different forward, or a feature beyond LoRA on
# linear layers: a truthy value is refused, with the name shown to the user.
_UNSUPPORTED_FIELDS = {
    "fan_in_fan_out": "fan_in_fan_out (GPT-2-style Conv1D layers that store the weight as (in, out))",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "modules_to_save": "modules_to_save (fully trained copies of whole modules)",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on nn.Parameter, e.g. MoE experts)",
    "layer_replication": "layer_replication",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "aLoRA",
    "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow",
    "kasa_config": "KaSA",
}
# init_lora_weights values that leave the base weights alone (every other value rewrites them on load).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Deterministic inits that rewrite the base: loading decomposes the base again as PEFT does (lora_kernels.init).
_BASE_INITS = ("pissa", "olora")


# ---------------------------------------------------------------------------------------------------
# rank_pattern / alpha_pattern, with PEFT's matching rule (lora_kernels.config.pattern_value)


def _exceptions(values: Dict[str, Any], default: Any) -> Dict[str, Any]:
    """A rank or alpha pattern for the layers whose value differs from ``default``, keyed by module path.

    PEFT reads a key as a regex that also matches any longer path ending in ``.<key>``; when a plain path
    would reach another layer that way, every key becomes ``^<escaped path>``, which matches one path only.
    """
    pattern = {name: v for name, v in sorted(values.items()) if v != default}
    if all(_pattern_value(pattern, name, default) == v for name, v in values.items()):
        return pattern
    return {"^" + re.escape(name): v for name, v in pattern.items()}


# ---------------------------------------------------------------------------------------------------
# Saving


def _most_common(values: List[Any]) -> Any:
    # Ties go to the value seen first in module order, which makes the file deterministic.
    return Counter(values).most_common(1)[0][0]


def _number(value: float) -> Union[int, float]:
    """An integral float as an int, as PEFT writes ``r`` and ``lora_alpha``."""
    return int(value) if float(value).is_integer() else float(value)


def _target_modules(model: nn.Module, names: List[str]) -> Union[List[str], str]:
    """PEFT's ``target_modules`` selecting exactly the layers ``names``.

    PEFT matches a list entry against a module's path or the path's suffix after a dot, whatever the
    module's type. A layer name such as ``"q_proj"`` is used when it selects adapted layers only, else the
    layers' full paths; a regex of the escaped paths is the fallback if even those reach other modules.
    """
    paths = [n for n, _ in model.named_modules() if n]
    wanted = set(names)

    def selected(entries):
        return {p for p in paths if any(p == t or p.endswith("." + t) for t in entries)}

    entries = set()
    for leaf in {name.rsplit(".", 1)[-1] for name in names}:
        entries |= {leaf} if selected([leaf]) <= wanted else {n for n in names if n.rsplit(".", 1)[-1] == leaf}
    if selected(entries) == wanted:
        return sorted(entries)
    return "|".join(re.escape(n) for n in sorted(names))


def _unwrap_peft_model(model: nn.Module) -> Tuple[nn.Module, Dict[str, Dict[str, Any]]]:
    """The base model inside a ``PeftModel`` (duck-typed: peft need not be installed) and, per adapter, its
    task type and base model name; a plain model and an empty dict otherwise."""
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict) and callable(getattr(model, "get_base_model", None)):
        info = {}
        for name, adapter_config in config.items():
            if getattr(adapter_config, "modules_to_save", None):
                raise ValueError(f"the PeftModel's adapter {name!r} trains modules_to_save="
                                 f"{adapter_config.modules_to_save!r}, which save_peft_adapter does not write "
                                 "(it saves LoRA weights only)")
            info[name] = {"task_type": getattr(adapter_config, "task_type", None),
                          "base_model_name_or_path": getattr(adapter_config, "base_model_name_or_path", None)}
        return model.get_base_model(), info
    return model, {}


def _uses_dora(base: nn.Module, adapter: str) -> bool:
    """Whether adapter ``adapter`` is written with ``use_dora: true``: PEFT's flag is one for the whole adapter,
    so its layers must be all DoRA or all plain LoRA.

    Raises:
        ValueError: some layers are DoRA and others not, naming a few of each.
    """
    dora = {name: layer.lora_configs[adapter].use_dora for name, layer in iter_lora_layers(base)
            if adapter in layer.lora_configs}
    if len(set(dora.values())) <= 1:
        return any(dora.values())
    with_dora = sorted(name for name, flag in dora.items() if flag)
    without = sorted(name for name, flag in dora.items() if not flag)
    raise ValueError(f"adapter {adapter!r} has DoRA on {len(with_dora)} layers ({with_dora[:3]}, ...) and plain "
                     f"LoRA on {len(without)} ({without[:3]}, ...); a PEFT adapter has one use_dora for all its layers, so "
                     "PEFT cannot express it: give every layer of the adapter use_dora=True (or none), or save the "
                     "DoRA and the LoRA layers as two adapters")


def save_peft_adapter(model: nn.Module, directory: PathLike, base_model_name_or_path: Optional[str] = None,
                      adapter_names: Optional[List[str]] = None, convert_to_lora: bool = True) -> None:
    """Writes the :class:`FusedLoRALinear` adapters of ``model`` as PEFT LoRA adapter directories, in PEFT's
    layout: the adapter ``"default"`` in ``directory`` itself, every other adapter ``NAME`` in
    ``directory/NAME`` (as ``PeftModel.save_pretrained`` writes them).

    ``peft.PeftModel.from_pretrained(base, directory)`` (then ``load_adapter(directory/NAME, NAME)`` for the
    others) gives the same outputs as ``model``. Per adapter, the most common rank and alpha become ``r``
    and ``lora_alpha``; layers that differ go to ``rank_pattern`` / ``alpha_pattern``. Layers whose rsLoRA
    setting differs from the most common one are written with the alpha that gives the same scaling. PEFT
    has one ``lora_dropout``: the most common dropout is written (with a warning when layers differ;
    dropout does not change inference). An adapter whose layers are all DoRA is written with ``use_dora: true``
    and each layer's magnitude (``<module>.lora_magnitude_vector``, as PEFT writes it). Base weights are not
    saved, even when they were trained.

    Args:
        model: a model with :class:`FusedLoRALinear` layers, or a ``PeftModel`` converted by
            :func:`lora_kernels.fuse_peft_model` (its task type and base model name are kept).
        directory: created if needed; each ``adapter_config.json`` and ``adapter_model.safetensors`` is
            written atomically, replacing any previous file.
        base_model_name_or_path: recorded in the config; defaults to the model's ``name_or_path`` (as set
            by ``transformers``' ``from_pretrained``), else null.
        adapter_names: the adapters to write; None: all of them.
        convert_to_lora: layers whose adapter was initialised by PiSSA / OLoRA are written as PEFT's
            ``save_pretrained(..., path_initial_model_for_weight_conversion=...)`` writes them: a plain LoRA of
            rank 2r (``r``, ``lora_alpha`` and the patterns doubled, ``init_lora_weights: true``) that PEFT
            loads onto the *original* base (:mod:`lora_kernels.init`). False: as PEFT's plain
            ``save_pretrained``: rank r, ``init_lora_weights: "pissa"`` / ``"olora"``, which PEFT loads by
            decomposing the original base again (deterministic for ``"pissa"`` and ``"olora"``, not for the
            randomized ``"pissa_niter_<n>"``).

    Raises:
        ValueError: the model has no LoRA layers, an unknown adapter name, an adapter with DoRA on some
            layers and plain LoRA on others (PEFT's ``use_dora`` is one flag per adapter), the model is a
            ``PeftModel`` with ``modules_to_save``, or (``convert_to_lora``) a PiSSA / OLoRA layer that no longer
            holds its initial A0, B0. Nothing is written then.
    """
    base, peft_info = _unwrap_peft_model(model)
    if not any(True for _ in iter_lora_layers(base)):
        raise ValueError("the model has no FusedLoRALinear layers to save")
    known = _adapter_names(base)
    names = known if adapter_names is None else list(adapter_names)
    for name in names:
        if name not in known:
            raise ValueError(f"no adapter named {name!r} in the model (it has {known})")
    use_dora = {name: _uses_dora(base, name) for name in names}  # every adapter checked before any is written
    directory = Path(directory)
    for name in names:
        _save_one_peft_adapter(base, name, directory if name == DEFAULT_ADAPTER else directory / name,
                               peft_info.get(name, {}), base_model_name_or_path, use_dora[name], convert_to_lora)


def _save_one_peft_adapter(base: nn.Module, adapter: str, directory: Path, peft_info: Dict[str, Any],
                           base_model_name_or_path: Optional[str], use_dora: bool,
                           convert_to_lora: bool = True) -> None:
    from safetensors.torch import save_file

    layers = {name: layer for name, layer in iter_lora_layers(base) if adapter in layer.lora_configs}
    configs = {name: layer.lora_configs[adapter] for name, layer in layers.items()}
    pairs = {name: layer.lora_params(adapter) for name, layer in layers.items()}
    if convert_to_lora:
        for name, (config, lora_A, lora_B) in converted_adapters(layers, adapter).items():
            configs[name], pairs[name] = config, (lora_A, lora_B)
    # PEFT has one init per adapter: a layer still initialised by PiSSA / OLoRA makes the file say so.
    init_lora_weights = next((c.init for c in configs.values() if is_residual_init(c.init)), True)
    use_rslora = _most_common([c.use_rslora for c in configs.values()])
    ranks = {name: c.rank for name, c in configs.items()}
    # alpha such that PEFT's scaling (alpha / r, or alpha / √r with the file's use_rslora) is the layer's.
    alphas = {name: _number(c.scaling / lora_scaling(c.rank, 1.0, use_rslora)) if c.use_rslora != use_rslora
              else _number(c.lora_alpha) for name, c in configs.items()}
    dropouts = [c.dropout for c in configs.values()]
    if len(set(dropouts)) > 1:
        warnings.warn(f"adapter {adapter!r}: layers have different dropouts {sorted(set(dropouts))}; PEFT has one "
                      f"lora_dropout, {_most_common(dropouts):g} is saved", stacklevel=3)
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))

    task_type = peft_info.get("task_type")
    if task_type is None and type(base).__name__.endswith("ForCausalLM"):
        task_type = "CAUSAL_LM"
    if base_model_name_or_path is None:
        base_model_name_or_path = peft_info.get("base_model_name_or_path") or getattr(base, "name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(dropouts),
        "target_modules": _target_modules(base, list(layers)),
        "use_rslora": use_rslora,
        "rank_pattern": _exceptions(ranks, r),
        "alpha_pattern": _exceptions(alphas, alpha),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": use_dora,
        "init_lora_weights": init_lora_weights,
        "modules_to_save": None,
        "inference_mode": True,
    }
    tensors = {}
    for name, (lora_A, lora_B) in pairs.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = lora_A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = lora_B.detach().contiguous().cpu()
        if use_dora:
            magnitude = layers[name].lora_magnitude_of(adapter)
            tensors[f"{PREFIX}{name}.{MAGNITUDE_SUFFIX}"] = magnitude.detach().contiguous().cpu()

    atomic_write(directory / SAFETENSORS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------
# Loading


def _read_config(directory: Path) -> Dict[str, Any]:
    """``adapter_config.json``, parsed and checked: LoRA or DoRA on linear layers only (every unsupported
    setting named), and ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``use_dora``, ``rank_pattern``
    and ``alpha_pattern`` of the right type, finite and in range.

    Raises:
        FileNotFoundError: no config.
        ValueError: naming the file and every bad field.
    """
    path = directory / CONFIG_NAME
    where = f"PEFT adapter config {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"PEFT adapter {str(directory)!r} has no {CONFIG_NAME}")
    config = read_json_object(path)

    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{where} has peft_type {peft_type!r}; only LoRA adapters (peft_type 'LORA') are supported")
    problems = [f"{label} ({field}={config[field]!r})" for field, label in _UNSUPPORTED_FIELDS.items()
                if config.get(field)]
    if config.get("bias", "none") != "none":
        problems.append(f"trained base biases (bias={config['bias']!r})")
    init = config.get("init_lora_weights", True)
    if not any(init is plain or (isinstance(plain, str) and init == plain) for plain in _PLAIN_INITS + _BASE_INITS):
        problems.append(f"init_lora_weights={init!r}, which rewrites the base weights when PEFT loads the adapter "
                        "in a way lora_kernels does not repeat (randomized or data-dependent; convert it to plain "
                        "LoRA with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...) first)")
    if problems:
        raise ValueError(f"{where} uses PEFT features that lora_kernels does not support: " + "; ".join(problems))

    config.setdefault("r", 8)
    config.setdefault("lora_alpha", 8)
    checks = [("r", config["r"], is_rank_value, "an integer >= 1"),
              ("lora_alpha", config["lora_alpha"], is_alpha_value, "a finite number > 0"),
              ("lora_dropout", config.get("lora_dropout") or 0.0, lambda v: is_finite_number(v) and 0 <= v < 1,
               "a number in [0, 1)"),
              ("use_rslora", config.get("use_rslora", False), lambda v: isinstance(v, bool), "true or false"),
              ("use_dora", config.get("use_dora") or False, lambda v: isinstance(v, bool), "true or false")]
    problems += [f"{field} must be {wanted}, got {value!r}" for field, value, test, wanted in checks if not test(value)]
    problems += pattern_problems(config.get("rank_pattern") or {}, config.get("alpha_pattern") or {})
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems[:10]))
    return config


def peft_lora_config(config: Dict[str, Any]) -> LoRAConfig:
    """Our :class:`LoRAConfig` for a (checked) PEFT ``adapter_config.json``, patterns included."""
    return LoRAConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                      dropout=float(config.get("lora_dropout") or 0.0), use_rslora=config.get("use_rslora", False),
                      use_dora=bool(config.get("use_dora") or False),
                      rank_pattern={k: int(v) for k, v in (config.get("rank_pattern") or {}).items()},
                      alpha_pattern={k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()})


def _read_tensors(directory: Path) -> Dict[str, torch.Tensor]:
    safetensors_path, pickle_path = directory / SAFETENSORS_NAME, directory / PICKLE_NAME
    for path in (safetensors_path, pickle_path):
        if path.is_file():
            return check_tensors(read_tensor_file(path)[0], path)
    raise FileNotFoundError(f"PEFT adapter {str(directory)!r} has neither {SAFETENSORS_NAME} nor {PICKLE_NAME}")


def _kind_of_module(module: Optional[nn.Module]) -> Optional[str]:
    """'an embedding' / 'a convolution' for modules whose LoRA we refuse, else None."""
    if isinstance(module, nn.Embedding):
        return "an embedding"
    if isinstance(module, nn.modules.conv._ConvNd) or type(module).__name__ == "Conv1D":
        return f"a convolution ({type(module).__name__})"
    return None


def load_peft_adapter(model: nn.Module, directory: PathLike, backend: str = "auto",
                      freeze_base: bool = True, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Applies a LoRA or DoRA adapter saved by PEFT to a plain model, as :class:`FusedLoRALinear` layers; in place.

    Gives the outputs of ``peft.PeftModel.from_pretrained(model, directory)``: each adapted ``nn.Linear``
    gets the file's A and B, its rank, and its alpha (``lora_alpha`` or the ``alpha_pattern`` entry),
    ``use_rslora`` and ``lora_dropout``; with ``use_dora: true``, a DoRA adapter (``LoRAConfig(use_dora=True)``)
    whose magnitude is the file's ``lora_magnitude_vector``. Layers that are already :class:`FusedLoRALinear`
    get the new A, B (and magnitude), alpha and rsLoRA setting. Everything is checked before anything changes.

    Args:
        model: the base model the adapter was trained on (e.g. a ``transformers`` ``LlamaForCausalLM``:
            the module paths in the file are relative to it).
        directory: a PEFT adapter directory (``adapter_config.json`` and ``adapter_model.safetensors`` or
            ``adapter_model.bin``, the latter read with ``weights_only=True``).
        backend: backend of the new layers (see :func:`lora_kernels.lora_linear`).
        freeze_base: leave only the LoRA parameters (and DoRA magnitudes) trainable, as PEFT does.
        adapter_name: the name to load it under (see :func:`lora_kernels.load_lora`): as PEFT's
            ``load_adapter(directory, adapter_name)``, a new adapter is inactive until
            :func:`lora_kernels.set_adapter`, unless the model had none.

    Returns:
        ``model``.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: an unsupported PEFT feature (embeddings, convolutions, ``fan_in_fan_out``, ..., all
            named), a config field of the wrong type or out of range (``r: "16"``, a NaN alpha, a rank/alpha
            pattern that could make matching hang, ...), non-finite weights, a magnitude without
            ``use_dora: true`` or a DoRA layer without one, a magnitude that is not (out_features,), a layer
            whose adapter ``adapter_name`` is DoRA in the model and not in the file (or the reverse), or
            modules and shapes that do not fit the model (all listed, naming the layers). Nothing is changed
            then.
    """
    check_adapter_name(adapter_name)
    directory = Path(directory)
    config = _read_config(directory)
    raw = _read_tensors(directory)

    modules = dict(model.named_modules())
    tensors, magnitudes, other, refused = {}, {}, [], []
    for key, value in raw.items():
        match = _KEY.fullmatch(key) or _MAGNITUDE_KEY.fullmatch(key)
        if match is None:
            if "lora_embedding_" in key:
                refused.append(f"{key}: LoRA on an embedding")
            else:
                other.append(key)
            continue
        name = match["module"]
        kind = _kind_of_module(modules.get(name))
        if kind is not None or (match.re is _KEY and value.dim() != 2):
            refused.append(f"{name}: LoRA on {kind or f'a convolution (lora weight of shape {tuple(value.shape)})'}")
            continue
        if match.re is _KEY:
            tensors[f"{name}.{match['leaf']}"] = value
        else:
            magnitudes[name] = value
    if refused:
        listed = sorted(set(refused))
        raise ValueError(f"PEFT adapter {str(directory)!r} has LoRA weights lora_kernels does not support "
                         "(only nn.Linear layers): " + "; ".join(listed[:10]))
    if other:
        raise ValueError(f"PEFT adapter {str(directory)!r} has tensors that are not LoRA weights named {PREFIX}"
                         f"<module>.lora_A.weight / .lora_B.weight / .{MAGNITUDE_SUFFIX}: {sorted(other)[:5]}")

    lora_config = peft_lora_config(config)
    layer_meta, mismatched = {}, []
    for key, a in tensors.items():
        name, _, leaf = key.rpartition(".")
        if leaf != "lora_A":
            continue
        layer_config = lora_config.for_module(name)
        if a.shape[0] != layer_config.rank:
            mismatched.append(f"{name}: lora_A has rank {a.shape[0]}, the config says {layer_config.rank}")
        layer_meta[name] = layer_config.layer_settings()
    mismatched += _magnitude_problems(modules, {key.rpartition(".")[0] for key in tensors}, magnitudes,
                                      lora_config.use_dora, adapter_name)
    if mismatched:
        raise ValueError(f"PEFT adapter {str(directory)!r} contradicts its config or the model: "
                         + "; ".join(mismatched[:10]))

    init = config.get("init_lora_weights", True)
    apply_lora_tensors(model, tensors, layer_meta, source=directory, strict=True, backend=backend,
                       adapter_name=adapter_name, init=init if init in _BASE_INITS else None)
    with torch.no_grad():  # checked above: every DoRA layer of the file has its magnitude, of its out_features
        for name, magnitude in magnitudes.items():
            model.get_submodule(name).lora_magnitude_of(adapter_name).copy_(magnitude)
    if freeze_base:
        mark_only_lora_as_trainable(model)
    return model


def _magnitude_problems(modules: Dict[str, nn.Module], lora_layers: set, magnitudes: Dict[str, torch.Tensor],
                        use_dora: bool, adapter: str) -> List[str]:
    """What is wrong with a PEFT file's DoRA magnitudes, one entry per layer: a magnitude without the config's
    ``use_dora`` or without the layer's A and B, a DoRA layer without its magnitude, a magnitude that is not
    (out_features,), or an adapter of the model that the file would turn from LoRA to DoRA (or back)."""
    problems = []
    for name in sorted(set(magnitudes) - lora_layers):
        problems.append(f"{name}: {MAGNITUDE_SUFFIX} without lora_A / lora_B")
    for name in sorted(lora_layers):
        module, magnitude = modules.get(name), magnitudes.get(name)
        if use_dora and magnitude is None:
            problems.append(f"{name}: no {MAGNITUDE_SUFFIX}, but the config has use_dora: true")
        elif not use_dora and magnitude is not None:
            problems.append(f"{name}: a DoRA magnitude ({MAGNITUDE_SUFFIX}), but the config has use_dora: false")
        if magnitude is not None and isinstance(module, (nn.Linear, FusedLoRALinear)) \
                and tuple(magnitude.shape) != (module.out_features,):
            problems.append(f"{name}: {MAGNITUDE_SUFFIX} has shape {tuple(magnitude.shape)}, the layer needs "
                            f"({module.out_features},) (its out_features)")
        if isinstance(module, FusedLoRALinear) and adapter in module.lora_configs \
                and module.lora_configs[adapter].use_dora != use_dora:
            kinds = ("plain LoRA", "DoRA")
            problems.append(f"{name}: adapter {adapter!r} is {kinds[module.lora_configs[adapter].use_dora]} in the "
                            f"model and {kinds[use_dora]} in the file (delete the adapter first to replace it)")
    return problems
