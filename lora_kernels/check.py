"""``python -m lora_kernels.check``: is the GPU path sound, here or on your GPU?

Two modes:

* ``--aot`` (no GPU needed): the compile gate of :mod:`lora_kernels.ops.aot`. Compiles every kernel in
  every configuration the launchers can choose for sm90/sm80/sm86/sm89 (``--arch``) with the installed
  Triton, reads registers, spills, shared memory and the MMA form of each, prints one table and exits 1 on
  any failure (compile error, shared memory over the arch's limit, a spill in a default configuration, an
  sm90 fp16/bf16 GEMM without wgmma). ``--quick`` compiles a representative subset (the test suite's);
  ``--full`` adds every (N, K) pair and every autotune candidate. ``--out DIR`` writes ``report.md`` and
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

ARCHS = (90, 80, 86, 89)


# ------------------------------------------------------------------------------------------------- --aot


def _sweep_job(arch: int, precision: str, full: bool, quick: bool):
    from lora_kernels.ops import aot

    reports, errors = aot.sweep_arch(arch, (precision,), full=full, quick=quick)
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
    jobs = [(arch, p) for arch in args.arch for p in precisions]
    start = time.time()
    reports, errors = [], []
    if args.jobs <= 1:
        results = [_sweep_job(arch, p, args.full, args.quick) for arch, p in jobs]
    else:
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_sweep_job, *zip(*jobs), [args.full] * len(jobs), [args.quick] * len(jobs)))
    for r, e in results:
        reports += r
        errors += e
    reports = _merge(reports)
    failures = aot.verdicts([aot.KernelReport(**r) for r in reports], [aot.CompileError(**e) for e in errors])
    elapsed = time.time() - start

    lines = [f"# Compile gate: `python -m lora_kernels.check --aot {' '.join(args.argv)}`".rstrip(), "",
             f"Triton {aot.triton_version()}, ptxas {aot.ptxas_version()}; {elapsed:.0f} s on this machine.", ""]
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
                        help="--aot: precisions to sweep (default: all)")
    parser.add_argument("--full", action="store_true", help="--aot: every (N, K) pair and autotune candidate")
    parser.add_argument("--quick", action="store_true", help="--aot: the representative subset of the tests")
    parser.add_argument("--jobs", type=int, default=1, help="--aot: compile processes (default 1)")
    parser.add_argument("--out", help="--aot: write report.md and report.json to this directory")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = [a for a in argv if a != "--aot"]
    if args.aot:
        return run_aot(args)
    return run_device(args)


def run_device(args) -> int:
    raise NotImplementedError


if __name__ == "__main__":
    sys.exit(main())
