"""The one-line conversion of a live ``peft.PeftModel`` to fused layers: :func:`fuse_peft_model`.

Each PEFT LoRA linear (``peft.tuners.lora.Linear``, and bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``
under it), plain LoRA or DoRA, becomes a :class:`FusedLoRALinear` over the same parameters, with every adapter
under its PEFT name and PEFT's names in the state dict. PEFT's model-level methods, which look for PEFT's own
layer classes, are then routed to our layers (``set_adapter``, ``load_adapter``, ``save_pretrained``,
``merge_and_unload``, ...); loading and saving go through the file format of :mod:`lora_kernels.peft_format`. Needs ``peft``.
"""
from __future__ import annotations

import math
import types
import warnings
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import torch.nn as nn

from . import quant
from .adapters import active_adapters, delete_adapter, set_adapter
from .config import DEFAULT_ADAPTER, LoRAConfig, lora_scaling
from .modules import FusedLoRALinear
from .peft_format import PathLike, load_peft_adapter, save_peft_adapter
from .replace import (_set_submodule, disable_lora, iter_lora_layers, merge_and_unload, merge_lora,
                      unmerge_lora)


def _fusable(module: nn.Module, path: str, lora_linear_cls) -> Tuple[List[str], List[str]]:
    """The adapter names of a PEFT LoRA layer that :func:`fuse_peft_model` can convert, and the problems
    that prevent it (then no names)."""
    kind = type(module).__name__
    bnb_wrapper = type(module).__module__.endswith("lora.bnb") and kind in ("Linear4bit", "Linear8bitLt")
    if type(module) is not lora_linear_cls and not bnb_wrapper:  # GPTQ, AWQ, ..., or other layers
        return [], [f"{path}: a PEFT {kind} layer (LoRA on nn.Linear and on bitsandbytes' Linear4bit "
                    "(NF4) / Linear8bitLt is supported)"]
    adapters = list(module.lora_A.keys())
    if not adapters:
        return [], [f"{path}: a PEFT LoRA layer without adapters"]
    problems = []
    base = module.get_base_layer()
    try:
        bnb = quant.from_bitsandbytes(base)
    except ValueError as err:
        return [], [f"{path}: {err}"]
    if not isinstance(base, nn.Linear):
        problems.append(f"{path}: the base layer is a {type(base).__name__}, not nn.Linear")
    elif type(base).forward is not nn.Linear.forward and bnb is None:
        problems.append(f"{path}: the base layer is a {type(base).__name__}, an nn.Linear subclass with its own "
                        "forward, which a FusedLoRALinear would drop")
    if getattr(module, "fan_in_fan_out", False):
        problems.append(f"{path}: fan_in_fan_out")
    if module.merged:
        problems.append(f"{path}: merged adapter {module.merged_adapters} (call PEFT's unmerge_adapter() first)")
    for adapter in adapters:
        if getattr(module, "lora_bias", {}).get(adapter):
            problems.append(f"{path}: lora_bias (adapter {adapter!r})")
        # DoRA is converted (it is a lora_variant too in newer PEFT); every other variant has its own forward.
        variant = getattr(module, "lora_variant", {}).get(adapter)
        if variant is not None and not module.use_dora.get(adapter):
            problems.append(f"{path}: a LoRA variant other than DoRA ({type(variant).__name__}, "
                            f"adapter {adapter!r})")
    return (adapters if not problems else []), problems


