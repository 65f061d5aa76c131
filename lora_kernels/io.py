"""Adapter files: ``save_lora`` / ``load_lora`` in safetensors (or ``.pth`` read with ``weights_only``).

Tensors are named as in :func:`lora_kernels.lora_state_dict` (``<module path>.lora_A`` (rank, in) and
``<module path>.lora_B`` (out, rank), and for a DoRA adapter ``<module path>.lora_magnitude`` (out,), the
trained magnitude m). The safetensors metadata holds ``format = "lora_kernels"``, ``format_version``,
``targets`` (JSON list of module paths) and ``layers`` (JSON object: module path to ``{"rank", "alpha",
"use_rslora", "dropout"}``, plus ``"use_dora": true`` for a DoRA layer: :meth:`LoRAConfig.layer_settings`).
A layer's magnitude and its ``use_dora`` go together: a file with one and not the other is refused. One file
holds one adapter (``adapter_name`` chooses which, on saving and loading). A ``.pth``/``.pt`` file holds the same as the dict
``{"tensors": {...}, "metadata": {...}}``; a flat dict of tensors (no metadata) is read too, with
alpha = rank.

Every reader here checks the whole file (names, shapes, finite values, typed and range-checked metadata)
before it changes the model, and names the file and the field in its errors. :func:`read_adapter` is the one
reader that tells the adapter formats apart (ours, MiniMind's, PEFT's folder), opening a file once;
:func:`load_lora` and ``minimind.lora_io.load_adapter`` go through it. The generic file readers
(``read_tensor_file``, ``read_json_object``, the read errors) live in the root module ``atomic_io``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

# The generic readers live in atomic_io (minimind uses them too); their old names here stay importable.
from atomic_io import (READ_ERRORS, SAFETENSORS_ERRORS, atomic_write, file_error_reason,  # noqa: F401
                       read_json_object, read_tensor_file)

from .adapters import active_adapters, adapter_names, lora_state_dict, resolve_adapter_name, set_adapter
from .config import DEFAULT_ADAPTER, LoRAConfig, check_adapter_name, is_finite_number
from .fsdp import check_not_sharded
from .init import converted_adapters, residual_init_problem
from .modules import FusedLoRALinear
from .replace import _set_submodule, iter_lora_layers

# The formats read_adapter tells apart: ours (its metadata says FORMAT), MiniMind's, PEFT's (a folder).
FORMAT = "lora_kernels"
FORMAT_VERSION = "1"
MINIMIND_FORMAT = "minimind"
PEFT_FORMAT = "peft"
PathLike = Union[str, os.PathLike]


def _is_torch_pickle(path: Path) -> bool:
    return path.suffix in (".pth", ".pt", ".bin")


def save_lora(model: nn.Module, path: PathLike, adapter_name: Optional[str] = None,
              convert_to_lora: bool = True) -> None:
    """Writes one adapter of ``model``'s :class:`FusedLoRALinear` layers to ``path``.

    ``.safetensors`` (recommended) or ``.pth``/``.pt``; tensors keep their dtype. Written atomically.

    Args:
        adapter_name: which adapter; None: ``"default"``, or the model's only adapter.
        convert_to_lora: layers whose adapter was initialised by PiSSA / OLoRA (their base holds the
            residual) are written as the plain LoRA of rank 2r that gives the same layer on the *original*
            base (:mod:`lora_kernels.init`), so the file loads onto the model the adapter was made from.
            False: A and B as they are, a file only for a base that holds the residual.

    Raises:
        ValueError: the model has no LoRA layers, no adapter of that name, or several and no name given; a
            PiSSA / OLoRA layer that no longer holds its initial A0, B0 (with ``convert_to_lora``).
    """
    path = Path(path)
    if not any(True for _ in iter_lora_layers(model)):
        raise ValueError("the model has no FusedLoRALinear layers to save")
    adapter_name = resolve_adapter_name(model, adapter_name)
    layers = {name: layer for name, layer in iter_lora_layers(model) if adapter_name in layer.lora_configs}
    state = lora_state_dict(model, adapter_name)
    configs = {name: layer.lora_configs[adapter_name] for name, layer in layers.items()}
    if convert_to_lora:
        for name, (config, lora_A, lora_B) in converted_adapters(layers, adapter_name).items():
            prefix = f"{name}." if name else ""
            configs[name], state[prefix + "lora_A"], state[prefix + "lora_B"] = config, lora_A, lora_B
    check_not_sharded(state, f"save_lora({str(path)!r})")
    tensors = {k: v.contiguous().cpu() for k, v in state.items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "targets": json.dumps(sorted(layers)),
        "layers": json.dumps({name: config.layer_settings() for name, config in configs.items()}),
    }
    if _is_torch_pickle(path):
        atomic_write(path, lambda tmp: torch.save({"tensors": tensors, "metadata": metadata}, tmp))
    else:
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def check_tensors(tensors: Any, path: PathLike) -> Dict[str, torch.Tensor]:
    """``tensors`` if it is a dict of finite floating-point tensors with string keys.

    Raises:
        ValueError: naming the file and the offending key.
    """
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError(f"{str(path)!r} does not hold a non-empty dict of tensors, got {type(tensors).__name__}")
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{str(path)!r}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        if not value.is_floating_point():
            raise ValueError(f"{str(path)!r}: tensor {key!r} has dtype {value.dtype}, expected floating point")
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{str(path)!r}: tensor {key!r} has {bad} non-finite values (NaN or inf); "
                             "the adapter is damaged (a diverged training?)")
    return tensors


def read_lora_file(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Reads an adapter file safely; returns ``(tensors, metadata)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an adapter file this library can read, or holds non-finite values.
    """
    obj, metadata = read_tensor_file(path)
    if isinstance(obj, dict) and "tensors" in obj:
        tensors, metadata = obj["tensors"], obj.get("metadata", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"{str(path)!r}: 'metadata' must be a dict of strings, got {metadata!r:.80}")
    else:
        tensors = obj
    return check_tensors(tensors, path), metadata


