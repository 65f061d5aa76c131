"""Fold a LoRA adapter into its base: ``python -m minimind.merge_lora --base B --lora L --out OUT``.

The result is a full checkpoint in MiniMind's format (a ``torch.save``'d state_dict with MiniMind's key
names for ``.pth``, or our safetensors with the config in its metadata), which MiniMind's own scripts and
``minimind.load_minimind`` load like any other base. The adapter may be MiniMind's format
(``<module>.lora.A.weight``), ours (``lora_kernels.save_lora``) or a HF PEFT adapter directory.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from lora_kernels import merge_and_unload

from .cli import ArgumentParser, reading, run_cli, writing


def merge_adapter(model, lora: str):
    """Applies the adapter file ``lora`` to ``model`` and folds it in (plain ``nn.Linear`` layers); returns model.

    An adapted ``lm_head`` that was tied to ``embed_tokens`` gets its own merged weight (the embedding
    keeps the base's) and the config then says ``tie_word_embeddings=False``, so that every output format
    keeps the head's delta.
    """
    from .lora_io import load_adapter

    load_adapter(model, lora)
    merge_and_unload(model)
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
    return model


def _main(argv: Optional[Sequence[str]] = None) -> None:
    p = ArgumentParser(prog="python -m minimind.merge_lora", description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="MiniMind base checkpoint (.pth or .safetensors)")
    p.add_argument("--lora", required=True, help="adapter: MiniMind .pth, lora_kernels .safetensors/.pth, or a PEFT adapter directory")
    p.add_argument("--out", required=True, help="merged checkpoint (.pth: MiniMind's format; .safetensors)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the saved weights (MiniMind ships float16)")
    p.add_argument("--arch", default=None, choices=["minimind2", "minimind3"])
    args = p.parse_args(argv)

    from .checkpoint import load_minimind, save_minimind

    with reading(f"--base {args.base!r}"):
        model = load_minimind(args.base, **({"arch": args.arch} if args.arch else {}))
    with reading(f"--lora {args.lora!r}"):
        merge_adapter(model, args.lora)
    with writing(args.out):
        save_minimind(model, Path(args.out), dtype=getattr(torch, args.dtype))
    print(f"merged {args.lora} into {args.base} -> {args.out} ({args.dtype})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (2 for a bad argument, file or a full disk)."""
    return run_cli("merge_lora", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
