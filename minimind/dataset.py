"""MiniMind's JSONL data as PyTorch datasets: SFT conversations and packed pretraining text.

Both datasets yield ``(input_ids, labels)``: two int64 tensors of the same length where
``labels`` equals ``input_ids`` on trained tokens and -100 elsewhere (prompt, padding).
``MiniMindForCausalLM(input_ids, labels=labels)`` shifts them itself (logits at t predict label
t + 1), the same convention as MiniMind-3's trainers.
"""
from __future__ import annotations

import bisect
import json
import os
from array import array
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from .tokenizer import SPECIAL_TOKENS, MiniMindTokenizer, render_chat

IGNORE_INDEX = -100
_, BOS, EOS = SPECIAL_TOKENS
ROLES = ("system", "user", "assistant")
PathLike = Union[str, os.PathLike]


class NoTrainableTokensError(ValueError):
    """No conversation of a data set keeps a trained (assistant) token within ``max_seq_len``: training on
    it would run at loss 0 and learn nothing."""


def iter_jsonl(path: PathLike) -> Iterator[Tuple[int, int, object]]:
    """Yield ``(line_number, byte_offset, parsed_object)`` for each non-blank line of a JSONL file.

    Args:
        path: the file.

    Yields:
        1-based line number, byte offset of the line, and the parsed JSON value.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``"<path>:<line>: invalid JSON ..."`` for a line that does not parse.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                yield lineno, start, json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None


def parse_conversation(obj: object, where: str) -> List[dict]:
    """Check one MiniMind SFT record and return its messages.

    Args:
        obj: a parsed JSONL line, ``{"conversations": [{"role": ..., "content": ...}, ...]}``.
        where: ``"<path>:<line>"`` for error messages.

    Returns:
        The list of messages.

    Raises:
        ValueError: naming ``where``, for a record without a ``conversations`` list, a turn without
            a known role or string content, or a conversation with no assistant turn.
    """
    conv = obj.get("conversations") if isinstance(obj, dict) else None
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}: expected an object with a non-empty 'conversations' list")
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: turn {i} must be {{'role': one of {ROLES}, 'content': str}}, got {turn!r:.120}")
    if not any(turn["role"] == "assistant" for turn in conv):
        raise ValueError(f"{where}: conversation has no assistant turn")
    return conv


def encode_conversation(
    tokenizer: MiniMindTokenizer, messages: Sequence[dict], max_seq_len: int
) -> Tuple[List[int], List[int]]:
    """Tokenize a conversation in the tokenizer's chat format and mark the tokens to train on.

    A token is trained on when it starts inside an assistant reply: from just after
    ``<|im_start|>assistant\\n`` through that turn's ``<|im_end|>\\n`` inclusive.

    Args:
        tokenizer: a ``MiniMindTokenizer`` (its ``chat_style`` picks the format).
        messages: the conversation.
        max_seq_len: truncate to this many tokens.

    Returns:
        (input_ids, labels), lists of equal length <= ``max_seq_len``; labels are -100 off the replies.
    """
    text, spans = render_chat(messages, tokenizer.chat_style)
    ids, offsets = tokenizer.encode_with_offsets(text)
    labels = [IGNORE_INDEX] * len(ids)
    span = 0
    for t, (start, _) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span < len(spans) and start >= spans[span][0]:
            labels[t] = ids[t]
    return ids[:max_seq_len], labels[:max_seq_len]


def pad_batch(
    batch: Sequence[Tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0, length: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(input_ids, labels)`` pairs into two (B, T) tensors, usable as a ``collate_fn``.

    Args:
        batch: pairs of 1-D tensors (or lists).
        pad_id: id for padded inputs (labels are padded with -100).
        length: pad to at least this length (default: the longest item).

    Returns:
        (input_ids, labels), each (B, T) int64.
    """
    T = max([length] + [len(ids) for ids, _ in batch])
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        labels[i, : len(lab)] = torch.as_tensor(lab, dtype=torch.long)
    return input_ids, labels


