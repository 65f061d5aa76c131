"""Train a MiniMind-style tokenizer: byte-level BPE, ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` at ids 0-2.

    python -m minimind.train_tokenizer                       # bundled corpus -> minimind/assets/tokenizer
    python -m minimind.train_tokenizer --data my.jsonl --out my_tokenizer --vocab-size 6400

Input files are JSONL in MiniMind's pretrain (``{"text": ...}``) or SFT (``{"conversations": ...}``)
format, read as for pretraining (``minimind.dataset.document_texts``, MiniMind2 chat format). A bad
argument or file ends with one line on stderr and exit status 2 (see ``minimind.cli``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .cli import ArgumentParser, number, reading, run_cli, writing
from .dataset import document_texts
from .tokenizer import ASSETS, BUNDLED_TOKENIZER, SPECIAL_TOKENS, MiniMindTokenizer

DEFAULT_DATA = [ASSETS / "corpus.jsonl", ASSETS / "chat_base.jsonl"]


def train_tokenizer(paths: Sequence[Path], vocab_size: int = 6400, max_token_length: int = 12) -> MiniMindTokenizer:
    """Train a byte-level BPE tokenizer on JSONL files.

    Args:
        paths: training files.
        vocab_size: total entries, special tokens and the 256 byte symbols included; fewer when the
            corpus runs out of merges.
        max_token_length: longest token, in byte-level symbols (a Chinese character is 3).

    Returns:
        The tokenizer (MiniMind2 chat format).

    Raises:
        ValueError: ``vocab_size`` too small for the byte alphabet and the special tokens.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        # A small corpus would otherwise merge whole recurring clauses into single tokens; 12 byte
        # symbols keep tokens to a word or at most four Chinese characters.
        max_token_length=max_token_length,
    )
    tok.train_from_iterator((t for p in paths for t in document_texts(p)), trainer=trainer)
    return MiniMindTokenizer(tok, chat_style="minimind2")


def _main(argv: Optional[Sequence[str]] = None) -> None:
    p = ArgumentParser(prog="python -m minimind.train_tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", type=Path, default=DEFAULT_DATA, help="JSONL training files")
    p.add_argument("--out", type=Path, default=BUNDLED_TOKENIZER, help="output folder")
    p.add_argument("--vocab-size", type=number(256 + len(SPECIAL_TOKENS), integer=True), default=6400)
    args = p.parse_args(argv)
    start = time.time()
    with reading("--data"):
        tok = train_tokenizer(args.data, args.vocab_size)
    with writing(args.out):
        tok.save(args.out)
    print(f"trained a {tok.vocab_size}-entry tokenizer in {time.time() - start:.1f}s -> {args.out}")
    sample = "Hello, I am a tiny model. 你好，我是一个很小的模型。"
    ids = tok.encode(sample)
    print(f"{sample!r} -> {len(ids)} tokens: {ids}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (see the module docstring); returns the exit status."""
    return run_cli("train_tokenizer", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
