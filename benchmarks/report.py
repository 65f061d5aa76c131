"""Turn one pytest-benchmark JSON into markdown tables and a PNG chart.

    python -m pytest benchmarks/ --benchmark-only --benchmark-json=results.json
    python -m benchmarks.report results.json [--out DIR]

writes ``DIR/report.md`` and ``DIR/report.png`` (DIR defaults to the JSON's folder) and prints the markdown.

Every ratio is computed between rows of the same JSON, i.e. the same run on the same machine; nothing is
compared across runs. The rows are recognised by ``extra_info["kind"]``, which the benchmarks set:

* ``kernel`` (``bench_lora_linear.py``): median time per provider, mode, shape and dropout, with
  ``× linear`` = time / time of the frozen linear alone (1.00 would mean LoRA is free) and
  ``vs eager``, ``vs peft`` = their time / this time (speed-ups: above 1 means faster than them); a DoRA
  provider (``*_dora``) is compared with PEFT's DoRA (``peft_dora``), and there is no eager DoRA to compare with;
* ``memory`` (``bench_memory.py``): bytes saved for backward (and peak CUDA memory) per provider, with
  ``÷ peft`` = this / PEFT's (below 1 means less memory than PEFT);
* ``train`` (``bench_train.py``): MiniMind SFT steps/s and tokens/s per variant, with speed-ups against
  full-parameter SFT and the eager LoRAs.

A provider missing from the run (skipped, or not installed) shows as ``–`` wherever it would appear.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

PROVIDERS = ("linear", "eager", "peft", "torch", "triton", "compiled", "peft_dora", "torch_dora", "triton_dora")
# The providers the headline compares with PEFT and the eager baseline (a DoRA one with PEFT's DoRA only).
OURS = ("torch", "triton", "torch_dora", "triton_dora")
MODES = ("forward", "backward", "forward+backward")
TRAIN_VARIANTS = ("full", "minimind_lora", "eager_lora", "fused_lora")
TRAIN_BASELINES = (("full", "full SFT"), ("minimind_lora", "MiniMind LoRA"), ("eager_lora", "eager LoRA"))
MISSING = "–"

# (shape, dropout_p): one LoRA linear problem; (shape, dropout_p, mode): one kernel comparison.
Case = Tuple[str, float]


@dataclass
class Timing:
    """The statistics of one benchmark row that the report uses, in seconds."""

    median: float
    iqr: float
    rounds: int


@dataclass
class Results:
    """The rows of one run, sorted by kind."""

    kernel: Dict[Tuple[str, float, str], Dict[str, Timing]]  # (shape, p, mode) -> provider -> timing
    memory: Dict[Case, Dict[str, dict]]  # (shape, p) -> provider -> extra_info
    train: Dict[str, Tuple[Timing, dict]]  # variant -> (timing, extra_info)
    shape_order: List[str]
    duplicates: List[str]


def _shape_key(info: dict) -> tuple:
    return (info.get("m", 0), info.get("k", 0), info.get("n", 0), info.get("r", 0))


def collect(data: dict) -> Results:
    """Sorts the benchmark rows of a pytest-benchmark JSON by kind; a row seen twice keeps the last value
    (and is listed in ``duplicates``)."""
    kernel: Dict[Tuple[str, float, str], Dict[str, Timing]] = defaultdict(dict)
    memory: Dict[Case, Dict[str, dict]] = defaultdict(dict)
    train: Dict[str, Tuple[Timing, dict]] = {}
    shapes: Dict[str, tuple] = {}
    duplicates = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        kind = info.get("kind")
        stats = bench.get("stats") or {}
        timing = Timing(median=float(stats.get("median", float("nan"))), iqr=float(stats.get("iqr", 0.0)),
                        rounds=int(stats.get("rounds", 0)))
        if kind in ("kernel", "memory"):
            shapes.setdefault(info["shape"], _shape_key(info))
            table = kernel[(info["shape"], float(info["dropout_p"]), info["mode"])] if kind == "kernel" \
                else memory[(info["shape"], float(info["dropout_p"]))]
            if info["provider"] in table:
                duplicates.append(bench.get("name", "?"))
            table[info["provider"]] = timing if kind == "kernel" else info
        elif kind == "train":
            if info["variant"] in train:
                duplicates.append(bench.get("name", "?"))
            train[info["variant"]] = (timing, info)
    return Results(dict(kernel), dict(memory), train, sorted(shapes, key=shapes.get), duplicates)


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """numerator / denominator, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return numerator / denominator


