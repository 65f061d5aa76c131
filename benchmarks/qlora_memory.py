"""Peak memory of one CPU training step of a small Llama-style model: 16-bit base vs NF4 vs int8 (QLoRA).

    python -m benchmarks.qlora_memory [--dim 1024] [--hidden 2752] [--layers 4] [--tokens 256] [--rank 16]

Each configuration runs in a fresh Python process (so that one's freed memory cannot hide another's peak)
that builds the model in bf16, swaps every projection for a ``FusedLoRALinear`` (``quantize`` None, "nf4"
with double quantization, or "int8"; torch backend), then runs one forward + backward + AdamW step on the
LoRA parameters. It reports the process's resident memory (Linux ``/proc/self/status``) after the imports,
after the model is built (the weights; freed heap returned with glibc's ``malloc_trim``), and its peak
during the step (``VmHWM``, reset after the build, so the transients of quantizing do not count), with the bytes of the base weights
(:func:`lora_kernels.quant.weight_bytes`). The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Optional, Sequence


def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process from /proc, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _trim() -> None:
    """Returns freed heap to the OS (glibc ``malloc_trim``), so that resident memory shows what is live."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: resident memory then includes freed heap
        pass


def _reset_peak() -> None:
    """Resets the peak resident size (VmHWM) to the current one (Linux >= 4.0: ``clear_refs`` value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _child(args: argparse.Namespace) -> dict:
    import gc

    import torch
    import torch.nn as nn

    from lora_kernels import replace_linear_with_fused_lora
    from lora_kernels.quant import weight_bytes

    torch.manual_seed(0)
    after_imports = _status_mib("VmRSS")
    layers = nn.ModuleList()
    quantize = None if args.quantize == "none" else args.quantize
    for _ in range(args.layers):
        dim, hidden = args.dim, args.hidden
        block = nn.ModuleDict({name: nn.Linear(i, o, bias=False, dtype=torch.bfloat16) for name, i, o in (
            ("q_proj", dim, dim), ("k_proj", dim, dim), ("v_proj", dim, dim), ("o_proj", dim, dim),
            ("gate_proj", dim, hidden), ("up_proj", dim, hidden), ("down_proj", hidden, dim))})
        replace_linear_with_fused_lora(block, rank=args.rank, target_modules="all-linear", backend="torch",
                                       quantize=quantize, double_quant=quantize == "nf4")
        layers.append(block)
        gc.collect()

    def forward(h):
        for block in layers:
            a = block["o_proj"](block["q_proj"](h) + block["k_proj"](h) + block["v_proj"](h))
            h = h + a
            h = h + block["down_proj"](torch.nn.functional.silu(block["gate_proj"](h)) * block["up_proj"](h))
        return h

    gc.collect()
    _trim()  # the bf16 weights quantized away, and quantization's temporaries, are freed: give them back
    built = _status_mib("VmRSS")
    _reset_peak()  # the step's peak, not the quantization's transients while building
    trainable = [p for p in layers.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    x = torch.randn(args.tokens, args.dim, dtype=torch.bfloat16)
    loss = forward(x).float().square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return {"quantize": args.quantize, "weight_bytes": weight_bytes(layers), "rss_after_imports_mib": after_imports,
            "rss_after_build_mib": built, "peak_rss_mib": _status_mib("VmHWM"), "loss": float(loss.detach())}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.qlora_memory", description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=2752)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--quantize", choices=["none", "nf4", "int8"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quantize is not None:  # a child: one configuration
        print(json.dumps(_child(args)))
        return 0
    rows = []
    for quantize in ("none", "nf4", "int8"):
        cmd = [sys.executable, "-m", "benchmarks.qlora_memory", "--quantize", quantize, "--dim", str(args.dim),
               "--hidden", str(args.hidden), "--layers", str(args.layers), "--tokens", str(args.tokens),
               "--rank", str(args.rank)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"CPU, bf16, {args.layers} Llama-style blocks (dim {args.dim}, hidden {args.hidden}), {args.tokens} "
          f"tokens, rank {args.rank}, torch backend; resident memory (/proc/self/status), measured:")
    print("| base | weight MiB | RSS after build MiB | peak RSS of a step MiB | peak - after imports MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['quantize']} | {r['weight_bytes'] / 2**20:.1f} | {r['rss_after_build_mib']:.0f} | "
              f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['rss_after_imports_mib']:.0f} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