class SFTDataset(Dataset):
    """MiniMind SFT JSONL: one ``{"conversations": [...]}`` per line, multi-turn, optional system.

    The file is checked once when the dataset is built (so a bad line fails before training, with
    its file and line number); lines are then re-read and tokenized lazily, so large MiniMind
    files do not sit in memory.

    Args:
        path: the JSONL file.
        tokenizer: a ``MiniMindTokenizer``; its chat style decides the formatting.
        max_seq_len: truncate longer conversations to this many tokens.
        pad: pad every item to ``max_seq_len`` (with ``pad=False`` items keep their length; batch them
            with ``collate_fn=pad_batch`` to pad only to the longest in the batch).

    Items:
        ``(input_ids, labels)``: int64 tensors; labels -100 outside assistant replies and on padding.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty file, or a malformed line / conversation without an assistant turn,
            named as ``<path>:<line>``.
        NoTrainableTokensError: every assistant answer lies beyond ``max_seq_len`` tokens.
    """

    def __init__(self, path: PathLike, tokenizer: MiniMindTokenizer, max_seq_len: int = 512, pad: bool = True):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.path, self.tokenizer, self.max_seq_len, self.pad = Path(path), tokenizer, max_seq_len, pad
        self.offsets, self.line_numbers = array("q"), array("q")
        for lineno, offset, obj in iter_jsonl(self.path):
            parse_conversation(obj, f"{self.path}:{lineno}")
            self.offsets.append(offset)
            self.line_numbers.append(lineno)
        if not self.offsets:
            raise ValueError(f"{self.path}: no conversations (the file is empty)")
        self._check_something_is_trained()

    def _check_something_is_trained(self) -> None:
        # Stops at the first conversation with a trained token (usually the first), so only a data set
        # that would train on nothing is tokenized whole. Position 0 is never a target (labels shift).
        shortest = None
        for index in range(len(self)):
            ids, labels = encode_conversation(self.tokenizer, self.conversation(index), self.max_seq_len)
            if any(label != IGNORE_INDEX for label in labels[1:]):
                return
            full_ids, full_labels = encode_conversation(self.tokenizer, self.conversation(index), 2**62)
            first = next((t for t, label in enumerate(full_labels) if label != IGNORE_INDEX), len(full_ids))
            shortest = first if shortest is None else min(shortest, first)
        raise NoTrainableTokensError(
            f"{self.path}: with max_seq_len={self.max_seq_len}, no conversation keeps any assistant token (the "
            f"earliest answer starts at token {shortest}), so training would learn nothing at loss 0; raise "
            f"max_seq_len above {shortest} or shorten the prompts")

    def __len__(self) -> int:
        return len(self.offsets)

    def conversation(self, index: int) -> List[dict]:
        """Returns: the messages of item ``index``."""
        with open(self.path, "rb") as f:
            f.seek(self.offsets[index])
            return parse_conversation(json.loads(f.readline()), f"{self.path}:{self.line_numbers[index]}")

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, labels = encode_conversation(self.tokenizer, self.conversation(index), self.max_seq_len)
        if self.pad:
            return tuple(t[0] for t in pad_batch([(ids, labels)], self.tokenizer.pad_token_id, self.max_seq_len))
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


class TaggedDatasets(Dataset):
    """Several data sets as one, each item tagged with the data set it comes from (one adapter per data
    set when several adapters train at once: the tag says whose row it is).

    Index ``offsets[k] + i`` is item ``i`` of ``datasets[k]``.

    Items:
        ``(input_ids, labels, k)``: the item of data set ``k`` and ``k``.
    """

    def __init__(self, datasets: Sequence[Dataset]):
        if not datasets:
            raise ValueError("TaggedDatasets needs at least one data set, got none")
        self.datasets = list(datasets)
        self.offsets = [0]
        for dataset in self.datasets[:-1]:
            self.offsets.append(self.offsets[-1] + len(dataset))

    def __len__(self) -> int:
        return self.offsets[-1] + len(self.datasets[-1])

    def locate(self, index: int) -> Tuple[int, int]:
        """Returns: ``(k, i)``: item ``index`` is item ``i`` of data set ``k``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        k = bisect.bisect_right(self.offsets, index) - 1
        return k, index - self.offsets[k]

    def conversation(self, index: int) -> List[dict]:
        k, i = self.locate(index)
        return self.datasets[k].conversation(i)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        k, i = self.locate(index)
        return (*self.datasets[k][i], k)


def document_texts(path: PathLike, chat_style: str = "minimind2") -> Iterator[str]:
    """The training text of each line of a pretraining JSONL.

    ``{"text": ...}`` lines (MiniMind's pretrain format) become ``<|im_start|>{text}<|im_end|>``;
    ``{"conversations": [...]}`` lines are rendered in the given chat format, so chat data can be
    mixed into pretraining.

    Args:
        path: the JSONL file.
        chat_style: ``"minimind2"`` or ``"minimind3"``.

    Yields:
        One string per line.

    Raises:
        ValueError: ``<path>:<line>`` for a line that is neither.
    """
    for lineno, _, obj in iter_jsonl(path):
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            yield f"{BOS}{obj['text']}{EOS}"
        elif isinstance(obj, dict) and "conversations" in obj:
            yield render_chat(parse_conversation(obj, f"{path}:{lineno}"), chat_style)[0]
        else:
            raise ValueError(f"{path}:{lineno}: expected {{'text': str}} or {{'conversations': [...]}}")


class PretrainDataset(Dataset):
    """Pretraining text packed into fixed-length blocks (every token trained on).

    All documents of all files are tokenized once, concatenated and cut into blocks of
    ``max_seq_len`` tokens (the tail shorter than a block is dropped), so no compute goes to padding.

    Args:
        paths: one JSONL file or several (see ``document_texts`` for the line formats).
        tokenizer: a ``MiniMindTokenizer``.
        max_seq_len: block length.

    Items:
        ``(input_ids, labels)``, both the same (max_seq_len,) int64 block.

    Raises:
        FileNotFoundError, ValueError: as ``iter_jsonl``; ValueError too when the files hold less
            than one block of tokens.
    """

    def __init__(self, paths: Union[PathLike, Iterable[PathLike]], tokenizer: MiniMindTokenizer, max_seq_len: int = 256):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        texts = [t for p in paths for t in document_texts(p, tokenizer.chat_style)]
        stream = [i for enc in tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False) for i in enc.ids]
        n_blocks = len(stream) // max_seq_len
        if n_blocks == 0:
            raise ValueError(f"{', '.join(map(str, paths))}: {len(stream)} tokens, less than one block of {max_seq_len}")
        self.blocks = torch.tensor(stream[: n_blocks * max_seq_len], dtype=torch.long).view(n_blocks, max_seq_len)
        self.num_tokens = len(stream)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        block = self.blocks[index]
        return block, block