def counterpart(provider: str, baseline: str) -> str:
    """The row ``provider`` is compared with for ``baseline`` (``"peft"``, ``"eager"``): the baseline's DoRA
    (``peft_dora``, ``eager_dora``, the latter never measured) for a DoRA provider, else the baseline itself."""
    return f"{baseline}_dora" if provider.endswith("_dora") else baseline


def kernel_ratios(timings: Dict[str, Timing], provider: str) -> Dict[str, Optional[float]]:
    """For one (shape, p, mode): ``× linear`` (time ratio) and the speed-ups ``vs eager`` and ``vs peft``
    (against :func:`counterpart`: PEFT's DoRA for a DoRA provider)."""
    median = lambda name: timings[name].median if name in timings else None  # noqa: E731
    own = median(provider)
    return {"x_linear": ratio(own, median("linear")), "vs_eager": ratio(median(counterpart(provider, "eager")), own),
            "vs_peft": ratio(median(counterpart(provider, "peft")), own)}


# ---------------------------------------------------------------------------------------------------
# Formatting


def fmt_ms(seconds: Optional[float]) -> str:
    """Milliseconds with three significant figures (at least three decimals below 1 ms)."""
    if seconds is None:
        return MISSING
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_ratio(value: Optional[float]) -> str:
    return MISSING if value is None else f"{value:.2f}×"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return MISSING
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: Optional[float]) -> str:
    if n is None:
        return MISSING
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], align: Optional[str] = None) -> List[str]:
    """A markdown table; ``align`` is one character per column, ``l`` or ``r`` (default: first left)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _present(providers: Iterable[str]) -> List[str]:
    present = set(providers)
    return [p for p in PROVIDERS if p in present] + sorted(present - set(PROVIDERS))


# ---------------------------------------------------------------------------------------------------
# Sections


def header(data: dict) -> List[str]:
    machine = data.get("machine_info") or {}
    bench = machine.get("lora_bench") or {}
    commit = data.get("commit_info") or {}
    device = bench.get("device_name") or (machine.get("cpu") or {}).get("brand_raw") or machine.get("machine", "?")
    versions = [f"torch {bench['torch']}" if bench.get("torch") else None,
                f"CUDA {bench['cuda']}" if bench.get("cuda") else None,
                f"triton {bench['triton']}" if bench.get("triton") else None,
                f"peft {bench['peft']}" if bench.get("peft") else None,
                f"Python {machine['python_version']}" if machine.get("python_version") else None]
    commit_text = MISSING
    if commit.get("id") and commit["id"] != "unversioned":  # pytest-benchmark's word for "no git here"
        commit_text = f"`{commit['id'][:10]}`" + (" (with uncommitted changes)" if commit.get("dirty") else "")
    elif bench.get("commit"):  # a tree copied without .git, commit given by LORA_BENCH_COMMIT
        commit_text = f"`{bench['commit'][:10]}` (from LORA_BENCH_COMMIT)"
    lines = ["# lora_kernels benchmarks", "",
             f"- device: **{device}** ({bench.get('device', '?')}, torch threads: {bench.get('torch_threads', '?')}), "
             f"dtype **{bench.get('dtype', '?')}**",
             "- software: " + ", ".join(v for v in versions if v),
             f"- commit: {commit_text}; run {data.get('datetime', '?')[:19].replace('T', ' ')} UTC; "
             f"pytest-benchmark {data.get('version', '?')}",
             f"- timing: median of {bench.get('rounds', '?')} rounds after {bench.get('warmup_rounds', '?')} warm-up "
             "per row; every ratio compares rows of this one run"]
    start, end = bench.get("load_average_start"), bench.get("load_average_end")
    if start is not None or end is not None:
        # The run itself adds about one unit per busy thread to the end value.
        busy = (start or 0) >= 0.5 or (end or 0) >= (bench.get("torch_threads") or 1) + 0.5
        cores = f" on {bench['cpu_count']} cores" if bench.get("cpu_count") else ""
        shown = " / ".join(MISSING if v is None else f"{v:g}" for v in (start, end))
        lines.append(f"- 1-minute load average at start / end: {shown}{cores}"
                     + (": other work shared the machine, so timings are noisier" if busy else ""))
    if bench.get("quick"):
        lines.append("- **QUICK run (LORA_BENCH_QUICK=1): tiny shapes, two rounds; the numbers mean nothing**")
    for provider, why in (bench.get("skipped_providers") or {}).items():
        lines.append(f"- not in this run: `{provider}`: {why}")
    return lines + [""]


def headline(results: Results) -> List[str]:
    """forward+backward, one row per (shape, dropout): each provider's median, and ours against PEFT/eager."""
    cases = [(s, p) for s in results.shape_order for p in sorted({p for (s2, p, _) in results.kernel if s2 == s})
             if (s, p, "forward+backward") in results.kernel]
    if not cases:
        return []
    providers = _present(prov for (s, p, mode), t in results.kernel.items() if mode == "forward+backward" for prov in t)
    ours = [p for p in OURS if p in providers]
    headers = ["shape", "dropout"] + [f"{p} (ms)" for p in providers]
    vs_peft = [o for o in ours if counterpart(o, "peft") in providers]
    vs_eager = [o for o in ours if counterpart(o, "eager") in providers]
    headers += [f"{o} vs {counterpart(o, 'peft')}" for o in vs_peft]
    headers += [f"{o} vs eager" for o in vs_eager]
    rows = []
    for shape, p in cases:
        timings = results.kernel[(shape, p, "forward+backward")]
        row = [shape, f"{p:g}"] + [fmt_ms(timings[x].median) if x in timings else MISSING for x in providers]
        row += [fmt_ratio(kernel_ratios(timings, o)["vs_peft"]) for o in vs_peft]
        row += [fmt_ratio(kernel_ratios(timings, o)["vs_eager"]) for o in vs_eager]
        rows.append(row)
    return (["## Forward+backward of one LoRA linear (median ms; speed-ups above 1 mean faster)", ""]
            + table(headers, rows, "ll" + "r" * (len(headers) - 2)) + [""])


