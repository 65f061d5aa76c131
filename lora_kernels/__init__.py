"""lora_kernels: fused LoRA for PyTorch.

    y = x·Wᵀ + b + scaling · (dropout(x)·Aᵀ)·Bᵀ,   scaling = alpha / rank

Public API, in the groups of ``__all__``:

* the functional ops :func:`lora_linear` and :func:`dora_linear` (DoRA) and their backends (:data:`BACKENDS`, :func:`resolve_backend`,
  :func:`triton_available`; :class:`LoRABackend`, :func:`get_backend`, :func:`register_backend` to add one);
* the drop-in module :class:`FusedLoRALinear` and an adapter's settings :class:`LoRAConfig`;
* named adapters (:func:`add_adapter`, :func:`set_adapter`, :func:`delete_adapter`, :func:`adapter_names`,
  :func:`active_adapters`);
* mixed batches with one adapter per row (:func:`mixed_adapters`, :func:`lora_linear_mixed`,
  :class:`AdapterTerm`; many adapters at each row's own rank from a layer's :class:`AdapterPool`);
* model-level helpers (:func:`replace_linear_with_fused_lora` and friends, :func:`lora_state_dict`);
* adapter files (:func:`save_lora`, :func:`load_lora`; PEFT's format with :func:`save_peft_adapter`,
  :func:`load_peft_adapter`, and :func:`fuse_peft_model` for a live ``PeftModel``);
* optimizer groups with LoRA+ (:func:`lora_param_groups`);
* the eager reference everything is checked against (:func:`lora_linear_reference`, :func:`lora_linear_eager`).
"""
from .adapters import (active_adapters, adapter_names, add_adapter, delete_adapter, lora_state_dict,
                       mixed_adapters, set_adapter)
from .backends import BACKENDS, LoRABackend, get_backend, register_backend, resolve_backend, triton_available
from .config import LoRAConfig
from .dora import dora_linear
from .functional import lora_linear
from .io import load_lora, save_lora
from .mixed import AdapterTerm, lora_linear_mixed
from .pool import AdapterPool
from .modules import FusedLoRALinear
from .optim import lora_param_groups
from .peft_format import load_peft_adapter, save_peft_adapter
from .peft_live import fuse_peft_model
from .reference import lora_linear_eager, lora_linear_reference
from .replace import (
    disable_lora,
    LoRASummary,
    find_target_linears,
    iter_lora_layers,
    lora_summary,
    mark_only_lora_as_trainable,
    merge_and_unload,
    merge_lora,
    replace_linear_with_fused_lora,
    unmerge_lora,
)

__version__ = "0.1.0"

__all__ = [
    # the functional ops and their backends
    "lora_linear",
    "dora_linear",
    "BACKENDS",
    "resolve_backend",
    "triton_available",
    "LoRABackend",
    "get_backend",
    "register_backend",
    # the drop-in module and an adapter's settings
    "FusedLoRALinear",
    "LoRAConfig",
    # named adapters
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "adapter_names",
    "active_adapters",
    # mixed batches, one adapter per row
    "mixed_adapters",
    "lora_linear_mixed",
    "AdapterTerm",
    "AdapterPool",
    # model-level helpers
    "replace_linear_with_fused_lora",
    "find_target_linears",
    "iter_lora_layers",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "merge_lora",
    "unmerge_lora",
    "merge_and_unload",
    "disable_lora",
    "lora_summary",
    "LoRASummary",
    # adapter files: ours, PEFT's, and a live PeftModel
    "save_lora",
    "load_lora",
    "save_peft_adapter",
    "load_peft_adapter",
    "fuse_peft_model",
    # optimizer groups (LoRA+)
    "lora_param_groups",
    # the eager reference
    "lora_linear_reference",
    "lora_linear_eager",
]