def fuse_peft_model(peft_model: nn.Module, backend: str = "auto") -> nn.Module:
    """Converts the LoRA linears inside a live ``peft.PeftModel`` to :class:`FusedLoRALinear`, in place.

    Each converted layer shares the PEFT layer's parameters (the base weight and bias, the ``lora_A`` /
    ``lora_B`` weights themselves and, for a DoRA adapter (``use_dora=True``), the magnitude
    ``lora_magnitude_vector[adapter].weight`` as its ``lora_magnitude``), so trainability, optimizer state and
    outputs are kept:
    an existing PEFT training loop speeds up with one line. Every adapter of a layer is converted under
    its PEFT name, with its rank, scaling and dropout; the active ones stay active (several add up, as in
    PEFT), and a layer inside PEFT's ``disable_adapter()`` stays off. The converted layers keep PEFT's
    names in the state dict (``<path>.base_layer.weight``, ``<path>.lora_A.<adapter>.weight``,
    ``<path>.lora_magnitude_vector.<adapter>.weight``, ...), so the model's ``state_dict()`` is unchanged.

    On a ``PeftModel`` (and its ``base_model``), PEFT's own methods then act on the converted layers:
    ``set_adapter`` (the active adapter trainable, the others frozen, as in PEFT), ``load_adapter`` (into
    an adapter it has, in place, or as a new one; what ``transformers.Trainer`` calls when it resumes from
    a checkpoint or loads the best one), ``delete_adapter``, ``save_pretrained`` (what ``Trainer`` calls at
    each checkpoint; the files of :func:`save_peft_adapter`), ``merge_adapter`` / ``unmerge_adapter``,
    ``merge_and_unload``, ``unload`` and ``disable_adapter``. PEFT's ``add_adapter`` cannot wrap the
    converted layers and is refused (``RuntimeError``): add adapters before the conversion, or load one with
    ``load_adapter``.

    A base layer quantized by bitsandbytes (``Linear4bit`` with NF4, ``Linear8bitLt``: QLoRA as PEFT and
    transformers' ``load_in_4bit`` / ``load_in_8bit`` build it) becomes a quantized :class:`FusedLoRALinear`
    over the same packed codes and scales (:func:`lora_kernels.quant.from_bitsandbytes`: no requantization);
    its state-dict keys are then the layer's ``weight_data``, ``weight_absmax``, ... (the adapter's keep
    PEFT's names).

    Args:
        peft_model: a ``PeftModel`` (or any module holding PEFT ``lora.Linear`` layers).
        backend: backend of the new layers.

    Returns:
        ``peft_model``.

    Raises:
        ImportError: peft is not installed.
        ValueError: a PEFT LoRA layer cannot be converted (LoRA variants other than DoRA, ``lora_bias``,
            embeddings, convolutions, ``fan_in_fan_out``, merged adapters, ...; all listed). Nothing is
            changed then.
    """
    try:
        from peft.tuners.lora import Linear as PeftLoraLinear, LoraLayer
    except ImportError as err:
        raise ImportError("fuse_peft_model needs peft (pip install peft)") from err

    plan, problems = [], []
    for path, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            adapters, why = _fusable(module, path, PeftLoraLinear)
            problems += why
            if adapters:
                plan.append((path, module, adapters))
    if problems:
        raise ValueError("fuse_peft_model cannot convert these PEFT layers:\n  " + "\n  ".join(problems[:20]))
    if not plan:
        raise ValueError("the model has no PEFT LoRA linear layers to convert")

    stacked_dora = []
    for path, module, adapters in plan:
        layer = _fused_layer(module, adapters, backend)
        _set_submodule(peft_model, path, layer)
        if len(layer.active_adapters) > 1 and any(layer.lora_configs[n].use_dora for n in layer.active_adapters):
            stacked_dora.append(path)
    if stacked_dora:
        warnings.warn(f"fuse_peft_model: {len(stacked_dora)} layers (e.g. {stacked_dora[0]!r}) have several active "
                      "adapters, one of them DoRA: ours add every adapter's term over the base, while PEFT without "
                      "dropout (and in eval) lets each DoRA adapter rescale the output of the adapters before it, "
                      "so outputs differ from PEFT's there; activate one adapter at a time for PEFT's outputs",
                      stacklevel=2)
    if callable(getattr(peft_model, "get_base_model", None)) and isinstance(getattr(peft_model, "peft_config", None),
                                                                          dict):
        _route_peft_methods(peft_model)
    return peft_model


def _layer_config(module: nn.Module, adapter: str) -> LoRAConfig:
    """Our settings for one adapter of a PEFT LoRA layer: its rank, rsLoRA and DoRA flags, dropout, and the
    alpha that gives its scaling (which PEFT's ``set_scale`` / ``scale_layer`` may have changed)."""
    rank, alpha, use_rslora = module.r[adapter], module.lora_alpha[adapter], module.use_rslora[adapter]
    if not math.isclose(lora_scaling(rank, alpha, use_rslora), module.scaling[adapter], rel_tol=1e-12):
        alpha = module.scaling[adapter] / lora_scaling(rank, 1.0, use_rslora)
    dropout = module.lora_dropout[adapter]
    return LoRAConfig(rank=rank, alpha=alpha, use_rslora=use_rslora, use_dora=bool(module.use_dora.get(adapter)),
                      dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0)


