"""The fused pure-PyTorch backend of :func:`lora_kernels.lora_linear`.

It works on every device PyTorch supports and is the fallback wherever the Triton kernels are not used.
Notation (the same in every backend): ``x`` (M, K), ``W`` (N, K), ``A`` (r, K), ``B`` (N, r),
``s = scaling``, keep-mask ``m`` (M, K) drawn with drop probability ``p``, ``x̃ = m ⊙ x / (1 - p)``.

Forward::

    S = x̃ · Aᵀ                         (M, r)   the only LoRA activation kept for backward
    y = x · Wᵀ + b ;  y += s · S · Bᵀ    (M, N)   one addmm_ into y: the LoRA term is never an M×N tensor

Backward, with dS = s · dY · B (M, r)::

    dB = s · dYᵀ · S                    (N, r)
    dX = dY · W + (m / (1 - p)) ⊙ (dS · A)
    dA = dSᵀ · x̃                        (r, K)   x̃ rebuilt from x and the regenerated mask
    dW = dYᵀ · x,  db = Σ_rows dY        only when the base is trainable

The dropout mask is never stored: forward and backward regenerate it from the same integer seed with a
private ``torch.Generator``, so the layer saves exactly what the base linear saves plus S.

The backend contract shared with ``lora_kernels.ops.lora_linear`` (the Triton backend):

* ``forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y, S)``, x 2-D (M, K);
* ``backward(grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, needs_grad)``
  ``-> (dx, dweight, dbias, dA, dB)``, with ``needs_grad`` five booleans in that order and None for
  every gradient not asked for (and for tensors that were not saved because nothing needed them);
* ``dropout_mask(seed, shape, dropout_p, device) -> bool tensor`` (True keeps), for tests.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

Grads = Tuple[Optional[torch.Tensor], ...]


def dropout_mask(seed: int, shape: Sequence[int], dropout_p: float, device: torch.device) -> torch.Tensor:
    """Keep-mask of this backend for ``seed``: True where an element of x survives dropout."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(tuple(shape), generator=generator, device=device) >= dropout_p


def _dropped(x: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """x̃ = m ⊙ x / (1 - p), a temporary that is never saved."""
    keep = dropout_mask(seed, x.shape, dropout_p, x.device)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - dropout_p))


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``y`` (M, N) and ``S = x̃·Aᵀ`` (M, r); see the module docstring."""
    x_lora = _dropped(x, dropout_p, seed) if dropout_p > 0 else x
    s = torch.mm(x_lora, lora_A.t())
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    y.addmm_(s, lora_B.t(), alpha=scaling)
    return y, s


def backward(
    grad_y: torch.Tensor,
    x: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    s: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float,
    seed: int,
    needs_grad: Sequence[bool],
) -> Grads:
    """Gradients ``(dx, dweight, dbias, dA, dB)``; see the module docstring."""
    need_x, need_w, need_b, need_a, need_bb = needs_grad
    dx = dw = db = da = dbb = None

    if need_bb:
        dbb = torch.mm(grad_y.t(), s).mul_(scaling)
    if need_x or need_a:
        ds = torch.mm(grad_y, lora_B).mul_(scaling)
        keep = dropout_mask(seed, (grad_y.shape[0], lora_A.shape[1]), dropout_p, grad_y.device) if dropout_p > 0 else None
        if need_x:
            dx = torch.mm(grad_y, weight)
            if keep is None:
                dx.addmm_(ds, lora_A)
            else:
                dx.addcmul_(torch.mm(ds, lora_A), keep.to(dx.dtype), value=1.0 / (1.0 - dropout_p))
        if need_a:
            x_lora = x if keep is None else x * keep.to(x.dtype) * (1.0 / (1.0 - dropout_p))
            da = torch.mm(ds.t(), x_lora)
    if need_w:
        dw = torch.mm(grad_y.t(), x)
    if need_b:
        db = grad_y.sum(0)
    return dx, dw, db, da, dbb
