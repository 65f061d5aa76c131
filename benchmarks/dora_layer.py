"""DoRA beside PEFT's DoRA: one layer's training step, time and bytes kept for backward, side by side in one run.

    python -m benchmarks.dora_layer [--rows 4096] [--width 512] [--rank 16] [--dropout 0.1 0] [--rounds 31]
                                    [--threads N] [--device cpu|cuda]

One linear ``--width`` -> ``--width`` (frozen W, no bias), x (``--rows``, ``--width``), rank ``--rank``,
alpha = 2·rank; fp32 on the CPU, bf16 on CUDA. The providers are those of ``benchmarks/conftest.py`` (one
definition for the pytest suites and this script), each on the same seeded tensors:

* ``linear``: the frozen ``F.linear(x, W)`` alone, the floor;
* ``torch`` (``triton`` on CUDA): our LoRA, :func:`lora_kernels.lora_linear`: the baseline of every time ratio;
* ``torch_dora`` (``triton_dora``): ``FusedLoRALinear(use_dora=True)``, our DoRA;
* ``peft``: PEFT's ``lora.Linear``; ``peft_dora``: the same with ``LoraConfig(use_dora=True)``.

A training step is ``forward(x).backward(dY)`` with x, A, B (and m) requiring grad, in training mode with the
given dropout (one table row group per ``--dropout`` value). Gradients are reset outside the timer.

Timing: two warm-up steps per provider, then ``--rounds`` rounds; each round times one step of every
provider back to back, in an order rotated from round to round, so that a slow stretch of a shared machine
falls on all of them. Reported: the median step time and, per provider, the median over rounds of its time /
our LoRA's time in the same round (what carries over to another machine is the ratio, not the ms).

Bytes kept for backward: :func:`lora_kernels.memory.saved_activation_bytes` (``saved_tensors_hooks`` over one
forward; a storage counts once; parameters, W included, do not count), as ``bench_memory.py`` measures them.

Before timing, the script checks that the providers compute the same thing: at dropout 0, our LoRA against
PEFT's and our DoRA against PEFT's DoRA, the output and every gradient within the dtype's tolerance
(:data:`lora_kernels.testing.TOLERANCES`); it stops with an AssertionError otherwise.

The output is a markdown table per dropout with the command, the date, the commit and the torch, Triton and
PEFT versions in its header; the last line is JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

LABELS = {
    "linear": "frozen `nn.Linear` (floor)",
    "torch": "ours: LoRA (`lora_linear`, torch backend)",
    "triton": "ours: LoRA (`lora_linear`, Triton)",
    "torch_dora": "ours: DoRA (`FusedLoRALinear(use_dora=True)`, torch backend)",
    "triton_dora": "ours: DoRA (`FusedLoRALinear(use_dora=True)`, Triton)",
    "peft": "PEFT `lora.Linear`",
    "peft_dora": "PEFT `lora.Linear`, `use_dora=True`",
}
MISSING = "–"


@dataclass
class Row:
    """One provider at one dropout: median step time (s), median per-round time ratio to the baseline, bytes."""

    provider: str
    median_s: float
    ratio: Optional[float]
    saved_bytes: Optional[int]


def providers_for(backend: str) -> List[str]:
    """The providers of one run: the floor, our LoRA (the baseline, first after the floor), our DoRA, PEFT's two."""
    return ["linear", backend, f"{backend}_dora", "peft", "peft_dora"]


