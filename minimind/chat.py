"""Chat with a MiniMind model in the terminal, or answer one prompt and exit.

    python -m minimind.chat                                   # the bundled base model, interactive
    python -m minimind.chat --lora out/lora_identity.pth --prompt "Who are you?"
    python -m minimind.chat --weights MiniMind2.pth --tokenizer minimind/model --prompt "你好"

Interactive commands: ``/reset`` forgets the conversation, ``/exit`` (or Ctrl-D) quits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

from .generate import stream_generate, stream_text
from .lora_io import load_adapter
from .model import BUNDLED_BASE, MiniMindForCausalLM, load_minimind
from .tokenizer import MiniMindTokenizer


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, default=BUNDLED_BASE,
                   help="MiniMind .pth or our .safetensors (default: the bundled base)")
    p.add_argument("--lora", type=Path, default=None, help="adapter to apply: MiniMind .pth, lora_kernels .safetensors, or a PEFT adapter directory")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json or its folder (default: bundled)")
    p.add_argument("--prompt", action="append", default=None, help="answer this and exit (repeatable)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--history-turns", type=int, default=4, help="earlier exchanges kept in the context")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def build_prompt(tokenizer: MiniMindTokenizer, messages: List[dict], limit: int) -> List[int]:
    """Prompt ids for ``messages``, dropping the oldest exchanges (then the oldest tokens) to fit ``limit``."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids = tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, tokenize=True)
        if len(ids) <= limit or len(turns) <= 1:
            return ids[-limit:]
        turns = turns[2:]


def reply(model: MiniMindForCausalLM, tokenizer: MiniMindTokenizer, messages: List[dict], args: argparse.Namespace) -> str:
    """Generate the assistant's answer to ``messages``, printing it as it streams; returns it."""
    limit = max(1, model.config.max_position_embeddings - args.max_new_tokens)
    ids = torch.tensor([build_prompt(tokenizer, messages, limit)])
    tokens = stream_generate(
        model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, eos_token_id=tokenizer.eos_token_id,
    )
    pieces = []
    for piece in stream_text(tokenizer, tokens, stop_id=tokenizer.eos_token_id):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(pieces)


def main(argv: Optional[List[str]] = None) -> None:
    """Command-line entry point (see the module docstring)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    tokenizer = MiniMindTokenizer.from_pretrained(args.tokenizer)
    model = load_minimind(args.weights)
    if args.lora is not None:
        load_adapter(model, args.lora)
    model.eval()
    if model.config.vocab_size < tokenizer.vocab_size:
        sys.exit(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}: "
                 "pass the tokenizer these weights were trained with (--tokenizer)")
    head = [{"role": "system", "content": args.system}] if args.system else []

    if args.prompt:
        for prompt in args.prompt:
            print(f">>> {prompt}")
            reply(model, tokenizer, head + [{"role": "user", "content": prompt}], args)
        return

    print(f"MiniMind chat ({args.weights.name}{' + ' + args.lora.name if args.lora else ''}); /reset, /exit")
    history: List[dict] = []
    while True:
        try:
            text = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, head + history, args)
        history.append({"role": "assistant", "content": answer})
        history = history[-2 * (args.history_turns + 1):]


if __name__ == "__main__":
    main()
