"""Text generation with the KV cache: greedy or sampled (temperature, top-k, top-p), repetition
penalty, streaming token by token, batches with left padding, and batches whose prompts each name their
adapter (:func:`generate_batch`, :func:`generate_mixed`)."""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .model import MiniMindForCausalLM
from .tokenizer import MiniMindTokenizer


def process_logits(
    logits: torch.Tensor,
    seen: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Turn next-token logits into the scores to sample from (filtered tokens get -inf).

    Order: repetition penalty (CTRL: positive logits of seen tokens divided by the penalty,
    negative ones multiplied), temperature, top-k, then top-p (the smallest set of tokens whose
    probability reaches ``top_p``; the most likely token always stays).

    Args:
        logits: (B, V).
        seen: (B, V) bool, tokens already in the context (for the repetition penalty).
        temperature: divide logits by it; <= 0 means greedy decoding: only the penalty is applied.
        top_k: keep the k best tokens; 0 keeps all.
        top_p: nucleus mass in (0, 1]; 1 keeps all.
        repetition_penalty: >= 1 discourages repeats; 1 disables.

    Returns:
        (B, V) float32 scores.

    Raises:
        ValueError: on a non-positive penalty, or top_p outside (0, 1].
    """
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    scores = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    if temperature <= 0:
        return scores
    scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


@torch.inference_mode()
def stream_generate(
    model: MiniMindForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: int = 256,
    temperature: float = 0.85,
    top_k: int = 50,
    top_p: float = 0.85,
    repetition_penalty: float = 1.0,
    eos_token_id: Optional[int] = 2,
    pad_token_id: int = 0,
    generator: Optional[torch.Generator] = None,
) -> Iterator[torch.Tensor]:
    """Generate token by token with the KV cache, yielding each step's new tokens.

    The prompt is run once; every later step feeds only the newest token. A row that has
    produced ``eos_token_id`` yields ``pad_token_id`` from then on; generation stops when every row
    has finished, after ``max_new_tokens``, or at the model's ``max_position_embeddings``.

    Args:
        model: the model (put it in eval mode yourself; this does not change its mode).
        input_ids: (B, T) prompt ids; left-pad rows of different length.
        attention_mask: (B, T), 1 for real tokens, 0 for padding; None means no padding.
        max_new_tokens: at most this many steps.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_k, top_p, repetition_penalty: see ``process_logits``.
        eos_token_id: stop token (``<|im_end|>``); None never stops early.
        pad_token_id: what finished rows yield.
        generator: a ``torch.Generator`` for reproducible sampling.

    Yields:
        (B,) int64: the next token of each row.
    """
    B, T = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    # Tokens in the context (padding excluded), for the repetition penalty.
    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.long, device=device).scatter_add_(1, input_ids, mask) > 0
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    budget = min(max_new_tokens, model.config.max_position_embeddings - T)
    past, step_ids = None, input_ids
    for _ in range(max(budget, 0)):
        out = model(step_ids, attention_mask=mask, past_key_values=past, use_cache=True, logits_to_keep=1)
        past, logits = out.past_key_values, out.logits[:, -1]  # (B, V)
        scores = process_logits(logits, seen, temperature, top_k, top_p, repetition_penalty)
        if temperature <= 0:
            token = scores.argmax(dim=-1)
        else:
            token = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        yield token
        if eos_token_id is not None:
            finished |= token == eos_token_id
        if bool(finished.all()):
            return
        seen.scatter_(1, token[:, None], True)
        step_ids = token[:, None]
        mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)


def generate(model: MiniMindForCausalLM, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Generate to completion; same arguments as ``stream_generate``.

    Returns:
        (B, T + n) int64: the prompt followed by the n generated tokens (``pad_token_id`` after a
        row's eos).
    """
    steps = list(stream_generate(model, input_ids, **kwargs))
    return torch.cat([input_ids] + [s[:, None] for s in steps], dim=1) if steps else input_ids


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-id prompts of different lengths as one left-padded batch.

    Returns:
        ``(input_ids, attention_mask)``, each (B, T) int64, T the longest prompt; the mask is 0 on padding.

    Raises:
        ValueError: no prompt, or an empty one (naming its position).
    """
    if not prompts:
        raise ValueError("expected at least one prompt, got none")
    empty = [i for i, ids in enumerate(prompts) if len(ids) == 0]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty; every prompt needs at least one token")
    T = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, T - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[row, T - len(ids):] = 1
    return input_ids, mask


def generate_batch(
    model: MiniMindForCausalLM,
    tokenizer: MiniMindTokenizer,
    prompts: Sequence[Union[str, Sequence[dict]]],
    adapters: Optional[Sequence[Optional[str]]] = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    **kwargs,
) -> List[str]:
    """Answers several prompts in one batch, each through its own adapter.

    The prompts are put in the chat template, left-padded into one batch and generated together: every step
    is one forward of the whole batch, in which the base runs once and each row adds the term of its own
    adapter (``lora_kernels.mixed_adapters``). With greedy decoding (the default) each answer is the one
    that prompt gets alone with its adapter active.

        generate_batch(model, tok, ["Who are you?", "Translate: 你好"], adapters=["qa", "tr"])

    Args:
        model: a MiniMind model with named adapters (``load_adapter(model, path, adapter_name=...)``); put it
            in eval mode yourself.
        tokenizer: its tokenizer.
        prompts: each a user message, or a whole conversation (a list of ``{"role", "content"}``).
        adapters: one per prompt: an adapter name, or None for the base alone (a model without LoRA layers takes
            all None); None (the argument): every prompt with the model's active adapters.
        max_new_tokens, temperature, **kwargs: as for :func:`stream_generate` (``eos_token_id`` and
            ``pad_token_id`` default to the tokenizer's).

    Returns:
        The answers, in the order of ``prompts`` (decoded up to the end-of-turn token).

    Raises:
        ValueError: ``adapters`` and ``prompts`` of different lengths, an unknown adapter name (from
            ``mixed_adapters``), or an empty prompt list.
    """
    if adapters is not None and len(adapters) != len(prompts):
        raise ValueError(f"adapters must give one name (or None) per prompt: {len(prompts)} prompts, "
                         f"{len(adapters)} adapters")
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in conversations]
    eos, pad = kwargs.pop("eos_token_id", tokenizer.eos_token_id), kwargs.pop("pad_token_id", tokenizer.pad_token_id)
    input_ids, mask = left_pad(ids, pad)
    device = next(model.parameters()).device
    out = generate_mixed(model, input_ids.to(device), adapters, attention_mask=mask.to(device),
                         max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos, pad_token_id=pad,
                         **kwargs)
    answers = []
    for row in out[:, input_ids.shape[1]:].tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        answers.append(decode_reply(tokenizer, row))
    return answers


def generate_mixed(model: MiniMindForCausalLM, input_ids: torch.Tensor, adapters: Optional[Sequence[Optional[str]]],
                   **kwargs) -> torch.Tensor:
    """:func:`generate` with row i of the batch through adapter ``adapters[i]``: the token ids behind
    :func:`generate_batch` (which adds the chat template, the left padding and the decoding).

    Every step is one forward of the whole batch under ``lora_kernels.mixed_adapters`` (set once for the whole
    generation: the per-row adapter indices are built at the first step and reused by every later one).

    Args:
        model: a MiniMind model with named adapters, in eval mode.
        input_ids: (B, T) prompt ids, left-padded (pass ``attention_mask``).
        adapters: B entries, an adapter name or None (the base alone); None (the argument): every row with the
            model's active adapters. All None on a model without LoRA layers runs the base.
        **kwargs: as for :func:`stream_generate`.

    Returns:
        (B, T + n) int64, as :func:`generate`.

    Raises:
        ValueError: ``adapters`` not of length B, or an unknown adapter name (from ``mixed_adapters``).
    """
    import contextlib

    from lora_kernels import iter_lora_layers, mixed_adapters

    if adapters is not None and len(adapters) != input_ids.shape[0]:
        raise ValueError(f"adapters must give one name (or None) per row: {input_ids.shape[0]} rows, "
                         f"{len(adapters)} adapters")
    if adapters is None or (all(name is None for name in adapters) and next(iter_lora_layers(model), None) is None):
        mixing = contextlib.nullcontext()  # the active adapters; or every row the base of a model without LoRA
    else:
        mixing = mixed_adapters(model, list(adapters))
    with mixing:
        return generate(model, input_ids, **kwargs)


def decode_reply(tokenizer: MiniMindTokenizer, ids: Sequence[int]) -> str:
    """The text of a reply's token ids, without the incomplete character a reply cut off by
    ``max_new_tokens`` can end in (byte-level BPE spreads a character over several tokens; decoding the first
    bytes alone gives U+FFFD)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).rstrip("\ufffd")


def stream_text(tokenizer: MiniMindTokenizer, tokens: Iterable[torch.Tensor], stop_id: Optional[int] = 2) -> Iterator[str]:
    """Turn the tokens of one row into text pieces as soon as they decode to whole characters.

    Byte-level BPE splits many characters (Chinese, emoji) over several tokens; a piece is held
    back while it ends in an incomplete UTF-8 sequence.

    Args:
        tokenizer: the tokenizer.
        tokens: an iterable of (1,) or scalar tensors / ints, e.g. ``stream_generate(...)`` with B = 1.
        stop_id: stop at this id (not decoded).

    Yields:
        New text, in order; their concatenation is the decoded reply (:func:`decode_reply`: a character the
        last token leaves incomplete is dropped, never shown as U+FFFD).
    """
    ids, emitted = [], ""
    for tok in tokens:
        tok = int(tok.reshape(-1)[0]) if isinstance(tok, torch.Tensor) else int(tok)
        if tok == stop_id:
            break
        ids.append(tok)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
    text = decode_reply(tokenizer, ids)
    if len(text) > len(emitted):
        yield text[len(emitted):]
