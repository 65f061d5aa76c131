"""The backend contract of :func:`lora_kernels.lora_linear`, as a ``Protocol``, the registry of backends,
and the dropout seed every backend regenerates its mask from.

Notation: x (M, K) 2-D, W (N, K), A (r, K), B (N, r), s = scaling, p = dropout probability; the seed is a
one-element int64 tensor (or an int) from which forward and backward regenerate the same dropout mask, so
no mask is ever stored (:func:`draw_seed_tensor` draws one per call). The maths of each pass is in
:mod:`lora_kernels.backends.torch`'s docstring.

Mixed batches (:mod:`lora_kernels.mixed`) pass several adapters concatenated along the rank as A and B, and
``scaling`` as an (M, r) (or (1, r)) tensor of per-(row, rank-column) scales: forward then returns the
scaled S' = S ⊙ scaling and adds S'·Bᵀ, backward takes dB = dYᵀ·S' and dS = (dY·B) ⊙ scaling. The torch
backend also takes ``dropout_p`` as an (M,) tensor of per-row probabilities; the Triton one takes a float.

A backend is registered under a name with a factory ``get(strict) -> LoRABackend``; ``strict`` is True when
the user asked for that backend by name (``backend="triton"``) and False when ``"auto"`` picked it, so a
backend may fall back quietly under ``"auto"`` and raise under its own name (as the Triton one does).
:func:`lora_kernels.lora_linear` resolves every name through :func:`get_backend`. The built-in backends
register themselves when :mod:`lora_kernels.backends` imports them (:mod:`lora_kernels.backends.torch` as
``"torch"``, :mod:`lora_kernels.backends.triton` as ``"triton"``).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch

Seed = Union[int, torch.Tensor]
Grads = Tuple[Optional[torch.Tensor], ...]


@runtime_checkable
class LoRABackend(Protocol):
    """What :func:`lora_kernels.lora_linear` needs from a backend."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout_p: float,
                seed: Optional[Seed]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(y, S)``: y = x·Wᵀ + b + s·S·Bᵀ (M, N) and S = dropout(x)·Aᵀ (M, r), kept for backward."""

    def backward(self, grad_y: torch.Tensor, x: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                 lora_A: torch.Tensor, lora_B: torch.Tensor, s: Optional[torch.Tensor], scaling: float,
                 dropout_p: float, seed: Optional[Seed], needs_grad: Sequence[bool]) -> Grads:
        """``(grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B)``; ``needs_grad`` is five booleans in
        that order, and a gradient not asked for is None (as is a tensor that was not saved because nothing
        needed it)."""

    def dropout_mask(self, seed: Seed, shape: Sequence[int], dropout_p: float,
                     device: torch.device) -> torch.Tensor:
        """The keep-mask (bool, True keeps) that forward and backward regenerate from ``seed``."""


@runtime_checkable
class DoRABackend(Protocol):
    """What :func:`lora_kernels.dora_linear` needs beside :class:`LoRABackend`: the column-scaled LoRA linear
    (maths in :mod:`lora_kernels.dora`) and the low-rank weight norm. A registered backend without these runs
    DoRA on the torch backend. ``col_scale`` c is fp32 (G, N), G dividing M (row m uses c[m // (M/G)])."""

    def dora_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                     lora_B: torch.Tensor, scaling: float, col_scale: torch.Tensor, dropout_p: float,
                     seed: Optional[Seed], keep_z: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(y, S, Z)``: y = x·Wᵀ + b + (c − 1)⊙Z + s·S·Bᵀ with Z = x̃·Wᵀ + s·S·Bᵀ (M, N), kept (else None)
        only when ``keep_z``."""

    def dora_backward(self, grad_y: torch.Tensor, x: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                      lora_A: torch.Tensor, lora_B: torch.Tensor, s: Optional[torch.Tensor], z: Optional[torch.Tensor],
                      col_scale: torch.Tensor, scaling: float, dropout_p: float, seed: Optional[Seed],
                      needs_grad: Sequence[bool]) -> Grads:
        """``(grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B, grad_col_scale)``; ``needs_grad`` is six
        booleans in that order, and a gradient not asked for is None. grad_col_scale is fp32 (G, N)."""

    def weight_norm(self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scaling: float) -> torch.Tensor:
        """‖W + scaling·B·A‖ per output row, (N,) fp32, without forming B·A."""


@runtime_checkable
class SegmentedBackend(Protocol):
    """The six primitives of the segmented mixed-batch path (:mod:`lora_kernels.segmented`, which states the
    maths): x (M, K) is B batch rows of T tokens, ``plan`` a :class:`lora_kernels.segmented.SegmentPlan` saying
    which slot of the stores each row uses; ``a_store`` (P, R_cap·K) holds slot i's A (r_i, K) and ``b_store``
    (P, R_cap·N) its B (N, r_i), row-major. S and dS are (M, R), 0 beyond each row's rank. The torch backend
    implements them (:class:`lora_kernels.backends.TorchBackend`), as do the Triton kernels
    (:mod:`lora_kernels.ops.segmented`)."""

    def segmented_shrink(self, x: torch.Tensor, a_store: torch.Tensor, plan, seed: Optional[Seed]) -> torch.Tensor:
        """S = x̃·A_slotᵀ (x̃ with each row's dropout and 1/(1-p))."""

    def segmented_expand(self, s: torch.Tensor, b_store: torch.Tensor, plan, out: torch.Tensor) -> None:
        """out += s_slot·S·B_slotᵀ, in place."""

    def segmented_grad_s(self, grad_y: torch.Tensor, b_store: torch.Tensor, plan) -> torch.Tensor:
        """dS = s_slot·dY·B_slot (· 1/(1-p) with dropout)."""

    def segmented_grad_x(self, grad_s: torch.Tensor, a_store: torch.Tensor, plan, seed: Optional[Seed],
                         grad_x: torch.Tensor) -> None:
        """grad_x += keep ⊙ (dS·A_slot), in place."""

    def segmented_grad_a(self, grad_s: torch.Tensor, x: torch.Tensor, plan, seed: Optional[Seed],
                         rank_capacity: Optional[int] = None) -> torch.Tensor:
        """Every slot's dA = Σ over its rows of dSᵀ·(keep ⊙ x), (P, rank_capacity·K) in the store's layout
        (slots without rows: 0); rank_capacity defaults to the plan's rank bound."""

    def segmented_grad_b(self, grad_y: torch.Tensor, s: torch.Tensor, plan,
                         rank_capacity: Optional[int] = None) -> torch.Tensor:
        """Every slot's dB = s_i·Σ over its rows of dYᵀ·S, (P, rank_capacity·N) in the store's layout."""


_REGISTRY: Dict[str, Callable[[bool], LoRABackend]] = {}
RESERVED = ("auto", "eager")  # names lora_linear handles itself: a choice, and the autograd reference


def register_backend(name: str, get: Callable[[bool], LoRABackend]) -> None:
    """Registers ``get(strict) -> backend`` under ``name`` (replacing an earlier registration).

    Raises:
        ValueError: ``name`` is empty or reserved (``"auto"``, ``"eager"``).
    """
    if not isinstance(name, str) or not name or name in RESERVED:
        raise ValueError(f"a backend name must be a non-empty string other than {RESERVED}, got {name!r}")
    _REGISTRY[name] = get


def registered_backends() -> Tuple[str, ...]:
    """The registered backend names, in registration order."""
    return tuple(_REGISTRY)


def get_backend(name: str, strict: bool = True) -> LoRABackend:
    """The backend object registered as ``name``.

    Raises:
        ValueError: no backend of that name, naming it and the registered ones.
    """
    try:
        get = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"no backend named {name!r}; registered: {registered_backends()}") from None
    return get(strict)


def draw_seed_tensor(device: Optional[torch.device] = None) -> torch.Tensor:
    """A dropout seed: a one-element int64 tensor on ``device`` (default: CPU) from that device's generator.

    A traceable RNG op: under ``torch.compile`` it neither breaks the graph nor recompiles per call, and on a
    GPU it advances the device generator's offset, which CUDA graphs replay correctly.
    """
    return torch.randint(0, 2**31 - 1, (1,), device=device)
