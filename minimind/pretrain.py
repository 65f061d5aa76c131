"""Pretrain a small MiniMind from scratch on CPU; this is how the bundled base model is made.

    python -m minimind.pretrain                   # bundled corpus + chat data -> minimind/assets/base.safetensors
    python -m minimind.pretrain --steps 200 --out /tmp/try.safetensors --hidden-size 64

Two phases: pretraining on ``--data`` (JSONL in MiniMind's pretrain format ``{"text": ...}`` and/or
SFT conversations, packed into blocks of ``--max-seq-len`` tokens, every token trained on), then a
short SFT on ``--sft-data`` with the loss on the assistant replies only, so that the base answers the
question it is asked in the ChatML format. Reads top to bottom: arguments, ``run_phase`` (one training
loop for both phases; the LR schedule and ``evaluate`` come from ``minimind.training``, shared with the
LoRA trainer), ``main``. The checkpoint is safetensors with the config in its metadata, saved in fp16. A
bad argument or file ends with one line on stderr and exit status 2 (see ``minimind.cli``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .checkpoint import BUNDLED_BASE, load_minimind, save_minimind
from .cli import ArgumentParser, CLIError, number, reading, run_cli, writing
from .dataset import PretrainDataset, SFTDataset, pad_batch
from .generate import decode_reply, generate
from .model import MiniMindConfig, MiniMindForCausalLM
from .tokenizer import ASSETS, MiniMindTokenizer
from .training import cosine_lr, evaluate

DEFAULT_DATA = [ASSETS / "corpus.jsonl", ASSETS / "chat_base.jsonl"]


def parse_args(argv: List[str] = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m minimind.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", type=Path, default=DEFAULT_DATA, help="JSONL files")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json or folder (default: bundled)")
    p.add_argument("--out", type=Path, default=BUNDLED_BASE)
    p.add_argument("--arch", choices=["minimind2", "minimind3"], default="minimind2")
    p.add_argument("--hidden-size", type=number(1, integer=True), default=128)
    p.add_argument("--layers", type=number(1, integer=True), default=4)
    p.add_argument("--heads", type=number(1, integer=True), default=8)
    p.add_argument("--kv-heads", type=number(1, integer=True), default=2)
    p.add_argument("--max-seq-len", type=number(2, integer=True), default=256,
                   help="training block length, and the model's max_position_embeddings")
    p.add_argument("--batch-size", type=number(1, integer=True), default=16)
    p.add_argument("--steps", type=number(0, integer=True), default=600, help="pretraining steps (0: only SFT, e.g. with --init)")
    p.add_argument("--lr", type=number(0, low_open=True), default=3e-3)
    p.add_argument("--min-lr", type=number(0), default=1e-4)
    p.add_argument("--warmup", type=number(0, integer=True), default=50)
    p.add_argument("--weight-decay", type=number(0), default=0.05)
    p.add_argument("--sft-data", type=Path, default=ASSETS / "chat_base.jsonl", help="SFT JSONL for the second phase")
    p.add_argument("--sft-steps", type=number(0, integer=True), default=600, help="steps of SFT (loss on replies only) after pretraining")
    p.add_argument("--sft-lr", type=number(0, low_open=True), default=1e-3)
    p.add_argument("--init", type=Path, default=None, help="start from this checkpoint instead of random weights")
    p.add_argument("--eval-every", type=number(1, integer=True), default=100)
    p.add_argument("--threads", type=number(1, integer=True), default=1, help="torch CPU threads")
    p.add_argument("--seed", type=number(0, integer=True), default=0)
    return p.parse_args(argv)


def run_phase(model, train_set, val_set, collate, steps: int, lr: float, args, name: str) -> None:
    """Train ``model`` for ``steps`` AdamW steps on ``train_set`` with the cosine schedule peaking at ``lr``.

    Logs the train loss every step (progress bar) and the validation loss every ``--eval-every`` steps.
    """
    def get_lr(step: int) -> float:
        return cosine_lr(step, steps, peak=lr, floor=args.min_lr, warmup=args.warmup)

    # No weight decay on norms (1-D parameters), as usual.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate)
    val_loader = DataLoader(val_set, batch_size=args.batch_size, collate_fn=collate)
    model.train()
    step, batches = 0, iter(loader)
    bar = tqdm(total=steps, desc=name, unit="step")
    while step < steps:
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step)
        loss = model(x, labels=y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{get_lr(step):.1e}")
        if step % args.eval_every == 0 or step == steps:
            bar.write(f"{name} step {step}: train loss {loss.item():.3f}, validation loss {evaluate(model, val_loader):.3f}")
    bar.close()


def split(dataset, seed: int):
    """(train, validation) subsets, 2% (at least one item) held out."""
    n_val = max(1, len(dataset) // 50)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[n_val:]), Subset(dataset, order[:n_val])


def _main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    with reading(f"--tokenizer {str(args.tokenizer or 'bundled')!r}"):
        tokenizer = MiniMindTokenizer.from_pretrained(args.tokenizer)
    start = time.time()

    if args.init is not None:
        with reading(f"--init {str(args.init)!r}"):
            model = load_minimind(args.init)
    else:
        try:
            config = MiniMindConfig(
                arch=args.arch, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=tokenizer.vocab_size,
                max_position_embeddings=args.max_seq_len,
            )
        except ValueError as err:
            raise CLIError(f"--hidden-size/--layers/--heads/--kv-heads: {err}") from None
        model = MiniMindForCausalLM(config)
    print(f"model: {model.num_parameters():,} parameters, config {model.config.to_dict()}")

    if args.steps > 0:
        with reading("--data"):
            data = PretrainDataset(args.data, tokenizer, max_seq_len=args.max_seq_len)
        train_set, val_set = split(data, args.seed)
        print(f"pretraining data: {data.num_tokens:,} tokens in {len(data)} blocks of {args.max_seq_len} "
              f"({len(train_set)} train / {len(val_set)} validation)")
        run_phase(model, train_set, val_set, None, args.steps, args.lr, args, "pretrain")
    if args.sft_steps > 0:
        # Loss on the replies only, so the model learns to answer the question it is asked.
        with reading("--sft-data"):
            data = SFTDataset(args.sft_data, tokenizer, max_seq_len=args.max_seq_len, pad=False)
        train_set, val_set = split(data, args.seed)
        print(f"SFT data: {len(data)} conversations ({len(train_set)} train / {len(val_set)} validation)")
        run_phase(model, train_set, val_set, lambda b: pad_batch(b, tokenizer.pad_token_id), args.sft_steps,
                  args.sft_lr, args, "sft")
    minutes = (time.time() - start) / 60

    model.eval()
    with writing(args.out):
        save_minimind(model, args.out, dtype=torch.float16)
    size = args.out.stat().st_size / 2**20
    print(f"saved {args.out} ({size:.1f} MiB, fp16) after {args.steps} pretraining + {args.sft_steps} SFT steps "
          f"in {minutes:.1f} min")
    for question in ("Who are you?", "What is the capital of France?", "讲一个关于熊猫的故事。"):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True)
        out = generate(model, torch.tensor([prompt]), max_new_tokens=60, temperature=0)
        print(f"> {question}\n{decode_reply(tokenizer, out[0, len(prompt):].tolist())}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (see the module docstring); returns the exit status."""
    return run_cli("pretrain", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