def interleaved_times(steps: Dict[str, Callable[[], None]], rounds: int, warmup: int = 2,
                      reset: Optional[Dict[str, Callable[[], None]]] = None,
                      clock: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    """Seconds per call of every step, ``rounds`` samples each, the steps interleaved within each round.

    Round i runs the steps in their order rotated by i, so no step always runs first (after a pause) or last.
    ``reset[name]()`` runs before each call of ``name`` outside the timer (gradient reset, device sync).

    Raises:
        ValueError: ``rounds`` < 1.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(steps)
    reset = reset or {}
    for name in names:
        for _ in range(warmup):
            reset.get(name, lambda: None)()
            steps[name]()
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            reset.get(name, lambda: None)()
            start = clock()
            steps[name]()
            samples[name].append(clock() - start)
    return samples


def summarise(samples: Dict[str, List[float]], baseline: str,
              saved_bytes: Optional[Dict[str, int]] = None) -> List[Row]:
    """Per provider: the median time and the median over rounds of (its time / the baseline's, same round).

    The per-round ratio cancels what slows a whole round down (another job on a shared machine); the ratio of
    the two medians would not. Without the baseline the ratios are None.
    """
    saved_bytes = saved_bytes or {}
    base = samples.get(baseline)
    rows = []
    for name, times in samples.items():
        ratio = statistics.median(t / b for t, b in zip(times, base)) if base else None
        rows.append(Row(name, statistics.median(times), ratio, saved_bytes.get(name)))
    return rows


def render_table(rows: Sequence[Row], baseline: str) -> List[str]:
    """A markdown table: provider, median ms, time / the baseline, MiB kept for backward, bytes / the baseline."""
    base_bytes = next((r.saved_bytes for r in rows if r.provider == baseline), None)
    lines = [f"| provider | what | median ms | time / `{baseline}` | kept for backward MiB | bytes / `{baseline}` |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = MISSING if r.ratio is None else f"{r.ratio:.2f}"
        mib = MISSING if r.saved_bytes is None else f"{r.saved_bytes / 2 ** 20:.2f}"
        byte_ratio = (f"{r.saved_bytes / base_bytes:.2f}" if r.saved_bytes is not None and base_bytes else MISSING)
        lines.append(f"| `{r.provider}` | {LABELS.get(r.provider, r.provider)} | {r.median_s * 1e3:.1f} | {ratio} | "
                     f"{mib} | {byte_ratio} |")
    return lines


def dora_over_lora(rows: Sequence[Row], samples: Dict[str, List[float]], backend: str) -> Dict[str, Optional[float]]:
    """Each family's DoRA / its own LoRA: median per-round time ratio, and the ratio of bytes kept."""
    by_name = {r.provider: r for r in rows}
    out: Dict[str, Optional[float]] = {}
    for family, lora, dora in (("ours", backend, f"{backend}_dora"), ("peft", "peft", "peft_dora")):
        if lora in samples and dora in samples:
            out[f"{family}_time"] = statistics.median(d / l for d, l in zip(samples[dora], samples[lora]))
            saved_l, saved_d = by_name[lora].saved_bytes, by_name[dora].saved_bytes
            out[f"{family}_bytes"] = saved_d / saved_l if saved_l else None
    return out


# ---------------------------------------------------------------------------------------------------
# Running it


def _versions() -> Dict[str, Optional[str]]:
    def version(module: str) -> Optional[str]:
        try:
            return __import__(module).__version__
        except Exception:  # not installed, or broken on import: the table says so
            return None
    return {"torch": torch.__version__, "triton": version("triton"), "peft": version("peft")}


def _commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return done.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
        return os.environ.get("LORA_BENCH_COMMIT", MISSING)


def _load() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not available on this platform
        return None


def check_same_maths(shape, settings, backend: str) -> None:
    """Our LoRA vs PEFT's and our DoRA vs PEFT's DoRA at dropout 0: output and every gradient.

    Raises:
        AssertionError: a pair disagrees beyond ``TOLERANCES[dtype]`` (naming the tensor).
    """
    from benchmarks.conftest import build_case
    from lora_kernels.testing import assert_close

    for ours, theirs in ((backend, "peft"), (f"{backend}_dora", "peft_dora")):
        if theirs in settings.skipped:
            continue
        results = []
        for provider in (ours, theirs):
            case = build_case(provider, shape, 0.0, settings)
            y = case.forward()
            y.backward(case.grad_out)
            results.append((y.detach(), [t.grad for t in case.trainable]))
        (y_ours, grads_ours), (y_theirs, grads_theirs) = results
        assert_close(y_ours, y_theirs, settings.dtype, f"{ours} vs {theirs}: y")
        for i, (g_ours, g_theirs) in enumerate(zip(grads_ours, grads_theirs)):
            name = ("x", "lora_A", "lora_B", "magnitude")[i]
            assert_close(g_ours, g_theirs, settings.dtype, f"{ours} vs {theirs}: grad of {name}")


def measure(shape, dropout_p: float, settings, backend: str, rounds: int) -> tuple:
    """(rows, samples) for one dropout: every provider that runs here, timed interleaved, and its saved bytes."""
    from benchmarks.bench_memory import measure as measure_memory
    from benchmarks.conftest import build_case

    cases = {p: build_case(p, shape, dropout_p, settings) for p in providers_for(backend)
             if p not in settings.skipped}
    saved = {}
    for name, case in cases.items():
        case.forward().backward(case.grad_out)  # first call outside the count (allocator, lazy imports)
        saved[name] = measure_memory(case, settings)["saved_bytes"]

    def step(case):
        def run():
            case.forward().backward(case.grad_out)
            settings.sync()
        return run

    def reset(case):
        def run():
            case.zero_grad()
            settings.sync()
        return run

    samples = interleaved_times({n: step(c) for n, c in cases.items()}, rounds,
                                reset={n: reset(c) for n, c in cases.items()})
    return summarise(samples, backend, saved), samples


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dora_layer", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096, help="M: rows of x (tokens)")
    p.add_argument("--width", type=int, default=512, help="K = N")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, nargs="+", default=[0.1, 0.0], help="LoRA dropout p, one table each")
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if min(args.rows, args.width, args.rank, args.rounds) < 1:
        p.error("--rows, --width, --rank and --rounds must be >= 1")
    bad = [d for d in args.dropout if not 0 <= d < 1]
    if bad:
        p.error(f"--dropout must be in [0, 1), got {bad}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from benchmarks import conftest

    device = torch.device(args.device)
    backend = "triton" if device.type == "cuda" else "torch"
    settings = conftest.BenchSettings(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                      rounds=args.rounds, warmup=2, quick=False, shapes=[],
                                      skipped=conftest.skip_reasons(device))
    shape = conftest.Shape(args.rows, args.width, args.width, args.rank)
    versions = _versions()
    load_start = _load()
    check_same_maths(conftest.Shape(min(args.rows, 256), args.width, args.width, args.rank), settings, backend)

    results = {}
    for dropout_p in args.dropout:
        results[dropout_p] = measure(shape, dropout_p, settings, backend, args.rounds)
    load_end = _load()

    command = "python -m benchmarks.dora_layer" + "".join(" " + shlex.quote(a) for a in
                                                          (sys.argv[1:] if argv is None else argv))
    dtype = str(settings.dtype).split(".")[-1]
    print(f"Command: `{command}`; commit {_commit()}; {datetime.date.today().isoformat()}")
    print(f"Machine: {settings.device_name}, {torch.get_num_threads()} torch threads; 1-minute load average "
          f"{load_start} at start, {load_end} at end")
    print(f"Software: torch {versions['torch']}, Triton {versions['triton'] or 'not installed'}, "
          f"PEFT {versions['peft'] or 'not installed'}")
    for name, why in settings.skipped.items():
        if name in providers_for(backend):
            print(f"Not in this run: `{name}`: {why}")
    print(f"Measured: one {args.width} -> {args.width} layer (frozen W, no bias), x ({args.rows}, {args.width}), "
          f"rank {args.rank}, alpha {2 * args.rank}, {dtype} on {device}, training step forward+backward; median of "
          f"{args.rounds} interleaved rounds; time / `{backend}` is the median of per-round ratios")
    summary = {}
    for dropout_p, (rows, samples) in results.items():
        ratios = dora_over_lora(rows, samples, backend)
        summary[f"{dropout_p:g}"] = {"rows": [r.__dict__ for r in rows], "dora_over_lora": ratios}
        print()
        print(f"Dropout {dropout_p:g}:")
        print()
        print("\n".join(render_table(rows, backend)))
        fmt = lambda v, unit="": MISSING if v is None else f"{v:.2f}{unit}"  # noqa: E731
        print()
        print(f"DoRA / its own LoRA: ours {fmt(ratios.get('ours_time'), 'x')} time, "
              f"{fmt(ratios.get('ours_bytes'), 'x')} bytes; PEFT {fmt(ratios.get('peft_time'), 'x')} time, "
              f"{fmt(ratios.get('peft_bytes'), 'x')} bytes")
    print()
    print(json.dumps({"command": command, "versions": versions, "threads": torch.get_num_threads(),
                      "load_average": [load_start, load_end], "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
