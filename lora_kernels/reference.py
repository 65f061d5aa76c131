"""The eager LoRA linear: the single source of truth that every backend is checked against.

    y = x·Wᵀ + b + scaling · (dropout(x)·Aᵀ)·Bᵀ

with ``x`` (..., in_features), ``W`` (out_features, in_features), ``b`` (out_features,) or None,
``A = lora_A`` (rank, in_features), ``B = lora_B`` (out_features, rank) and ``scaling = alpha / rank``.

This is what MiniMind's monkey-patched LoRA and HF PEFT's ``lora.Linear`` compute, written with plain
differentiable torch ops so autograd derives the backward. It is deliberately naive: it materialises the
M×N LoRA product, and with dropout it keeps the mask and a dropped-out copy of x for backward.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Eager LoRA linear with an explicit dropout mask.

    Args:
        x: input, shape (..., in_features).
        weight: base weight, shape (out_features, in_features).
        bias: base bias, shape (out_features,), or None.
        lora_A: shape (rank, in_features).
        lora_B: shape (out_features, rank).
        scaling: the LoRA scale, alpha / rank.
        dropout_mask: boolean keep-mask broadcastable to ``x`` (True keeps), or None for no dropout.
            Passing the mask (instead of drawing one here) lets tests feed the reference the exact mask a
            backend regenerated from its seed.
        dropout_p: the drop probability the mask was drawn with; kept values are scaled by 1/(1-p).

    Returns:
        y, shape (..., out_features), in the dtype of the inputs.
    """
    x_lora = x
    if dropout_mask is not None:
        x_lora = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    base = F.linear(x, weight, bias)
    return base + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)


def lora_linear_unfused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """The unfused LoRA linear as MiniMind and PEFT write it: plain autograd ops and ordinary dropout
    (``F.dropout``, its own random mask, kept for backward).

    This is the ``"eager"`` provider of the benchmarks (``lora_linear_eager`` is its older name); the
    ``backend="eager"`` of :func:`lora_kernels.lora_linear` instead uses :func:`lora_linear_reference` with the
    seeded mask of the fused backends so that both give the same numbers under the same ``torch.manual_seed``.
    """
    x_lora = F.dropout(x, dropout_p, training) if dropout_p > 0 else x
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)


lora_linear_eager = lora_linear_unfused  # the older name, still exported by lora_kernels


def lora_linear_stacked_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    adapters: Sequence[Tuple[torch.Tensor, torch.Tensor, float]],
    dropout_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Eager sum of several adapters on every row (PEFT's several active adapters): the base plus each
    adapter's term of :func:`lora_linear_reference`, all on one shared dropout mask.

    Args:
        x, weight, bias, dropout_mask, dropout_p: as for :func:`lora_linear_reference`.
        adapters: ``(lora_A, lora_B, scaling)`` per adapter.

    Returns:
        x·Wᵀ + b + Σ_a s_a·(dropout(x)·A_aᵀ)·B_aᵀ, shape (..., out_features), in x's dtype.
    """
    x_lora = x if dropout_mask is None else x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    y = F.linear(x, weight, bias)
    for lora_A, lora_B, scaling in adapters:
        y = y + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)
    return y


def lora_linear_mixed_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    adapters: Sequence[Tuple[torch.Tensor, torch.Tensor, float]],
    row_adapter: torch.Tensor,
    dropout_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    dropout_ps: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Eager mixed batch: the base for every row, plus each adapter's term on its own rows (a loop over
    adapters, :func:`lora_linear_reference`'s maths on each adapter's rows).

    Args:
        x: (B, ..., in_features). weight, bias: the base, as for :func:`lora_linear_reference`.
        adapters: ``(lora_A, lora_B, scaling)`` per adapter, or ``(lora_A, lora_B, scaling, magnitude)`` for a
            DoRA adapter (its rows get :func:`dora_linear_reference`'s term).
        row_adapter: (B,) int64, the adapter index of each leading row, -1 for the base alone.
        dropout_masks: per adapter a keep-mask of x's shape (True keeps), or None (no dropout for it).
        dropout_ps: per adapter the probability its mask was drawn with (kept values are scaled by 1/(1-p)).

    Returns:
        (B, ..., out_features), in x's dtype.
    """
    y = F.linear(x, weight, bias)
    for a, adapter in enumerate(adapters):
        lora_A, lora_B, scaling = adapter[:3]
        rows = (row_adapter.to(x.device) == a).nonzero().flatten()
        if rows.numel() == 0:
            continue
        x_lora = x.index_select(0, rows)
        mask = dropout_masks[a] if dropout_masks is not None else None
        if mask is not None:
            x_lora = x_lora * mask.index_select(0, rows).to(x.dtype) / (1.0 - dropout_ps[a])
        term = scaling * F.linear(F.linear(x_lora, lora_A), lora_B)
        if len(adapter) == 4:  # DoRA: (g − 1)⊙(x̃·Wᵀ) + g⊙term
            g = adapter[3] / torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1).detach()
            term = (g - 1) * F.linear(x_lora, weight) + g * term
        y = y.index_add(0, rows, term)
    return y


def dora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Eager DoRA linear (Liu et al. 2024) as HF PEFT computes it (``use_dora=True``), forming B·A:

        g = m / ‖W + s·B·A‖ (per output row, detached);  y = x·Wᵀ + b + (g − 1)⊙(x̃·Wᵀ) + g⊙s·(x̃·Aᵀ)·Bᵀ

    x̃ = x without a mask, else ``x ⊙ mask / (1 - p)`` (PEFT then runs the base GEMM again on x̃).

    Args:
        magnitude: m, shape (out_features,). The others: as for :func:`lora_linear_reference`.

    Returns:
        y, shape (..., out_features).
    """
    norm = torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1).detach()
    g = magnitude / norm
    x_lora = x if dropout_mask is None else x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    return (F.linear(x, weight, bias) + (g - 1) * F.linear(x_lora, weight)
            + g * (scaling * F.linear(F.linear(x_lora, lora_A), lora_B)))
