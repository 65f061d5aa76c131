"""``python -m lora_kernels.check``: is the GPU path sound, here or on your GPU?

Two modes:

* ``--aot`` (no GPU needed): the compile gate of :mod:`lora_kernels.ops.aot`. Compiles every kernel in
  every configuration the launchers can choose for sm90/sm80/sm86/sm89 (``--arch``) with the installed
  Triton, reads registers, spills, shared memory and the MMA form of each, prints one table and exits 1 on
  any failure (compile error, shared memory over the arch's limit, a spill in a default configuration, an
  sm90 fp16/bf16 GEMM without wgmma). ``--quick`` compiles a representative subset (the test suite's);
  ``--full`` adds every (N, K) pair and every autotune candidate. ``--only KIND ...`` keeps the cases of
  those kinds (``lora``, ``quantized``, ``dora``, ``segmented``). ``--out DIR`` writes ``report.md`` and
  ``report.json`` there.
* default (a CUDA GPU): every kernel (forward and all gradients, with and without dropout and bias) against
  the float64 reference at the benchmark shapes (``--shapes MxNxK:r,...``), then forward+backward timings
  of ours vs the frozen ``F.linear`` vs eager LoRA vs PEFT (medians of ``triton.testing.do_bench``), one
  table; exit 1 on a mismatch. Without CUDA it exits 2, unless ``--interpret`` runs the correctness part on
  Triton's CPU interpreter at tiny shapes.

Exit status: 0 all good, 1 a check failed, 2 cannot run here (no CUDA, no ptxas, TRITON_INTERPRET set for
``--aot``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from . import testing as _testing

ARCHS = (90, 80, 86, 89)
# The Triton versions whose full default sweep is committed under benchmarks/results/compile-gate/, and the
# archs each covers (a test keeps this equal to the committed reports).
SWEPT = {"3.9.0": (90, 80, 86, 89), "3.8.0": (90, 80)}


def stack_lines() -> List[str]:
    """torch, Triton, CUDA and the GPU this process sees, and whether a committed sweep covers this Triton;
    the lines every report of ``check`` starts with."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines = [f"Stack: torch {torch.__version__}, Triton {triton_version or 'not installed'}, CUDA "
             f"{torch.version.cuda or 'none (a CPU build)'}, GPU: {gpu}."]
    if triton_version in SWEPT:
        lines.append(f"The committed compile-gate sweep covers Triton {triton_version} "
                     f"(sm{', sm'.join(map(str, SWEPT[triton_version]))}).")
    else:
        lines.append(f"WARNING: no committed compile-gate sweep covers Triton {triton_version} (swept: "
                     f"{', '.join(SWEPT)}); run `python -m lora_kernels.check --aot` to gate this Triton.")
    return lines


# ------------------------------------------------------------------------------------------------- --aot


