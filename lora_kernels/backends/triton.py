"""The Triton backend of :func:`lora_kernels.lora_linear`: the fused kernels of :mod:`lora_kernels.ops` behind
the backend ``Protocol`` (:class:`lora_kernels.backends.LoRABackend`), with a per-configuration fallback.

The kernels run on CUDA tensors in fp32/fp16/bf16, or on any tensors under ``TRITON_INTERPRET=1``
(:func:`triton_refusal` says why they cannot run somewhere). Triton and the kernels are imported the first
time a call needs them, never when this module is imported, so ``import lora_kernels`` works without Triton.

A configuration (device, dtype, shape bucket, rank, dropout) whose kernels fail to compile or launch on the
user's GPU raises under ``backend="triton"``; under ``"auto"`` it warns once, naming the shape, dtype and
error, and runs on the torch backend with the kernels' own dropout mask from then on
(:class:`_KernelsWithFallback`). A quantized base runs the kernels of :mod:`lora_kernels.ops.quantized`.

This module registers the backend as ``"triton"`` when it is imported.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType
from typing import Optional, Set

import torch

from .base import register_backend
from .torch import KERNEL_MASK

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _triton_module(name: str = "lora_linear") -> Optional[ModuleType]:
    """The Triton backend module ``lora_kernels.ops.<name>`` (``"quantized"``: the kernels for a quantized
    base), or None when Triton or the kernels cannot be imported here."""
    try:
        return importlib.import_module(f"lora_kernels.ops.{name}")
    except ImportError:
        return None


def segmented_kernels() -> Optional[ModuleType]:
    """The Triton primitives of the segmented path (:mod:`lora_kernels.ops.segmented`, the
    ``SegmentedBackend`` contract), or None where they do not import."""
    module = _triton_module("segmented")
    return module if module is not None and hasattr(module, "segmented_shrink") else None


def triton_available() -> bool:
    """True when the Triton backend can be imported on this machine."""
    return _triton_module() is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_refusal(x: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot run on ``x`` here, or None when they can."""
    if not triton_available():
        return "backend='triton' needs triton and lora_kernels.ops, which do not import here"
    if x.dtype not in TRITON_DTYPES:
        return (f"the Triton kernels support float32, float16 and bfloat16, got {x.dtype}; "
                "use backend='torch' or 'auto' (which runs the torch backend for it)")
    if not x.is_cuda:
        if not _interpreting():
            return (f"backend='triton' needs CUDA tensors (x is on {x.device}); set TRITON_INTERPRET=1 before "
                    "importing triton to run the kernels on the CPU interpreter, or use backend='torch'")
        if x.dtype == torch.bfloat16:
            return ("Triton's CPU interpreter computes bf16 tl.dot wrongly (a known upstream bug), so bf16 is "
                    "refused under TRITON_INTERPRET=1; use float16/float32 there, or a GPU")
    return None


