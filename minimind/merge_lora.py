"""Fold a LoRA adapter into its base: ``python -m minimind.merge_lora --base B --lora L --out OUT``.

The result is a full checkpoint in MiniMind's format (a ``torch.save``'d state_dict with MiniMind's key
names for ``.pth``, or our safetensors with the config in its metadata), which MiniMind's own scripts and
``minimind.load_minimind`` load like any other base. The adapter may be MiniMind's format
(``<module>.lora.A.weight``), ours (``lora_kernels.save_lora``) or a HF PEFT adapter directory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from lora_kernels import merge_and_unload


def merge_into_base(base: str, lora: str, arch: Optional[str] = None):
    """Loads ``base``, applies the adapter ``lora`` and returns the model with plain merged linears.

    Raises:
        FileNotFoundError, ValueError: unreadable files or an adapter that does not fit the base.
    """
    from .lora_io import load_adapter
    from .model import load_minimind

    model = load_minimind(base, **({"arch": arch} if arch else {}))
    load_adapter(model, lora)
    return merge_and_unload(model)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minimind.merge_lora", description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="MiniMind base checkpoint (.pth or .safetensors)")
    p.add_argument("--lora", required=True, help="adapter: MiniMind .pth, lora_kernels .safetensors/.pth, or a PEFT adapter directory")
    p.add_argument("--out", required=True, help="merged checkpoint (.pth: MiniMind's format; .safetensors)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the saved weights (MiniMind ships float16)")
    p.add_argument("--arch", default=None, choices=["minimind2", "minimind3"])
    args = p.parse_args(argv)

    from .model import save_minimind

    try:
        model = merge_into_base(args.base, args.lora, args.arch)
        save_minimind(model, Path(args.out), dtype=getattr(torch, args.dtype))
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"merge_lora: error: {err}", file=sys.stderr)
        return 2
    print(f"merged {args.lora} into {args.base} -> {args.out} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