def _sweep_job(arch: int, precision: str, full: bool, quick: bool, kinds=None):
    from lora_kernels.ops import aot

    start = time.time()
    reports, errors = aot.sweep_arch(arch, (precision,), full=full, quick=quick, kinds=kinds)
    print(f"check --aot: sm{arch} {precision}: {len(reports)} distinct kernels, {len(errors)} compile errors, "
          f"{time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return [dataclasses.asdict(r) for r in reports], [dataclasses.asdict(e) for e in errors]


def _merge(reports: List[dict]) -> List[dict]:
    """The mask kernel is compiled by every job of an arch: keep one row per (arch, hash)."""
    seen, merged = set(), []
    for r in reports:
        if (r["arch"], r["hash"]) not in seen:
            seen.add((r["arch"], r["hash"]))
            merged.append(r)
    return merged


def _table(reports: Sequence[dict]) -> List[str]:
    from lora_kernels.ops.aot import KernelReport

    rows = ["| arch | kernel | roles | precision | config | default | regs | spills (st/ld B) | shared B "
            "| MMA | cp.async | widest load | cases |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        config = KernelReport(**r).config
        rows.append(f"| sm{r['arch']} | {r['kernel']} | {'/'.join(r['roles'])} | {r['precision']} | {config} | "
                    f"{'yes' if r['default'] else 'autotune'} | {r['registers']} | "
                    f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {r['mma']} | {r['ldgsts']} | "
                    f"{r['widest_load']} | {r['cases']} |")
    return rows


def _summary(archs: Sequence[int], reports: Sequence[dict], errors: Sequence[dict]) -> List[str]:
    from lora_kernels.ops.standin import GPUS

    lines = []
    for arch in archs:
        mine = [r for r in reports if r["arch"] == arch]
        default = [r for r in mine if r["default"]]
        over = [r for r in default if r["shared"] > GPUS[arch].max_shared_mem]
        spills = [r for r in default if r["spill_stores"] or r["spill_loads"]]
        wide_gemm = [r for r in default if r["precision"] in ("fp16", "bf16") and r["constexprs"].get("BLOCK_M", 0) >= 64
                     and set(r["roles"]) & {"forward", "dX", "dY"}]
        wgmma = sum(r["mma"] == "HGMMA" for r in wide_gemm)
        lines.append(f"sm{arch}: {len(mine)} distinct kernels ({len(default)} default, {len(mine) - len(default)} "
                     f"autotune only), {sum(e['arch'] == arch for e in errors)} compile errors, "
                     f"{len(over)} default over shared memory ({GPUS[arch].max_shared_mem} B), "
                     f"{len(spills)} default with spills, wgmma in {wgmma}/{len(wide_gemm)} fp16/bf16 "
                     f"forward/dX/dY kernels with BLOCK_M >= 64")
    return lines


def run_aot(args) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("check --aot compiles for real GPU targets: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    from lora_kernels.ops import aot

    missing = aot.missing_tools()
    if missing:
        print(f"check --aot: {missing}", file=sys.stderr)
        return 2
    precisions = args.precision or list(aot.PRECISIONS)
    jobs = [(arch, p) for p in precisions for arch in args.arch]  # every arch of the first precision first
    start = time.time()
    reports, errors = [], []
    parts = Path(args.out) / "jobs" if args.out else None
    if parts:  # each finished (arch, precision) is kept, so a long sweep that is stopped still reports
        parts.mkdir(parents=True, exist_ok=True)

    def done(arch, precision, result):
        if parts:
            (parts / f"sm{arch}-{precision}.json").write_text(json.dumps(result, default=str))
        return result

    if args.from_jobs:  # a report from the per-job results of an earlier (possibly stopped) sweep
        files = sorted(Path(args.from_jobs).glob("sm*-*.json"))
        results = [json.loads(f.read_text()) for f in files]
        args.arch = sorted({int(f.stem[2:].split("-")[0]) for f in files}, key=ARCHS.index)
    elif parts and args.resume:  # jobs already in jobs/ are not compiled again
        results = [json.loads((parts / f"sm{a}-{p}.json").read_text()) for a, p in jobs
                   if (parts / f"sm{a}-{p}.json").exists()]
        todo = [(a, p) for a, p in jobs if not (parts / f"sm{a}-{p}.json").exists()]
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_sweep_job, arch, p, args.full, args.quick, args.only): (arch, p) for arch, p in todo}
            results += [done(*futures[f], f.result()) for f in concurrent.futures.as_completed(futures)]
    elif args.jobs <= 1:
        results = [done(arch, p, _sweep_job(arch, p, args.full, args.quick, args.only)) for arch, p in jobs]
    else:
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_sweep_job, arch, p, args.full, args.quick, args.only): (arch, p) for arch, p in jobs}
            results = [done(*futures[f], f.result()) for f in concurrent.futures.as_completed(futures)]
    for r, e in results:
        reports += r
        errors += e
    reports = _merge(reports)
    failures = aot.verdicts([aot.KernelReport(**r) for r in reports], [aot.CompileError(**e) for e in errors])
    elapsed = time.time() - start

    lines = [f"# Compile gate: `python -m lora_kernels.check --aot {' '.join(args.argv)}`".rstrip(), "",
             f"Triton {aot.triton_version()}, ptxas {aot.ptxas_version()}; {elapsed:.0f} s on this machine.", "",
             *stack_lines(), ""]
    lines += _summary(args.arch, reports, errors) + [""]
    lines += _table(reports) + [""]
    if errors:
        lines += ["## Compile errors", ""] + [f"- sm{e['arch']} {e['case']}: {e['error']}" for e in errors] + [""]
    lines += ["## Failures", ""] + ([f"- {f}" for f in failures] or ["none"])
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text("\n".join(lines) + "\n")
        (out / "report.json").write_text(json.dumps(
            {"command": f"python -m lora_kernels.check --aot {' '.join(args.argv)}".strip(),
             "triton": aot.triton_version(), "ptxas": aot.ptxas_version(), "seconds": round(elapsed),
             "summary": _summary(args.arch, reports, errors), "failures": failures, "errors": errors,
             "kernels": reports}, indent=1, default=str) + "\n")
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_kernels.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--aot", action="store_true", help="compile gate for GPU targets (no GPU needed)")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS,
                        help="--aot: compute capabilities to compile for (default: all)")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "tf32", "fp16", "bf16"),
                        help="precisions to sweep / check (default: all; --interpret: fp32 fp16)")
    parser.add_argument("--full", action="store_true", help="--aot: every (N, K) pair and autotune candidate")
    parser.add_argument("--quick", action="store_true", help="--aot: the representative subset of the tests")
    parser.add_argument("--only", nargs="+", choices=("lora", "quantized", "dora", "segmented"),  # = aot.KINDS
                        help="--aot: only these kinds of cases (default: all); e.g. --only segmented")
    parser.add_argument("--jobs", type=int, default=1, help="--aot: compile processes (default 1)")
    parser.add_argument("--out", help="--aot: write report.md and report.json (and jobs/, one file per arch and "
                                      "precision as each finishes) to this directory")
    parser.add_argument("--resume", action="store_true", help="--aot: keep the jobs/ results already in --out")
    parser.add_argument("--from-jobs", metavar="DIR", help="--aot: report from the jobs/ files of an earlier sweep")
    parser.add_argument("--shapes", type=parse_shapes,
                        help="device check: MxKxN:rank[,...] (default: the benchmark shapes)")
    parser.add_argument("--interpret", action="store_true",
                        help="device check on Triton's CPU interpreter at tiny shapes (no timing)")
    parser.add_argument("--no-timing", action="store_true", help="device check: correctness only")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = [a for a in argv if a != "--aot"]
    if args.interpret and "triton" not in sys.modules:  # must precede the first import of triton
        os.environ["TRITON_INTERPRET"] = "1"
    if args.aot:
        return run_aot(args)
    return run_device(args)