class _KernelsWithFallback:
    """The Triton backend behind the backend protocol (:class:`lora_kernels.backends.LoRABackend`), with a
    guard for GPU problems nobody could test.

    When a kernel fails to compile or launch (out of resources, an unknown arch, a Triton bug) for a
    configuration, ``strict`` (``backend="triton"``) raises a RuntimeError naming the shape, dtype and error;
    otherwise (``"auto"``) it warns once and runs that configuration on the torch backend with the kernels'
    own dropout mask from then on, so a forward made by the kernels and a backward made by torch agree.
    """

    def __init__(self, strict: bool, module: str = "lora_linear"):
        self.strict, self.module = strict, module
        self.failed: Set[tuple] = set()

    @staticmethod
    def _key(t: torch.Tensor, m: int, n: int, k: int, rank: int, dropout_p: float) -> tuple:
        """The configuration of a call, the same for its forward and its backward: device, dtype, M bucket,
        (N, K), rank, dropout. A failure in either pass sends both to the torch backend."""
        return t.device, t.dtype, 1 << max(m - 1, 0).bit_length(), (n, k), rank, dropout_p > 0

    def _fail(self, key: tuple, what: str, err: BaseException) -> None:
        device, dtype, m_bucket, (n, k), rank, has_dropout = key
        message = (f"lora_kernels: the Triton {what} kernels failed for x (M<={m_bucket}, {k}) -> ({n}), rank "
                   f"{rank}, {dtype}, dropout={has_dropout} on {device}: "
                   f"{type(err).__name__}: {err}")
        if self.strict:
            raise RuntimeError(message) from err
        warnings.warn(message + "; this configuration runs on the torch backend from now on", RuntimeWarning,
                      stacklevel=4)
        self.failed.add(key)

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        if not (self.failed and self._forward_key(x, lora_B, dropout_p) in self.failed):
            try:
                return _triton_module(self.module).forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
            except Exception as err:  # noqa: BLE001 - any kernel failure: raise with context, or fall back
                self._fail(self._forward_key(x, lora_B, dropout_p), "forward", err)
        return KERNEL_MASK.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)

    def backward(self, grad_y, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs_grad):
        args = (grad_y, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs_grad)
        if not (self.failed and self._backward_key(grad_y, lora_A, dropout_p) in self.failed):
            try:
                return _triton_module(self.module).backward(*args)
            except Exception as err:  # noqa: BLE001
                self._fail(self._backward_key(grad_y, lora_A, dropout_p), "backward", err)
        return KERNEL_MASK.backward(*args)

    # ---------------------------------------------------------------------------------------------- DoRA
    # lora_kernels.ops.dora behind the DoRA methods of the protocol (lora_kernels.backends.DoRABackend), with the
    # same per-configuration fallback to the torch backend (its kernel-mask twin). A column scale with G > 1
    # groups (a mixed batch) always runs on the torch backend: the kernels take one group.

    def dora_forward(self, x, weight, bias, lora_A, lora_B, scaling, col_scale, dropout_p, seed, keep_z):
        args = (x, weight, bias, lora_A, lora_B, scaling, col_scale, dropout_p, seed, keep_z)
        key = self._forward_key(x, lora_B, dropout_p)
        if _one_group(col_scale) and not (self.failed and key in self.failed):
            try:
                return _triton_module("dora").forward(*args)
            except Exception as err:  # noqa: BLE001 - any kernel failure: raise with context, or fall back
                self._fail(key, "DoRA forward", err)
        return KERNEL_MASK.dora_forward(*args)

    def dora_backward(self, grad_y, x, weight, lora_A, lora_B, s, z, col_scale, scaling, dropout_p, seed,
                      needs_grad):
        args = (grad_y, x, weight, lora_A, lora_B, s, z, col_scale, scaling, dropout_p, seed, needs_grad)
        key = self._backward_key(grad_y, lora_A, dropout_p)
        if _one_group(col_scale) and not (self.failed and key in self.failed):
            try:
                return _triton_module("dora").backward(*args)
            except Exception as err:  # noqa: BLE001
                self._fail(key, "DoRA backward", err)
        return KERNEL_MASK.dora_backward(*args)

    def weight_norm(self, weight, lora_A, lora_B, scaling):
        (n, k), rank = weight.shape, lora_A.shape[0]
        key = self._key(lora_A, n, n, k, rank, 0.0)  # the norm pass: W's rows in the M slot
        if triton_refusal(lora_A) is None and not (self.failed and key in self.failed):
            try:
                return _triton_module("dora").weight_norm(weight, lora_A, lora_B, scaling)
            except Exception as err:  # noqa: BLE001
                self._fail(key, "DoRA weight-norm", err)
        return KERNEL_MASK.weight_norm(weight, lora_A, lora_B, scaling)

    def _forward_key(self, x, lora_B, dropout_p) -> tuple:
        (m, k), (n, rank) = x.shape, lora_B.shape
        return self._key(x, m, n, k, rank, dropout_p)

    def _backward_key(self, grad_y, lora_A, dropout_p) -> tuple:
        (m, n), (rank, k) = grad_y.shape, lora_A.shape
        return self._key(grad_y, m, n, k, rank, dropout_p)

    @staticmethod
    def dropout_mask(seed, shape, dropout_p, device):
        """The kernels' keep-mask (the torch backend's copy of it where the kernels cannot run)."""
        module = _triton_module()
        if module is None or not (torch.device(device).type == "cuda" or _interpreting()):
            return KERNEL_MASK.dropout_mask(seed, shape, dropout_p, device)
        return module.dropout_mask(seed, shape, dropout_p, device)


def _one_group(col_scale: torch.Tensor) -> bool:
    """True when DoRA's column scale has one group of rows ((N,) or (1, N)): what the kernels take."""
    return col_scale.dim() == 1 or col_scale.shape[0] == 1


_TRITON_STRICT = _KernelsWithFallback(strict=True)
_TRITON_AUTO = _KernelsWithFallback(strict=False)
# A quantized base: the kernels that dequantize W tiles in their main loops (lora_kernels.ops.quantized).
_QUANTIZED_STRICT = _KernelsWithFallback(strict=True, module="quantized")
_QUANTIZED_AUTO = _KernelsWithFallback(strict=False, module="quantized")


def kernels(strict: bool, quantized: bool = False) -> _KernelsWithFallback:
    """The Triton backend object: ``strict`` when the user named ``"triton"`` (a failing kernel raises), else
    the one that falls back per configuration; ``quantized`` for a quantized base's kernels. One object per
    kind, so each remembers its failed configurations for the whole process."""
    if quantized:
        return _QUANTIZED_STRICT if strict else _QUANTIZED_AUTO
    return _TRITON_STRICT if strict else _TRITON_AUTO


register_backend("triton", kernels)
