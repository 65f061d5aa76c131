"""The launch machinery shared by the kernel files (:mod:`lora_kernels.ops.lora_linear`,
:mod:`lora_kernels.ops.quantized`): the launch-plan cache and its keys, the planned launch that calls a
compiled kernel directly, the split of a reduction over programs, the seed and device helpers, and the
launchers' operand checks.

A call does little more than its launches. Everything that depends only on a call's shapes, strides,
dtypes, pointer alignments, flags and device (configs, grids, splits, workspace shapes, the integer
arguments, and the compiled kernel of every launch) is worked out once into a plan, cached under that
key (:func:`call_key`, :func:`cached`), and reused by every later call with the same key. A planned launch
(:class:`Launch`) calls the compiled kernel's launcher directly: Triton's ``JITFunction.run`` binds and
specialises every argument and looks the kernel up again on each launch, which costs more Python than the
rest of the call.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import triton
from triton import knobs
from triton.compiler.compiler import CompiledKernel
from triton.runtime.driver import driver

from . import configs as _configs
from .configs import _input_precision, _interpreting

PLAN_CACHE_SIZE = 512


def split_reduction(programs: int, num_tiles: int, target_programs: int, min_tiles: int) -> Tuple[int, int]:
    """(number of splits, tiles per split) so that programs · splits reaches ``target_programs`` while each
    split keeps at least ``min_tiles`` tiles of its reduction (and there is always at least one split)."""
    splits = 1
    if programs < target_programs and num_tiles >= 2 * min_tiles:
        splits = min(triton.cdiv(target_programs, max(programs, 1)), num_tiles // min_tiles)
    tiles_per_split = max(1, triton.cdiv(num_tiles, splits))
    return max(1, triton.cdiv(num_tiles, tiles_per_split)), tiles_per_split


class Launch:
    """One kernel launch of a plan: its grid and meta-parameters and, after its first launch, the compiled
    kernel, whose launcher every later launch calls directly with the same positional arguments.

    ``launch(*args)`` looks the stream and the launch hooks up itself; a plan that launches several kernels
    looks them up once (:func:`launch_env`) and calls ``launch.run(env, *args)`` for each."""

    __slots__ = ("fn", "grid", "meta", "compiled", "constexprs")

    def __init__(self, fn, grid: Tuple[int, ...], meta: Dict[str, Any]):
        self.fn, self.meta, self.compiled, self.constexprs = fn, meta, None, ()
        self.grid = tuple(grid) + (1,) * (3 - len(grid))

    def __call__(self, *args) -> None:
        self.run(launch_env() if self.compiled is not None else None, *args)

    def run(self, env: Optional[tuple], *args) -> None:
        compiled = self.compiled
        if compiled is None:
            compiled = self.fn[self.grid](*args, **self.meta)
            if isinstance(compiled, CompiledKernel):  # None under the interpreter: it keeps this slow path
                # The launcher takes every parameter in order: the run-time ones given, then the constexprs.
                self.constexprs = tuple(self.meta[p.name] for p in self.fn.params[len(args):])
                self.compiled = compiled
            return
        stream, enter, exit_ = env
        metadata = None
        if enter is not None or exit_ is not None:  # a profiler is listening: give it what Triton gives it
            metadata = compiled.launch_metadata(self.grid, stream, *args, *self.constexprs)
        compiled.run(self.grid[0], self.grid[1], self.grid[2], stream, compiled.function, compiled.packed_metadata,
                     metadata, enter, exit_, *args, *self.constexprs)


_INTERPRETED = _interpreting()  # fixed at import, when the kernel modules that import this one build their kernels


def launch_env() -> Optional[tuple]:
    """What every launch of a call needs from the runtime: (stream, enter hook, exit hook); None under the
    interpreter, whose launches never reach a compiled kernel."""
    if _INTERPRETED:
        return None
    device = driver.active.get_current_device()
    return (driver.active.get_current_stream(device), _hook(knobs.runtime.launch_enter_hook),
            _hook(knobs.runtime.launch_exit_hook))


def _hook(hook):
    """A launch hook, or None when there is none to call (Triton >= 3.5 keeps an empty chain of hooks)."""
    return hook if hook is not None and getattr(hook, "calls", True) else None


def call_key(kind: str, device: torch.device, dtype: torch.dtype, tensors: Sequence[Optional[torch.Tensor]],
              flags: tuple) -> tuple:
    """A plan's key: the device's (capability, SMs), the fp32 precision and an override (they change the
    chosen kernels), the flags, and per tensor what Triton specialises on and the grids depend on."""
    key = [kind, device, _configs._device_info(device), _input_precision(dtype), id(_configs._OVERRIDE), flags]
    for t in tensors:  # inline, not a helper per tensor: this runs on every call
        key.append(None if t is None else (t.dtype, t.shape, t.stride(), t.data_ptr() % 16 == 0))
    return tuple(key)


def cached(cache: Dict[tuple, Any], key: tuple, build: Callable[[], Any]) -> Any:
    """The plan under ``key`` in ``cache``, built with ``build()`` and stored the first time."""
    plan = cache.get(key)
    if plan is None:
        plan = build()
        if len(cache) >= PLAN_CACHE_SIZE:  # many shapes (variable sequence lengths): start over
            cache.clear()
        cache[key] = plan
    return plan


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The seed as the one-element int64 device tensor the kernels read (an int is copied there, for tests)."""
    if isinstance(seed, torch.Tensor):
        return seed if seed.device == device else seed.to(device)
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


def device_guard(t: torch.Tensor):
    """Makes ``t``'s GPU the current one for the launches (nothing on the CPU interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_operands(x: torch.Tensor, weight: Optional[torch.Tensor], lora_A: torch.Tensor,
                   lora_B: torch.Tensor) -> None:
    """The launchers' own checks: 2-D x, one dtype for x and the weights, and a rank that A and B agree on.

    Raises:
        ValueError / TypeError: naming the shape or dtype that does not fit.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, in_features), got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1] or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A (rank, in_features) and lora_B (out_features, rank) must agree on a rank >= 1, "
                         f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