def kernel_section(results: Results) -> List[str]:
    lines = ["## Every kernel row", "",
             "`× linear`: time / time of the frozen linear alone (the floor). `vs eager`, `vs peft`: their time / "
             "this time (above 1: faster than them); a DoRA row (`*_dora`) is compared with PEFT's DoRA. IQR: "
             "interquartile range of the rounds.", ""]
    for mode in MODES:
        keys = [(s, p) for s in results.shape_order
                for p in sorted({p for (s2, p, m) in results.kernel if s2 == s and m == mode})]
        if not keys:
            continue
        rows = []
        for shape, p in keys:
            timings = results.kernel[(shape, p, mode)]
            for provider in _present(timings):
                t, r = timings[provider], kernel_ratios(timings, provider)
                rows.append([shape, f"{p:g}", provider, fmt_ms(t.median), fmt_ms(t.iqr), fmt_ratio(r["x_linear"]),
                             fmt_ratio(r["vs_eager"]), fmt_ratio(r["vs_peft"])])
        lines += [f"### {mode}", ""]
        lines += table(["shape", "dropout", "provider", "median (ms)", "IQR (ms)", "× linear", "vs eager", "vs peft"],
                       rows, "lll" + "r" * 5)
        lines.append("")
    return lines if len(lines) > 4 else []


