"""Mixed batches: one LoRA linear whose batch rows use four different adapters, timed per implementation.

    python -m benchmarks.mixed_batch [--rows 8] [--seq 256] [--width 768] [--rank 16] [--adapters 4] [--rounds 15]
                                     [--threads N] [--device cpu|cuda]

Providers (the same base W (width x width, frozen, no bias) and adapters; x (rows, seq, width), the rows
spread evenly over the adapters):

* ``single``: one adapter over the whole batch (:func:`lora_kernels.lora_linear`): the floor a mixed batch
  approaches;
* ``mixed``: :func:`lora_kernels.lora_linear_mixed`, one fused call over the adapters concatenated along the
  rank (Σr = adapters x rank);
* ``loop``: a Python loop over adapters, each running :func:`lora_kernels.lora_linear` on its own rows
  (``x[rows]``) and writing them back (``y[rows] = ...``): what one does without mixed batches;
* ``peft``: HF PEFT's ``lora.Linear`` with ``adapter_names=[...]`` (PEFT refuses it in training, so forward
  only; skipped without peft).

Modes: ``forward`` (eval, no_grad, no dropout) and ``forward+backward`` (training, dropout 0.1, x, A and B
requiring grad). Each number is the median of ``--rounds`` timed calls after two warm-up calls, in ms. The
backend is ``"auto"`` (Triton on CUDA, the torch backend on the CPU). The GPU predictions beside the
measurements are ``benchmarks.cost_model``'s (``mixed_table``), not measurements.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from lora_kernels import AdapterTerm, lora_linear, lora_linear_mixed


def _time(fn: Callable[[], None], rounds: int, sync: Callable[[], None]) -> float:
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _peft_layer(weight: torch.Tensor, adapters: Sequence[AdapterTerm]):
    """A PEFT-wrapped linear with ``adapters`` named a0, a1, ... (None without peft)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                        dtype=weight.dtype)

        def forward(self, x):
            return self.proj(x)

    module = One()
    with torch.no_grad():
        module.proj.weight.copy_(weight)
    rank = adapters[0].lora_A.shape[0]
    model = None
    for i, term in enumerate(adapters):
        config = LoraConfig(r=rank, lora_alpha=term.scaling * rank, target_modules=["proj"])
        if model is None:
            model = get_peft_model(module, config, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", config)
        with torch.no_grad():
            model.base_model.model.proj.lora_A[f"a{i}"].weight.copy_(term.lora_A)
            model.base_model.model.proj.lora_B[f"a{i}"].weight.copy_(term.lora_B)
    return model.eval()


def measure(rows: int, seq: int, width: int, rank: int, num_adapters: int, rounds: int,
            device: torch.device, dtype: torch.dtype) -> Dict[str, Dict[str, float]]:
    """{mode: {provider: median ms}} for one layer and a batch spread over ``num_adapters`` adapters."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(width, width, generator=gen) / width ** 0.5).to(device, dtype)
    adapters = [AdapterTerm((torch.randn(rank, width, generator=gen) * 0.02).to(device, dtype).requires_grad_(),
                            (torch.randn(width, rank, generator=gen) * 0.02).to(device, dtype).requires_grad_(),
                            2.0, 0.1) for _ in range(num_adapters)]
    x = torch.randn(rows, seq, width, generator=gen).to(device, dtype).requires_grad_()
    row_adapter = torch.arange(rows, device=device) % num_adapters
    members = [(row_adapter == a).nonzero().flatten() for a in range(num_adapters)]
    grad_out = torch.randn(rows, seq, width, generator=gen).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def single(training):
        t = adapters[0]
        return lora_linear(x, weight, None, t.lora_A, t.lora_B, t.scaling, t.dropout_p, training)

    def mixed(training):
        return lora_linear_mixed(x, weight, None, adapters, row_adapter, training)

    def loop(training):
        y = x.new_empty(rows, seq, width)
        for t, index in zip(adapters, members):
            y[index] = lora_linear(x[index], weight, None, t.lora_A, t.lora_B, t.scaling, t.dropout_p, training)
        return y

    providers = {"single": single, "mixed": mixed, "loop": loop}
    results: Dict[str, Dict[str, float]] = {"forward": {}, "forward+backward": {}}
    for name, fn in providers.items():
        with torch.no_grad():
            results["forward"][name] = _time(lambda: fn(False), rounds, sync)

        def step():
            for p in [x] + [p for t in adapters for p in (t.lora_A, t.lora_B)]:
                p.grad = None
            fn(True).backward(grad_out)

        results["forward+backward"][name] = _time(step, rounds, sync)
    peft = _peft_layer(weight, adapters)
    if peft is not None:
        names = [f"a{int(a)}" for a in row_adapter.tolist()]
        with torch.no_grad():
            results["forward"]["peft"] = _time(lambda: peft(x, adapter_names=names), rounds, sync)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mixed_batch", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8, help="batch rows (spread evenly over the adapters)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row")
    p.add_argument("--width", type=int, default=768, help="K = N")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        # On a loaded machine, multi-threaded elementwise ops wait for busy cores; one thread is steadier.
        torch.set_num_threads(args.threads)
    if min(args.rows, args.seq, args.width, args.rank, args.adapters, args.rounds) < 1:
        p.error("every size must be >= 1")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = measure(args.rows, args.seq, args.width, args.rank, args.adapters, args.rounds, device, dtype)
    print(f"Measured: one {args.width}->{args.width} LoRA layer, x ({args.rows}, {args.seq}, {args.width}), "
          f"{args.adapters} adapters of rank {args.rank}, {str(dtype).split('.')[-1]} on {device} "
          f"({torch.get_num_threads()} threads); median ms of {args.rounds} calls")
    names = ["single", "mixed", "loop", "peft"]
    lines: List[str] = ["| mode | " + " | ".join(f"{n} ms" for n in names) + " | loop / mixed | peft / mixed |",
                        "| --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: |"]
    for mode, row in results.items():
        cells = [f"{row[n]:.2f}" if n in row else "n/a" for n in names]
        ratio = lambda n: f"{row[n] / row['mixed']:.2f}" if n in row else "n/a"  # noqa: E731
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {ratio('loop')} | {ratio('peft')} |")
    print("\n".join(lines))
    from benchmarks.cost_model import GPUS, mixed_table
    print()
    print("Predicted (roofline model, not measured) µs per training step of the same layer, bf16, at M = 8192:")
    print(mixed_table(8192, [args.width], args.rank, args.adapters, [GPUS["h100"], GPUS["a100"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
