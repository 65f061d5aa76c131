"""A stand-in CUDA GPU for Triton: compile the project's kernels for a real target on a machine without one.

Triton asks its *active driver* for the current device, stream and target (``GPUTarget("cuda", 90, 32)``),
compiles for that target (TTIR -> TTGIR -> LLIR -> PTX -> cubin through ``ptxas``) and only then needs a GPU
to load the cubin and launch it. :func:`stand_in_gpu` installs a driver that answers those questions for a
chosen architecture, so the *real* launchers (:func:`~lora_kernels.ops.lora_linear.forward`, ``backward``,
``dropout_mask``), called with CPU tensors, pick their configs as on that GPU and compile every kernel they
would launch. Two modes:

* ``launch="compile"``: every ``kernel[grid](...)`` goes through ``JITFunction.run(..., warmup=True)``, which
  compiles (or loads from Triton's cache) and returns without loading or launching anything. Each kernel
  the launchers asked for is recorded in :attr:`StandIn.kernels` (its ``CompiledKernel``: ``asm`` with
  ``ptx``/``cubin``/``sass``, ``metadata`` with ``shared``, ``num_warps``, ``num_stages``, ...).
* ``launch="stub"``: the launcher path runs exactly as on a GPU (argument binding, cache lookup, the
  ``CompiledKernel``'s load step with its shared-memory check against the stand-in's opt-in limit), and
  only the final call, the compiled kernel's C launcher, is a no-op. This is what a host-overhead
  benchmark measures: the Python cost of a call, with the GPU's work taken out::

      from lora_kernels.ops.standin import stand_in_gpu
      from lora_kernels.ops import lora_linear as ops

      with stand_in_gpu(arch=90, launch="stub"):
          ops.forward(x, w, None, a, b, 2.0, 0.1, seed=1)      # x, w, a, b: small CPU tensors
          ...                                                  # time calls here; the first one compiles

What is patched while the context is open (and restored on exit):

* Triton's active driver (``triton.runtime.driver.driver``): a stand-in whose device is a private id per
  arch (so the compiled-kernel caches of different archs never mix), stream 0, the arch's properties
  (SM count, opt-in shared memory, 64 K registers), a ``load_binary`` that loads nothing and a
  launcher that does nothing;
* ``JITFunction.run``: to force ``warmup=True`` (compile mode) and to record every kernel (both modes);
* :func:`lora_kernels.ops.configs._device_info`: the (capability, SM count) of the stand-in GPU, so the
  heuristics choose the tiles a real device of that arch would get;
* the launchers' cached launch plans are cleared on entry and on exit: each plan's first launch goes
  through ``JITFunction.run`` (recorded here), later ones call the compiled kernel's launcher directly
  (the stand-in's no-op launcher in both modes).

The launchers need no patch for CPU tensors: they allocate with ``device=x.device`` and enter
``torch.cuda.device`` only for CUDA tensors. The tensors' contents are never read or written (nothing
runs). Not for use under ``TRITON_INTERPRET=1``, where ``triton.jit`` builds interpreter functions that
never compile: run it in a process without that variable (the tests use a subprocess).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver as _driver
from triton.runtime.jit import JITFunction

from . import configs as _configs


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    """The properties of a stand-in GPU that compilation and the launch heuristics depend on."""

    name: str
    capability: Tuple[int, int]
    num_sms: int
    max_shared_mem: int  # opt-in shared memory per block, bytes (what a kernel may request)
    max_num_regs: int = 65536  # 32-bit registers per SM
    max_threads: int = 1024  # per block

    @property
    def arch(self) -> int:
        return self.capability[0] * 10 + self.capability[1]


GPUS: Dict[int, GPUSpec] = {
    90: GPUSpec("H100 SXM (sm90)", (9, 0), 132, 232_448),
    80: GPUSpec("A100 (sm80)", (8, 0), 108, 166_912),
    86: GPUSpec("RTX A6000 / A40 class (sm86)", (8, 6), 84, 101_376),
    89: GPUSpec("RTX 4090 / L40 class (sm89)", (8, 9), 128, 101_376),
}


@dataclasses.dataclass
class CompiledRecord:
    """One kernel the launchers asked for under the stand-in: its ``CompiledKernel`` and the constexprs
    and launch options it was specialised on."""

    kernel_name: str
    constexprs: Dict[str, object]
    compiled: object  # triton.compiler.CompiledKernel
    ptxas_log: Optional[str] = None  # ``ptxas -v`` output, when compiled inside the context with ptxas_log=True

    @property
    def key(self) -> str:
        """Identifies the compilation (same key, same binary): Triton's hash of source, options, target."""
        return self.compiled.hash


class _NoLaunch:
    """The stand-in for Triton's compiled C launcher: accepts a launch and does nothing."""

    def __init__(self, src, metadata):
        self.metadata = metadata

    def __call__(self, *args, **kwargs) -> None:
        return None


class _StandInUtils:
    def __init__(self, spec: GPUSpec):
        self.spec = spec

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": self.spec.max_shared_mem, "multiprocessor_count": self.spec.num_sms,
                "max_num_regs": self.spec.max_num_regs, "warpSize": 32, "sm_clock_rate": 1_980_000,
                "mem_clock_rate": 2_619_000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads). module=None: CompiledKernel.__del__ then has
        # nothing to unload, whichever driver is active when it is collected.
        return None, 0, 0, 0, self.spec.max_threads

    def unload_module(self, module) -> None:
        return None


