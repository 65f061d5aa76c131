"""Named adapters on one base model: add, switch, combine, delete.

A model's :class:`FusedLoRALinear` layers each hold any number of named adapters, each with its own
:class:`LoRAConfig` (a layer may carry different ranks per adapter). :func:`set_adapter` chooses the active
ones on every layer; several active adapters add up (as in PEFT), and switching allocates nothing and
moves no weights. The adapter ``"default"`` is the one that ``lora_A`` / ``lora_B`` hold and that
:func:`lora_kernels.replace_linear_with_fused_lora`, :func:`lora_kernels.load_lora` and friends use when
no name is given.

    replace_linear_with_fused_lora(model, rank=8)                       # adapter "default"
    add_adapter(model, "qa", config=LoRAConfig(rank=16))                 # on the same layers
    load_lora(model, "tr.safetensors", adapter_name="tr")               # from a file
    set_adapter(model, "qa"); set_adapter(model, ["qa", "tr"]); set_adapter(model, [])   # [] = the base alone
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch.nn as nn

from .config import DEFAULT_ADAPTER, LoRAConfig, check_adapter_name
from .modules import FusedLoRALinear
from .replace import (Targets, _set_submodule, find_target_linears, iter_lora_layers,
                      mark_only_lora_as_trainable)


def adapter_names(model: nn.Module) -> List[str]:
    """Every adapter name of the model's LoRA layers, in the order they first appear."""
    names = {}
    for _, layer in iter_lora_layers(model):
        names.update(dict.fromkeys(layer.lora_configs))
    return list(names)


def active_adapters(model: nn.Module) -> List[str]:
    """The active adapters (as :func:`set_adapter` set them), in order."""
    names = {}
    for _, layer in iter_lora_layers(model):
        names.update(dict.fromkeys(layer._active))
    return list(names)


def _unknown(model: nn.Module, name: str) -> ValueError:
    return ValueError(f"no adapter named {name!r} in the model (it has {adapter_names(model)})")


def resolve_adapter_name(model: nn.Module, adapter_name: Optional[str] = None) -> str:
    """``adapter_name`` if the model has it; for None, ``"default"`` if the model has it, else its only adapter.

    Raises:
        ValueError: an unknown name, or None on a model with several adapters and no ``"default"`` (naming them).
    """
    names = adapter_names(model)
    if adapter_name is not None:
        if adapter_name not in names:
            raise _unknown(model, adapter_name)
        return adapter_name
    if DEFAULT_ADAPTER in names or not names:
        return DEFAULT_ADAPTER
    if len(names) == 1:
        return names[0]
    raise ValueError(f"the model has the adapters {names} and none named {DEFAULT_ADAPTER!r}; pass adapter_name")


def _refuse_merged(model: nn.Module, what: str) -> None:
    merged = [name for name, layer in iter_lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"cannot {what} while layers are merged ({merged[:3]}...); call unmerge_lora(model) first")


def add_adapter(
    model: nn.Module,
    name: str,
    target_modules: Optional[Targets] = None,
    config: Optional[LoRAConfig] = None,
    exclude_modules: Optional[Targets] = None,
    backend: str = "auto",
    freeze_base: bool = True,
) -> nn.Module:
    """Adds a new adapter ``name`` to ``model``, in place; returns ``model``.

    The adapter is inactive (call :func:`set_adapter`), unless the model had no adapter yet.

    Args:
        name: letters, digits, ``_`` and ``-``; not already in the model.
        target_modules: as for :func:`lora_kernels.replace_linear_with_fused_lora` (``"square"``,
            ``"all-linear"``, names, a regex), selecting plain linears (wrapped as new LoRA layers) and
            existing LoRA layers (which get one more adapter); None: the model's existing LoRA layers.
        config: the adapter's settings (default ``LoRAConfig()``), with its ``rank_pattern`` /
            ``alpha_pattern`` applied per layer.
        exclude_modules, backend: as for ``replace_linear_with_fused_lora`` (backend of new layers).
        freeze_base: leave only LoRA parameters trainable.

    Raises:
        ValueError: a bad or duplicate name, a bad config or target, or (target_modules None) a model
            without LoRA layers; nothing is changed then. RuntimeError: layers are merged.
    """
    check_adapter_name(name)
    config = LoRAConfig() if config is None else config
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a lora_kernels.LoRAConfig, got {type(config).__name__}")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}; delete_adapter(model, {name!r}) first "
                         "or choose another name")
    _refuse_merged(model, f"add adapter {name!r}")
    if target_modules is None:
        paths = [path for path, _ in iter_lora_layers(model)]
        if not paths:
            raise ValueError(f"add_adapter({name!r}): the model has no LoRA layers; pass target_modules")
    else:
        paths = find_target_linears(model, target_modules, exclude_modules, include_lora=True)
    had_adapters = bool(adapter_names(model))
    active = active_adapters(model) if had_adapters else [name]
    new_layers = {}
    for path in paths:  # plain linears are wrapped first, attached only when all succeeded
        module = model.get_submodule(path)
        if not isinstance(module, FusedLoRALinear):
            layer = FusedLoRALinear.from_linear(module, config=config.for_module(path), backend=backend,
                                                adapter_name=name)
            layer.set_adapter(active, strict=False)
            new_layers[path] = layer
    for path in paths:
        if path in new_layers:
            _set_submodule(model, path, new_layers[path])
        else:
            model.get_submodule(path).add_adapter(name, config.for_module(path))
    if freeze_base:
        mark_only_lora_as_trainable(model)
    return model


def set_adapter(model: nn.Module, name_or_names: Union[str, Sequence[str]]) -> nn.Module:
    """Makes the named adapters the active ones on every LoRA layer; their terms add up (a layer skips the
    ones it does not have). ``[]`` runs the base alone. Allocates nothing and moves no weights; trainability
    is left as it is.

    Raises:
        ValueError: an unknown name (naming it and the model's adapters). RuntimeError: layers are merged.
    """
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    known = adapter_names(model)
    for name in names:
        if name not in known:
            raise _unknown(model, name)
    if names != active_adapters(model):
        _refuse_merged(model, f"switch adapters to {names}")
    for _, layer in iter_lora_layers(model):
        layer.set_adapter(names, strict=False)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Removes adapter ``name`` and frees its parameters. A layer left without adapters becomes the plain
    ``nn.Linear`` it wrapped (the same weight and bias). If the model then has no active adapter but still has
    adapters, the first of them becomes active (as in PEFT).

    Raises:
        ValueError: an unknown name. RuntimeError: layers are merged.
    """
    if name not in adapter_names(model):
        raise _unknown(model, name)
    _refuse_merged(model, f"delete adapter {name!r}")
    for path, layer in list(iter_lora_layers(model)):
        if name not in layer.lora_configs:
            layer.set_adapter([n for n in layer._active if n != name], strict=False)
            continue
        layer.delete_adapter(name)
        if not layer.lora_configs:
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            linear.weight, linear.bias = layer.weight, layer.bias
            linear.train(layer.training)
            _set_submodule(model, path, linear)
    remaining = adapter_names(model)
    if remaining and not [n for n in active_adapters(model) if n in remaining]:
        set_adapter(model, remaining[0])
    return model
