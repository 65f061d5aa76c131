"""Named adapters on one base model: add, switch, combine, delete; one adapter per batch row
(:func:`mixed_adapters`); one adapter's weights (:func:`lora_state_dict`).

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
    with mixed_adapters(model, ["qa", None, "tr"]): model(x)            # row i with adapter names[i]

Each call takes one snapshot of the model's LoRA layers (``list(iter_lora_layers(model))``) and hands it to
the helpers below, so a model is walked once per call, not once per check.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .config import DEFAULT_ADAPTER, LoRAConfig, check_adapter_name
from .init import check_residual_inits
from .mixed import takes_segments
from .modules import FusedLoRALinear
from .pool import Slots
from .replace import (Targets, _set_submodule, find_target_linears, iter_lora_layers,
                      mark_only_lora_as_trainable)


# A snapshot of a model's LoRA layers: ``list(iter_lora_layers(model))``, (module path, layer) in module order.
LoRALayers = List[Tuple[str, FusedLoRALinear]]


def _names_in(layers: LoRALayers) -> List[str]:
    names = {}
    for _, layer in layers:
        names.update(dict.fromkeys(layer.lora_configs))
    return list(names)


def _active_in(layers: LoRALayers) -> List[str]:
    names = {}
    for _, layer in layers:
        names.update(dict.fromkeys(layer._active))
    return list(names)


def _unknown(name: str, known: List[str]) -> ValueError:
    return ValueError(f"no adapter named {name!r} in the model (it has {known})")


def _resolve_name(known: List[str], adapter_name: Optional[str]) -> str:
    if adapter_name is not None:
        if adapter_name not in known:
            raise _unknown(adapter_name, known)
        return adapter_name
    if DEFAULT_ADAPTER in known or not known:
        return DEFAULT_ADAPTER
    if len(known) == 1:
        return known[0]
    raise ValueError(f"the model has the adapters {known} and none named {DEFAULT_ADAPTER!r}; pass adapter_name")


def _refuse_merged(layers: LoRALayers, what: str) -> None:
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(f"cannot {what} while layers are merged ({merged[:3]}...); call unmerge_lora(model) first")


def adapter_names(model: nn.Module) -> List[str]:
    """Every adapter name of the model's LoRA layers, in the order they first appear."""
    return _names_in(list(iter_lora_layers(model)))


def active_adapters(model: nn.Module) -> List[str]:
    """The active adapters (as :func:`set_adapter` set them), in order."""
    return _active_in(list(iter_lora_layers(model)))


