"""minimind: a MiniMind-compatible model, tokenizer, data, generation and chat, plus a bundled tiny base.

Loads real MiniMind files (MiniMind2 and MiniMind-3 checkpoints, tokenizers, LoRA adapters, JSONL data)
and ships a tiny pretrained base model, its tokenizer and an identity LoRA data set so that nothing
needs downloading:

    from minimind import load_minimind, MiniMindTokenizer, generate
    model, tok = load_minimind(), MiniMindTokenizer.from_pretrained()      # the bundled base
"""
from .dataset import PretrainDataset, SFTDataset, encode_conversation, pad_batch
from .generate import generate, stream_generate, stream_text
from .lora_io import load_minimind_lora, save_minimind_lora
from .checkpoint import load_minimind, save_minimind
from .model import MiniMindConfig, MiniMindForCausalLM
from .tokenizer import MiniMindTokenizer

__all__ = [
    "MiniMindConfig",
    "MiniMindForCausalLM",
    "MiniMindTokenizer",
    "PretrainDataset",
    "SFTDataset",
    "encode_conversation",
    "generate",
    "load_minimind",
    "load_minimind_lora",
    "pad_batch",
    "save_minimind",
    "save_minimind_lora",
    "stream_generate",
    "stream_text",
]
