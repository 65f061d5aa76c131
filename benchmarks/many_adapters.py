"""Many adapters in one training batch, one adapter per batch row, through a stack of LoRA layers.

    python -m benchmarks.many_adapters [--adapters 1 4 16 64 256] [--rows 64] [--seq 64] [--width 512]
                                       [--layers 4] [--rank 16] [--rounds 5] [--threads N] [--device cpu|cuda]

A stack of ``--layers`` :class:`lora_kernels.FusedLoRALinear` layers (width -> width, frozen base) carrying N
named adapters of rank ``--rank`` (dropout 0.1); x is (max(rows, N), seq, width), row i on adapter i mod N.
Each provider runs forward + backward (training) on the same batch; the median of ``--rounds`` interleaved
rounds after a warm-up, in ms, and each provider's time over ``single``'s from the same rounds:

* ``single``: the whole batch through one adapter (``set_adapter``): the floor;
* ``segmented``: ``lora_kernels.mixed_adapters`` with one adapter per row, its automatic choice: the segmented
  path (each row at its own rank, the adapters in each layer's pool) from three adapters of equal rank up,
  the concatenation below;
* ``concatenated``: the same batch through :func:`lora_kernels.lora_linear_mixed` with ``segmented=False``
  (every row pays the sum of all ranks), skipped above 64 adapters;
* ``loop``: a Python loop over the adapters, each over its own rows (``set_adapter``), skipped above 64.

``--mixed_ranks`` gives the adapters ranks cycling through 4, 8, 16, 32, 64 instead. On CUDA the layers and x
are bf16 and the Triton kernels run (``backend="auto"``); each round is synchronised. The GPU columns of the
README come from ``benchmarks.cost_model`` (predictions, not measurements).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

import triton
from benchmarks.machine import cpu_model
from lora_kernels import (LoRAConfig, add_adapter, iter_lora_layers, lora_linear_mixed, mixed_adapters,
                          replace_linear_with_fused_lora, set_adapter)
from lora_kernels.mixed import AdapterTerm

MIXED_RANKS = (4, 8, 16, 32, 64)


def build(adapters: int, width: int, layers: int, rank: int, mixed_ranks: bool,
          device: torch.device = torch.device("cpu")) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    ranks = [MIXED_RANKS[a % len(MIXED_RANKS)] if mixed_ranks else rank for a in range(adapters)]
    replace_linear_with_fused_lora(model, target_modules="all-linear",
                                   config=LoRAConfig(rank=ranks[0], alpha=2 * ranks[0], dropout=0.1))
    for a in range(1, adapters):
        add_adapter(model, f"a{a}", config=LoRAConfig(rank=ranks[a], alpha=2 * ranks[a], dropout=0.1))
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            for name in layer.adapter_names:
                layer.lora_params(name)[1].normal_(0, 0.02)
    return model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).train()


def names(adapters: int) -> List[str]:
    return ["default"] + [f"a{a}" for a in range(1, adapters)]


def providers(model: nn.Module, adapters: int, x: torch.Tensor) -> Dict[str, Callable[[], None]]:
    rows = [names(adapters)[i % adapters] for i in range(x.shape[0])]
    layers = [layer for _, layer in iter_lora_layers(model)]

    def single():
        set_adapter(model, "default")
        model(x).square().mean().backward()

    def segmented():
        with mixed_adapters(model, rows):
            model(x).square().mean().backward()

    def concatenated():
        index = torch.tensor([i % adapters for i in range(x.shape[0])])
        h = x
        for layer in layers:
            terms = [AdapterTerm(*layer.lora_params(n), layer.lora_configs[n].scaling, layer.lora_configs[n].dropout)
                     for n in names(adapters)]
            h = lora_linear_mixed(h, layer.weight, None, terms, index, training=True, segmented=False)
        h.square().mean().backward()

    def loop():
        total = 0.0
        for a, name in enumerate(names(adapters)):
            set_adapter(model, name)
            members = [i for i in range(x.shape[0]) if i % adapters == a]
            total = total + model(x[members]).square().sum() / x.numel()
        total.backward()

    found = {"single": single, "segmented": segmented}
    if adapters <= 64:
        found.update(concatenated=concatenated, loop=loop)
    return found


def measure(adapters: int, rows: int, seq: int, width: int, layers: int, rank: int, rounds: int,
            mixed_ranks: bool, device: torch.device = torch.device("cpu")) -> Dict[str, float]:
    """{provider: median ms} and {provider + "/single": median ratio of the same round}."""
    model = build(adapters, width, layers, rank, mixed_ranks, device)
    dtype = next(model.parameters()).dtype
    x = torch.randn(max(rows, adapters), seq, width, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    found = providers(model, adapters, x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: Dict[str, List[float]] = {name: [] for name in found}
    for _ in range(rounds + 1):  # the first round warms up
        for name, fn in found.items():
            model.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    result = {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}
    for name in found:
        result[f"{name}/single"] = statistics.median(a / b for a, b in zip(times[name][1:], times["single"][1:]))
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.many_adapters", description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--mixed_ranks", action="store_true", help="ranks cycling through 4, 8, 16, 32, 64")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"the CPU ({cpu_model()}, {torch.get_num_threads()} threads)"
    print(f"Measured on {where}, "
          f"torch {torch.__version__}, Triton {triton.__version__}: {args.layers} layers {args.width}->{args.width}, "
          f"rank {'4-64 mixed' if args.mixed_ranks else args.rank}, dropout 0.1, x (max({args.rows}, N), "
          f"{args.seq}, {args.width}) {'bf16' if device.type == 'cuda' else 'fp32'}, forward+backward; median ms of {args.rounds} interleaved rounds")
    names_ = ["single", "segmented", "concatenated", "loop"]
    print("| adapters | " + " | ".join(f"{n} ms" for n in names_) + " | segmented / single | "
          "concatenated / single | loop / single |")
    print("| ---: | " + " | ".join("---:" for _ in names_) + " | ---: | ---: | ---: |")
    for count in args.adapters:
        r = measure(count, args.rows, args.seq, args.width, args.layers, args.rank, args.rounds, args.mixed_ranks,
                    device)
        cells = [f"{r[n]:.0f}" if n in r else "n/a" for n in names_]
        ratios = [f"{r[n + '/single']:.2f}" if n in r else "n/a" for n in ("segmented", "concatenated", "loop")]
        print(f"| {count} | " + " | ".join(cells + ratios) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