def _fused_layer(module: nn.Module, adapters: List[str], backend: str) -> FusedLoRALinear:
    """A :class:`FusedLoRALinear` over a PEFT LoRA layer's own parameters, with its adapters and state."""
    linear = module.get_base_layer()
    # Built around a meta stand-in: no allocation and no draw from the RNG for parameters replaced next.
    stub = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    first, *others = adapters
    layer = FusedLoRALinear.from_linear(stub, config=_layer_config(module, first), backend=backend,
                                        adapter_name=first)
    for adapter in others:
        layer.add_adapter(adapter, _layer_config(module, adapter))
    bnb = quant.from_bitsandbytes(linear)
    if bnb is None:
        layer.weight = linear.weight
    else:  # bitsandbytes' packed codes and scales become the layer's buffers, as they are
        layer.use_quantized(*bnb)
    layer.bias = linear.bias
    for adapter in adapters:
        owner = layer if adapter == DEFAULT_ADAPTER else layer.lora_adapters[adapter]
        owner.lora_A, owner.lora_B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        if layer.lora_configs[adapter].use_dora:  # its magnitude was built on the meta stand-in: PEFT's replaces it
            owner.lora_magnitude = module.lora_magnitude_vector[adapter].weight
    # PEFT's parameter names in the state dict: the model's state_dict() is what it was before the
    # conversion, so PEFT's checkpoints (and Trainer's) keep their keys.
    layer._peft_names = True
    layer.set_adapter(list(module.active_adapters), strict=False)
    layer.lora_enabled = not module.disable_adapters
    layer.train(module.training)
    return layer


def _route_peft_methods(peft_model: nn.Module) -> None:
    """PEFT's model-level LoRA methods look for PEFT's own layer classes and, finding none after
    :func:`fuse_peft_model`, would silently do nothing: return the model unmerged (``merge_and_unload``),
    load no weights (``load_adapter``: a resumed ``Trainer`` run would restart from the untrained adapter),
    save an adapter with no tensors (``save_pretrained``), switch nothing (``set_adapter``). On this model
    (and its ``base_model``) they run on our layers instead."""
    base = peft_model.get_base_model()
    tuner = getattr(peft_model, "base_model", None)

    def merged_and_unloaded(self, *args: Any, **kwargs: Any) -> nn.Module:
        """The base model with every adapter merged into plain ``nn.Linear`` layers (PEFT's names)."""
        return merge_and_unload(base)

    def unloaded(self, *args: Any, **kwargs: Any) -> nn.Module:
        """The base model with the adapters removed: plain ``nn.Linear`` layers sharing the base weights."""
        for name, layer in list(iter_lora_layers(base)):
            if layer._merged:
                layer.unmerge()
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device="meta")
            linear.weight, linear.bias = layer.weight, layer.bias
            _set_submodule(base, name, linear)
        return base

    def set_active(self, adapter_name: Union[str, List[str]], inference_mode: bool = False) -> None:
        """PEFT's ``set_adapter``: the named adapters active and trainable (unless ``inference_mode``),
        every other adapter frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in peft_model.peft_config]
        if unknown:
            raise ValueError(f"Adapter {unknown[0]} not found (the model has {sorted(peft_model.peft_config)})")
        set_adapter(base, names)
        _set_adapters_trainable(base, names, not inference_mode)
        peft_model.active_adapter = adapter_name
        if tuner is not None:
            tuner.active_adapter = adapter_name

    def deleted(self, adapter_name: str) -> None:
        """PEFT's ``delete_adapter``: the adapter's parameters and config are gone."""
        if adapter_name not in peft_model.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        delete_adapter(base, adapter_name)
        del peft_model.peft_config[adapter_name]
        active = active_adapters(base)
        peft_model.active_adapter = active[0] if active else []
        if tuner is not None:
            tuner.active_adapter = active

    def refused_add(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's ``add_adapter`` would inject PEFT layers around ours (and fail half-way): refused first."""
        raise RuntimeError(f"cannot add adapter {adapter_name!r} with PEFT's add_adapter after fuse_peft_model (it "
                           "only wraps PEFT's own layer classes): add it before fuse_peft_model, load a saved one "
                           "with load_adapter(directory, name), or use lora_kernels.add_adapter(model.get_base_model(), "
                           "name, ...)")

    methods = {"merge_and_unload": merged_and_unloaded, "unload": unloaded, "set_adapter": set_active,
               "delete_adapter": deleted, "add_adapter": refused_add,
               "merge_adapter": lambda self, *a, **k: merge_lora(peft_model),
               "unmerge_adapter": lambda self, *a, **k: unmerge_lora(peft_model),
               "disable_adapter": lambda self: disable_lora(peft_model)}
    for owner in (peft_model, tuner):
        if owner is None:
            continue
        for name, fn in methods.items():
            if callable(getattr(owner, name, None)):
                setattr(owner, name, types.MethodType(fn, owner))
    # PeftModel only: the others are PeftModel's own (LoraModel's take other arguments or do not exist).
    peft_model.load_adapter = types.MethodType(_fused_load_adapter, peft_model)
    peft_model.save_pretrained = types.MethodType(_fused_save_pretrained, peft_model)


