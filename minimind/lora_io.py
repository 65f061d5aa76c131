"""MiniMind's own LoRA file format, read into and written from ``FusedLoRALinear`` layers.

MiniMind's ``save_lora`` writes a flat state_dict (``torch.save``) with, for each adapted linear
``<module path>``:

* ``<module path>.lora.A.weight``: A, (rank, in_features)
* ``<module path>.lora.B.weight``: B, (out_features, rank)

and its LoRA has no scaling: ``y = W x + B (A x)``. So a MiniMind adapter is a ``FusedLoRALinear``
with ``alpha = rank`` (scaling 1); when saving an adapter trained with another scaling, the scaling
is folded into B so MiniMind computes the same output.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from atomic_io import atomic_write, read_tensor_file
from lora_kernels import LoRAConfig, iter_lora_layers, load_peft_adapter
from lora_kernels.adapters import resolve_adapter_name
from lora_kernels.config import DEFAULT_ADAPTER
from lora_kernels.fsdp import check_not_sharded
from lora_kernels.io import FORMAT, PEFT_FORMAT, apply_adapter_file, apply_lora_tensors, check_tensors, read_adapter

from .checkpoint import strip_wrapper_prefix

PathLike = Union[str, os.PathLike]
_KEY = re.compile(r"^(?P<module>.+)\.lora\.(?P<half>[AB])\.weight$")


def read_minimind_lora(path: PathLike) -> Dict[str, Dict[str, torch.Tensor]]:
    """Read a MiniMind LoRA file into ``{module path: {"A": (r, in), "B": (out, r)}}``.

    Args:
        path: ``.pth`` (read with ``weights_only=True``) or ``.safetensors``.

    Returns:
        The tensors grouped by module.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable file, non-finite values, keys that are not MiniMind LoRA keys, or an A
            without its B (all listed).
    """
    return minimind_modules(check_tensors(read_tensor_file(path)[0], path), path)


def minimind_modules(tensors: Dict[str, torch.Tensor], path: PathLike) -> Dict[str, Dict[str, torch.Tensor]]:
    """A MiniMind LoRA file's tensors (already read and checked finite) grouped as
    ``{module path: {"A": (r, in), "B": (out, r)}}``; ``path`` names the file in errors.

    Raises:
        ValueError: keys that are not MiniMind LoRA keys, or an A without its B (all listed).
    """
    modules: Dict[str, Dict[str, torch.Tensor]] = {}
    bad = []
    for key, value in tensors.items():
        m = _KEY.match(strip_wrapper_prefix(key))
        if m is None or value.dim() != 2:
            bad.append(key)
            continue
        modules.setdefault(m["module"], {})[m["half"]] = value
    unpaired = [name for name, t in modules.items() if len(t) != 2]
    if bad or unpaired:
        raise ValueError(
            f"{str(path)!r} is not a MiniMind LoRA file (keys '<module>.lora.A.weight' / '<module>.lora.B.weight', 2-D): "
            + "; ".join(p for p in (f"unexpected keys {bad[:8]}" if bad else "",
                                     f"A without B or B without A for {unpaired[:8]}" if unpaired else "") if p)
        )
    return modules


def load_minimind_lora(model: nn.Module, path: PathLike, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Put the adapters of a MiniMind LoRA file on ``model`` as adapter ``adapter_name``, in place.

    Each module the file names must be a linear layer. A plain ``nn.Linear`` is replaced by
    ``FusedLoRALinear.from_linear(linear, rank=r)`` sharing its weight; an existing ``FusedLoRALinear``
    of the same rank gets the file's adapter instead of its own. Either way alpha = rank, so scaling 1
    as in MiniMind, and A and B are cast to the layer's dtype and device. Everything is checked before
    anything changes (by ``lora_kernels.io.apply_lora_tensors``, which ``lora_kernels.load_lora`` uses
    too), so a failed load leaves the model as it was.

    Args:
        model: e.g. a ``MiniMindForCausalLM``.
        path: a file written by MiniMind's ``save_lora`` or by ``save_minimind_lora``.
        adapter_name: the name to load it under (see ``lora_kernels.load_lora``).

    Returns:
        ``model``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: listing every module that does not exist, is not a linear layer or does not fit
            the file's shapes.
    """
    return _apply_minimind(model, read_minimind_lora(path), path, adapter_name)


