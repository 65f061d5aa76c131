"""The model a run trains: the frozen base and its tokenizer (``load_base``), the adapters added to it
(``add_lora``, with ``lora_config`` their settings) and the optimizer's parameter groups (``param_groups``).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import torch

from lora_kernels import (
    LoRAConfig,
    add_adapter,
    lora_param_groups,
    replace_linear_with_fused_lora,
    triton_available,
)

from ..cli import CLIError, reading
from .config import TrainConfig, model_adapters
from .runtime import Runtime


def load_base(cfg: TrainConfig, rt: Runtime):
    """The base model (all parameters frozen) and its tokenizer, checked against the configuration."""
    from ..checkpoint import load_minimind
    from ..model import MiniMindConfig, MiniMindForCausalLM
    from ..tokenizer import MiniMindTokenizer

    try:
        tokenizer = MiniMindTokenizer.from_pretrained(cfg.tokenizer)
    except Exception as err:  # tokenizers reports a malformed file as a bare Exception
        raise CLIError(f"--tokenizer {cfg.tokenizer or 'bundled'!r} is not a readable tokenizer.json: {err}")
    given = {k: v for k, v in (("hidden_size", cfg.hidden_size), ("num_hidden_layers", cfg.num_hidden_layers),
                               ("use_moe", cfg.use_moe), ("arch", cfg.arch)) if v is not None}
    if cfg.random_base:
        torch.manual_seed(cfg.seed)
        model = MiniMindForCausalLM(MiniMindConfig(vocab_size=tokenizer.vocab_size, **given))
    else:
        base = Path(cfg.base)
        if not base.is_file():
            near = sorted(p.name for p in base.parent.glob(base.name.split("_")[0] + "_*.pth"))[:5] if \
                base.parent.is_dir() else []
            raise CLIError(f"base {str(base)!r}: no such file" + (f" (there: {', '.join(near)})" if near else ""))
        fit = f" (with {', '.join(f'--{k} {v}' for k, v in given.items())})" if given else ""
        with reading(f"base {str(base)!r}{fit}"):
            model = load_minimind(base, **given)
        for name, value in given.items():
            if getattr(model.config, name) != value:
                raise CLIError(f"base {str(base)!r} has {name}={getattr(model.config, name)}, not --{name} {value}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CLIError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                       f"{model.config.vocab_size}: they do not belong together (see --tokenizer)")
    model.requires_grad_(False)
    return model.to(rt.device), tokenizer


def lora_config(cfg: TrainConfig) -> LoRAConfig:
    """The adapter's settings (``--rank``, ``--alpha``, ``--lora_dropout``, ``--use_dora``)."""
    return LoRAConfig(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout, use_dora=cfg.use_dora)


def add_lora(model, cfg: TrainConfig, rt: Runtime) -> str:
    """Adds the adapters in place; returns a description of the backend."""
    targets = cfg.targets if cfg.targets in ("square", "all-linear") else \
        [t.strip() for t in cfg.targets.split(",") if t.strip()]
    torch.manual_seed(cfg.seed)  # the same A on every process and in fused and eager runs
    names = model_adapters(cfg)
    try:
        replace_linear_with_fused_lora(model, config=lora_config(cfg), target_modules=targets,
                                       backend="auto" if cfg.fused else "eager", quantize=cfg.quantize,
                                       adapter_name=names[0])
    except (ValueError, TypeError) as err:
        raise CLIError(f"--targets {cfg.targets!r}: {err}")
    for name in names[1:]:  # each adapter starts where a run of it alone (same --seed) starts: the same A
        torch.manual_seed(cfg.seed)
        add_adapter(model, name, config=lora_config(cfg))
    if not cfg.fused:
        return ("eager (PEFT's DoRA maths in plain PyTorch, B·A formed; add --fused for lora_kernels)" if cfg.use_dora
                else "eager (MiniMind's unfused LoRA; add --fused for lora_kernels)")
    base = f", {cfg.quantize} base" if cfg.quantize else ""
    if rt.device.type == "cuda" and triton_available():
        return "fused: Triton kernels" + base
    return ("fused: torch backend (Triton kernels need a CUDA GPU; none is used here)"
            if rt.device.type != "cuda" else "fused: torch backend (Triton is not importable)") + base


def param_groups(model, cfg: TrainConfig) -> List[dict]:
    """The optimizer's parameter groups (LoRA+ as asked); with several adapters one set of groups per adapter,
    each tagged ``"adapter"``, so the step clips each adapter's gradient on its own."""
    if not cfg.multi:
        return lora_param_groups(model, cfg.learning_rate, cfg.loraplus_lr_ratio, cfg.weight_decay)
    groups = []
    for name in cfg.lora_names:
        for group in lora_param_groups(model, cfg.learning_rate, cfg.loraplus_lr_ratio, cfg.weight_decay,
                                       adapter_names=[name]):
            groups.append({**group, "name": f"{name}/{group['name']}", "adapter": name})
    return groups
