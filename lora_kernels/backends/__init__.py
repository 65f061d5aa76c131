"""The backends of :func:`lora_kernels.lora_linear`, and the registry that finds them by name.

* :mod:`.base`: the backend contract (the ``Protocol`` :class:`LoRABackend`), the registry
  (:func:`register_backend`, :func:`get_backend`) and the dropout seed (:func:`draw_seed_tensor`);
* :mod:`.torch`: the fused pure-PyTorch backend, registered as ``"torch"``;
* :mod:`.triton`: the fused Triton kernels behind the contract with a per-configuration fallback,
  registered as ``"triton"``;
* :mod:`.resolve`: what a ``backend=`` name (``"auto"``, ...) means for a given input.

Importing this package imports the built-in backends, so they are registered whenever ``lora_kernels`` is.
"""
# No `import torch` here: the submodule .torch is an attribute of this package under that very name.
from .base import (DoRABackend, Grads, LoRABackend, RESERVED, Seed, SegmentedBackend, draw_seed_tensor, get_backend,
                   register_backend, registered_backends)
from .resolve import BACKENDS, backend_for, backend_names, resolve_backend
from .torch import TorchBackend
from .triton import TRITON_DTYPES, triton_available, triton_refusal

__all__ = [
    "BACKENDS",
    "DoRABackend",
    "Grads",
    "LoRABackend",
    "RESERVED",
    "Seed",
    "SegmentedBackend",
    "TRITON_DTYPES",
    "TorchBackend",
    "backend_for",
    "backend_names",
    "draw_seed_tensor",
    "get_backend",
    "register_backend",
    "registered_backends",
    "resolve_backend",
    "triton_available",
    "triton_refusal",
]
