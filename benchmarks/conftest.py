"""Benchmark setup: where the benchmarks run, what each provider is, which shapes, and how timing works.

``python -m pytest benchmarks/ --benchmark-only`` collects the ``bench_*.py`` files of this folder (the hook
below; ``pytest tests`` never sees them because ``pytest.ini`` points at ``tests/``).

Device and dtype: CUDA in bfloat16 when a GPU is visible, else the CPU in float32. Environment variables
change that and the amount of work:

* ``LORA_BENCH_DEVICE`` (``cuda`` / ``cpu``), ``LORA_BENCH_DTYPE`` (``bf16`` / ``fp16`` / ``fp32``);
* ``LORA_BENCH_ROUNDS``, ``LORA_BENCH_WARMUP``: timed and warm-up rounds of every benchmark;
* ``LORA_BENCH_THREADS``: torch's CPU threads (default: torch's own choice, one per core);
* ``LORA_BENCH_COMMIT``: the commit to print in the report when the tree has no ``.git``;
* ``LORA_BENCH_QUICK=1``: one tiny shape and two rounds, to check that everything runs (numbers meaningless);
* ``LORA_BENCH_COMPILE_ON_CPU=1``: let the ``compiled`` provider run on the CPU (needs a C++ compiler;
  for development only, compile time would dominate a CPU run).

Providers (every one computes ``y = x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ`` with the same tensors, all in the
compute dtype, W frozen, A, B and x requiring grad as inside a network; no bias, as in LLaMA and MiniMind):

* ``linear``: the frozen ``F.linear(x, W)`` alone, the floor any LoRA implementation pays;
* ``eager``: :func:`lora_kernels.reference.lora_linear_unfused`, the plain autograd LoRA with ``F.dropout`` as
  MiniMind's monkey-patched LoRA (and most hand-written LoRA) computes it;
* ``peft``: HF PEFT's ``lora.Linear`` (skipped when peft is not installed);
* ``torch``: ``lora_linear(..., backend="torch")``, our fused pure-PyTorch backend;
* ``triton``: ``lora_linear(..., backend="triton")``, our Triton kernels (CUDA only);
* ``compiled``: ``torch.compile`` of ``lora_linear_unfused`` (CUDA only), what a user gets for free;
* ``torch_dora``, ``triton_dora``: DoRA (PEFT's ``use_dora=True``), ``FusedLoRALinear(use_dora=True)`` around the
  same W with backend ``"torch"`` / ``"triton"`` (Triton on CUDA only), its magnitude m trainable too;
* ``peft_dora``: HF PEFT's ``lora.Linear`` with ``LoraConfig(use_dora=True)``, the same A, B and m.

The DoRA providers' magnitude is the weight norm ‖W + s·B·A‖ per row times a seeded factor in [0.9, 1.1], as
after some training (at initialisation m equals the norm, and g = m / norm would be exactly 1).

Timing uses ``benchmark.pedantic`` with a setup function, so inputs, gradient reset and (for the backward
mode) the forward pass that builds the graph all stay outside the timed region; on CUDA the timed function
ends with ``torch.cuda.synchronize()`` and the setup synchronises too, so each round measures exactly its
own kernels.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.machine import cpu_model
from lora_kernels import FusedLoRALinear, lora_linear
from lora_kernels.dora import weight_norm
from lora_kernels.reference import lora_linear_unfused
from lora_kernels.testing import make_peft_linear

PROVIDERS = ("linear", "eager", "peft", "torch", "triton", "compiled", "peft_dora", "torch_dora", "triton_dora")
DORA_PROVIDERS = ("peft_dora", "torch_dora", "triton_dora")
MODES = ("forward", "backward", "forward+backward")
DROPOUTS = (0.0, 0.1)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        number = int(value)
    except ValueError:
        raise pytest.UsageError(f"{name} must be an integer, got {value!r}")
    if number < 0:
        raise pytest.UsageError(f"{name} must be >= 0, got {number}")
    return number


def _select_device() -> torch.device:
    name = os.environ.get("LORA_BENCH_DEVICE", "").strip() or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"LORA_BENCH_DEVICE={name!r} but torch sees no CUDA device")
    return device


def _select_dtype(device: torch.device) -> torch.dtype:
    name = os.environ.get("LORA_BENCH_DTYPE", "").strip() or ("bf16" if device.type == "cuda" else "fp32")
    if name not in DTYPES:
        raise pytest.UsageError(f"LORA_BENCH_DTYPE must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Shape:
    """One LoRA linear: x (m, k), W (n, k), A (r, k), B (n, r)."""

    m: int
    k: int
    n: int
    r: int

    def __str__(self) -> str:
        return f"M{self.m}-K{self.k}-N{self.n}-r{self.r}"


def _shapes(device: torch.device, quick: bool) -> List[Shape]:
    if quick:
        return [Shape(256, 128, 128, 8)]
    if device.type == "cuda":
        # 8192 tokens: MiniMind widths (512, 768), a LLaMA-7B attention projection and its FFN up-projection.
        return [Shape(8192, 512, 512, 8), Shape(8192, 512, 512, 16), Shape(8192, 768, 768, 8),
                Shape(8192, 768, 768, 16), Shape(8192, 4096, 4096, 16), Shape(8192, 4096, 11008, 16)]
    # A 2-core CPU: the MiniMind widths only, and fewer tokens, so the whole suite stays within minutes.
    return [Shape(2048, 512, 512, 8), Shape(2048, 512, 512, 16), Shape(2048, 768, 768, 8),
            Shape(2048, 768, 768, 16)]


# ---------------------------------------------------------------------------------------------------
# Settings


@dataclass
class BenchSettings:
    """What every benchmark of this run shares; the fixture ``settings`` hands it out."""

    device: torch.device
    dtype: torch.dtype
    rounds: int
    warmup: int
    quick: bool
    shapes: List[Shape]
    skipped: Dict[str, str] = field(default_factory=dict)  # provider -> why it does not run here

    @property
    def dtype_name(self) -> str:
        return next(name for name, d in DTYPES.items() if d == self.dtype)

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"{cpu_model()}, {os.cpu_count()} cores"

    def sync(self) -> None:
        """Waits for queued device work, so that a timer read afterwards covers it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _triton_skip_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"needs a CUDA device (this run is on {device.type}; the Triton interpreter is for tests, not timing)"
    try:
        importlib.import_module("lora_kernels.ops.lora_linear")
    except Exception as err:  # the kernels are not there yet, triton is missing, or it breaks on import
        return f"lora_kernels.ops.lora_linear does not import: {type(err).__name__}: {err}"
    return None


