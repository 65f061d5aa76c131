"""What pretraining (``minimind.pretrain``) and LoRA SFT (``minimind.train_lora``) share: the learning-rate
schedule, the token-level loss and ``evaluate``.

The loss of a batch is the cross-entropy of each position's next-token prediction, over the positions
whose label is not -100 (SFT: the assistant replies; pretraining: every token). Summing it and dividing
by the token count of the whole step (not averaging per-batch means) makes gradient accumulation and data
parallelism give exactly the gradient of one large batch.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Iterable, Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cosine_lr(step: int, total: int, peak: float, floor: float, warmup: int = 0) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then a cosine from ``peak`` down to ``floor`` at
    step ``total`` (and ``floor`` after it).

    MiniMind2's ``lr/10 + 0.5·lr·(1 + cos(π·t/T))`` is ``peak = 1.1·lr, floor = lr/10``; MiniMind-3's
    ``lr·(0.1 + 0.45·(1 + cos(π·t/T)))`` is ``peak = lr, floor = lr/10``.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(1, total - warmup), 1.0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def supervised_tokens(labels: torch.Tensor) -> int:
    """The number of positions that carry a loss in a (B, T) label batch (next-token: labels[:, 1:])."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _next_token_losses(model, input_ids: torch.Tensor, labels: torch.Tensor,
                       reduction: str) -> Tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids)
    logits = out.logits[:, :-1].float()  # (B, T-1, V)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction=reduction)
    return losses, out.aux_loss


def token_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the supervised positions (fp32), and the MoE auxiliary loss."""
    return _next_token_losses(model, input_ids, labels, "sum")


def row_loss_sums(model, input_ids: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`token_loss_sum`, but each row's own sum: (B,) fp32 (a batch whose rows train different
    adapters), and the MoE auxiliary loss of the whole batch."""
    losses, aux = _next_token_losses(model, input_ids, labels, "none")  # 0 where ignored
    return losses.view(input_ids.shape[0], -1).sum(dim=1), aux


def row_supervised_tokens(labels: torch.Tensor) -> torch.Tensor:
    """(B,) int64: the positions of each row of a (B, T) label batch that carry a loss."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


@torch.no_grad()
def evaluate(model, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], device: torch.device = None,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> float:
    """Mean cross-entropy per supervised token over ``batches`` of ``(input_ids, labels)`` (B, T).

    The model is put in eval mode for the pass and back in its previous mode afterwards.

    Returns:
        The mean loss (nan when no batch has a supervised token).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for input_ids, labels in batches:
            if device is not None:
                input_ids, labels = input_ids.to(device), labels.to(device)
            with autocast():
                loss_sum, _ = token_loss_sum(model, input_ids, labels)
            total += loss_sum.item()
            count += supervised_tokens(labels)
    finally:
        model.train(was_training)
    return total / count if count else math.nan
