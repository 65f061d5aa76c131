"""Host (Python) time of one LoRA-linear training step, with the GPU's work taken out.

    python -m benchmarks.host_overhead [--arch 90] [--rounds 15] [--calls 200] [--dropout 0.1] [--depth 8]

At MiniMind widths (512-768) a fused LoRA linear's GPU work is tens of microseconds, so the Python a call
spends before its launches decides whether the fused path can beat eager on a real GPU. This measures that
Python on a machine without one:

* **ours**: ``lora_linear(..., backend="triton")`` forward and ``backward()``, under
  :func:`lora_kernels.ops.standin.stand_in_gpu` in ``"stub"`` mode: Triton compiles the kernels for the
  stand-in target (sm90 by default: an H100's 132 SMs pick the configs), the launchers run exactly as on a
  GPU (argument binding, cache lookups, workspaces, grids) and only the compiled kernel's C launcher is a
  no-op. The tensors are tiny CPU tensors, so the allocations the launchers make cost what they cost on a
  GPU's caching allocator, roughly. The Triton check that refuses CPU tensors is patched to accept them.
* **launchers**: the same two calls without autograd: ``lora_kernels.ops.lora_linear.forward`` and
  ``backward`` called directly (the Python our launchers spend per training step: checks, plan lookup,
  output allocations, seed, launches);
* **autograd floor**: an ``autograd.Function`` that saves x, A and B, returns empty outputs and launches
  nothing: what torch's autograd (``Function.apply`` and the engine's ``backward()``) charges any fused op
  on this host before it does anything, so ``ours - floor`` is the Python of our own layer;
* **linear**: ``F.linear`` forward and backward on the same tiny tensors (the frozen base alone: the floor);
* **peft**: HF PEFT's ``lora.Linear`` around an ``nn.Linear``, forward and backward, the same way.

Every provider runs with x requiring grad and the base frozen, as a LoRA layer in a model does, twice: one
layer and its own ``backward()``, and a stack of ``--depth`` layers (K = N) with one ``backward()`` from the
last, reported per layer: in a model the engine's fixed cost per ``backward()`` call is shared by every
layer, so the stack's figure is what a layer adds to a training step. All steps are measured interleaved,
``--rounds`` times ``--calls`` steps each; the figure is the median over rounds of the mean µs per step. The
last line is JSON: ``{"ours_us": ..., "ours_stack_us": ..., "launchers_us": ..., "floor_us": ...,
"floor_stack_us": ..., "linear_us": ..., "linear_stack_us": ..., "peft_us": ..., "peft_stack_us": ...,
"depth": ..., "launches": ...}`` (``*_stack_us`` per layer).

Run it in a process without ``TRITON_INTERPRET=1`` (the stand-in needs compiled kernels).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F


def _inputs(m: int, k: int, n: int, r: int, dtype: torch.dtype, depth: int) -> Dict[str, object]:
    """x (M, K), dY (M, N), and ``depth`` layers' (W, b, A, B); layer i > 0 maps N to N (a stack needs K = N)."""
    g = torch.Generator().manual_seed(0)
    layers = []
    for i in range(depth):
        k_in = k if i == 0 else n
        layers.append((torch.randn(n, k_in, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype),
                       torch.randn(r, k_in, generator=g).to(dtype).requires_grad_(),
                       torch.randn(n, r, generator=g).to(dtype).requires_grad_()))
    return {"x": torch.randn(m, k, generator=g).to(dtype).requires_grad_(), "layers": layers,
            "grad": torch.randn(m, n, generator=g).to(dtype)}


def _trainable(t: Dict[str, object]) -> List[torch.Tensor]:
    return [t["x"]] + [p for _, _, a, bb in t["layers"] for p in (a, bb)]


def _zero_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


@contextlib.contextmanager
def _triton_accepts_cpu_tensors() -> Iterator[None]:
    from lora_kernels.backends import resolve  # resolve_backend asks this module's triton_refusal

    refusal = resolve.triton_refusal
    resolve.triton_refusal = lambda x: None
    try:
        yield
    finally:
        resolve.triton_refusal = refusal


# Each provider gives a training step over the first ``depth`` layers: the layers' forwards, then one
# backward() from the last output, as a model's step does.

def _chain(t: Dict[str, object], layers: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[], None]:
    def step():
        h = t["x"]
        for layer in layers:
            h = layer(h)
        h.backward(t["grad"])
    return step


def step_ours(t: Dict[str, object], dropout_p: float, depth: int = 1) -> Callable[[], None]:
    from lora_kernels import lora_linear

    return _chain(t, [lambda h, w=w, b=b, a=a, bb=bb: lora_linear(h, w, b, a, bb, 2.0, dropout_p=dropout_p,
                                                                  backend="triton")
                      for w, b, a, bb in t["layers"][:depth]])


def step_launchers(t: Dict[str, object], dropout_p: float, depth: int = 1) -> Callable[[], None]:
    """Our launchers without autograd, one layer (their Python does not depend on what is around them)."""
    from lora_kernels.backends import draw_seed_tensor
    from lora_kernels.ops import lora_linear as ops

    w, b, a, bb = (p.detach() for p in t["layers"][0])
    x, grad = t["x"].detach(), t["grad"]
    needs = (True, False, False, True, True)  # dX, dA, dB: a frozen base

    def step():
        seed = draw_seed_tensor(x.device) if dropout_p > 0 else None
        _, s = ops.forward(x, w, b, a, bb, 2.0, dropout_p, seed)
        ops.backward(grad, x, w, a, bb, s, 2.0, dropout_p, seed, needs)
    return step


