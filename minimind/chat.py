"""Chat with a MiniMind model in the terminal, or answer one prompt and exit.

    python -m minimind.chat                                   # the bundled base model, interactive
    python -m minimind.chat --lora out/lora_identity.pth --prompt "Who are you?"
    python -m minimind.chat --weights MiniMind2.pth --tokenizer minimind/model --prompt "你好"
    python -m minimind.chat --lora qa=lora_qa_768.pth --lora tr=lora_translation_768.pth   # then /adapter tr
    python -m minimind.chat --lora qa=qa.pth --lora tr=tr.pth --prompt "Who are you?" --prompt-adapter qa \
        --prompt "Translate to Chinese: cat" --prompt-adapter tr        # one batch, each prompt its adapter

Interactive commands: ``/reset`` forgets the conversation, ``/adapter NAME`` switches to another loaded
adapter (``/adapter none``: the base alone; ``/adapter a,b``: both, their terms added; ``/adapter`` alone
lists them), ``/exit`` (or Ctrl-D) quits. The first ``--lora`` is active at the start; switching keeps the
conversation and moves no weights. With ``--prompt-adapter`` (one per ``--prompt``, ``none`` for the base) the
prompts are answered together in one batch, each through its own adapter (``minimind.generate.generate_batch``).
A bad argument or file ends with one line on stderr and exit status 2 (see ``minimind.cli``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from lora_kernels import active_adapters, adapter_names, set_adapter
from lora_kernels.config import DEFAULT_ADAPTER, check_adapter_name

from .cli import ArgumentParser, CLIError, number, reading, run_cli
from .generate import stream_generate, stream_text
from .lora_io import load_adapter
from .checkpoint import BUNDLED_BASE, load_minimind
from .model import MiniMindForCausalLM
from .tokenizer import MiniMindTokenizer


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m minimind.chat", description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, default=BUNDLED_BASE,
                   help="MiniMind .pth or our .safetensors (default: the bundled base)")
    p.add_argument("--lora", action="append", default=None, metavar="[NAME=]PATH",
                   help="adapter to apply: MiniMind .pth, lora_kernels .safetensors, or a PEFT adapter directory; "
                        "repeat with NAME=PATH to load several and switch with /adapter NAME")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json or its folder (default: bundled)")
    p.add_argument("--prompt", action="append", default=None, help="answer this and exit (repeatable)")
    p.add_argument("--prompt-adapter", action="append", default=None, metavar="NAME",
                   help="the adapter of the --prompt at the same position (repeat once per --prompt; 'none': the "
                   "base): all prompts answered in one batch, each through its own adapter")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=number(1, integer=True), default=200,
                   help="at most this many tokens per answer (less than the model's context length)")
    p.add_argument("--temperature", type=number(0), default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=number(0, 1, low_open=True), default=0.85, help="nucleus mass in (0, 1]")
    p.add_argument("--top-k", type=number(0, integer=True), default=50, help="0 keeps every token")
    p.add_argument("--repetition-penalty", type=number(0, low_open=True), default=1.1, help="> 0; 1 disables")
    p.add_argument("--history-turns", type=number(0, integer=True), default=4,
                   help="earlier exchanges kept in the context")
    p.add_argument("--seed", type=number(0, integer=True), default=None)
    p.add_argument("--threads", type=number(1, integer=True), default=None, help="torch CPU threads")
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None,
                   help="run every linear but the output head on a frozen NF4 or int8 base (as trained with "
                   "train_lora --quantize); the adapter, if any, stays in 16 bits")
    return p.parse_args(argv)


def quantize_base(model, fmt: str) -> None:
    """Quantizes the base of every linear except the output head, in place: adapted layers keep their
    adapter; the others become adapter-less :class:`FusedLoRALinear` layers (``lora_enabled`` False)."""
    from lora_kernels import FusedLoRALinear, find_target_linears, replace_linear_with_fused_lora

    plain = set(find_target_linears(model, "all-linear"))
    if plain:
        replace_linear_with_fused_lora(model, rank=1, target_modules=sorted(plain), quantize=fmt)
    for name, module in model.named_modules():
        if isinstance(module, FusedLoRALinear):
            if name in plain:
                module.lora_enabled = False  # no adapter here: the quantized base alone
            elif module.quantize is None:
                module.quantize_base(fmt)


def parse_loras(values: Sequence[str]) -> List[Tuple[str, Path, str]]:
    """``(name, path, argument)`` for each ``--lora [NAME=]PATH``; an unnamed one is ``"default"``.

    Raises:
        CLIError: a bad or repeated name, naming it.
    """
    loras, names = [], set()
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or Path(value).exists():  # a path that itself contains '=' stays a path
            name, path = DEFAULT_ADAPTER, value
        try:
            check_adapter_name(name)
        except ValueError as err:
            raise CLIError(f"--lora {value!r}: {err}") from None
        if name in names:
            raise CLIError(f"--lora {value!r}: the adapter name {name!r} is given twice (name them: --lora NAME=PATH)")
        names.add(name)
        loras.append((name, Path(path), value))
    return loras


def switch_adapter(model, text: str) -> str:
    """Runs ``/adapter [NAME[,NAME...]|none]``; returns the line to show."""
    arg = text[len("/adapter"):].strip()
    names = adapter_names(model)
    if not arg:
        return f"adapters: {', '.join(names) or '(none loaded)'}; active: {', '.join(active_adapters(model)) or 'none'}"
    wanted = [] if arg == "none" else [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        return f"no adapter named {unknown[0]!r}; loaded: {', '.join(names) or '(none)'} (or none)"
    set_adapter(model, wanted)
    return f"active: {', '.join(wanted) or 'none (the base model)'}"


def answer_batch(model, tokenizer: MiniMindTokenizer, head: List[dict], prompts: List[str],
                 args: argparse.Namespace) -> List[str]:
    """Answers ``prompts`` in one batch, prompt i through adapter ``--prompt-adapter`` i; prints and returns them.

    Raises:
        CLIError: not one adapter per prompt, an unknown adapter name, or a prompt that fills the context.
    """
    from .generate import generate_batch

    names = args.prompt_adapter
    if len(names) != len(prompts):
        raise CLIError(f"--prompt-adapter: give one per --prompt ({len(prompts)} prompts, {len(names)} adapters; "
                       "'none' for the base alone)")
    loaded = adapter_names(model)
    unknown = [n for n in names if n != "none" and n not in loaded]
    if unknown:
        raise CLIError(f"--prompt-adapter {unknown[0]!r}: no adapter of that name; loaded: "
                       f"{', '.join(loaded) or '(none)'} (or none)")
    conversations = [head + [{"role": "user", "content": prompt}] for prompt in prompts]
    context = model.config.max_position_embeddings
    longest = max(len(build_prompt(tokenizer, c, context, truncate=False)) for c in conversations)
    if longest >= context:
        raise CLIError(f"a prompt is {longest} tokens, which fills the model's context of {context} tokens "
                       "(max_position_embeddings); shorten it")
    answers = generate_batch(model, tokenizer, conversations, adapters=[None if n == "none" else n for n in names],
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    for prompt, name, answer in zip(prompts, names, answers):
        print(f">>> [{name}] {prompt}\n{answer}")
    return answers


def build_prompt(tokenizer: MiniMindTokenizer, messages: List[dict], limit: int, truncate: bool = True) -> List[int]:
    """Prompt ids for ``messages``, dropping the oldest exchanges (then, with ``truncate``, the oldest
    tokens) to fit ``limit``."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids = tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, tokenize=True)
        if len(ids) <= limit or len(turns) <= 1:
            return ids[-limit:] if truncate else ids
        turns = turns[2:]


