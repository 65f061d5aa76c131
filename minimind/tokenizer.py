"""MiniMind tokenizer on the ``tokenizers`` library, with MiniMind's two ChatML chat formats.

A MiniMind ``tokenizer.json`` is a byte-level BPE of 6400 entries whose first ids are
``<|endoftext|>`` (0, padding), ``<|im_start|>`` (1, bos) and ``<|im_end|>`` (2, eos).

Chat formats (what MiniMind's ``tokenizer_config.json`` templates produce):

* ``"minimind2"``: a system turn ``<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n`` is
  added when the conversation has none; every user turn is followed by ``<|im_start|>assistant\\n``;
  an assistant turn is ``{content}<|im_end|>\\n``.
* ``"minimind3"``: no default system turn; an assistant turn is
  ``<|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{content}<|im_end|>\\n`` (the reasoning
  is usually empty); the generation prompt is ``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from tokenizers import Tokenizer

from atomic_io import read_json_object

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_TOKENIZER = ASSETS / "tokenizer"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DEFAULT_SYSTEM = "You are a helpful assistant"
CHAT_STYLES = ("minimind2", "minimind3")
ASSISTANT_HEADER = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>\n"

Message = Dict[str, str]


def render_chat(
    messages: Sequence[Message], style: str = "minimind2", add_generation_prompt: bool = False, open_thinking: bool = False
) -> Tuple[str, List[Tuple[int, int]]]:
    """Render a conversation as MiniMind's ChatML text and locate the assistant replies in it.

    Args:
        messages: dicts with ``role`` (``system``, ``user``, ``assistant``, and for minimind3
            ``tool``) and ``content``; minimind3 assistant turns may carry ``reasoning_content``.
        style: ``"minimind2"`` or ``"minimind3"`` (see the module docstring).
        add_generation_prompt: minimind3: end with the assistant header and an empty think block
            (minimind2's template always ends a user turn with the assistant header).
        open_thinking: minimind3 with ``add_generation_prompt``: leave ``<think>\\n`` open instead.

    Returns:
        (text, spans): ``spans`` are the ``(start, end)`` character ranges of each assistant reply,
        from just after ``<|im_start|>assistant\\n`` through its ``<|im_end|>\\n`` inclusive: the
        part of the text that SFT trains on.

    Raises:
        ValueError: unknown style or role, or a message without string content.
    """
    if style not in CHAT_STYLES:
        raise ValueError(f"chat style must be one of {CHAT_STYLES}, got {style!r}")
    parts: List[str] = []
    spans: List[Tuple[int, int]] = []
    length = 0

    def emit(s: str, reply: bool = False):
        nonlocal length
        if reply:
            spans.append((length, length + len(s)))
        parts.append(s)
        length += len(s)

    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role not in ("system", "user", "assistant", "tool") or (role == "tool" and style == "minimind2"):
            raise ValueError(f"message {i}: unknown role {role!r} for chat style {style}")
    first_is_system = bool(messages) and messages[0]["role"] == "system"
    if first_is_system:
        emit(f"<|im_start|>system\n{messages[0]['content']}{TURN_END}")
    elif style == "minimind2":
        emit(f"<|im_start|>system\n{DEFAULT_SYSTEM}{TURN_END}")

    for i, msg in enumerate(messages):
        role, content = msg["role"], msg["content"]
        if style == "minimind2":
            if role == "user":
                emit(f"<|im_start|>user\n{content}{TURN_END}{ASSISTANT_HEADER}")
            elif role == "assistant":
                emit(content + TURN_END, reply=True)
            continue
        if role == "user" or (role == "system" and i > 0):
            emit(f"<|im_start|>{role}\n{content}{TURN_END}")
        elif role == "assistant":
            reasoning = msg.get("reasoning_content")
            if not isinstance(reasoning, str):
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
            emit(ASSISTANT_HEADER)
            emit(f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}{TURN_END}", reply=True)
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                emit("<|im_start|>user")
            emit(f"\n<tool_response>\n{content}\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                emit(TURN_END)
    if style == "minimind3" and add_generation_prompt:
        emit(ASSISTANT_HEADER + ("<think>\n" if open_thinking else "<think>\n\n</think>\n\n"))
    return "".join(parts), spans


class MiniMindTokenizer:
    """A MiniMind ``tokenizer.json`` plus MiniMind's chat format.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        chat_style: ``"minimind2"`` or ``"minimind3"``.
        config: the ``tokenizer_config.json`` it came with, written back by ``save``; None for a
            new tokenizer (``save`` then writes a MiniMind2-style config).

    Raises:
        ValueError: the special tokens are not at ids 0, 1, 2 or the style is unknown.
    """

    def __init__(self, tokenizer: Tokenizer, chat_style: str = "minimind2", config: Optional[dict] = None):
        if chat_style not in CHAT_STYLES:
            raise ValueError(f"chat_style must be one of {CHAT_STYLES}, got {chat_style!r}")
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != [0, 1, 2]:
            raise ValueError(f"expected special tokens {SPECIAL_TOKENS} at ids [0, 1, 2], got {ids}")
        self.tokenizer = tokenizer
        self.chat_style = chat_style
        self.config = config
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.pad_token, self.bos_token, self.eos_token = SPECIAL_TOKENS

    @classmethod
    def from_pretrained(
        cls, path: Union[str, os.PathLike, None] = None, chat_style: Optional[str] = None
    ) -> "MiniMindTokenizer":
        """Load a tokenizer.

        Args:
            path: a ``tokenizer.json`` or a folder holding one (MiniMind's ``model/`` folder works);
                None loads the tokenizer bundled with this package.
            chat_style: force a chat format; by default ``"minimind3"`` when the folder's
                ``tokenizer_config.json`` chat template uses ``<think>``, else ``"minimind2"``.

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: no ``tokenizer.json`` at ``path``.
            ValueError: ``tokenizer.json`` or ``tokenizer_config.json`` cannot be parsed (naming the file),
                or the special tokens are not where MiniMind puts them.
        """
        path = Path(path) if path is not None else BUNDLED_TOKENIZER
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        config_file = file.parent / "tokenizer_config.json"
        config = read_json_object(config_file) if config_file.is_file() else None
        if chat_style is None:
            template = config.get("chat_template") if config else None
            chat_style = "minimind3" if isinstance(template, str) and "<think>" in template else "minimind2"
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # the tokenizers library raises a bare Exception for a malformed file
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ValueError(f"{str(file)!r} is not a tokenizers tokenizer.json ({reason})") from None
        try:
            return cls(tokenizer, chat_style=chat_style, config=config)
        except ValueError as err:
            raise ValueError(f"{str(file)!r}: {err}") from None

    @property
    def vocab_size(self) -> int:
        """Returns: the number of ids, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``...) map to their ids.

        Args:
            text: the string.

        Returns:
            The ids (no bos/eos added).
        """
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Like ``encode``, plus each token's ``(start, end)`` character range in ``text``."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``.

        Args:
            ids: token ids (a list or 1-D tensor).
            skip_special_tokens: drop ``<|im_start|>`` and the like.

        Returns:
            The decoded string (an incomplete UTF-8 sequence decodes to U+FFFD).
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        open_thinking: bool = False,
    ) -> Union[str, List[int]]:
        """Format a conversation in this tokenizer's MiniMind chat format.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.
            add_generation_prompt: end ready for the assistant's reply (see ``render_chat``).
            tokenize: return ids instead of text.
            open_thinking: minimind3: leave the think block open for the model to fill.

        Returns:
            The text, or its ids when ``tokenize``.

        Raises:
            ValueError: a malformed message.
        """
        text, _ = render_chat(messages, self.chat_style, add_generation_prompt, open_thinking)
        return self.encode(text) if tokenize else text

    def save(self, folder: Union[str, os.PathLike]):
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``.

        The config is the one this tokenizer was loaded with, or for a new tokenizer a
        MiniMind2-style one whose ``chat_template`` renders like ``render_chat(style="minimind2")``,
        so ``transformers.AutoTokenizer`` and MiniMind's own scripts load the folder too.

        Args:
            folder: destination folder (created if needed).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        config = self.config or {
            "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
            "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True}
                                     for i, t in enumerate(SPECIAL_TOKENS)},
            "additional_special_tokens": [], "bos_token": self.bos_token, "eos_token": self.eos_token,
            "pad_token": self.pad_token, "unk_token": self.pad_token, "clean_up_tokenization_spaces": False,
            "legacy": True, "model_max_length": 32768, "spaces_between_special_tokens": False,
            "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": _MINIMIND2_TEMPLATE,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


# MiniMind2's chat template, for the configs of new tokenizers (this module renders in Python).
_MINIMIND2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n<|im_start|>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
)