def memory_section(results: Results) -> List[str]:
    if not results.memory:
        return []
    has_peak = any("peak_bytes" in info for case in results.memory.values() for info in case.values())
    headers = ["shape", "dropout", "provider", "saved for backward", "÷ peft"]
    if has_peak:
        headers += ["peak fwd+bwd (CUDA)", "÷ peft"]
    rows = []
    for shape in results.shape_order:
        for p in sorted({p for (s, p) in results.memory if s == shape}):
            case = results.memory[(shape, p)]
            for provider in _present(case):
                info, peft = case[provider], case.get(counterpart(provider, "peft"), {})
                row = [shape, f"{p:g}", provider, fmt_bytes(info.get("saved_bytes")),
                       fmt_ratio(ratio(info.get("saved_bytes"), peft.get("saved_bytes")))]
                if has_peak:
                    row += [fmt_bytes(info.get("peak_bytes")), fmt_ratio(ratio(info.get("peak_bytes"),
                                                                                peft.get("peak_bytes")))]
                rows.append(row)
    return (["## Memory of one LoRA linear", "",
             "Saved for backward: the activations autograd keeps between forward and backward (parameters "
             "excluded); `linear` keeps none since its weight is frozen. Peak: CUDA memory allocated during "
             "forward+backward beyond the inputs. `÷ peft`: this / PEFT's (below 1: less memory); a DoRA row "
             "(`*_dora`) is divided by PEFT's DoRA.", ""]
            + table(headers, rows, "lll" + "r" * (len(headers) - 3)) + [""])


def train_section(results: Results) -> List[str]:
    if not results.train:
        return []
    variants = [v for v in TRAIN_VARIANTS if v in results.train] + sorted(set(results.train) - set(TRAIN_VARIANTS))
    first = results.train[variants[0]][1]
    setup = (f"MiniMind hidden {first.get('hidden_size', '?')}, {first.get('num_hidden_layers', '?')} layers, "
             f"batch {first.get('batch_size', '?')} × {first.get('seq_len', '?')} tokens, LoRA rank "
             f"{first.get('rank', '?')} on the square linears, AdamW, {first.get('dtype', '?')}")
    baselines = [(v, label) for v, label in TRAIN_BASELINES if v in results.train]
    headers = ["variant", "backend", "trainable params", "median step (ms)", "steps/s", "tokens/s"]
    headers += [f"vs {label}" for _, label in baselines]
    rows = []
    for variant in variants:
        timing, info = results.train[variant]
        tokens = info.get("tokens_per_step")
        row = [variant, str(info.get("backend", MISSING)), fmt_count(info.get("trainable_params")),
               fmt_ms(timing.median), f"{1 / timing.median:.2f}" if timing.median > 0 else MISSING,
               fmt_count(tokens / timing.median) if tokens and timing.median > 0 else MISSING]
        row += [fmt_ratio(ratio(results.train[b][0].median, timing.median)) for b, _ in baselines]
        rows.append(row)
    return (["## End-to-end MiniMind SFT step (forward, backward, optimizer)", "", setup + ". `vs X`: X's step "
             "time / this step time (above 1: faster than X).", ""] + table(headers, rows, "ll" + "r" * (len(headers) - 2))
            + [""])