def _layer_metadata(metadata: Dict[str, str], path: PathLike) -> Dict[str, dict]:
    """The ``layers`` field of a lora_kernels file's metadata, parsed (checked by apply_lora_tensors)."""
    if metadata.get("format") == FORMAT and metadata.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r}: metadata field 'format_version' is {metadata['format_version']!r}; "
                         f"this version of lora_kernels reads version {FORMAT_VERSION!r}")
    try:
        layers = json.loads(metadata.get("layers", "{}"))
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: metadata field 'layers' is not valid JSON ({err})") from None
    if not isinstance(layers, dict):
        raise ValueError(f"{str(path)!r}: metadata field 'layers' must be a JSON object (module path -> settings), "
                         f"got a {type(layers).__name__}")
    return layers


def check_layer_settings(settings: Any, rank: int) -> List[str]:
    """Problems with one layer's ``{"rank", "alpha", "use_rslora", "dropout", "use_dora"}`` (any may be
    missing), each naming the field and the value; ``rank`` is the rank of the layer's lora_A."""
    if not isinstance(settings, dict):
        return [f"settings must be an object with rank/alpha/use_rslora/dropout, got {settings!r:.80}"]
    problems = []
    if "rank" in settings and (not is_finite_number(settings["rank"]) or settings["rank"] != rank):
        problems.append(f"rank must be the integer {rank} (the rank of lora_A), got {settings['rank']!r}")
    if "alpha" in settings and not (is_finite_number(settings["alpha"]) and settings["alpha"] > 0):
        problems.append(f"alpha must be a finite number > 0, got {settings['alpha']!r}")
    if "use_rslora" in settings and not isinstance(settings["use_rslora"], bool):
        problems.append(f"use_rslora must be true or false, got {settings['use_rslora']!r}")
    if "dropout" in settings and not (is_finite_number(settings["dropout"]) and 0 <= settings["dropout"] < 1):
        problems.append(f"dropout must be a number in [0, 1), got {settings['dropout']!r}")
    if "use_dora" in settings and not isinstance(settings["use_dora"], bool):
        problems.append(f"use_dora must be true or false, got {settings['use_dora']!r}")
    return problems


