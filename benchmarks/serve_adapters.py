"""Serving many adapters at once: tokens per second of greedy decoding with one adapter per prompt, on the
bundled MiniMind, beside a loop over adapters and beside PEFT's ``adapter_names`` (issue #21).

    python -m benchmarks.serve_adapters [--adapters 64] [--rank 16] [--new_tokens 32] [--rounds 5] [--threads N]
                                        [--prompts_per_adapter 1]

The model is the bundled base (``minimind/assets/base.safetensors``, fp32 on the CPU) with ``--adapters``
adapters ``a0``, ``a1``, ... of rank ``--rank`` (alpha = rank, scaling 1, the trainer's defaults) on the
trainer's default targets (``--targets square``: q_proj and o_proj of every layer), each drawn from a seeded
generator: A as the trainer initialises it (N(0, 0.02²)), B ~ N(0, 0.3²) (nonzero, so that every adapter
changes the answers). The prompts are the first user messages of ``minimind/assets/chat_base.jsonl`` in
order, ``--prompts_per_adapter`` per adapter, in the chat template. Every provider decodes greedily exactly
``--new_tokens`` tokens per prompt (no stop at the end-of-turn token: the same work for all) with the KV cache
of :func:`minimind.generate.stream_generate`:

* ``single``: the whole batch through adapter a0 alone (``set_adapter`` + :func:`minimind.generate.generate`):
  the floor a mixed batch approaches;
* ``batched``: :func:`minimind.generate.generate_mixed`, i.e. :func:`minimind.generate.generate_batch` less the
  chat template and the decoding: one left-padded batch, every step one forward of the whole batch under
  ``lora_kernels.mixed_adapters``, each row with its own adapter;
* ``loop``: for each adapter, ``set_adapter`` and :func:`minimind.generate.generate` over that adapter's prompts
  only (left-padded among themselves): what one does without mixed batches;
* ``peft``: the same base (a fresh copy of its plain linears) wrapped by HF PEFT (``peft.get_peft_model``, the
  same A and B copied into every adapter), the same decoding loop calling the ``PeftModel`` with
  ``adapter_names=[...]`` (one per row) at every step: PEFT's own mixed-batch inference. Skipped, with the
  reason, without peft.

Before timing, each provider runs once; ``batched``, ``loop`` and ``peft`` must give every prompt the same
tokens (greedy, each prompt through its own adapter), which the output states (rows that differ are counted,
not hidden); ``single`` gives as many tokens. Then ``--rounds`` rounds, each timing one full generation of
every provider back to back in an order rotated from round to round. Reported per provider: the median wall
time, tokens per second = (prompts x new tokens) / median time, and the median over rounds of the per-round
speed ratio to ``batched`` (time of ``batched`` / time of the provider, same round: a slow stretch of a
shared machine cancels).

The output is one markdown table per adapter count and one summary row per count with the speeds side by side
(``--adapters 1 8 64`` for a scaling picture), headed by the command, the commit, the date, the CPU, the torch
threads and the torch / Triton / PEFT versions; the last line is JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

from benchmarks.machine import cpu_model
from benchmarks.dora_layer import MISSING, _commit, _load, _versions, interleaved_times

PROVIDERS = ("single", "batched", "loop", "peft")
LABELS = {
    "single": "every prompt through adapter a0 (floor)",
    "batched": "ours: `generate_batch`, one adapter per prompt, one batch",
    "loop": "`set_adapter` + `generate` per adapter",
    "peft": "PEFT `adapter_names=[...]`, same decode loop",
}
SAME_TOKENS = ("batched", "loop", "peft")  # each prompt through its own adapter: the same greedy tokens
B_STD = 0.3


def chat_prompts(count: int) -> List[str]:
    """The first user message of each conversation of the bundled chat data, in order, repeated past its end."""
    from minimind.checkpoint import BUNDLED_BASE

    path = BUNDLED_BASE.parent / "chat_base.jsonl"
    firsts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                firsts.append(json.loads(line)["conversations"][0]["content"])
            if len(firsts) >= count:
                break
    return [firsts[i % len(firsts)] for i in range(count)]


def add_random_adapters(model: torch.nn.Module, ranks: Sequence[int], targets="square", seed: int = 0) -> List[str]:
    """Adds adapters ``a0``.. (rank ``ranks[i]``, alpha = rank) to ``model`` on ``targets``, B ~ N(0, B_STD²) drawn
    from a generator seeded with ``seed``; returns their names."""
    from lora_kernels import LoRAConfig, add_adapter, iter_lora_layers, replace_linear_with_fused_lora

    gen = torch.Generator().manual_seed(seed)
    names = []
    for i, rank in enumerate(ranks):
        name = f"a{i}"
        if i == 0:
            replace_linear_with_fused_lora(model, config=LoRAConfig(rank=rank), target_modules=targets,
                                           adapter_name=name)
        else:
            add_adapter(model, name, config=LoRAConfig(rank=rank))
        with torch.no_grad():
            for _, layer in iter_lora_layers(model):
                if name in layer.lora_configs:
                    lora_A, lora_B = layer.lora_params(name)
                    lora_A.copy_(torch.randn(lora_A.shape, generator=gen) * 0.02)
                    lora_B.copy_(torch.randn(lora_B.shape, generator=gen) * B_STD)
        names.append(name)
    return names


def peft_twin(plain: torch.nn.Module, adapted: torch.nn.Module, names: Sequence[str]):
    """``plain`` (the same base, its linears plain) wrapped by ``peft.get_peft_model`` with every adapter of
    ``adapted`` (same name, rank, scaling, layers, A and B), in eval mode; None without peft."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    from lora_kernels import iter_lora_layers

    layers = dict(iter_lora_layers(adapted))
    model = None
    for name in names:
        paths = [path for path, layer in layers.items() if name in layer.lora_configs]
        rank = layers[paths[0]].lora_configs[name].rank
        config = LoraConfig(r=rank, lora_alpha=layers[paths[0]].lora_configs[name].scaling * rank,
                            target_modules=paths, lora_dropout=0.0)
        if model is None:
            model = get_peft_model(plain, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        with torch.no_grad():
            for path in paths:
                peft_layer = model.base_model.model.get_submodule(path)
                lora_A, lora_B = layers[path].lora_params(name)
                peft_layer.lora_A[name].weight.copy_(lora_A)
                peft_layer.lora_B[name].weight.copy_(lora_B)
    return model.eval()


class _PeftRows:
    """A PeftModel called with ``adapter_names`` at every step, shaped for :func:`minimind.generate.stream_generate`
    (which reads ``config`` and calls the model)."""

    def __init__(self, peft_model, config, names: Sequence[str]):
        self.peft_model, self.config, self.names = peft_model, config, list(names)

    def __call__(self, *args, **kwargs):
        return self.peft_model(*args, adapter_names=self.names, **kwargs)


def make_providers(model, peft_model, prompt_ids: Sequence[Sequence[int]], row_names: Sequence[str],
                   new_tokens: int, pad_token_id: int = 0) -> Dict[str, Callable[[], torch.Tensor]]:
    """{provider: a function that generates ``new_tokens`` greedy tokens for every prompt and returns them
    (P, new_tokens)}."""
    from lora_kernels import set_adapter
    from minimind.generate import generate, generate_mixed, left_pad

    settings = dict(max_new_tokens=new_tokens, temperature=0, eos_token_id=None, pad_token_id=pad_token_id)
    groups: Dict[str, List[int]] = {}
    for row, name in enumerate(row_names):
        groups.setdefault(name, []).append(row)

    def batch(rows=None):
        return left_pad([prompt_ids[i] for i in (range(len(prompt_ids)) if rows is None else rows)], pad_token_id)

    @torch.inference_mode()
    def single():
        ids, mask = batch()
        set_adapter(model, row_names[0])
        return generate(model, ids, attention_mask=mask, **settings)[:, ids.shape[1]:]

    @torch.inference_mode()
    def batched():
        ids, mask = batch()
        return generate_mixed(model, ids, row_names, attention_mask=mask, **settings)[:, ids.shape[1]:]

    @torch.inference_mode()
    def loop():
        out = torch.empty(len(prompt_ids), new_tokens, dtype=torch.long)
        for name, rows in groups.items():
            ids, mask = batch(rows)
            set_adapter(model, name)
            out[rows] = generate(model, ids, attention_mask=mask, **settings)[:, ids.shape[1]:]
        return out

    providers = {"single": single, "batched": batched, "loop": loop}
    if peft_model is not None:
        rows_model = _PeftRows(peft_model, model.config, row_names)

        @torch.inference_mode()
        def peft():
            ids, mask = batch()
            return generate(rows_model, ids, attention_mask=mask, **settings)[:, ids.shape[1]:]

        providers["peft"] = peft
    return providers


def measure(base: Callable[[], torch.nn.Module], tokenizer, num_adapters: int, rank, new_tokens: int, rounds: int,
            prompts_per_adapter: int = 1, targets="square", providers: Sequence[str] = PROVIDERS,
            prompts: Optional[Sequence[str]] = None) -> dict:
    """One adapter count: build the model, its PEFT twin, the prompts; run every provider once (tokens), then
    ``rounds`` interleaved timed rounds.

    Args:
        base: returns a fresh base model (eval mode); called twice (ours and PEFT's).
        tokenizer: its tokenizer (chat template).
        num_adapters: adapters a0..a{n-1}.
        rank: every adapter's rank, or one rank per adapter (a sequence).
        new_tokens: tokens generated per prompt.
        rounds: timed rounds.
        prompts_per_adapter: prompts per adapter (the rows of adapter a_i are i, n + i, 2n + i, ...).
        targets: the adapters' target modules.
        providers: which to run (``peft`` is skipped without peft).
        prompts: the user messages (default :func:`chat_prompts`).

    Returns:
        ``{"tokens": {provider: (P, new_tokens) tensor}, "seconds": {provider: [per round]}, "generated": P *
        new_tokens, "prompt_tokens": [min, max], "skipped": {provider: reason}, "mismatched_rows": {provider:
        rows whose tokens differ from batched's}, "adapters_matter": rows where single differs from batched}``.
    """
    ranks = list(rank) if isinstance(rank, (list, tuple)) else [int(rank)] * num_adapters
    if len(ranks) != num_adapters:
        raise ValueError(f"{len(ranks)} ranks for {num_adapters} adapters")
    model = base().eval()
    names = add_random_adapters(model, ranks, targets)
    count = num_adapters * prompts_per_adapter
    messages = list(prompts) if prompts is not None else chat_prompts(count)
    if len(messages) < count:
        raise ValueError(f"{len(messages)} prompts for {count} rows")
    prompt_ids = [tokenizer.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True,
                                                tokenize=True) for m in messages[:count]]
    row_names = [names[row % num_adapters] for row in range(count)]
    skipped = {}
    peft_model = None
    if "peft" in providers:
        peft_model = peft_twin(base().eval(), model, names)
        if peft_model is None:
            skipped["peft"] = "peft is not installed (pip install peft)"
    steps = {name: fn for name, fn in make_providers(model, peft_model, prompt_ids, row_names, new_tokens,
                                                     tokenizer.pad_token_id).items() if name in providers}
    tokens = {name: fn() for name, fn in steps.items()}  # the first call, outside the timer, gives the tokens
    seconds = interleaved_times({name: (lambda fn=fn: fn()) for name, fn in steps.items()}, rounds, warmup=0)
    reference = tokens.get("batched")
    mismatched = {}
    if reference is not None:
        for name in SAME_TOKENS:
            if name in tokens and name != "batched":
                mismatched[name] = int((tokens[name] != reference).any(dim=1).sum())
    matter = None if reference is None or "single" not in tokens else \
        int((tokens["single"] != reference).any(dim=1).sum())
    lengths = [len(ids) for ids in prompt_ids]
    return {"tokens": tokens, "seconds": seconds, "generated": count * new_tokens, "rows": count,
            "prompt_tokens": [min(lengths), max(lengths)], "skipped": skipped, "mismatched_rows": mismatched,
            "adapters_matter": matter, "ranks": sorted(set(ranks))}