def skip_reasons(device: torch.device) -> Dict[str, str]:
    reasons = {}
    try:
        importlib.import_module("peft")
    except ImportError:
        reasons["peft"] = reasons["peft_dora"] = "peft is not installed (pip install peft)"
    triton_reason = _triton_skip_reason(device)
    if triton_reason:
        reasons["triton"] = reasons["triton_dora"] = triton_reason
    if device.type != "cuda" and not _env_flag("LORA_BENCH_COMPILE_ON_CPU"):
        reasons["compiled"] = (f"torch.compile is benchmarked on CUDA only (this run is on {device.type}; "
                               "LORA_BENCH_COMPILE_ON_CPU=1 forces it)")
    return reasons


def _make_settings() -> BenchSettings:
    device = _select_device()
    threads = _env_int("LORA_BENCH_THREADS", 0)
    if threads:
        torch.set_num_threads(threads)
    quick = _env_flag("LORA_BENCH_QUICK")
    # CPU rounds take tens of milliseconds each and the machine is small; CUDA rounds are ~1 ms.
    default_rounds = 2 if quick else (30 if device.type == "cuda" else 21)
    default_warmup = 1 if quick or device.type != "cuda" else 3
    return BenchSettings(
        device=device,
        dtype=_select_dtype(device),
        rounds=max(1, _env_int("LORA_BENCH_ROUNDS", default_rounds)),
        warmup=_env_int("LORA_BENCH_WARMUP", default_warmup),
        quick=quick,
        shapes=_shapes(device, quick),
        skipped=skip_reasons(device),
    )


SETTINGS = _make_settings()


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not available on this platform
        return None


LOAD_AT_START = _load_average()  # other work on the machine skews timings; the report shows this


@pytest.fixture(scope="session")
def settings() -> BenchSettings:
    return SETTINGS


# ---------------------------------------------------------------------------------------------------
# Providers