def render(data: dict, chart_name: Optional[str] = None) -> str:
    """The whole markdown report of one run."""
    results = collect(data)
    lines = header(data)
    if chart_name:
        lines += [f"![chart]({chart_name})", ""]
    lines += headline(results) + memory_section(results) + train_section(results) + kernel_section(results)
    if results.duplicates:
        lines += ["Rows seen more than once (the last one is used): " + ", ".join(results.duplicates), ""]
    if not (results.kernel or results.memory or results.train):
        lines += ["No lora_kernels benchmark rows in this file.", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------
# Chart

COLORS = {"linear": "#9e9e9e", "eager": "#ff9800", "peft": "#e53935", "torch": "#1e88e5", "triton": "#43a047",
          "compiled": "#8e24aa", "peft_dora": "#ef9a9a", "torch_dora": "#90caf9", "triton_dora": "#a5d6a7"}
TRAIN_COLORS = {"full": "#9e9e9e", "minimind_lora": "#a1887f", "eager_lora": "#ff9800", "fused_lora": "#1e88e5"}


def chart(data: dict, path: Path) -> bool:
    """Writes a PNG: per mode, each provider's time relative to the frozen linear; saved-for-backward bytes;
    training tokens/s. Returns False (and writes nothing) when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = collect(data)
    panels = [m for m in MODES if any(key[2] == m for key in results.kernel)]
    n = len(panels) + bool(results.memory) + bool(results.train)
    if n == 0:
        return False
    fig, axes = plt.subplots(n, 1, figsize=(12, 3.6 * n), squeeze=False)
    axes = list(axes[:, 0])
    for ax, mode in zip(axes, panels):
        cases = [(s, p) for s in results.shape_order for p in sorted({p for (s2, p, m) in results.kernel
                                                                      if s2 == s and m == mode})]
        providers = _present(prov for (s, p, m), t in results.kernel.items() if m == mode for prov in t)
        relative = all("linear" in results.kernel[(s, p, mode)] for s, p in cases)
        width = 0.8 / max(len(providers), 1)
        for i, provider in enumerate(providers):
            xs, ys = [], []
            for j, (s, p) in enumerate(cases):
                timings = results.kernel[(s, p, mode)]
                if provider in timings:
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    ys.append(kernel_ratios(timings, provider)["x_linear"] if relative else timings[provider].median * 1e3)
            ax.bar(xs, ys, width, label=provider, color=COLORS.get(provider))
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{s}\np={p:g}" for s, p in cases], fontsize=7)
        if relative:
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("time / frozen linear" if relative else "median ms")
        ax.set_title(f"{mode}: lower is better")
        ax.legend(fontsize=8, ncol=len(providers))
    k = len(panels)
    if results.memory:
        ax = axes[k]
        k += 1
        cases = [(s, p) for s in results.shape_order for p in sorted({p for (s2, p) in results.memory if s2 == s})]
        providers = _present(prov for case in results.memory.values() for prov in case)
        width = 0.8 / max(len(providers), 1)
        for i, provider in enumerate(providers):
            xs, ys = [], []
            for j, case in enumerate(cases):
                info = results.memory[case].get(provider)
                if info is not None and info.get("saved_bytes") is not None:
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    ys.append(info["saved_bytes"] / 2 ** 20)
            ax.bar(xs, ys, width, label=provider, color=COLORS.get(provider))
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{s}\np={p:g}" for s, p in cases], fontsize=7)
        ax.set_ylabel("MiB")
        ax.set_title("saved for backward per layer: lower is better")
        ax.legend(fontsize=8, ncol=len(providers))
    if results.train:
        ax = axes[k]
        variants = [v for v in TRAIN_VARIANTS if v in results.train] + sorted(set(results.train) - set(TRAIN_VARIANTS))
        values = [results.train[v][1].get("tokens_per_step", 0) / results.train[v][0].median for v in variants]
        ax.bar(variants, values, color=[TRAIN_COLORS.get(v, "#607d8b") for v in variants])
        for x, value in enumerate(values):
            ax.annotate(fmt_count(value), (x, value), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("tokens / s")
        ax.set_title("MiniMind SFT throughput: higher is better")
    bench = (data.get("machine_info") or {}).get("lora_bench") or {}
    about = ", ".join(str(v) for v in (bench.get("device_name"), bench.get("dtype"),
                                       bench.get("torch_threads") and f"torch threads: {bench['torch_threads']}") if v)
    fig.suptitle(f"lora_kernels benchmarks: {about}" if about else "lora_kernels benchmarks")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json=FILE)")
    parser.add_argument("--out", type=Path, default=None, help="folder for report.md and report.png "
                        "(default: the JSON's folder)")
    parser.add_argument("--no-chart", action="store_true", help="markdown only")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        print(f"report: cannot read {args.json}: {err}", file=sys.stderr)
        return 2
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        print(f"report: {args.json} is not a pytest-benchmark JSON (no 'benchmarks' list)", file=sys.stderr)
        return 2
    out = args.out or args.json.parent
    out.mkdir(parents=True, exist_ok=True)
    chart_path = out / "report.png"
    has_chart = not args.no_chart and chart(data, chart_path)
    if not args.no_chart and not has_chart:
        print("report: no chart (matplotlib missing or nothing to plot)", file=sys.stderr)
    markdown = render(data, chart_path.name if has_chart else None)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"report: wrote {out / 'report.md'}" + (f" and {chart_path}" if has_chart else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
