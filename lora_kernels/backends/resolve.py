"""Which backend a ``backend=`` name means: ``"auto"``, ``"triton"``, ``"torch"``, ``"eager"`` or a registered
name, resolved for a given input, and the backend object that runs it.

``"auto"`` is ``"triton"`` for CUDA tensors in fp32/fp16/bf16 when Triton and the kernels import, else
``"torch"``; ``"triton"`` raises where the kernels cannot run (:func:`lora_kernels.backends.triton.triton_refusal`
says why); ``"eager"`` is the autograd reference, which :func:`lora_kernels.lora_linear` runs itself.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .base import LoRABackend, get_backend, registered_backends
from .triton import TRITON_DTYPES, kernels, triton_refusal

BACKENDS = ("auto", "triton", "torch", "eager")


def backend_names() -> Tuple[str, ...]:
    """Every name ``backend=`` accepts: :data:`BACKENDS` and any backend registered since
    (:func:`lora_kernels.backends.register_backend`)."""
    return BACKENDS + tuple(name for name in registered_backends() if name not in BACKENDS)


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The concrete backend (``"triton"``, ``"torch"`` or ``"eager"``) that ``backend`` means for ``x``.

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
        TypeError: ``"triton"`` was asked for a dtype the kernels do not support (float64, ...).
        RuntimeError: ``"triton"`` was asked for where it cannot run.
    """
    if backend not in backend_names():
        raise ValueError(f"backend must be one of {backend_names()}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_refusal(x) is None else "torch"
    if backend == "triton":
        why = triton_refusal(x)
        if why is not None:
            raise (TypeError if x.dtype not in TRITON_DTYPES else RuntimeError)(why)
    return backend


def backend_for(backend: str, name: str, quantized: bool = False) -> LoRABackend:
    """The backend object (:class:`lora_kernels.backends.LoRABackend`) for a resolved backend ``name``:
    strict when the user named it, so Triton raises instead of falling back. A quantized base on Triton
    runs the quantized kernels; the torch backend takes either kind of W."""
    if quantized and name == "triton":
        return kernels(strict=backend == name, quantized=True)
    return get_backend(name, strict=backend == name)