def resolve_adapter_name(model: nn.Module, adapter_name: Optional[str] = None) -> str:
    """``adapter_name`` if the model has it; for None, ``"default"`` if the model has it, else its only adapter.

    Raises:
        ValueError: an unknown name, or None on a model with several adapters and no ``"default"`` (naming them).
    """
    return _resolve_name(adapter_names(model), adapter_name)


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
        config: the adapter's settings (None: ``LoRAConfig()``, its defaults), with its ``rank_pattern`` /
            ``alpha_pattern`` applied per layer.
        exclude_modules, backend: as for ``replace_linear_with_fused_lora`` (backend of new layers).
        freeze_base: leave only LoRA parameters trainable.

    Raises:
        ValueError: a bad or duplicate name, a bad config or target, or (target_modules None) a model
            without LoRA layers; nothing is changed then. RuntimeError: layers are merged.
    """
    check_adapter_name(name)
    config = LoRAConfig.resolve(config)
    layers = list(iter_lora_layers(model))
    known = _names_in(layers)
    if name in known:
        raise ValueError(f"the model already has an adapter named {name!r}; delete_adapter(model, {name!r}) first "
                         "or choose another name")
    _refuse_merged(layers, f"add adapter {name!r}")
    if target_modules is None:
        paths = [path for path, _ in layers]
        if not paths:
            raise ValueError(f"add_adapter({name!r}): the model has no LoRA layers; pass target_modules")
    else:
        paths = find_target_linears(model, target_modules, exclude_modules, include_lora=True)
    check_residual_inits(model, paths, config)
    active = _active_in(layers) if known else [name]
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


def _switch(layers: LoRALayers, names: List[str]) -> None:
    """set_adapter on a snapshot: the checks, then every layer."""
    known = _names_in(layers)
    for name in names:
        if name not in known:
            raise _unknown(name, known)
    if names != _active_in(layers):
        _refuse_merged(layers, f"switch adapters to {names}")
    for _, layer in layers:
        layer.set_adapter(names, strict=False)


def set_adapter(model: nn.Module, name_or_names: Union[str, Sequence[str]]) -> nn.Module:
    """Makes the named adapters the active ones on every LoRA layer; their terms add up (a layer skips the
    ones it does not have). ``[]`` runs the base alone. Allocates nothing and moves no weights; trainability
    is left as it is.

    Raises:
        ValueError: an unknown name (naming it and the model's adapters). RuntimeError: layers are merged.
    """
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    _switch(list(iter_lora_layers(model)), names)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Removes adapter ``name`` and frees its parameters. A layer left without adapters becomes the plain
    ``nn.Linear`` it wrapped (the same weight and bias). If the model then has no active adapter but still has
    adapters, the first of them becomes active (as in PEFT).

    Raises:
        ValueError: an unknown name. RuntimeError: layers are merged.
    """
    layers = list(iter_lora_layers(model))
    known = _names_in(layers)
    if name not in known:
        raise _unknown(name, known)
    _refuse_merged(layers, f"delete adapter {name!r}")
    kept = []  # the LoRA layers still in the model afterwards
    for path, layer in layers:
        if name not in layer.lora_configs:
            layer.set_adapter([n for n in layer._active if n != name], strict=False)
            kept.append((path, layer))
            continue
        layer.delete_adapter(name)
        if not layer.lora_configs:
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            linear.weight, linear.bias = layer.weight, layer.bias
            linear.train(layer.training)
            _set_submodule(model, path, linear)
        else:
            kept.append((path, layer))
    remaining = _names_in(kept)
    if remaining and not [n for n in _active_in(kept) if n in remaining]:
        _switch(kept, [remaining[0]])
    return model


def lora_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """One adapter's weights: ``{"<module path>.lora_A": A, "<module path>.lora_B": B}``, detached, for
    every layer that has it, and ``"<module path>.lora_magnitude": m`` (out_features,) where the adapter is
    DoRA. ``adapter_name=None``: ``"default"``, or the model's only adapter (see
    :func:`resolve_adapter_name`)."""
    state = {}
    layers = list(iter_lora_layers(model))
    if not layers:
        return state
    adapter_name = _resolve_name(_names_in(layers), adapter_name)
    for name, layer in layers:
        if adapter_name in layer.lora_configs:
            prefix = f"{name}." if name else ""
            lora_A, lora_B = layer.lora_params(adapter_name)
            state[prefix + "lora_A"] = lora_A.detach()
            state[prefix + "lora_B"] = lora_B.detach()
            magnitude = layer.lora_magnitude_of(adapter_name)
            if magnitude is not None:
                state[prefix + "lora_magnitude"] = magnitude.detach()
    return state


# ---------------------------------------------------------------------------------------------------
# Mixed batches: one adapter per row (the op itself is lora_kernels.mixed.lora_linear_mixed)


class _MixedRows:
    """What a layer needs inside :func:`mixed_adapters`: its path, the per-row names, and per device the
    layer's own (adapter names, row index, where they sit in its pool) so that repeated calls copy nothing."""

    def __init__(self, path: str, names: Tuple[Optional[str], ...]):
        self.path, self.names = path, names
        self._cache = {}

    def rows_for(self, layer, device: torch.device) -> Tuple[List[str], torch.Tensor, Tuple[int, ...]]:
        """(the adapters this layer has that some row uses, each row's index into them (-1: none) on
        ``device``, the same indices on the host)."""
        key = (device, tuple(layer.lora_configs))
        cached = self._cache.get(key)
        if cached is None:
            # Only the adapters this layer has and some row uses; a row whose adapter the layer lacks runs the
            # base here, as set_adapter skips adapters a layer does not have.
            used = [name for name in layer.lora_configs if name in self.names]
            position = {name: a for a, name in enumerate(used)}
            host = tuple(position.get(name, -1) for name in self.names)
            index = torch.tensor(host, dtype=torch.int64, device=device)
            cached = self._cache[key] = (used, index, host)
        return cached

    def terms_for(self, layer, used: List[str]) -> list:
        """The layer's :class:`lora_kernels.AdapterTerm` of each adapter in ``used``, built once per context
        (64 adapters rebuilt per layer per decoding step cost more than the step's LoRA maths)."""
        key = ("terms", tuple(used))
        terms = self._cache.get(key)
        if terms is None:
            terms = self._cache[key] = [layer._adapter_term(name) for name in used]
        return terms

    @torch.compiler.disable
    def store_for(self, layer, used: List[str], terms, host: Tuple[int, ...]) -> Optional[Slots]:
        """Where ``used`` sit in the layer's adapter pool (placed there once per context), or None when the
        segmented path is not predicted to pay or the parameters cannot be pooled."""
        key = ("store", tuple(used))
        if key not in self._cache:
            self._cache[key] = layer.pooled(used) if terms and takes_segments(terms, host) else None
        return self._cache[key]


@contextlib.contextmanager
def mixed_adapters(model: nn.Module, names: Sequence[Optional[str]]) -> Iterator[nn.Module]:
    """Runs each row of a batch with its own adapter: ``with mixed_adapters(model, names): model(x)``.

    Inside the ``with``, every :class:`lora_kernels.FusedLoRALinear` of ``model`` computes the base once for
    the whole batch plus, for each row i (the leading dimension of the layer's input), the term of adapter
    ``names[i]`` with its own rank, scaling and dropout (see :mod:`lora_kernels.mixed`). Works in training
    (each adapter's ``lora_A`` / ``lora_B`` get gradients from their own rows only) and in eval / no_grad.
    Leaving the context restores the adapters that were active before. Backward may run after the context
    (the Function keeps what it needs), except with activation checkpointing, whose recomputation runs in
    backward: call ``backward()`` inside the ``with`` then.

    Args:
        model: a model with LoRA layers (named adapters, :func:`lora_kernels.add_adapter`).
        names: one entry per row: an adapter name of the model, or None for the base alone.

    Yields:
        ``model``.

    Raises:
        TypeError: an entry is neither a string nor None.
        ValueError: an unknown adapter name (naming it and the model's adapters), or a model without LoRA
            layers; inside the context, a layer whose input's leading size is not ``len(names)``.
        RuntimeError: layers are merged, or the model is already inside a ``mixed_adapters`` context.
    """
    if isinstance(names, str):
        raise TypeError(f"names must be a sequence with one adapter name (or None) per row, got the string {names!r}")
    names = tuple(names)
    layers = list(iter_lora_layers(model))
    known = _names_in(layers)
    for i, name in enumerate(names):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"names[{i}] must be an adapter name or None, got {type(name).__name__} {name!r}")
        if name is not None and name not in known:
            raise _unknown(name, known)
    if not layers:
        raise ValueError("mixed_adapters: the model has no LoRA layers")
    inside = [path for path, layer in layers if layer._mixed is not None]
    if inside:
        raise RuntimeError(f"mixed_adapters contexts do not nest: layer {inside[0]!r} is already running a mixed "
                           "batch; leave that context first")
    _refuse_merged(layers, "run a mixed batch")
    before = [(layer, layer._active) for _, layer in layers]
    for path, layer in layers:
        layer._mixed = _MixedRows(path, names)
    try:
        yield model
    finally:
        for layer, active in before:
            layer._mixed = None
            layer.unpool()
            layer.set_adapter([name for name in active if name in layer.lora_configs], strict=False)
