"""Model-level LoRA: swap ``nn.Linear`` layers for :class:`FusedLoRALinear`, freeze, merge, summarise."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from . import quant
from .config import DEFAULT_ADAPTER, LORA_PARAM_NAMES, LoRAConfig
from .init import check_residual_inits
from .modules import FusedLoRALinear

Targets = Union[str, Sequence[str]]


def iter_lora_layers(model: nn.Module) -> Iterator[Tuple[str, FusedLoRALinear]]:
    """Yields ``(module path, layer)`` for every :class:`FusedLoRALinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FusedLoRALinear):
            yield name, module


def _output_head_names(model: nn.Module) -> set:
    """Names of the output head that ``"all-linear"`` leaves alone (PEFT's rule)."""
    heads = set()
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    for name, module in model.named_modules():
        if module is head or name == "lm_head" or name.endswith(".lm_head"):
            heads.add(name)
    return heads


def _name_matches(name: str, targets: Targets) -> bool:
    """List: exact path or a suffix after a dot. String: regular expression matching the whole path."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


# transformers' Conv1D (GPT-2 and its relatives) is a linear layer with the weight stored transposed.
_CONV1D_HINT = (" (transformers' Conv1D, as in GPT-2, stores its weight transposed as (in, out) and is not "
                "supported; convert such layers to nn.Linear with the transposed weight first)")


def find_target_linears(
    model: nn.Module, target_modules: Targets = "square", exclude_modules: Optional[Targets] = None,
    include_lora: bool = False,
) -> List[str]:
    """Paths of the ``nn.Linear`` modules that ``target_modules`` selects (see
    :func:`replace_linear_with_fused_lora`); with ``include_lora``, :class:`FusedLoRALinear` layers count
    as linears too (to add another adapter to them).

    Raises:
        ValueError: a bad ``target_modules`` value, or nothing matched.
        TypeError: a module named explicitly by a list is not an ``nn.Linear`` (e.g. GPT-2's ``Conv1D``).
    """
    if isinstance(target_modules, str) and target_modules in ("square", "all-linear"):
        rule = target_modules
    elif isinstance(target_modules, str) or (
        isinstance(target_modules, (list, tuple, set)) and all(isinstance(t, str) for t in target_modules)
    ):
        rule = "names"
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
            if not target_modules:
                raise ValueError("target_modules is an empty list")
        else:
            try:
                re.compile(target_modules)
            except re.error as err:
                raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {err}")
    else:
        raise ValueError(
            "target_modules must be 'square', 'all-linear', a list of module names or a regex string, "
            f"got {target_modules!r}"
        )
    heads = _output_head_names(model) if rule == "all-linear" else set()

    selected = []
    for name, module in model.named_modules():
        if not name or (exclude_modules is not None and _name_matches(name, exclude_modules)):
            continue
        is_linear = isinstance(module, nn.Linear) or (include_lora and isinstance(module, FusedLoRALinear))
        if rule == "square":
            chosen = is_linear and module.in_features == module.out_features
        elif rule == "all-linear":
            chosen = is_linear and name not in heads
        else:
            chosen = _name_matches(name, target_modules)
            if chosen and not is_linear:
                if isinstance(module, FusedLoRALinear):
                    raise ValueError(f"module {name!r} already has a LoRA adapter")
                if isinstance(target_modules, str) and not list(module.parameters(recurse=False)):
                    continue  # a regex may also match containers; only leaf layers matter
                raise TypeError(
                    f"module {name!r} is a {type(module).__name__}; only nn.Linear layers can take a "
                    "FusedLoRALinear adapter" + (_CONV1D_HINT if type(module).__name__ == "Conv1D" else "")
                )
        if chosen:
            selected.append(name)
    if not selected:
        conv1d = [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear layer in the model"
                         + (f"; its {conv1d[0]!r} and {len(conv1d) - 1} more are Conv1D layers" + _CONV1D_HINT
                            if conv1d else ""))
    return selected


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def replace_linear_with_fused_lora(
    model: nn.Module,
    rank: Optional[int] = None,
    alpha: Optional[float] = None,
    dropout: Optional[float] = None,
    target_modules: Targets = "square",
    exclude_modules: Optional[Targets] = None,
    freeze_base: bool = True,
    backend: str = "auto",
    config: Optional[LoRAConfig] = None,
    rank_pattern: Optional[Dict[str, int]] = None,
    alpha_pattern: Optional[Dict[str, float]] = None,
    adapter_name: str = DEFAULT_ADAPTER,
    **kwargs,
) -> nn.Module:
    """Swaps the selected ``nn.Linear`` children of ``model`` for :class:`FusedLoRALinear`, in place.

    The new layers share the old layers' weights (no copy); the LoRA parameters are created on the same
    device, in the same dtype.

    Args:
        model: any ``nn.Module``.
        rank, alpha, dropout, backend: passed to :meth:`FusedLoRALinear.from_linear` (or all settings as
            one ``config=LoRAConfig(...)``); rank, alpha and dropout left None take :class:`LoRAConfig`'s
            defaults (alpha None: alpha = rank).
        rank_pattern, alpha_pattern: per-layer ranks / alphas, PEFT's rule: a key applies to the module
            paths it matches as ``(.*\\.)?(key)$`` (the path, a suffix after a dot, or a regex), first
            match wins; e.g. ``rank=4, rank_pattern={".*attn.*": 8, ".*mlp.*": 16}``. Added to
            ``config``'s own patterns.
        adapter_name: the name of the new adapters (``"default"``: ``lora_A`` / ``lora_B``).
        target_modules: ``"square"`` (in_features == out_features, MiniMind's rule), ``"all-linear"``
            (every linear except the output head, PEFT's meaning), a list of names (a module's full path,
            or a suffix of it after a dot, e.g. ``["q_proj", "v_proj"]``), or a regular expression string
            that must match a module's whole path.
        exclude_modules: modules to leave alone, given as a list of names or a regex, as above.
        freeze_base: set ``requires_grad=False`` on every parameter of the model except the LoRA ones.
        **kwargs: further :meth:`FusedLoRALinear.from_linear` arguments (``use_rslora``, ``init``, ``use_dora``,
            ``lora_dtype``, ``allow_custom_forward``, ``quantize="nf4"|"int8"``, ``double_quant``: a frozen
            quantized base, each layer quantized as it is built); ``use_rslora``, ``init`` and ``use_dora`` left out take
            :class:`LoRAConfig`'s defaults.

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError / TypeError: see :func:`find_target_linears` and :class:`FusedLoRALinear`; TypeError
            too, naming every selected ``nn.Linear`` subclass that overrides ``forward`` (wrapping it would
            change the model's outputs) unless ``allow_custom_forward=True``. Nothing changes then.
    """
    config = LoRAConfig.resolve(config, rank=rank, alpha=alpha, dropout=dropout,
                                use_rslora=kwargs.pop("use_rslora", None), init=kwargs.pop("init", None),
                                use_dora=kwargs.pop("use_dora", None))
    if rank_pattern or alpha_pattern:
        config = config.replace(rank_pattern={**config.rank_pattern, **(rank_pattern or {})},
                                alpha_pattern={**config.alpha_pattern, **(alpha_pattern or {})})
    names = find_target_linears(model, target_modules, exclude_modules)
    check_residual_inits(model, names, config)
    layers, refused = {}, []
    for name in names:  # every layer is built before the first is attached: a refusal changes nothing
        try:
            layers[name] = FusedLoRALinear.from_linear(model.get_submodule(name), config=config.for_module(name),
                                                       backend=backend, freeze_base=freeze_base,
                                                       adapter_name=adapter_name, **kwargs)
        except TypeError as err:
            refused.append(f"{name}: {err}")
    if refused:
        for layer in layers.values():  # a PiSSA / OLoRA layer built already gives its linear W back
            layer.delete_adapter(adapter_name)
        raise TypeError("cannot adapt " + "; ".join(refused[:10]))
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    if freeze_base:
        mark_only_lora_as_trainable(model)
    return model


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Sets ``requires_grad`` True on LoRA parameters and False on every other parameter; returns model."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.rsplit(".", 1)[-1] in LORA_PARAM_NAMES)
    return model


def _shared_weights(model: nn.Module) -> set:
    """ids of parameters that more than one module holds (tied weights, e.g. lm_head and embed_tokens)."""
    seen: Dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def merge_lora(model: nn.Module, keep_original: bool = True) -> nn.Module:
    """Merges every adapter into its base weight (see :meth:`FusedLoRALinear.merge`); returns model.

    A LoRA layer whose weight is tied to another module's (an adapted ``lm_head`` sharing
    ``embed_tokens.weight``) gets its own merged copy, so the other module is unchanged;
    :func:`unmerge_lora` ties them again.
    """
    shared = _shared_weights(model)
    for _, layer in iter_lora_layers(model):
        if id(layer.weight) in shared:
            layer._untie_weight()
        layer.merge(keep_original=keep_original)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undoes :func:`merge_lora`; returns model."""
    for _, layer in iter_lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, quantize: Optional[str] = None, double_quant: bool = False) -> nn.Module:
    """Replaces every :class:`FusedLoRALinear` by a plain ``nn.Linear`` with the adapter merged into its
    weight (:meth:`FusedLoRALinear.to_linear`), in place; returns model, whose state_dict then has the
    base's keys only.

    A quantized base is dequantized, the adapter added in fp32, and the sum rounded once to the base's
    16-bit dtype. With ``quantize="nf4"`` / ``"int8"`` the merged weight is quantized again instead, into a
    :class:`FusedLoRALinear` with that base and a fresh adapter (B = 0: it computes the base alone, and a
    further QLoRA round can start from it). That rounding is new: each merged weight moves to the nearest
    NF4 value of its block (at most half the widest code gap, 0.152 × the block's absmax) or int8 step
    (at most absmax / 254 of its row), so the re-quantized model is not the merged model exactly.
    """
    for name, layer in list(iter_lora_layers(model)):
        merged = layer.to_linear()
        if quantize is not None:
            # The default adapter's settings as the layer reports them (alpha resolved to a number).
            config = layer._default_config().replace(alpha=layer.alpha)
            merged = FusedLoRALinear.from_linear(merged, config=config, backend=layer.backend,
                                                 lora_dtype=layer.lora_A.dtype, quantize=quantize,
                                                 double_quant=double_quant)
            merged.lora_A.requires_grad_(layer.lora_A.requires_grad)
            merged.lora_B.requires_grad_(layer.lora_B.requires_grad)
        _set_submodule(model, name, merged)
    return model


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it every adapter of ``model`` is off and the model computes its base.

    Raises:
        RuntimeError: a layer is merged (its adapter is inside the weight; unmerge it first).
    """
    named = list(iter_lora_layers(model))
    merged = [name for name, layer in named if layer.merged]
    if merged:
        raise RuntimeError(f"cannot disable merged adapters ({merged[:3]}...); call unmerge_lora(model) first")
    layers = [layer for _, layer in named]
    previous = [layer.lora_enabled for layer in layers]
    for layer in layers:
        layer.lora_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.lora_enabled = enabled


@dataclass(frozen=True)
class LoRASummary:
    """Parameter counts of a model with adapters, and the bytes of its base weights.

    ``total`` counts a quantized base weight by its elements (out·in), as the dense layer it stands for;
    ``weight_bytes`` is what the base weights take (:func:`lora_kernels.quant.weight_bytes`: parameters and
    buffers other than the adapters, quantized codes and scales at their real size).
    """

    trainable: int
    total: int
    lora_layers: int
    weight_bytes: int = 0

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of all parameters."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable: {self.percent:.4f}% || LoRA layers: {self.lora_layers} || "
                f"base weight bytes: {self.weight_bytes:,}")


def lora_summary(model: nn.Module) -> LoRASummary:
    """Counts trainable and total parameters (a shared parameter once), LoRA layers and base weight bytes."""
    params = list(model.parameters())  # parameters() yields a tied parameter once
    layers = [layer for _, layer in iter_lora_layers(model)]
    return LoRASummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        # integer parameters are quantized codes: counted as the weights they stand for
        total=sum(p.numel() for p in params if p.is_floating_point())
        + sum(layer.in_features * layer.out_features for layer in layers if layer.quantize is not None),
        lora_layers=len(layers),
        weight_bytes=quant.weight_bytes(model),
    )
