"""The trainer's optimizer step with many adapters: one step of N adapters trained at once (one mixed batch
through ``lora_kernels.mixed_adapters``) against the N steps of N runs of each adapter alone on the same rows.

    python -m benchmarks.many_adapters_step [--adapters 16] [--batch_size 4] [--max_seq_len 64] [--steps 6]
                                            [--fused 1] [--threads N] [--device cpu|cuda] [--base PATH]

Both sides are ``minimind.train_lora``'s own ``setup`` and ``train_step`` (forward, backward, per-adapter
clipping, AdamW, the finiteness checks) on the bundled base unless ``--base``; the data sets are slices of
different sizes of the bundled SFT data (adapter k: 16 + 8k conversations). Step s of the run with N adapters
takes the rows that step s of each run alone takes (``minimind.lora_trainer.batches``), so both sides do the
same work but for padding: the mixed batch is padded to its longest row, each run alone to its own.

Each side is timed over steps 2..``--steps`` (step 1 warms up); printed: the median ms per step of the
run with N adapters, the median of the summed N steps of the runs alone, and their ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

ASSETS = Path(__file__).resolve().parents[1] / "minimind" / "assets"


def write_data_sets(folder: Path, count: int) -> List[Path]:
    """``count`` SFT data sets of 16, 24, 32, ... conversations, consecutive slices of the bundled data."""
    rows = [line for name in ("lora_identity.jsonl", "lora_terse.jsonl", "chat_base.jsonl")
            for line in (ASSETS / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    paths, start = [], 0
    for k in range(count):
        n = 16 + 8 * k
        if start + n > len(rows):
            start = 0
        path = folder / f"ad{k:02d}.jsonl"
        path.write_text("\n".join(rows[start:start + n]) + "\n", encoding="utf-8")
        paths.append(path)
        start += n
    return paths


def steps_of(run, count: int) -> list:
    """The first ``count`` optimizer steps of ``run`` (each a list of collated micro-batches)."""
    from minimind.lora_trainer.batches import data_loader, epoch_steps, windows

    steps, epoch = [], 0
    while len(steps) < count:  # a small data set's epoch may be shorter than ``count`` steps
        steps += epoch_steps(run.cfg, run.rt, run.train_set, epoch)
        epoch += 1
    steps = steps[:count]
    loader = data_loader(run.train_set, [m for step in steps for m in step], run.tokenizer.pad_token_id, 0)
    return list(windows(loader, [len(step) for step in steps]))


def timed(run, micro_batches, sync) -> float:
    from minimind.train_lora import train_step

    sync()
    start = time.perf_counter()
    train_step(run, micro_batches)
    sync()
    return time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.many_adapters_step", description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=4, help="rows of each data set per step")
    p.add_argument("--max_seq_len", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="steps per side (the first warms up)")
    p.add_argument("--fused", type=int, choices=[0, 1], default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--base", default=None, help="a MiniMind base (default: the bundled one)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.adapters < 2 or args.steps < 2:
        p.error("--adapters and --steps must be >= 2")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from minimind.train_lora import parse_args, setup

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_data_sets(folder, args.adapters)
        names = [path.stem for path in paths]
        common = ["--batch_size", str(args.batch_size), "--max_seq_len", str(args.max_seq_len), "--rank",
                  str(args.rank), "--answers", "0", "--no_progress", "--device", args.device, "--max_steps",
                  str(args.steps), *(["--fused"] if args.fused else []), *(["--base", args.base] if args.base else [])]
        quiet = contextlib.redirect_stdout(io.StringIO())  # the 1 + N runs' headers
        with quiet:
            together = setup(parse_args(common + ["--out_dir", str(folder / "together"), "--data_path",
                                                  ",".join(map(str, paths)), "--lora_name", ",".join(names)]))
            alone = [setup(parse_args(common + ["--out_dir", str(folder / name), "--data_path", str(path),
                                                "--lora_name", name])) for name, path in zip(names, paths)]
        try:
            mixed_steps = steps_of(together, args.steps)
            alone_steps = [steps_of(run, args.steps) for run in alone]
            mixed_ms, alone_ms = [], []
            for s in range(args.steps):  # interleaved, so that a change in the machine's load hits both sides
                mixed_ms.append(timed(together, mixed_steps[s], sync) * 1e3)
                alone_ms.append(sum(timed(run, steps[s], sync) for run, steps in zip(alone, alone_steps)) * 1e3)
        finally:
            for run in [together, *alone]:
                run.close()
    mixed, sequential = statistics.median(mixed_ms[1:]), statistics.median(alone_ms[1:])
    rows = sum(int(m[0].shape[0]) for m in mixed_steps[1])
    # Padded tokens over the timed steps: the mixed batch pads every row to the longest of all data sets' rows.
    padded_mixed = sum(m[0].numel() for step in mixed_steps[1:] for m in step)
    padded_alone = sum(m[0].numel() for steps in alone_steps for step in steps[1:] for m in step)
    backend = together.backend.split(":")[0].split(" (")[0]
    print(f"one step of {args.adapters} adapters at once ({rows} rows, {backend}, "
          f"{device}, {torch.get_num_threads()} threads): {mixed:.1f} ms; the {args.adapters} runs alone, one step "
          f"each on the same rows: {sequential:.1f} ms; alone / at once = {sequential / mixed:.2f} (padded tokens "
          f"at once / alone: {padded_mixed / padded_alone:.2f})")
    print(json.dumps({"adapters": args.adapters, "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
                      "fused": bool(args.fused), "device": str(device), "threads": torch.get_num_threads(),
                      "together_ms": round(mixed, 2), "alone_ms": round(sequential, 2),
                      "ratio": round(sequential / mixed, 3),
                      "padded_tokens_ratio": round(padded_mixed / padded_alone, 3),
                      "together_all_ms": [round(t, 2) for t in mixed_ms],
                      "alone_all_ms": [round(t, 2) for t in alone_ms]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