@dataclass
class LoRACase:
    """One provider on one shape, ready to run: ``forward()`` returns y (m, n) and builds the graph."""

    provider: str
    shape: Shape
    dropout_p: float
    forward: Callable[[], torch.Tensor]
    x: torch.Tensor
    grad_out: torch.Tensor
    trainable: List[torch.Tensor]  # x, the LoRA factors (and DoRA's m): what a training step writes .grad into
    frozen: List[torch.Tensor]  # the base weight: a parameter, never counted as an activation

    @property
    def parameters(self) -> List[torch.Tensor]:
        """The LoRA factors and the base weight: everything but the input x."""
        return [t for t in self.trainable if t is not self.x] + self.frozen

    def zero_grad(self) -> None:
        """Drops the gradients, as ``optimizer.zero_grad()`` does, so no round accumulates into the last."""
        for t in self.trainable:
            t.grad = None


def _peft_linear(base: nn.Linear, r: int, alpha: float, dropout_p: float) -> nn.Module:
    """PEFT's ``lora.Linear`` around ``base``, built as the tests and the self-check build it."""
    return make_peft_linear(base, r=r, alpha=alpha, dropout=dropout_p)


def _peft_dora_linear(base: nn.Linear, r: int, alpha: float, dropout_p: float) -> nn.Module:
    """PEFT's ``lora.Linear`` around ``base`` with ``LoraConfig(use_dora=True)`` (PEFT >= 0.18's signature, the
    one with ``config=``; older ones take ``use_dora`` as a keyword)."""
    import inspect

    from peft import LoraConfig
    from peft.tuners.lora import Linear

    kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=dropout_p, use_dora=True)
    if "config" in inspect.signature(Linear.__init__).parameters:
        return Linear(base, "default", config=LoraConfig(**kwargs), r=r, lora_alpha=alpha)
    return Linear(base, "default", **kwargs)


_compiled_eager = None


def _compiled_lora_linear_unfused():
    """One ``torch.compile`` of the eager reference, specialised per shape (dynamic=False), compiled lazily."""
    global _compiled_eager
    if _compiled_eager is None:
        import torch._dynamo.config as dynamo_config

        # Every (shape, dropout) pair is its own specialisation; past the default limit of 8 dynamo would
        # silently fall back to eager and the row would lie.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
        _compiled_eager = torch.compile(lora_linear_unfused, dynamic=False)
    return _compiled_eager


def build_case(provider: str, shape: Shape, dropout_p: float, settings: BenchSettings) -> LoRACase:
    """The tensors of ``shape`` (seeded, on the benchmark device) and ``provider``'s forward over them.

    scaling = alpha / r with alpha = 2r, a common choice (any value costs the same).

    Raises:
        ValueError: an unknown ``provider``.
    """
    if provider in settings.skipped:
        pytest.skip(f"{provider}: {settings.skipped[provider]}")
    device, dtype = settings.device, settings.dtype
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*size, generator=generator, device=device, dtype=dtype).mul_(std)

    m, k, n, r = shape.m, shape.k, shape.n, shape.r
    x = randn(m, k).requires_grad_()
    weight = randn(n, k, std=k ** -0.5)  # frozen base weight
    lora_A = randn(r, k, std=k ** -0.5).requires_grad_()
    lora_B = randn(n, r, std=r ** -0.5).requires_grad_()  # non-zero, as after some training
    grad_out = randn(m, n)
    alpha = 2.0 * r
    scaling = alpha / r
    trainable = [x, lora_A, lora_B]

    if provider == "linear":
        trainable = [x]
        forward = lambda: F.linear(x, weight)  # noqa: E731
    elif provider == "eager":
        forward = lambda: lora_linear_unfused(x, weight, None, lora_A, lora_B, scaling, dropout_p)  # noqa: E731
    elif provider in ("torch", "triton"):
        forward = lambda: lora_linear(x, weight, None, lora_A, lora_B, scaling, dropout_p,  # noqa: E731
                                      backend=provider)
    elif provider == "compiled":
        compiled = _compiled_lora_linear_unfused()
        forward = lambda: compiled(x, weight, None, lora_A, lora_B, scaling, dropout_p)  # noqa: E731
    elif provider == "peft":
        base = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        base.weight = nn.Parameter(weight, requires_grad=False)
        layer = _peft_linear(base, r=r, alpha=alpha, dropout_p=dropout_p).to(dtype).train()
        peft_A, peft_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            peft_A.copy_(lora_A)
            peft_B.copy_(lora_B)
        trainable = [x, peft_A, peft_B]
        forward = lambda: layer(x)  # noqa: E731
    elif provider in DORA_PROVIDERS:
        magnitude = weight_norm(weight, lora_A, lora_B, scaling, "torch").to(dtype)
        magnitude.mul_(torch.rand(n, generator=generator, device=device, dtype=dtype).mul_(0.2).add_(0.9))
        base = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        base.weight = nn.Parameter(weight, requires_grad=False)
        if provider == "peft_dora":
            layer = _peft_dora_linear(base, r=r, alpha=alpha, dropout_p=dropout_p).to(dtype).train()
            params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                      layer.lora_magnitude_vector["default"].weight)
        else:
            layer = FusedLoRALinear.from_linear(base, rank=r, alpha=alpha, dropout=dropout_p, use_dora=True,
                                                backend=provider.split("_")[0]).train()
            params = (layer.lora_A, layer.lora_B, layer.lora_magnitude)
        with torch.no_grad():
            for ours, theirs in zip((lora_A, lora_B, magnitude), params):
                theirs.copy_(ours)
        trainable = [x, *params]
        forward = lambda: layer(x)  # noqa: E731
    else:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    return LoRACase(provider, shape, dropout_p, forward, x, grad_out, trainable, [weight])