def _adapter_parameters(layer: FusedLoRALinear, adapter: str) -> List[nn.Parameter]:
    """A, B and (for DoRA) the magnitude of one adapter: what PEFT's ``set_adapter`` makes trainable."""
    magnitude = layer.lora_magnitude_of(adapter)
    return [*layer.lora_params(adapter), *([] if magnitude is None else [magnitude])]


def _set_adapters_trainable(base: nn.Module, names: List[str], trainable: bool) -> None:
    """``requires_grad`` on: the adapters ``names`` (if ``trainable``); off: every other adapter."""
    for _, layer in iter_lora_layers(base):
        for adapter in layer.lora_configs:
            for param in _adapter_parameters(layer, adapter):
                param.requires_grad_(trainable and adapter in names)


def _fused_load_adapter(self, model_id: PathLike, adapter_name: str, is_trainable: bool = False,
                        **kwargs: Any) -> Any:
    """PEFT's ``load_adapter`` for a model converted by :func:`fuse_peft_model`: a local PEFT adapter
    directory read by :func:`load_peft_adapter` (every file checked before anything changes). Into an
    adapter the model has, the weights are copied in place (the parameters an optimizer holds stay the
    same objects; their trainability is kept); a new adapter is added inactive, trainable if
    ``is_trainable`` (as in PEFT). ``is_trainable=False`` puts the model in eval mode, as PEFT does. Hub
    names and PEFT's loading options (``torch_device``, ``low_cpu_mem_usage``, ...) are not supported."""
    from peft import PeftConfig
    from torch.nn.modules.module import _IncompatibleKeys

    directory = Path(model_id)
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(model_id)!r} is not a local PEFT adapter directory (a model converted by "
                                "lora_kernels.fuse_peft_model loads adapters from local directories only)")
    base = self.get_base_model()
    new = adapter_name not in self.peft_config
    if new:
        config = PeftConfig.from_pretrained(str(directory))
        config.inference_mode = not is_trainable
    load_peft_adapter(base, directory, freeze_base=False, adapter_name=adapter_name)
    if new:
        self.peft_config[adapter_name] = config
        for _, layer in iter_lora_layers(base):
            if adapter_name in layer.lora_configs:
                layer._peft_names = True
                for param in _adapter_parameters(layer, adapter_name):
                    param.requires_grad_(is_trainable)
    if not is_trainable:
        self.eval()
    return _IncompatibleKeys([], [])


def _fused_save_pretrained(self, save_directory: PathLike, safe_serialization: bool = True,
                           selected_adapters: Optional[List[str]] = None, is_main_process: bool = True,
                           **kwargs: Any) -> None:
    """PEFT's ``save_pretrained`` for a model converted by :func:`fuse_peft_model`: writes the adapters with
    :func:`save_peft_adapter`, ``"default"`` in ``save_directory`` and every other one in
    ``save_directory/NAME``, as PEFT does (safetensors whatever ``safe_serialization``; other PEFT options
    such as ``state_dict`` are ignored: the weights are read from the layers, as PEFT would)."""
    names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in self.peft_config]
    if unknown:
        raise ValueError(f"this model holds the adapter(s) {list(self.peft_config)}; cannot save {unknown!r}")
    if is_main_process:
        save_peft_adapter(self, save_directory, adapter_names=names)