class _Floor(torch.autograd.Function):
    """The least a fused op can do through autograd: save its inputs, return outputs, compute nothing."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B):
        ctx.save_for_backward(x, lora_A, lora_B)
        return x.new_empty(x.shape[0], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B = ctx.saved_tensors
        return torch.empty_like(x), None, None, torch.empty_like(lora_A), torch.empty_like(lora_B)


def step_floor(t: Dict[str, object], dropout_p: float, depth: int = 1) -> Callable[[], None]:
    return _chain(t, [lambda h, w=w, b=b, a=a, bb=bb: _Floor.apply(h, w, b, a, bb)
                      for w, b, a, bb in t["layers"][:depth]])


def step_linear(t: Dict[str, object], dropout_p: float, depth: int = 1) -> Callable[[], None]:
    return _chain(t, [lambda h, w=w, b=b: F.linear(h, w, b) for w, b, _, _ in t["layers"][:depth]])


def step_peft(t: Dict[str, object], dropout_p: float, depth: int = 1) -> Optional[Callable[[], None]]:
    try:
        import peft  # noqa: F401
    except ImportError:
        return None
    from lora_kernels.testing import make_peft_linear

    modules = []
    for w, _, a, _ in t["layers"][:depth]:
        (n, k), r = w.shape, a.shape[0]
        base = torch.nn.Linear(k, n, dtype=w.dtype)
        base.requires_grad_(False)
        layer = make_peft_linear(base, r=r, alpha=2 * r, dropout=dropout_p)
        modules.append(layer.train())
    return _chain(t, modules)


PROVIDERS = {"ours": step_ours, "launchers": step_launchers, "floor": step_floor, "linear": step_linear,
             "peft": step_peft}


def measure(steps: Dict[str, Callable[[], None]], grads: Sequence[torch.Tensor], rounds: int,
            calls: int) -> Dict[str, float]:
    """Median over ``rounds`` of the mean µs per call of each step, the steps interleaved round by round."""
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up: compilation, caches, first allocations
        for _ in range(20):
            step()
        _zero_grads(grads)
    for _ in range(rounds):
        for name, step in steps.items():
            _zero_grads(grads)
            start = time.perf_counter()
            for _ in range(calls):
                step()
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="stand-in GPU arch: 90 (H100), 80 (A100), 86, 89")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout p (0 for none)")
    p.add_argument("--shape", type=int, nargs=4, default=[8, 64, 64, 16], metavar=("M", "K", "N", "R"),
                   help="x (M, K), W (N, K), rank R: tiny, so that F.linear and PEFT, which do compute, cost "
                        "their host time; ours launches nothing whatever the shape")
    p.add_argument("--depth", type=int, default=8,
                   help="layers in the stack measured per layer (one backward() per step, as in a model); "
                        "needs K = N when > 1; 1 to skip the stack")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    m, k, n, r = args.shape
    if args.rounds < 1 or args.calls < 1 or args.depth < 1:
        p.error("--rounds, --calls and --depth must be >= 1")
    if args.depth > 1 and k != n:
        p.error(f"--depth {args.depth} stacks layers of N -> N: the shape needs K = N, got K={k}, N={n}")

    from lora_kernels.ops.standin import stand_in_gpu

    dtype = getattr(torch, args.dtype)
    t = _inputs(m, k, n, r, dtype, args.depth)
    steps: Dict[str, Callable[[], None]] = {}
    for name, provider in PROVIDERS.items():
        for depth in sorted({1, args.depth}):
            if name == "launchers" and depth > 1:
                continue
            step = provider(t, args.dropout, depth)
            if step is not None:  # PEFT not installed: left out
                steps[name if depth == 1 else f"{name}_stack"] = step
    torch.set_num_threads(1)  # tiny tensors: threads only add noise
    with stand_in_gpu(arch=args.arch, launch="stub") as standin, _triton_accepts_cpu_tensors():
        step_ours(t, args.dropout)()
        launches = len(standin.kernels)
        result = measure(steps, _trainable(t), args.rounds, args.calls)
    for name in [name for name in result if name.endswith("_stack")]:
        result[name] /= args.depth  # per layer

    print(f"host time per LoRA-linear forward+backward (µs, median of {args.rounds} rounds x {args.calls} calls; "
          f"stand-in {standin.spec.name}, x ({m}, {k}) -> {n}, rank {r}, {args.dtype}, dropout {args.dropout}, "
          f"frozen base)")
    stacked = args.depth > 1
    print(f"  {'':62s} {'one layer':>10s}" + (f" {'per layer of ' + str(args.depth):>16s}" if stacked else ""))
    print(f"  {'':62s} {'+backward()':>10s}" + (f" {'+backward()':>16s}" if stacked else ""))

    def row(label: str, name: str) -> None:
        if name not in result:
            return
        stack = result.get(f"{name}_stack")
        print(f"  {label:62s} {result[name]:10.1f}" + (f" {stack:16.1f}" if stack is not None else ""))

    row(f"ours (lora_linear, Triton, {launches} launches, launches stubbed)", "ours")
    row("  of which our launchers (ops.forward + ops.backward, no autograd)", "launchers")
    row("  autograd floor (a Function that computes nothing)", "floor")
    row("F.linear (frozen base alone)", "linear")
    row("PEFT lora.Linear (eager torch)", "peft")
    print(json.dumps({**{f"{name}_us": round(value, 1) for name, value in result.items()},
                      "depth": args.depth, "launches": launches}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