def _has_minimind_keys(keys) -> bool:
    return any(k.endswith((".lora.A.weight", ".lora.B.weight")) for k in keys)


def _format_hint(keys) -> str:
    """Where a file in another adapter format goes, judged from its keys ('' when they look like none)."""
    if _has_minimind_keys(keys):
        return ("; its keys are MiniMind's ('<module>.lora.A.weight'): load it with "
                "minimind.lora_io.load_minimind_lora(model, path)")
    if any(".lora_A." in k or ".lora_B." in k or ".lora_embedding_" in k or ".lora_magnitude_vector" in k
           for k in keys):
        return ("; its keys are PEFT's ('<module>.lora_A.weight'): load the adapter's directory with "
                "lora_kernels.load_peft_adapter(model, directory)")
    return ""


# The tensors of one layer's adapter in our files (lora_magnitude only for DoRA).
ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_magnitude")


def _group_by_module(tensors: Dict[str, torch.Tensor], path: PathLike) -> Dict[str, Dict[str, torch.Tensor]]:
    modules: Dict[str, Dict[str, torch.Tensor]] = {}
    bad = []
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ADAPTER_TENSORS:
            bad.append(key)
            continue
        modules.setdefault(module, {})[leaf] = value
    if bad:
        raise ValueError(f"{str(path)!r} is not a lora_kernels adapter: unexpected keys {bad[:5]}{_format_hint(bad)}")
    halves = [m for m, t in modules.items() if "lora_A" not in t or "lora_B" not in t]
    if halves:
        raise ValueError(f"{str(path)!r} has lora_A without lora_B (or the reverse, or a lora_magnitude alone) "
                         f"for {halves}")
    return modules


# ---------------------------------------------------------------------------------------------------
# One reader for every adapter format