def _text(value: str, where: str) -> str:
    """``value`` if it is valid Unicode text; Python decodes undecodable input bytes to lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CLIError(f"{where} is not UTF-8 text (byte {value[err.start].encode('utf-8', 'surrogateescape')!r} "
                       f"at character {err.start}); set the terminal or the input file to UTF-8") from None
    return value


def reply(model: MiniMindForCausalLM, tokenizer: MiniMindTokenizer, messages: List[dict], args: argparse.Namespace) -> str:
    """Generate the assistant's answer to ``messages``, printing it as it streams; returns it.

    Old exchanges are dropped to leave ``--max-new-tokens`` of room in the model's context; when the
    last message alone leaves less, the answer is shortened (said on stderr), never the prompt.

    Raises:
        CLIError: the prompt alone fills the model's context.
    """
    context = model.config.max_position_embeddings
    prompt = build_prompt(tokenizer, messages, context - args.max_new_tokens, truncate=False)
    max_new_tokens = min(args.max_new_tokens, context - len(prompt))
    if max_new_tokens < 1:
        raise CLIError(f"the prompt is {len(prompt)} tokens, which fills the model's context of {context} tokens "
                       "(max_position_embeddings); shorten it")
    if max_new_tokens < args.max_new_tokens:
        print(f"(the prompt takes {len(prompt)} of the model's {context} tokens of context: this answer is limited "
              f"to {max_new_tokens} new tokens)", file=sys.stderr)
    ids = torch.tensor([prompt])
    tokens = stream_generate(
        model, ids, max_new_tokens=max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, eos_token_id=tokenizer.eos_token_id,
    )
    pieces = []
    for piece in stream_text(tokenizer, tokens, stop_id=tokenizer.eos_token_id):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(pieces)


def _main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    with reading(f"--tokenizer {str(args.tokenizer or 'bundled')!r}"):
        tokenizer = MiniMindTokenizer.from_pretrained(args.tokenizer)
    with reading(f"--weights {str(args.weights)!r}"):
        model = load_minimind(args.weights)
    loras = parse_loras(args.lora or [])
    for name, path, value in loras:
        with reading(f"--lora {value!r}"):
            load_adapter(model, path, adapter_name=name)
    if args.quantize is not None:
        quantize_base(model, args.quantize)
    model.eval()
    if model.config.vocab_size < tokenizer.vocab_size:
        raise CLIError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}: "
                       "pass the tokenizer these weights were trained with (--tokenizer)")
    context = model.config.max_position_embeddings
    if args.max_new_tokens >= context:
        raise CLIError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt: the model's context is "
                       f"{context} tokens (max_position_embeddings); use at most {context - 1}")
    head = [{"role": "system", "content": _text(args.system, "--system")}] if args.system else []
    prompts = [_text(prompt, "--prompt") for prompt in args.prompt or []]

    if args.prompt_adapter and not prompts:
        raise CLIError("--prompt-adapter goes with --prompt (one adapter per prompt)")
    if prompts and args.prompt_adapter:
        answer_batch(model, tokenizer, head, prompts, args)
        return
    if prompts:
        for prompt in prompts:
            print(f">>> {prompt}")
            reply(model, tokenizer, head + [{"role": "user", "content": prompt}], args)
        return

    adapters = ", ".join(f"{name}={path.name}" for name, path, _ in loras)
    print(f"MiniMind chat ({args.weights.name}{' + ' + adapters if adapters else ''}); /reset, "
          f"{'/adapter NAME|none, ' if loras else ''}/exit")
    history: List[dict] = []
    while True:
        try:
            text = _text(input(">>> ").strip(), "standard input")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        except UnicodeDecodeError as err:
            raise CLIError(f"standard input is not UTF-8 text ({err.reason} at byte {err.start}); "
                           "set the terminal or the input file to UTF-8") from None
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = []
            continue
        if text == "/adapter" or text.startswith("/adapter "):
            print(switch_adapter(model, text))
            continue
        if not text:
            continue
        try:
            answer = reply(model, tokenizer, head + history + [{"role": "user", "content": text}], args)
        except CLIError as err:  # a message too long for the context: say so and keep the session
            print(f"chat: {err}", file=sys.stderr)
            continue
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        history = history[-2 * (args.history_turns + 1):]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (see the module docstring); returns the exit status."""
    return run_cli("chat", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