# ------------------------------------------------------------------------------------------ on a device

# The benchmark shapes (benchmarks/conftest.py, CUDA): (M, K, N, rank). 8192 tokens at MiniMind widths, a
# LLaMA-7B attention projection and its FFN up-projection.
BENCH_SHAPES = ((8192, 512, 512, 8), (8192, 512, 512, 16), (8192, 768, 768, 8), (8192, 768, 768, 16),
                (8192, 4096, 4096, 16), (8192, 4096, 11008, 16))
# --interpret: odd sizes (tile edges, rank padding) small enough for the CPU interpreter.
INTERPRET_SHAPES = ((37, 40, 24, 5), (70, 64, 48, 16))
# Relative error bars per precision: the tests' own (lora_kernels.testing states and justifies them); errors
# are max|ours - ref| / max|ref| against the float64 reference on the same rounded inputs.
TOLERANCES = {name: _testing.TOLERANCES[key] for name, key in _testing.PRECISIONS.items()}
GRADIENTS = ("x", "weight", "bias", "lora_A", "lora_B")


def parse_shapes(text: str) -> List[tuple]:
    """``"8192x768x768:16,1x4096x4096:64"`` (M x K x N : rank) -> [(8192, 768, 768, 16), ...]."""
    shapes = []
    for item in text.split(","):
        try:
            dims, rank = item.strip().split(":")
            m, k, n = (int(v) for v in dims.lower().split("x"))
            shape = (m, k, n, int(rank))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not MxKxN:rank (e.g. 8192x768x768:16)")
        if min(shape) < 1:
            raise argparse.ArgumentTypeError(f"shape {item!r}: every size must be >= 1")
        shapes.append(shape)
    return shapes


