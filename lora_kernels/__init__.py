"""lora_kernels: fused LoRA for PyTorch.

    y = x·Wᵀ + b + scaling · (dropout(x)·Aᵀ)·Bᵀ,   scaling = alpha / rank

Public API: the functional op :func:`lora_linear`, the drop-in module :class:`FusedLoRALinear`, an
adapter's settings :class:`LoRAConfig`, named adapters (:func:`add_adapter`, :func:`set_adapter`,
:func:`delete_adapter`, :func:`adapter_names`, :func:`active_adapters`), mixed batches with one adapter
per row (:func:`mixed_adapters`, :func:`lora_linear_mixed`), model-level
helpers (:func:`replace_linear_with_fused_lora` and friends), adapter files (:func:`save_lora`,
:func:`load_lora`; PEFT's format with :func:`save_peft_adapter`, :func:`load_peft_adapter`, and
:func:`fuse_peft_model` for a live ``PeftModel``), optimizer groups with LoRA+ (:func:`lora_param_groups`)
and the eager reference everything is checked against.
"""
from .adapters import active_adapters, adapter_names, add_adapter, delete_adapter, set_adapter
from .backends import BACKENDS, LoRABackend, get_backend, register_backend, resolve_backend, triton_available
from .config import LoRAConfig
from .functional import lora_linear
from .io import load_lora, save_lora
from .mixed import AdapterTerm, lora_linear_mixed, mixed_adapters
from .modules import FusedLoRALinear
from .optim import lora_param_groups
from .peft_format import fuse_peft_model, load_peft_adapter, save_peft_adapter
from .reference import lora_linear_eager, lora_linear_reference
from .replace import (
    disable_lora,
    LoRASummary,
    find_target_linears,
    iter_lora_layers,
    lora_state_dict,
    lora_summary,
    mark_only_lora_as_trainable,
    merge_and_unload,
    merge_lora,
    replace_linear_with_fused_lora,
    unmerge_lora,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterTerm",
    "BACKENDS",
    "FusedLoRALinear",
    "LoRABackend",
    "LoRAConfig",
    "active_adapters",
    "adapter_names",
    "add_adapter",
    "delete_adapter",
    "get_backend",
    "register_backend",
    "set_adapter",
    "disable_lora",
    "LoRASummary",
    "find_target_linears",
    "fuse_peft_model",
    "iter_lora_layers",
    "load_lora",
    "load_peft_adapter",
    "lora_linear",
    "lora_linear_eager",
    "lora_linear_mixed",
    "lora_linear_reference",
    "lora_param_groups",
    "lora_state_dict",
    "lora_summary",
    "mark_only_lora_as_trainable",
    "mixed_adapters",
    "merge_and_unload",
    "merge_lora",
    "replace_linear_with_fused_lora",
    "resolve_backend",
    "save_lora",
    "save_peft_adapter",
    "triton_available",
    "unmerge_lora",
]