class StandInDriver(DriverBase):
    """A Triton driver for a GPU that is not there: answers target, device, stream and properties queries
    for ``spec``; loads nothing and launches nothing."""

    def __init__(self, spec: GPUSpec):
        self.spec = spec
        self.device = 10_000 + spec.arch  # a private device id: its own per-device kernel caches in Triton
        self.utils = _StandInUtils(spec)
        self.launcher_cls = _NoLaunch

    @classmethod
    def is_active(cls) -> bool:
        return False  # never chosen by Triton's own driver discovery

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.spec.arch, 32)

    def get_current_device(self) -> int:
        return self.device

    def set_current_device(self, device) -> None:
        return None

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_capability(self, device=None) -> Tuple[int, int]:
        return self.spec.capability

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("the stand-in GPU cannot time kernels: nothing runs")

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("the stand-in GPU cannot time kernels: nothing runs")


@dataclasses.dataclass
class StandIn:
    """What :func:`stand_in_gpu` yields: the stand-in's spec and every kernel launched (or compiled) inside
    the ``with`` block, in order (a kernel launched twice appears twice)."""

    spec: GPUSpec
    launch: str
    kernels: List[CompiledRecord] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def stand_in_gpu(arch: int = 90, launch: str = "compile", spec: Optional[GPUSpec] = None,
                 ptxas_log: bool = False) -> Iterator[StandIn]:
    """Make Triton and the project's config lookup believe a CUDA GPU of ``arch`` (90, 80, 86, 89) is active.

    Args:
        arch: compute capability as an int (90 = sm90, H100 SXM with 132 SMs; 80 = A100, 108 SMs; 86; 89).
        launch: ``"compile"`` (compile every kernel, launch none) or ``"stub"`` (the launch path runs, the
            compiled kernel's launcher is a no-op).
        spec: a custom :class:`GPUSpec` instead of ``GPUS[arch]``.
        ptxas_log: keep the ``ptxas -v`` report (registers, spills) of every kernel compiled inside the
            context (Triton runs ``ptxas -v`` and discards it; a kernel found in Triton's on-disk cache
            has none: run ``ptxas -v`` on its PTX then).

    Yields:
        A :class:`StandIn` whose ``kernels`` list fills with a :class:`CompiledRecord` per launch.

    Raises:
        RuntimeError: under ``TRITON_INTERPRET=1`` (kernels would not compile), or a stand-in already active.
        ValueError: unknown ``arch`` or ``launch``.
    """
    if launch not in ("compile", "stub"):
        raise ValueError(f"launch must be 'compile' or 'stub', got {launch!r}")
    if spec is None:
        if arch not in GPUS:
            raise ValueError(f"no stand-in GPU for arch {arch}; known: {sorted(GPUS)}")
        spec = GPUS[arch]
    if os.environ.get("TRITON_INTERPRET") == "1" or not isinstance(_lora_kernel(), JITFunction):
        raise RuntimeError("stand_in_gpu needs compiled Triton kernels: run it in a process without "
                           "TRITON_INTERPRET=1 (triton.jit built interpreter functions here)")
    if isinstance(_driver._active, StandInDriver):
        raise RuntimeError("a stand-in GPU is already active")

    state = StandIn(spec, launch)
    stand_in = StandInDriver(spec)
    original_run = JITFunction.run
    original_device_info = _configs._device_info
    previous_driver = _driver._active  # not .active: that would create (and fail on) the real driver
    touched = set()

    def run(self, *args, grid, warmup, **kwargs):
        log = None
        if ptxas_log:
            buffer = io.StringIO()
            with _knob(knobs.nvidia, "dump_ptxas_log", True), contextlib.redirect_stdout(buffer):
                kernel = original_run(self, *args, grid=grid, warmup=warmup or launch == "compile", **kwargs)
            log = buffer.getvalue() or None
        else:
            kernel = original_run(self, *args, grid=grid, warmup=warmup or launch == "compile", **kwargs)
        touched.add(self)
        if kernel is not None:
            names = {p.name for p in self.params if p.is_constexpr} | {"num_warps", "num_stages"}
            constexprs = {k: v for k, v in kwargs.items() if k in names}
            state.kernels.append(CompiledRecord(self.__name__, constexprs, kernel, log))
        return kernel

    def device_info(device):
        return spec.capability, spec.num_sms

    _driver.set_active(stand_in)
    JITFunction.run = run
    _configs._device_info = device_info
    _clear_launch_plans()  # every launch of the block goes through JITFunction.run once (and is recorded)
    try:
        yield state
    finally:
        JITFunction.run = original_run
        _configs._device_info = original_device_info
        _driver._active = previous_driver
        _clear_launch_plans()  # no plan holding a stand-in's kernel survives it
        for fn in touched:  # leave no entry for the private device id in the kernels' caches
            fn.device_caches.pop(stand_in.device, None)


@contextlib.contextmanager
def _knob(scope, name: str, value) -> Iterator[None]:
    previous = getattr(scope, name)
    setattr(scope, name, value)
    try:
        yield
    finally:
        setattr(scope, name, previous)


def _clear_launch_plans() -> None:
    """The launchers cache plans that call compiled kernels directly (see ``lora_linear.clear_plans``,
    ``segmented.clear_plans``)."""
    from . import lora_linear, segmented

    for module in (lora_linear, segmented):
        clear = getattr(module, "clear_plans", None)
        if clear is not None:
            clear()


def _lora_kernel():
    from .lora_linear import _lora_matmul_kernel
    return _lora_matmul_kernel