def _precision_context(precision: str):
    """fp32 matmuls in TF32 for ``"tf32"``, IEEE otherwise (torch's new API where it has it)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def scope():
        matmul = torch.backends.cuda.matmul
        if hasattr(torch.backends, "fp32_precision"):
            previous = matmul.fp32_precision
            matmul.fp32_precision = "tf32" if precision == "tf32" else "ieee"
        else:
            previous = matmul.allow_tf32
            matmul.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            if hasattr(torch.backends, "fp32_precision"):
                matmul.fp32_precision = previous
            else:
                matmul.allow_tf32 = previous
    return scope()


def _inputs(shape, dtype, device, bias: bool, seed: int = 0):
    import torch

    m, k, n, r = shape
    g = torch.Generator().manual_seed(seed)
    t = {"x": torch.randn(m, k, generator=g), "weight": torch.randn(n, k, generator=g) / k ** 0.5,
         "bias": torch.randn(n, generator=g) if bias else None,
         "lora_A": torch.randn(r, k, generator=g) / k ** 0.5, "lora_B": torch.randn(n, r, generator=g) / r ** 0.5}
    return {name: (v.to(device, dtype) if v is not None else None) for name, v in t.items()}


def check_correctness(shape, precision: str, bias: bool, dropout_p: float, device) -> dict:
    """Ours (``lora_linear(backend="triton")``, forward and every gradient) vs the float64 reference on the
    same inputs and the same dropout mask; returns the relative error of y and each gradient."""
    import torch

    from lora_kernels import lora_linear, lora_linear_reference
    from lora_kernels.backends import draw_seed_tensor
    from lora_kernels.ops import lora_linear as ops

    dtype = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    inputs = _inputs(shape, dtype, device, bias)
    names = [n for n in GRADIENTS if inputs[n] is not None]
    grad_out = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(7)).to(device, dtype)
    torch.manual_seed(1234)  # the seed lora_linear draws on x's device, so the reference gets the kernels' mask
    mask = ops.dropout_mask(draw_seed_tensor(device), (shape[0], shape[1]), dropout_p, device) if dropout_p > 0 else None
    ours = {n: (v.detach().clone().requires_grad_(True) if v is not None else None) for n, v in inputs.items()}
    with _precision_context(precision):
        torch.manual_seed(1234)
        y = lora_linear(**ours, scaling=2.0, dropout_p=dropout_p, backend="triton")
        grads = torch.autograd.grad(y, [ours[n] for n in names], grad_out)
    ref = {n: (v.detach().double().requires_grad_(True) if v is not None else None) for n, v in inputs.items()}
    y_ref = lora_linear_reference(**ref, scaling=2.0, dropout_mask=mask, dropout_p=dropout_p)
    grads_ref = torch.autograd.grad(y_ref, [ref[n] for n in names], grad_out.double())

    errors = {"y": _testing.relative_error(y, y_ref)}
    errors.update({f"d{n}": _testing.relative_error(g, gr) for n, g, gr in zip(names, grads, grads_ref)})
    return errors


def time_providers(shape, precision: str, device) -> dict:
    """Median ms of forward+backward (x, A, B requiring grad, W frozen, dropout 0.1 where the provider has
    it): ours, the frozen ``F.linear`` alone, eager LoRA, PEFT's ``lora.Linear`` (None without peft)."""
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from lora_kernels import lora_linear
    from lora_kernels.reference import lora_linear_unfused

    dtype = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    t = _inputs(shape, dtype, device, bias=False)
    x = t["x"].requires_grad_(True)
    a, b = t["lora_A"].requires_grad_(True), t["lora_B"].requires_grad_(True)
    grad = torch.randn(shape[0], shape[2], device=device, dtype=dtype)
    steps = {
        "ours": lambda: lora_linear(x, t["weight"], None, a, b, 2.0, 0.1, backend="triton"),
        "linear": lambda: F.linear(x, t["weight"]),
        "eager": lambda: lora_linear_unfused(x, t["weight"], None, a, b, 2.0, 0.1),
    }
    try:
        base = torch.nn.Linear(shape[1], shape[2], bias=False, device=device, dtype=dtype).requires_grad_(False)
        peft = _testing.make_peft_linear(base, r=shape[3], alpha=2 * shape[3], dropout=0.1)
        peft.to(device=device, dtype=dtype)
        steps["peft"] = lambda: peft(x)
    except ImportError:
        pass
    times = {"peft": None}
    with _precision_context(precision):
        for name, step in steps.items():
            times[name] = do_bench(lambda: step().backward(grad), warmup=10, rep=50, return_mode="median",
                                   grad_to_none=[x, a, b])
    return times


