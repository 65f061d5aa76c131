"""Optimizer parameter groups for LoRA, with LoRA+ (Hayou et al., 2024: B learns ``ratio`` times faster than A).

LoRA+ observes that with B initialised at zero and A random, one learning rate for both is inefficient for
wide layers: B should take larger steps. ``lora_param_groups`` returns groups any ``torch.optim`` optimizer
takes; each group carries ``lr_scale`` (its learning rate divided by the base one) so that a schedule can
set ``group["lr"] = schedule_lr * group["lr_scale"]`` and keep the ratio.

DoRA's magnitudes (``lora_magnitude``, one per output row) get a group of their own, ``lora_magnitude``:

* learning rate: B's (``lr * loraplus_lr_ratio``), as PEFT's ``create_loraplus_optimizer`` puts every 1-D
  adapter parameter (``lora_magnitude_vector``) beside ``lora_B``; without LoRA+ that is just ``lr``;
* no weight decay, whatever ``weight_decay`` says: decay pulls a parameter towards 0, which is "no change"
  for A and B but for m means shrinking every output row of the layer (m's neutral value is the row norm
  ‖W + s·B·A‖, not 0). It also follows the common rule of no decay on 1-D parameters (biases, norms), which
  the ``other_no_decay`` group applies. PEFT's LoRA+ decays them with its ``loraplus_weight_decay``, which is
  0 by default.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch.nn as nn

from .replace import iter_lora_layers


def lora_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: Optional[float] = None,
                      weight_decay: float = 0.0,
                      adapter_names: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """Parameter groups of ``model``'s trainable parameters: ``lora_A``, ``lora_B`` (LoRA+), DoRA's
    ``lora_magnitude``, and the rest.

    Args:
        model: a model with :class:`FusedLoRALinear` layers.
        lr: learning rate of ``lora_A`` and of any other trainable parameter.
        loraplus_lr_ratio: ``lora_B``'s learning rate is ``lr * loraplus_lr_ratio`` (LoRA+; the paper
            suggests 2–16). None or 1: plain LoRA, one learning rate.
        weight_decay: applied to the LoRA matrices and other parameters of two or more dimensions; biases,
            norms and DoRA magnitudes (1-D) get none (see the module docstring).
        adapter_names: only these adapters' ``lora_A`` / ``lora_B`` / ``lora_magnitude`` (and no other
            parameter), e.g. one optimizer group set per adapter when several train at once; None: every
            adapter and every other trainable parameter.

    Returns:
        Non-empty groups, each ``{"name", "params", "lr", "lr_scale", "weight_decay"}``, in the order
        ``lora_A``, ``lora_B``, ``lora_magnitude`` (DoRA: ``lr * loraplus_lr_ratio``, no decay), ``other``,
        ``other_no_decay``.

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
    lora_a, lora_b, magnitudes = [], [], []
    for _, layer in iter_lora_layers(model):
        # every named adapter: each A with the A's, each B with the B's, each DoRA magnitude with the magnitudes
        for adapter in layer.adapter_names if wanted is None else [n for n in layer.adapter_names if n in wanted]:
            a, b = layer.lora_params(adapter)
            m = layer.lora_magnitude_of(adapter)
            lora_a += [a] if a.requires_grad else []
            lora_b += [b] if b.requires_grad else []
            magnitudes += [m] if m is not None and m.requires_grad else []
    if not lora_a and not lora_b and not magnitudes:
        raise ValueError("the model has no trainable lora_A/lora_B parameter (no FusedLoRALinear layer, or all "
                         "frozen)")
    seen = {id(p) for p in lora_a + lora_b + magnitudes}
    rest = [] if wanted is not None else [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [
        ("lora_A", lora_a, 1.0, weight_decay),
        ("lora_B", lora_b, ratio, weight_decay),
        ("lora_magnitude", magnitudes, ratio, 0.0),
        ("other", [p for p in rest if p.dim() >= 2], 1.0, weight_decay),
        ("other_no_decay", [p for p in rest if p.dim() < 2], 1.0, 0.0),
    ]
    return [{"name": name, "params": params, "lr": lr * scale, "lr_scale": scale, "weight_decay": decay}
            for name, params, scale, decay in groups if params]
