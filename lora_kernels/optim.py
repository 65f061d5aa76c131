"""Optimizer parameter groups for LoRA, with LoRA+ (Hayou et al., 2024: B learns ``ratio`` times faster than A).

LoRA+ observes that with B initialised at zero and A random, one learning rate for both is inefficient for
wide layers: B should take larger steps. ``lora_param_groups`` returns groups any ``torch.optim`` optimizer
takes; each group carries ``lr_scale`` (its learning rate divided by the base one) so that a schedule can
set ``group["lr"] = schedule_lr * group["lr_scale"]`` and keep the ratio.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch.nn as nn

from .replace import iter_lora_layers


def lora_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: Optional[float] = None,
                      weight_decay: float = 0.0,
                      adapter_names: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """Parameter groups of ``model``'s trainable parameters: ``lora_A``, ``lora_B`` (LoRA+), and the rest.

    Args:
        model: a model with :class:`FusedLoRALinear` layers.
        lr: learning rate of ``lora_A`` and of any other trainable parameter.
        loraplus_lr_ratio: ``lora_B``'s learning rate is ``lr * loraplus_lr_ratio`` (LoRA+; the paper
            suggests 2–16). None or 1: plain LoRA, one learning rate.
        weight_decay: applied to the LoRA matrices and other parameters of two or more dimensions; biases
            and norms (1-D) get none.
        adapter_names: only these adapters' ``lora_A`` / ``lora_B`` (and no other parameter), e.g. one
            optimizer group set per adapter when several train at once; None: every adapter and every other
            trainable parameter.

    Returns:
        Non-empty groups, each ``{"name", "params", "lr", "lr_scale", "weight_decay"}``, in the order
        ``lora_A``, ``lora_B``, ``other``, ``other_no_decay``.

    Raises:
        ValueError: ``lr``, ``loraplus_lr_ratio`` or ``weight_decay`` not finite and positive (>= 0 for
            ``weight_decay``), an adapter name no layer has, or the model has no trainable LoRA parameter.
    """
    for name, value, low_ok in (("lr", lr, False), ("loraplus_lr_ratio", loraplus_lr_ratio, False),
                                ("weight_decay", weight_decay, True)):
        if value is None and name == "loraplus_lr_ratio":
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value < 0 or (value == 0 and not low_ok)):
            raise ValueError(f"{name} must be a finite number {'>= 0' if low_ok else '> 0'}, got {value!r}")
    ratio = 1.0 if loraplus_lr_ratio is None else float(loraplus_lr_ratio)

    wanted = None if adapter_names is None else list(adapter_names)
    if wanted is not None:
        known = {name for _, layer in iter_lora_layers(model) for name in layer.adapter_names}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r} in the model (it has {sorted(known)})")
    lora_a, lora_b = [], []
    for _, layer in iter_lora_layers(model):
        for adapter in layer.adapter_names if wanted is None else [n for n in layer.adapter_names if n in wanted]:  # every named adapter, each A with the A's and each B with the B's
            a, b = layer.lora_params(adapter)
            lora_a += [a] if a.requires_grad else []
            lora_b += [b] if b.requires_grad else []
    if not lora_a and not lora_b:
        raise ValueError("the model has no trainable lora_A/lora_B parameter (no FusedLoRALinear layer, or all "
                         "frozen)")
    seen = {id(p) for p in lora_a + lora_b}
    rest = [] if wanted is not None else [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [
        ("lora_A", lora_a, 1.0, weight_decay),
        ("lora_B", lora_b, ratio, weight_decay),
        ("other", [p for p in rest if p.dim() >= 2], 1.0, weight_decay),
        ("other_no_decay", [p for p in rest if p.dim() < 2], 1.0, 0.0),
    ]
    return [{"name": name, "params": params, "lr": lr * scale, "lr_scale": scale, "weight_decay": decay}
            for name, params, scale, decay in groups if params]