def _apply_minimind(model: nn.Module, modules: Dict[str, Dict[str, torch.Tensor]], path: PathLike,
                    adapter_name: str) -> nn.Module:
    tensors = {f"{name}.lora_{half}": pair[half] for name, pair in modules.items() for half in ("A", "B")}
    # MiniMind's LoRA is unscaled: alpha = rank. Dropout is left out: a loaded layer keeps its own.
    meta = {name: {k: v for k, v in LoRAConfig(rank=pair["A"].shape[0]).layer_settings().items() if k != "dropout"}
            for name, pair in modules.items()}
    return apply_lora_tensors(model, tensors, meta, source=path, strict=False, adapter_name=adapter_name)


def save_minimind_lora(model: nn.Module, path: PathLike, adapter_name: Optional[str] = None) -> None:
    """Write one adapter of ``model``'s ``FusedLoRALinear`` layers in MiniMind's LoRA format, in fp16.

    Keys are ``<module path>.lora.A.weight`` / ``.lora.B.weight``; B is multiplied by the layer's
    scaling when it is not 1, since MiniMind's LoRA is unscaled. MiniMind's own ``load_lora`` reads
    the file (it adapts only square linears, so adapters on other layers are ignored there).
    ``.safetensors`` writes safetensors, any other suffix ``torch.save``. Written atomically.

    Args:
        model: a model with ``FusedLoRALinear`` layers.
        path: destination file.
        adapter_name: which adapter; None: ``"default"``, or the model's only adapter.

    Raises:
        ValueError: the model has no ``FusedLoRALinear`` layer or no such adapter, one is merged into its
            weight, or the adapter is DoRA (MiniMind's format has no magnitude: ``lora_kernels.save_lora``
            writes it).
    """
    tensors: Dict[str, torch.Tensor] = {}
    if any(True for _ in iter_lora_layers(model)):
        adapter_name = resolve_adapter_name(model, adapter_name)
    for name, layer in iter_lora_layers(model):
        if adapter_name not in layer.lora_configs:
            continue
        if layer.merged:
            raise ValueError(f"{name}: the adapter is merged into the weight; unmerge it before saving")
        if layer.lora_configs[adapter_name].use_dora:
            raise ValueError(f"{name}: adapter {adapter_name!r} is DoRA (use_dora), and MiniMind's LoRA format has no "
                             "magnitude; save it with lora_kernels.save_lora (.safetensors)")
        name = strip_wrapper_prefix(name)
        lora_A, lora_B = layer.lora_params(adapter_name)
        scaling = layer.lora_configs[adapter_name].scaling
        b = lora_B.detach().float()
        if scaling != 1.0:
            b = b * scaling
        tensors[f"{name}.lora.A.weight"] = lora_A.detach().to("cpu", torch.float16).contiguous()
        tensors[f"{name}.lora.B.weight"] = b.to("cpu", torch.float16).contiguous()
    if not tensors:
        raise ValueError("the model has no FusedLoRALinear layers to save")
    check_not_sharded(tensors, f"save_minimind_lora({str(path)!r})")
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(tensors, tmp))
    else:
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def load_adapter(model: nn.Module, path: PathLike, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Applies an adapter in any format this project reads, told apart by its content, as ``adapter_name``.

    The file is read once (``lora_kernels.io.read_adapter``), which says its format:

    * a directory with ``adapter_config.json``: a HF PEFT adapter (``lora_kernels.load_peft_adapter``);
    * a file whose metadata says ``format: lora_kernels``: as ``lora_kernels.load_lora``;
    * any other ``.pth``/``.safetensors``: MiniMind's format (as :func:`load_minimind_lora`).

    Raises:
        FileNotFoundError, ValueError: as the loader it picks.
    """
    path = Path(path)
    adapter = read_adapter(path)
    if adapter.format == PEFT_FORMAT:
        return load_peft_adapter(model, path, freeze_base=False, adapter_name=adapter_name)
    if adapter.format == FORMAT:
        return apply_adapter_file(model, adapter, adapter_name=adapter_name)
    return _apply_minimind(model, minimind_modules(adapter.tensors, path), path, adapter_name)
