"""Adapter files: ``save_lora`` / ``load_lora`` in safetensors (or ``.pth`` read with ``weights_only``).

Tensors are named as in :func:`lora_kernels.lora_state_dict` (``<module path>.lora_A`` (rank, in) and
``<module path>.lora_B`` (out, rank)). The safetensors metadata holds ``format = "lora_kernels"``,
``format_version``, ``targets`` (JSON list of module paths) and ``layers`` (JSON object: module path to
``{"rank", "alpha", "use_rslora", "dropout"}``). A ``.pth``/``.pt`` file holds the same as the dict
``{"tensors": {...}, "metadata": {...}}``; a flat dict of tensors (no metadata) is read too, with
alpha = rank.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Tuple, Union

import torch
import torch.nn as nn

from atomic_io import atomic_write  # noqa: F401  (lora_kernels.io.atomic_write: kept importable)

from .modules import FusedLoRALinear
from .replace import _set_submodule, iter_lora_layers, lora_state_dict

FORMAT = "lora_kernels"
FORMAT_VERSION = "1"
PathLike = Union[str, os.PathLike]


def _is_torch_pickle(path: Path) -> bool:
    return path.suffix in (".pth", ".pt", ".bin")


def save_lora(model: nn.Module, path: PathLike) -> None:
    """Writes every :class:`FusedLoRALinear` adapter of ``model`` to ``path``.

    ``.safetensors`` (recommended) or ``.pth``/``.pt``; tensors keep their dtype. Written atomically.

    Raises:
        ValueError: the model has no LoRA layers.
    """
    path = Path(path)
    layers = dict(iter_lora_layers(model))
    if not layers:
        raise ValueError("the model has no FusedLoRALinear layers to save")
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "targets": json.dumps(sorted(layers)),
        "layers": json.dumps({
            name: {"rank": l.rank, "alpha": l.alpha, "use_rslora": l.use_rslora, "dropout": l.dropout}
            for name, l in layers.items()
        }),
    }
    if _is_torch_pickle(path):
        atomic_write(path, lambda tmp: torch.save({"tensors": tensors, "metadata": metadata}, tmp))
    else:
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_lora_file(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Reads an adapter file safely; returns ``(tensors, metadata)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an adapter file this library can read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist")
    if _is_torch_pickle(path):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "tensors" in obj:
            tensors, metadata = obj["tensors"], obj.get("metadata", {})
        else:
            tensors, metadata = obj, {}
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{str(path)!r} does not hold a dict of tensors")
    return tensors, metadata


def _group_by_module(tensors: Dict[str, torch.Tensor], path: PathLike) -> Dict[str, Dict[str, torch.Tensor]]:
    modules: Dict[str, Dict[str, torch.Tensor]] = {}
    bad = []
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ("lora_A", "lora_B"):
            bad.append(key)
            continue
        modules.setdefault(module, {})[leaf] = value
    if bad:
        raise ValueError(f"{str(path)!r} is not a lora_kernels adapter: unexpected keys {bad[:5]}")
    halves = [m for m, t in modules.items() if len(t) != 2]
    if halves:
        raise ValueError(f"{str(path)!r} has lora_A without lora_B (or the reverse) for {halves}")
    return modules


def load_lora(model: nn.Module, path: PathLike, strict: bool = True, backend: str = "auto") -> nn.Module:
    """Loads an adapter file into ``model``, in place; returns ``model``.

    Modules named in the file that are already :class:`FusedLoRALinear` get the file's A and B, and its
    alpha and rsLoRA setting when the file records them; plain ``nn.Linear`` modules are first wrapped (with ``backend``). Everything is checked
    before anything changes, so a failed load leaves the model as it was.

    Args:
        model: the model to adapt.
        path: a file written by :func:`save_lora`.
        strict: also fail when the model has LoRA layers that the file does not name.
        backend: backend of newly created layers.

    Raises:
        FileNotFoundError, ValueError: unreadable file, or names or shapes that do not fit the model (all
            of them listed).
    """
    tensors, metadata = read_lora_file(path)
    layer_meta = json.loads(metadata.get("layers", "{}"))
    return apply_lora_tensors(model, tensors, layer_meta, source=path, strict=strict, backend=backend)


def apply_lora_tensors(
    model: nn.Module,
    tensors: Dict[str, torch.Tensor],
    layer_meta: Dict[str, dict],
    source: PathLike,
    strict: bool = True,
    backend: str = "auto",
) -> nn.Module:
    """The checks and the in-place load behind :func:`load_lora` (also used for PEFT adapters).

    Args:
        tensors: ``{"<module path>.lora_A": A, "<module path>.lora_B": B}``.
        layer_meta: module path to ``{"rank", "alpha", "use_rslora", "dropout"}`` (any may be missing).
        source: the file or directory the tensors came from, for error messages.
        strict, backend: as for :func:`load_lora`.
    """
    modules = _group_by_module(tensors, source)
    available = dict(model.named_modules())

    problems = []
    for name, pair in sorted(modules.items()):
        a, b = pair["lora_A"], pair["lora_B"]
        module = available.get(name)
        if module is None:
            problems.append(f"{name}: no such module in the model")
            continue
        if not isinstance(module, (nn.Linear, FusedLoRALinear)):
            problems.append(f"{name}: is a {type(module).__name__}, not a linear layer")
            continue
        rank = a.shape[0] if a.dim() == 2 else -1
        want_a = (module.rank if isinstance(module, FusedLoRALinear) else rank, module.in_features)
        want_b = (module.out_features, want_a[0])
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(f"{name}: file has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; "
                            f"the model needs {want_a}, {want_b}")
        if isinstance(module, FusedLoRALinear) and module.merged:
            problems.append(f"{name}: the layer is merged; unmerge it before loading an adapter")
    if strict:
        for name, _ in iter_lora_layers(model):
            if name not in modules:
                problems.append(f"{name}: LoRA layer in the model but not in the file (strict=True)")
    if problems:
        listed = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"adapter {str(source)!r} does not fit the model:\n  {listed}")

    for name, pair in modules.items():
        meta = layer_meta.get(name, {})
        module = available[name]
        if not isinstance(module, FusedLoRALinear):
            module = FusedLoRALinear.from_linear(module, rank=pair["lora_A"].shape[0], alpha=meta.get("alpha"),
                                                 dropout=meta.get("dropout", 0.0),
                                                 use_rslora=meta.get("use_rslora", False), backend=backend)
            _set_submodule(model, name, module)
        else:
            if "alpha" in meta:
                module.alpha = float(meta["alpha"])
            if "use_rslora" in meta:
                module.use_rslora = bool(meta["use_rslora"])
        with torch.no_grad():
            module.lora_A.copy_(pair["lora_A"])
            module.lora_B.copy_(pair["lora_B"])
    return model