@dataclass(frozen=True)
class AdapterFile:
    """An adapter read from disk once (by :func:`read_adapter`), with the format it is in.

    Attributes:
        path: the file or folder.
        format: ``FORMAT`` (``"lora_kernels"``: a :func:`save_lora` file, whose metadata says so),
            ``MINIMIND_FORMAT`` (``"minimind"``: MiniMind's keys ``<module>.lora.A.weight``, no metadata; read
            by ``minimind.lora_io``), ``PEFT_FORMAT`` (``"peft"``: a folder in PEFT's layout, whose files
            :func:`lora_kernels.load_peft_adapter` reads and checks; nothing is read here), or None (a tensor
            file of none of these, e.g. a flat dict of ``<module>.lora_A`` tensors, which :func:`load_lora`
            reads with alpha = rank).
        tensors: the file's tensors, all finite floating point (``{}`` for a folder).
        metadata: the safetensors metadata, or a ``.pth`` file's ``"metadata"`` dict (``{}`` when none).
        layers: the metadata's ``layers`` field parsed (module path -> ``{"rank", "alpha", "use_rslora",
            "dropout"}`` and ``"use_dora"`` for DoRA), its format version checked; ``{}`` when the file has none
            (or is MiniMind's).
    """

    path: PathLike
    format: Optional[str]
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    metadata: Dict[str, str] = field(default_factory=dict)
    layers: Dict[str, dict] = field(default_factory=dict, repr=False)

    def modules(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The tensors as ``{module path: {"lora_A": A, "lora_B": B}}`` (our key names), with
        ``"lora_magnitude": m`` for a DoRA layer.

        Raises:
            ValueError: a key that is not ``<module>.lora_A`` / ``.lora_B`` / ``.lora_magnitude`` (saying which
                format it looks like), or a lora_A without its lora_B.
        """
        return _group_by_module(self.tensors, self.path)

    def layer_config(self, module: str, rank: int) -> LoRAConfig:
        """The :class:`LoRAConfig` the file records for the layer at ``module`` whose lora_A has ``rank``
        (fields the file leaves out: alpha = rank, no dropout, no rsLoRA, no DoRA).

        Raises:
            ValueError: settings of the wrong type or out of range, naming the file, the layer and each field.
        """
        settings = self.layers.get(module, {})
        problems = check_layer_settings(settings, rank)
        if problems:
            raise ValueError(f"{str(self.path)!r}: {module}: " + "; ".join(problems))
        return LoRAConfig.from_layer_settings(settings, rank)


def _read_adapter_file(path: PathLike) -> AdapterFile:
    tensors, metadata = read_lora_file(path)
    if metadata.get("format") == FORMAT:
        kind = FORMAT
    elif _has_minimind_keys(tensors):
        kind = MINIMIND_FORMAT
    else:
        kind = None
    # MiniMind's files have no metadata of ours; any other file's is read (and checked) as load_lora reads it.
    layers = {} if kind == MINIMIND_FORMAT else _layer_metadata(metadata, path)
    return AdapterFile(path, kind, tensors, metadata, layers)


def read_adapter(path: PathLike) -> AdapterFile:
    """Reads an adapter in any format this project knows, opening its file once, and says which format it is
    (see :class:`AdapterFile`): ours when the metadata says ``format = "lora_kernels"``, MiniMind's by its
    keys, PEFT's for a folder (its files are left to :func:`lora_kernels.load_peft_adapter`).

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: an unreadable file, non-finite values, or malformed metadata (``layers`` not a JSON
            object, another ``format_version``), naming the file.
    """
    if Path(path).is_dir():
        return AdapterFile(path, PEFT_FORMAT)
    return _read_adapter_file(path)


# ---------------------------------------------------------------------------------------------------
# Loading into a model


def load_lora(model: nn.Module, path: PathLike, strict: bool = True, backend: str = "auto",
              adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Loads an adapter file into ``model`` as adapter ``adapter_name``, in place; returns ``model``.

    Modules named in the file that already have that adapter get the file's A and B (and a DoRA adapter's
    magnitude), and its alpha and rsLoRA setting when the file records them; other :class:`FusedLoRALinear`
    layers get it as a new adapter (of the file's rank, DoRA when the file says ``use_dora``), and plain
    ``nn.Linear`` modules are first wrapped (with ``backend``).
    A new adapter is inactive (:func:`lora_kernels.set_adapter`) unless the model had no adapter yet.
    Everything is checked before anything changes, so a failed load leaves the model as it was.

    Args:
        model: the model to adapt.
        path: a file written by :func:`save_lora`.
        strict: also fail when the model has layers with this adapter that the file does not name.
        backend: backend of newly created layers.
        adapter_name: the name to load it under.

    Raises:
        FileNotFoundError, ValueError: unreadable file, non-finite values, malformed metadata, or names,
            shapes or settings that do not fit the model (all of them listed, with the file): among them a
            ``lora_magnitude`` of the wrong shape, a magnitude without ``use_dora: true`` or the reverse, and a
            DoRA file loaded onto an existing plain LoRA adapter of the same name (or the reverse).
    """
    check_adapter_name(adapter_name)
    return apply_adapter_file(model, _read_adapter_file(path), strict=strict, backend=backend,
                              adapter_name=adapter_name)


def apply_adapter_file(model: nn.Module, adapter: AdapterFile, strict: bool = True, backend: str = "auto",
                       adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """:func:`load_lora` for a file :func:`read_adapter` has already read (so it is not read again).

    Raises:
        ValueError: a PEFT folder (load it with :func:`lora_kernels.load_peft_adapter`), or as
            :func:`load_lora`.
    """
    check_adapter_name(adapter_name)
    if adapter.format == PEFT_FORMAT:
        raise ValueError(f"{str(adapter.path)!r} is a PEFT adapter folder; load it with "
                         "lora_kernels.load_peft_adapter(model, directory)")
    return apply_lora_tensors(model, adapter.tensors, adapter.layers, source=adapter.path, strict=strict,
                              backend=backend, adapter_name=adapter_name, with_magnitudes=True)


def _dora_problem(name: str, magnitude: Optional[torch.Tensor], use_dora: bool, module: nn.Module,
                  existing: Optional[str], with_magnitudes: bool) -> Optional[str]:
    """What is wrong with layer ``name``'s DoRA part (None when nothing is): a magnitude needs ``use_dora``
    (and, ``with_magnitudes``, ``use_dora`` needs a magnitude), the magnitude is of shape (out_features,), and an
    ``existing`` adapter of the layer that the file replaces must be of the same kind (its parameters are kept,
    so a LoRA adapter cannot become DoRA)."""
    if magnitude is not None and not use_dora:
        return (f"{name}: the file has a lora_magnitude (DoRA) but the layer's settings do not say use_dora: true; "
                "a DoRA layer records both")
    if use_dora and magnitude is None and with_magnitudes:
        return f"{name}: the layer's settings say use_dora: true but the file has no {name}.lora_magnitude"
    if magnitude is not None and tuple(magnitude.shape) != (module.out_features,):
        return (f"{name}: file has lora_magnitude {tuple(magnitude.shape)}; the model needs "
                f"({module.out_features},) (one per output feature)")
    if existing is not None and module.lora_configs[existing].use_dora != use_dora:
        kinds = ("DoRA", "plain LoRA") if use_dora else ("plain LoRA", "DoRA")
        return (f"{name}: the file's adapter is {kinds[0]} but the model's adapter {existing!r} is {kinds[1]}; "
                f"load it under another adapter_name, or delete_adapter(model, {existing!r}) first")
    return None


def _new_config(settings: dict, rank: int, init: Optional[str]) -> LoRAConfig:
    """The config of a new adapter from a file's layer settings, with ``init`` when one is given."""
    config = LoRAConfig.from_layer_settings(settings, rank)
    return config if init is None else config.replace(init=init)


def apply_lora_tensors(
    model: nn.Module,
    tensors: Dict[str, torch.Tensor],
    layer_meta: Dict[str, dict],
    source: PathLike,
    strict: bool = True,
    backend: str = "auto",
    adapter_name: str = DEFAULT_ADAPTER,
    with_magnitudes: bool = False,
    init: Optional[str] = None,
) -> nn.Module:
    """The checks and the in-place load behind :func:`load_lora` (also used for PEFT adapters).

    Args:
        tensors: ``{"<module path>.lora_A": A, "<module path>.lora_B": B}``, and for a DoRA layer
            ``"<module path>.lora_magnitude": m`` (out_features,).
        layer_meta: module path to ``{"rank", "alpha", "use_rslora", "dropout", "use_dora"}`` (any may be
            missing); a layer has a magnitude exactly when its ``use_dora`` is true.
        source: the file or directory the tensors came from, for error messages.
        strict, backend, adapter_name: as for :func:`load_lora`.
        with_magnitudes: the tensors hold every DoRA layer's magnitude (our files: a layer whose settings say
            ``use_dora`` without one is refused). False: a DoRA layer may come without it (the caller sets it
            afterwards, as ``load_peft_adapter`` does; a new DoRA adapter starts at ‖W + s·B·A‖ meanwhile); a
            magnitude given is checked and loaded either way.
        init: an initialisation that rewrites the base (``"pissa"``, ``"olora"``) for the new adapters: each
            runs on its layer's weight (the residual stays in the base, as PEFT does when it loads an adapter
            saved with that ``init_lora_weights``) before the file's A and B replace the initial ones. A layer
            that already has the adapter is refused then (its base would be decomposed a second time).

    Raises:
        ValueError: non-finite or non-float tensors, unpaired or unknown keys, settings of the wrong type
            or out of range, a magnitude without ``use_dora`` (or the reverse), or modules, shapes and adapter
            kinds (DoRA or not) that do not fit the model; nothing is changed then.
    """
    modules = _group_by_module(check_tensors(tensors, source), source)
    available = dict(model.named_modules())
    adapter = adapter_name

    problems, new_layers, configs = [], {}, {}
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
        has_it = isinstance(module, FusedLoRALinear) and adapter in module.lora_configs
        want_a = (module.lora_configs[adapter].rank if has_it else rank, module.in_features)
        want_b = (module.out_features, want_a[0])
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(f"{name}: file has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; "
                            f"the model needs {want_a}, {want_b} for adapter {adapter!r}")
            continue
        settings = layer_meta.get(name, {})
        bad_settings = check_layer_settings(settings, rank)
        if bad_settings:
            problems += [f"{name}: {problem}" for problem in bad_settings]
            continue
        bad_dora = _dora_problem(name, pair.get("lora_magnitude"), settings.get("use_dora", False), module,
                                 adapter if has_it else None, with_magnitudes)
        if bad_dora:
            problems.append(bad_dora)
            continue
        if isinstance(module, FusedLoRALinear):
            if module.merged:
                problems.append(f"{name}: the layer is merged; unmerge it before loading an adapter")
            elif has_it and init is not None:
                problems.append(f"{name}: adapter {adapter!r} exists; an adapter saved with init {init!r} needs its "
                                "base decomposed when it is added (delete the adapter first, or load it under "
                                "another adapter_name)")
            elif has_it:
                configs[name] = module.lora_configs[adapter].replace(
                    **{k: settings[k] for k in ("alpha", "use_rslora") if k in settings})
            else:
                configs[name] = _new_config(settings, rank, init)
                problem = residual_init_problem(configs[name], module.in_features, module.out_features,
                                                module.quantize)
                if problem is not None:
                    problems.append(f"{name}: {problem}")
            continue
        # Built now, attached only once everything checked out: a refused layer (e.g. an nn.Linear
        # subclass with its own forward) leaves the model untouched.
        problem = residual_init_problem(_new_config(settings, rank, init), module.in_features, module.out_features,
                                        None)
        if problem is not None:
            problems.append(f"{name}: {problem}")
            continue
        try:  # with the file's init applied once everything checked out (it rewrites the shared weight)
            new_layers[name] = FusedLoRALinear.from_linear(
                module, config=_new_config(settings, rank, None), backend=backend, adapter_name=adapter)
        except (TypeError, ValueError) as err:
            problems.append(f"{name}: {err}")
    if strict:
        for name, layer in iter_lora_layers(model):
            if name not in modules and adapter in layer.lora_configs:
                problems.append(f"{name}: LoRA layer in the model but not in the file (strict=True)")
    if problems:
        listed = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"adapter {str(source)!r} does not fit the model: {listed}")

    had_adapters = adapter_names(model)
    active = active_adapters(model) if had_adapters else [adapter]
    for name, pair in modules.items():
        module = new_layers.get(name)
        if module is not None:
            module.set_adapter(active, strict=False)
            _set_submodule(model, name, module)
            if init is not None:  # the base decomposed now, as PEFT does on loading; A and B are replaced below
                module.lora_configs[adapter] = module.lora_configs[adapter].replace(init=init)
                module.reset_lora_parameters(adapter)
        else:
            module = available[name]
            if adapter in module.lora_configs:
                module.lora_configs[adapter] = configs[name]
            else:
                module.add_adapter(adapter, configs[name])
        lora_A, lora_B = module.lora_params(adapter)
        with torch.no_grad():
            lora_A.copy_(pair["lora_A"])
            lora_B.copy_(pair["lora_B"])
            if "lora_magnitude" in pair:  # the layer's DoRA magnitude (checked to exist above)
                module.lora_magnitude_of(adapter).copy_(pair["lora_magnitude"])
    if not had_adapters:
        set_adapter(model, adapter)
    return model