def run_device(args) -> int:
    import torch

    print("\n".join(stack_lines()) + "\n")  # first, so that a "cannot run here" below names the stack too

    if args.interpret:
        device = torch.device("cpu")
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("check --interpret: set TRITON_INTERPRET=1 before Python starts (python -m lora_kernels.check "
                  "sets it itself when run as a command)", file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("check: torch sees no CUDA device, so there is nothing to run the kernels on. Use --interpret "
              "(correctness on Triton's CPU interpreter at tiny shapes) or --aot (compile for GPU targets).",
              file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    shapes = args.shapes or (INTERPRET_SHAPES if args.interpret else BENCH_SHAPES)
    precisions = args.precision or (["fp32", "fp16"] if args.interpret else ["bf16", "fp16", "tf32", "fp32"])
    if args.interpret and "bf16" in precisions:
        print("check --interpret: Triton's interpreter computes bf16 tl.dot wrongly; bf16 skipped", file=sys.stderr)
        precisions = [p for p in precisions if p != "bf16"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "Triton CPU interpreter"
    print(f"# lora_kernels check on {name}\n")
    print("| shape (MxKxN:r) | precision | bias | dropout | worst output | rel. error | tolerance | result |")
    print("|---|---|---|---|---|---|---|---|")
    failed = 0
    for shape in shapes:
        for precision in precisions:
            for bias in (False, True):
                for p in (0.0, 0.1):
                    errors = check_correctness(shape, precision, bias, p, device)
                    worst = max(errors, key=lambda k: errors[k] if errors[k] == errors[k] else float("inf"))
                    ok = all(e <= TOLERANCES[precision] for e in errors.values())  # NaN fails
                    failed += not ok
                    print(f"| {shape[0]}x{shape[1]}x{shape[2]}:{shape[3]} | {precision} | {bias} | {p} | {worst} | "
                          f"{errors[worst]:.2e} | {TOLERANCES[precision]:g} | {'ok' if ok else 'MISMATCH'} |")
    if device.type == "cuda" and not args.no_timing:
        print("\n| shape (MxKxN:r) | precision | ours ms | F.linear ms | eager ms | PEFT ms | ours / linear "
              "| eager / ours | PEFT / ours |")
        print("|---|---|---|---|---|---|---|---|---|")
        for shape in shapes:
            for precision in precisions[:1]:
                t = time_providers(shape, precision, device)
                peft = f"{t['peft']:.3f}" if t["peft"] else "n/a"
                peft_ratio = f"{t['peft'] / t['ours']:.2f}" if t["peft"] else "n/a"
                print(f"| {shape[0]}x{shape[1]}x{shape[2]}:{shape[3]} | {precision} | {t['ours']:.3f} | "
                      f"{t['linear']:.3f} | {t['eager']:.3f} | {peft} | {t['ours'] / t['linear']:.2f} | "
                      f"{t['eager'] / t['ours']:.2f} | {peft_ratio} |")
    print(f"\n{failed} mismatch(es)" if failed else "\nall kernels match the float64 reference")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