def summarise(result: dict, baseline: str = "batched") -> List[dict]:
    """Per provider: median seconds, tokens/s, and the median over rounds of (baseline time / its time)."""
    seconds = result["seconds"]
    base = seconds.get(baseline)
    rows = []
    for name in PROVIDERS:
        if name not in seconds:
            continue
        median = statistics.median(seconds[name])
        speed = statistics.median(b / t for b, t in zip(base, seconds[name])) if base else None
        rows.append({"provider": name, "median_s": median, "tokens_per_s": result["generated"] / median,
                     "speed_vs_batched": speed})
    return rows


def render_table(rows: Sequence[dict]) -> List[str]:
    lines = ["| provider | what | median s | tokens/s | speed / `batched` |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        speed = MISSING if r["speed_vs_batched"] is None else f"{r['speed_vs_batched']:.2f}"
        lines.append(f"| `{r['provider']}` | {LABELS[r['provider']]} | {r['median_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{speed} |")
    return lines


def render_summary(per_count: Dict[int, List[dict]], rank: int) -> List[str]:
    """One row per adapter count: tokens/s of every provider and batched's speed over loop, PEFT, single."""
    lines = ["| adapters | rank | " + " | ".join(f"`{p}` tok/s" for p in PROVIDERS)
             + " | batched / loop | batched / peft | batched / single |",
             "| ---: | ---: | " + " | ".join("---:" for _ in PROVIDERS) + " | ---: | ---: | ---: |"]
    for n, rows in per_count.items():
        by = {r["provider"]: r for r in rows}
        speeds = [f"{by[p]['tokens_per_s']:.0f}" if p in by else MISSING for p in PROVIDERS]
        over = []
        for p in ("loop", "peft", "single"):
            s = by.get(p, {}).get("speed_vs_batched")
            over.append(MISSING if not s else f"{1 / s:.2f}x")
        lines.append(f"| {n} | {rank} | " + " | ".join(speeds) + " | " + " | ".join(over) + " |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_adapters", description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, nargs="+", default=[64], help="adapter counts, one table each")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=32, help="tokens generated per prompt (no early stop)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompts_per_adapter", type=int, default=1)
    p.add_argument("--targets", default="square", help="the adapters' targets ('square': the trainer's default)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if min(args.adapters + [args.rank, args.new_tokens, args.rounds, args.prompts_per_adapter]) < 1:
        p.error("every count must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from minimind.checkpoint import load_minimind
    from minimind.tokenizer import MiniMindTokenizer

    tokenizer = MiniMindTokenizer.from_pretrained()
    versions, load_start = _versions(), _load()
    results = {n: measure(load_minimind, tokenizer, n, args.rank, args.new_tokens, args.rounds,
                          args.prompts_per_adapter, args.targets) for n in args.adapters}
    load_end = _load()

    command = "python -m benchmarks.serve_adapters" + "".join(" " + shlex.quote(a) for a in
                                                              (sys.argv[1:] if argv is None else argv))
    print(f"Command: `{command}`; commit {_commit()}; {datetime.date.today().isoformat()}")
    print(f"Machine: {cpu_model()}, {torch.get_num_threads()} torch threads; 1-minute load average {load_start} at "
          f"start, {load_end} at end")
    print(f"Software: torch {versions['torch']}, Triton {versions['triton'] or 'not installed'} (not used on the "
          f"CPU), PEFT {versions['peft'] or 'not installed'}")
    print(f"Measured: the bundled MiniMind base (fp32, CPU), adapters of rank {args.rank} (alpha = rank) on "
          f"'{args.targets}', {args.prompts_per_adapter} prompt(s) per adapter, {args.new_tokens} greedy new tokens "
          f"per prompt with the KV cache; median of {args.rounds} interleaved rounds; speed / `batched` is the median "
          "of per-round ratios (batched's time / the provider's)")
    summary, per_count = {}, {}
    for n, result in results.items():
        rows = summarise(result)
        per_count[n] = rows
        print()
        print(f"{n} adapters: {result['rows']} prompts of {result['prompt_tokens'][0]}-{result['prompt_tokens'][1]} "
              f"tokens, {result['generated']} tokens generated per provider")
        for name, why in result["skipped"].items():
            print(f"Not in this run: `{name}`: {why}")
        same = ", ".join(f"`{name}` {'same tokens' if bad == 0 else f'{bad} rows differ'}"
                         for name, bad in result["mismatched_rows"].items())
        print(f"Tokens beside `batched`: {same or MISSING}; adapters matter: `single` (all through a0) answers "
              f"{result['adapters_matter']} of {result['rows']} prompts otherwise")
        print()
        print("\n".join(render_table(rows)))
        summary[n] = {"rows": rows, "seconds": result["seconds"], "mismatched_rows": result["mismatched_rows"],
                      "adapters_matter": result["adapters_matter"], "prompt_tokens": result["prompt_tokens"],
                      "generated": result["generated"], "skipped": result["skipped"]}
    print()
    print("Side by side (tokens per second; batched / X: how many times faster batched is, median per-round ratio):")
    print()
    print("\n".join(render_summary(per_count, args.rank)))
    print()
    print(json.dumps({"command": command, "versions": versions, "threads": torch.get_num_threads(), "cpu": cpu_model(),
                      "load_average": [load_start, load_end], "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