@pytest.fixture
def lora_case(settings):
    """Factory: ``lora_case(provider, shape, dropout_p)`` -> :class:`LoRACase` (skips unavailable providers)."""
    return lambda provider, shape, dropout_p: build_case(provider, shape, dropout_p, settings)


# ---------------------------------------------------------------------------------------------------
# pytest glue


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` in this folder as test modules (pytest's default pattern is test_*.py)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        # A file named on the command line is collected by pytest itself; returning it here too would
        # collect it twice.
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    """Parametrize any benchmark that asks for ``shape``, ``dropout_p``, ``mode`` or ``provider``.

    ``provider`` is parametrized last so that it varies fastest: the providers of one case run back to back,
    which keeps slow drifts of a shared machine out of their ratios. Providers that cannot run here are
    still listed, and skipped with their reason.
    """
    names = metafunc.fixturenames
    if "shape" in names:
        metafunc.parametrize("shape", SETTINGS.shapes, ids=str)
    if "dropout_p" in names:
        metafunc.parametrize("dropout_p", DROPOUTS, ids=lambda p: f"p{p:g}")
    if "mode" in names:
        metafunc.parametrize("mode", MODES)
    if "provider" in names:
        params = [pytest.param(p, marks=pytest.mark.skip(reason=f"{p}: {SETTINGS.skipped[p]}"))
                  if p in SETTINGS.skipped else p for p in PROVIDERS]
        metafunc.parametrize("provider", params)


def _version(module: str) -> Optional[str]:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # not installed, or no __version__
        return None


def pytest_benchmark_update_machine_info(config, machine_info):
    """Adds what the report's header needs: device, dtype, library versions, skipped providers."""
    s = SETTINGS
    machine_info["lora_bench"] = {
        "device": s.device.type,
        "device_name": s.device_name,
        "dtype": s.dtype_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": LOAD_AT_START,
        "load_average_end": _load_average(),
        "rounds": s.rounds,
        "warmup_rounds": s.warmup,
        "quick": s.quick,
        "skipped_providers": dict(s.skipped),
        # For copies of the tree without .git (where pytest-benchmark's commit_info is empty).
        "commit": os.environ.get("LORA_BENCH_COMMIT") or None,
    }


def pytest_report_header(config):
    s = SETTINGS
    skipped = ", ".join(f"{p} ({why})" for p, why in s.skipped.items()) or "none"
    return [f"lora bench: {s.device.type} ({s.device_name}), {s.dtype_name}, {s.rounds} rounds after "
            f"{s.warmup} warm-up, torch {torch.__version__}, {torch.get_num_threads()} threads"
            + (", QUICK (numbers meaningless)" if s.quick else ""),
            f"lora bench: providers skipped here: {skipped}"]
