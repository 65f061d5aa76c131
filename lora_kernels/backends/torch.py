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

The dropout mask is never stored: forward and backward regenerate it from the same seed, so the layer
saves exactly what the base linear saves plus S. The seed is a one-element int64 tensor (or an int). Two
mask generators, one per place the backend runs:

* on the CPU, 16 random bits per element from a private ``torch.Generator`` seeded with the seed (about
  three times cheaper than a float draw each; p is rounded to a multiple of 2⁻¹⁶);
* on every other device (CUDA, ...), the counter-based hash of the Triton kernels, computed with integer
  tensor ops from the seed tensor: no host sync, nothing that a CUDA graph could not replay, and the very
  mask the kernels regenerate, so the Triton backend can fall back to this one between forward and backward.

Mixed batches (:func:`lora_kernels.lora_linear_mixed`): ``A``/``B`` are several adapters concatenated along
the rank, ``scaling`` is then an (M, r) tensor (s_a on the rank columns of row m's adapter a, 0 elsewhere)
and the returned S is already scaled, ``S' = S ⊙ scaling``; backward uses ``dB = dYᵀ·S'`` and
``dS = (dY·B) ⊙ scaling``. ``dropout_p`` may be an (M,) tensor of per-row probabilities (adapters with
different dropout in one batch): row m's mask is row m of the mask a single call with that row's p draws.

The backend contract (``forward``, ``backward``, ``dropout_mask``) is the ``Protocol`` class
:class:`lora_kernels.backends.LoRABackend`; this module registers this backend there as ``"torch"`` when it
is imported (``lora_kernels.torch_backend`` is its older name and still imports).
:func:`effective_dropout_p` gives the drop probability the CPU mask realises (1/(1-p) uses it).
Here ``weight`` is a tensor, or a frozen quantized base (:class:`lora_kernels.quant.QuantizedWeight`, no dW)
that the backend dequantizes in x's dtype a chunk of rows at a time.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from .base import Grads, Seed, register_backend


# The CPU mask compares 16 random bits per element with round(p·2¹⁶): four elements per 64-bit draw, about
# three times cheaper on the CPU than one float draw each. p is thereby rounded to a multiple of 2⁻¹⁶
# (at most 7.6e-6 away), and 1/(1-p) uses that effective p so the LoRA term stays unbiased.
_P_STEPS = 1 << 16
_U32 = 0xFFFFFFFF

DropoutP = Union[float, torch.Tensor]  # a probability, or (M,) per-row probabilities (mixed batches)
Scaling = Union[float, torch.Tensor]  # alpha / rank, or an (M, r) per-(row, rank-column) scale (mixed batches)


def effective_dropout_p(dropout_p: DropoutP) -> DropoutP:
    """The drop probability the CPU mask realises for ``dropout_p``: a multiple of 2⁻¹⁶ (elementwise for a
    tensor of per-row probabilities)."""
    if isinstance(dropout_p, torch.Tensor):
        return (dropout_p.double() * _P_STEPS).round().clamp(max=_P_STEPS - 1) / _P_STEPS
    return min(round(dropout_p * _P_STEPS), _P_STEPS - 1) / _P_STEPS


def _generator_drop_mask(seed: Seed, shape: Sequence[int], dropout_p: float, device: torch.device) -> torch.Tensor:
    """True where an element is dropped; a pure function of (seed, shape, p, device)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if isinstance(seed, int) else int(seed.item()))  # a CPU tensor: no device sync
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    if isinstance(dropout_p, torch.Tensor):  # per-row p (a mixed batch): one threshold per row of (M, K)
        threshold = (effective_dropout_p(dropout_p) * _P_STEPS).round().to(torch.int32) - _P_STEPS // 2
        return bits.view(torch.int16)[:n].view(-1, shape[-1]) < threshold.to(device)[:, None]
    threshold = round(effective_dropout_p(dropout_p) * _P_STEPS) - _P_STEPS // 2  # int16 values are signed
    return (bits.view(torch.int16)[:n] < threshold).view(tuple(shape))


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """The kernels' 32-bit avalanche mixer on int64 tensors holding uint32 values (products stay < 2⁶³)."""
    h = h ^ (h >> 16)
    h = (h * 0x21F0AAAD) & _U32
    h = h ^ (h >> 15)
    h = (h * 0x735A2D97) & _U32
    return h ^ (h >> 15)


def hash_threshold(dropout_p: DropoutP) -> Union[int, torch.Tensor]:
    """The kernels' drop threshold: p·2³² with p rounded to fp32 (as the kernel argument is), capped
    (an int64 tensor for per-row probabilities)."""
    if isinstance(dropout_p, torch.Tensor):
        return (dropout_p.float().double() * 4294967296.0).clamp(max=4294967040.0).floor().to(torch.int64)
    p32 = struct.unpack("f", struct.pack("f", dropout_p))[0]
    return int(min(p32 * 4294967296.0, 4294967040.0))


def _hash_drop_mask(seed: Seed, shape: Sequence[int], dropout_p: float, device: torch.device) -> torch.Tensor:
    """The Triton kernels' mask (see ``lora_kernels.ops.lora_linear``) from integer tensor ops: element
    (row, col) of the flattened (M, K) is dropped when round(mix(row ^ mix(seed ^ c)) ^ col·φ) < p·2³²."""
    shape = tuple(int(d) for d in shape)
    m, k = math.prod(shape[:-1]), shape[-1]
    if isinstance(seed, int):
        seed = torch.tensor([seed], dtype=torch.int64)
    seed_key = _mix32((seed.to(device=device, dtype=torch.int64) & _U32) ^ 0x3C6EF372)
    row_key = _mix32(torch.arange(m, device=device, dtype=torch.int64) ^ seed_key)
    col_key = (torch.arange(k, device=device, dtype=torch.int64) * 0x9E3779B1) & _U32
    h = row_key[:, None] ^ col_key[None, :]
    h = ((h ^ (h >> 16)) * 0x21F0AAAD) & _U32  # the kernels' one round per element
    if isinstance(dropout_p, torch.Tensor):  # per-row p: (M, K)
        return h < hash_threshold(dropout_p).to(device)[:, None]
    return (h < hash_threshold(dropout_p)).view(shape)


def _drop_mask(seed: Seed, shape: Sequence[int], dropout_p: float, device: torch.device) -> torch.Tensor:
    """True where an element is dropped: the generator mask on the CPU, the kernels' hash elsewhere."""
    device = torch.device(device)
    if device.type == "meta":
        return torch.empty(tuple(shape), dtype=torch.bool, device=device)
    if device.type == "cpu":
        return _generator_drop_mask(seed, shape, dropout_p, device)
    return _hash_drop_mask(seed, shape, dropout_p, device)


def _realised_p(dropout_p: DropoutP, device: torch.device) -> DropoutP:
    return effective_dropout_p(dropout_p) if torch.device(device).type == "cpu" else dropout_p


def _has_dropout(dropout_p: DropoutP) -> bool:
    # A tensor of per-row probabilities is only passed when they differ, so some row drops.
    return isinstance(dropout_p, torch.Tensor) or dropout_p > 0


def _inv_keep(realised_p: DropoutP, like: torch.Tensor) -> Union[float, torch.Tensor]:
    """1/(1-p) as a float, or as an (M, 1) column in ``like``'s dtype for per-row probabilities."""
    if isinstance(realised_p, torch.Tensor):
        return (1.0 / (1.0 - realised_p)).to(device=like.device, dtype=like.dtype)[:, None]
    return 1.0 / (1.0 - realised_p)


def _base_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x·Wᵀ (+ b). ``weight`` is a tensor, or a frozen quantized base (:class:`lora_kernels.quant.QuantizedWeight`)
    that dequantizes a chunk of its rows at a time, never the whole 16-bit W of a large layer."""
    if isinstance(weight, torch.Tensor):
        return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    return weight.linear(x, bias)


def _base_grad_input(grad_y: torch.Tensor, weight, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dY·W, added into ``out`` when given (a tensor W, or a quantized one as in :func:`_base_linear`)."""
    if isinstance(weight, torch.Tensor):
        return torch.mm(grad_y, weight) if out is None else out.addmm_(grad_y, weight)
    return weight.grad_input(grad_y, out)


@dataclass(frozen=True)
class TorchBackend:
    """The fused torch backend with one mask generator (``drop_mask(seed, shape, p, device)``, True drops)
    and the drop probability it realises (``realised_p(p, device)``)."""

    name: str
    drop_mask: Callable[..., torch.Tensor]
    realised_p: Callable[[float, torch.device], float]

    def dropout_mask(self, seed: Seed, shape: Sequence[int], dropout_p: float, device: torch.device) -> torch.Tensor:
        """Keep-mask for ``seed``: True where an element of x survives dropout."""
        return ~self.drop_mask(seed, shape, dropout_p, device)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: Scaling, dropout_p: DropoutP, seed: Seed) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``y`` (M, N) and ``S = x̃·Aᵀ`` (M, r), or ``S ⊙ scaling`` for a tensor ``scaling`` (a mixed
        batch); see the module docstring."""
        if _has_dropout(dropout_p):
            # masked_fill, with 1/(1-p) applied to the small S: one pass over x instead of cast-multiply-scale.
            s = torch.mm(torch.where(self.drop_mask(seed, x.shape, dropout_p, x.device), 0, x), lora_A.t())
            s.mul_(_inv_keep(self.realised_p(dropout_p, x.device), s))
        else:
            s = torch.mm(x, lora_A.t())
        y = _base_linear(x, weight, bias)
        if isinstance(scaling, torch.Tensor):
            s.mul_(scaling)
            scaling = 1.0
        y.addmm_(s, lora_B.t(), alpha=scaling)
        return y, s

    def backward(self, grad_y: torch.Tensor, x: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                 lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], s: Optional[torch.Tensor],
                 scaling: Scaling, dropout_p: DropoutP, seed: Seed, needs_grad: Sequence[bool]) -> Grads:
        """Gradients ``(grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B)``; see the module docstring."""
        need_x, need_weight, need_bias, need_lora_A, need_lora_B = needs_grad
        grad_x = grad_weight = grad_bias = grad_lora_A = grad_lora_B = None

        if need_lora_B:  # a tensor scaling (mixed batch) is already in S
            grad_lora_B = torch.mm(grad_y.t(), s)
            if not isinstance(scaling, torch.Tensor):
                grad_lora_B.mul_(scaling)
        if need_x or need_lora_A:
            grad_s = torch.mm(grad_y, lora_B).mul_(scaling)
            drop = None
            if _has_dropout(dropout_p):
                drop = self.drop_mask(seed, (grad_y.shape[0], lora_A.shape[1]), dropout_p, grad_y.device)
                grad_s.mul_(_inv_keep(self.realised_p(dropout_p, grad_y.device), grad_s))  # x̃'s 1/(1-p), on (M, r)
            if need_x:
                if drop is None:
                    grad_x = _base_grad_input(grad_y, weight).addmm_(grad_s, lora_A)
                else:
                    # (m ⊙ dS·A) first, then the base GEMM accumulates into it: no separate add pass.
                    grad_x = _base_grad_input(grad_y, weight, torch.mm(grad_s, lora_A).masked_fill_(drop, 0))
            if need_lora_A:
                grad_lora_A = torch.mm(grad_s.t(), x if drop is None else torch.where(drop, 0, x))
        if need_weight:
            grad_weight = torch.mm(grad_y.t(), x)
        if need_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B


    # -------------------------------------------------------------------------------------------- DoRA
    # The column-scaled LoRA linear of lora_kernels.dora (the derivation is in that module's docstring):
    #     y = x·Wᵀ + b + (c − 1) ⊙ Z + u,   u = s·S·Bᵀ,   Z = x̃·Wᵀ + u   (= c ⊙ (x·Wᵀ + u) + b without dropout)

    def dora_forward(self, x: torch.Tensor, weight, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                     lora_B: torch.Tensor, scaling: Scaling, col_scale: torch.Tensor, dropout_p: DropoutP,
                     seed: Seed, keep_z: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(y, S, Z)``, Z None unless ``keep_z``; ``col_scale`` c is fp32 (G, N), G dividing M."""
        if _has_dropout(dropout_p):
            x_kept = torch.where(self.drop_mask(seed, x.shape, dropout_p, x.device), 0, x)
            inv_keep = _inv_keep(self.realised_p(dropout_p, x.device), x)
            s = torch.mm(x_kept, lora_A.t())
            s.mul_(inv_keep if isinstance(inv_keep, float) else inv_keep.to(s.dtype))
            z = _base_linear(x_kept, weight, None)  # x̃·Wᵀ, 1/(1-p) applied on the (M, N) product below
            z.mul_(inv_keep)
        else:
            s = torch.mm(x, lora_A.t())
            z = _base_linear(x, weight, None)
        if isinstance(scaling, torch.Tensor):  # a mixed batch: S' = S ⊙ scale, as in forward
            s.mul_(scaling)
            scaling = 1.0
        z.addmm_(s, lora_B.t(), alpha=scaling)  # Z = x̃·Wᵀ + u
        if _has_dropout(dropout_p):
            y = _base_linear(x, weight, bias).addmm_(s, lora_B.t(), alpha=scaling)  # x·Wᵀ + b + u
            _grouped(y, col_scale.shape[0]).addcmul_(_grouped(z, col_scale.shape[0]),
                                                     (col_scale - 1).to(z.dtype)[:, None, :])
        else:
            scale = col_scale.to(z.dtype)[:, None, :]
            grouped = _grouped(z, col_scale.shape[0])
            if keep_z:  # one pass: y = b + c ⊙ Z into a new tensor
                y = (torch.addcmul(bias, grouped, scale) if bias is not None else grouped * scale).view(z.shape)
            else:
                y = z
                grouped.mul_(scale)
                if bias is not None:
                    y.add_(bias)
        return y, s, (z if keep_z else None)

    def dora_backward(self, grad_y: torch.Tensor, x: Optional[torch.Tensor], weight, lora_A: torch.Tensor,
                      lora_B: torch.Tensor, s: Optional[torch.Tensor], z: Optional[torch.Tensor],
                      col_scale: torch.Tensor, scaling: Scaling, dropout_p: DropoutP, seed: Seed,
                      needs_grad: Sequence[bool]) -> Grads:
        """``(grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B, grad_col_scale)``; ``needs_grad`` is six
        booleans in that order."""
        need_x, need_weight, need_bias, need_lora_A, need_lora_B, need_col_scale = needs_grad
        groups = col_scale.shape[0]
        grad_col_scale = _grouped_column_dot(grad_y, z, groups) if need_col_scale else None
        # dY' = c ⊙ dY: the LoRA gradients, and without dropout the base's too, are the LoRA ones on dY'.
        scaled = (_grouped(grad_y, groups) * col_scale[:, None, :].to(grad_y.dtype)).view(grad_y.shape)
        if not _has_dropout(dropout_p):
            grads = self.backward(scaled, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed,
                                  (need_x, need_weight, False, need_lora_A, need_lora_B))
            grad_x, grad_weight, _, grad_lora_A, grad_lora_B = grads
        else:
            # dX = dY·W + keep/(1-p) ⊙ [((c−1)⊙dY)·W + dS·A];  dW = dYᵀ·x + ((c−1)⊙dY)ᵀ·x̃
            grad_x = grad_weight = grad_lora_A = grad_lora_B = None
            if need_lora_B:
                grad_lora_B = torch.mm(scaled.t(), s)
                if not isinstance(scaling, torch.Tensor):
                    grad_lora_B.mul_(scaling)
            drop = self.drop_mask(seed, (grad_y.shape[0], lora_A.shape[1]), dropout_p, grad_y.device)
            inv_keep = _inv_keep(self.realised_p(dropout_p, grad_y.device), grad_y)
            grad_s = torch.mm(scaled, lora_B).mul_(scaling) if need_x or need_lora_A else None
            x_kept = torch.where(drop, 0, x) if need_lora_A or need_weight else None
            if need_lora_A:
                grad_lora_A = torch.mm(grad_s.t(), x_kept).mul_(inv_keep) if isinstance(inv_keep, float) \
                    else torch.mm((grad_s * inv_keep).t(), x_kept)
            minus_one = scaled.sub_(grad_y)  # (c − 1) ⊙ dY, in dY''s buffer
            if need_x:
                inner = _base_grad_input(minus_one, weight).addmm_(grad_s, lora_A).mul_(inv_keep)
                grad_x = _base_grad_input(grad_y, weight, inner.masked_fill_(drop, 0))
            if need_weight:
                grad_weight = torch.mm(grad_y.t(), x).addmm_((minus_one * inv_keep).t(), x_kept)
        grad_bias = grad_y.sum(0) if need_bias else None
        return grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B, grad_col_scale

    @staticmethod
    def weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
        """‖W + s·B·A‖ per row (N,), in fp32 (float64 for float64 inputs), without forming B·A:
        n² = ‖W_n‖² + 2s·(W·Aᵀ)_n·B_n + s²·B_n·(A·Aᵀ)·B_nᵀ, one pass over W (a quantized W a chunk of rows at a
        time, dequantized in fp32)."""
        dtype = torch.float64 if lora_A.dtype == torch.float64 else torch.float32
        lora_A, lora_B = lora_A.detach().to(dtype), lora_B.detach().to(dtype)
        out_features = lora_B.shape[0]
        squares = torch.empty(out_features, dtype=dtype, device=lora_A.device)
        w_at = torch.empty((out_features, lora_A.shape[0]), dtype=dtype, device=lora_A.device)
        if isinstance(weight, torch.Tensor):
            chunks = [(0, out_features)] if weight.dtype == dtype else _row_chunks(out_features, weight.shape[1])
            rows = lambda start, stop: weight.detach()[start:stop].to(dtype)  # noqa: E731
        else:
            chunks = weight.row_chunks()
            rows = lambda start, stop: weight.dequantize(dtype, rows=(start, stop))  # noqa: E731
        for start, stop in chunks:
            w = rows(start, stop)
            torch.linalg.vector_norm(w, dim=1, out=squares[start:stop])
            torch.mm(w, lora_A.t(), out=w_at[start:stop])
        squares.square_()
        squares.add_((w_at * lora_B).sum(1), alpha=2 * scaling)
        squares.add_((lora_B @ (lora_A @ lora_A.t()) * lora_B).sum(1), alpha=scaling * scaling)
        return squares.clamp_(min=0).sqrt_()


    # ---------------------------------------------------------------------------------------- segments
    # Many adapters in one batch, each batch row at its own adapter's rank (lora_kernels.segmented): the six
    # primitives of SegmentedBackend, as batched matmuls over the batch rows of each rank group
    # (plan.groups: one bmm per distinct rank, never a loop over adapters).

    def _segment_drop(self, plan, seed: Seed, x: torch.Tensor) -> Optional[torch.Tensor]:
        """True where x (M, K) is dropped (each token at its row's p), or None without dropout."""
        if not plan.dropout:
            return None
        return self.drop_mask(seed, x.shape, plan.dropout_p, x.device)

    def _inv_keep_rows(self, plan, like: torch.Tensor, rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """1/(1-p) per batch row of a group (b,), in ``like``'s dtype; None without dropout."""
        if not plan.dropout:
            return None
        realised = self.realised_p(plan.row_p, like.device)
        inv = (1.0 / (1.0 - realised)).to(device=like.device, dtype=like.dtype)
        return inv if rows is None else inv.index_select(0, rows)

    def segmented_shrink(self, x: torch.Tensor, a_store: torch.Tensor, plan, seed: Seed) -> torch.Tensor:
        """S (M, R): each token's x̃·A_slotᵀ at its slot's rank (0 beyond it and for rows without adapter)."""
        drop = self._segment_drop(plan, seed, x)
        source = x if drop is None else torch.where(drop, 0, x)
        rows3 = source.view(plan.batch_rows, plan.tokens_per_row, x.shape[1])
        s = x.new_zeros((plan.batch_rows, plan.tokens_per_row, plan.rank_bound))
        for group in plan.groups:
            a = _slot_weights(a_store, group, x.shape[1], x.dtype)  # (b, r, K)
            part = torch.bmm(_pick(rows3, group.rows), a.transpose(1, 2))  # (b, T, r)
            factor = group.valid
            inv_keep = self._inv_keep_rows(plan, part, group.rows)
            if inv_keep is not None:
                factor = inv_keep if factor is None else factor * inv_keep
            if factor is not None:
                part.mul_(factor.to(part.dtype)[:, None, None])
            _put(s, group.rows, group.rank, part)
        return s.view(-1, plan.rank_bound)

    def segmented_expand(self, s: torch.Tensor, b_store: torch.Tensor, plan, out: torch.Tensor) -> None:
        """out (M, N) += s_slot · S[:, :r] · B_slotᵀ per token, in place."""
        s3 = s.view(plan.batch_rows, plan.tokens_per_row, -1)
        out3 = out.view(plan.batch_rows, plan.tokens_per_row, out.shape[1])
        for group in plan.groups:
            b = _slot_weights(b_store, group, out.shape[1], out.dtype, transposed=True)  # (b, N, r)
            part = _pick(s3, group.rows)[:, :, :group.rank] * group.scale.to(s.dtype)[:, None, None]
            _add(out3, group.rows, part, b.transpose(1, 2))

    def segmented_grad_s(self, grad_y: torch.Tensor, b_store: torch.Tensor, plan) -> torch.Tensor:
        """dS (M, R) = s_slot · dY·B_slot (· 1/(1-p)), 0 beyond each slot's rank."""
        dy3 = grad_y.view(plan.batch_rows, plan.tokens_per_row, grad_y.shape[1])
        grad_s = grad_y.new_zeros((plan.batch_rows, plan.tokens_per_row, plan.rank_bound))
        for group in plan.groups:
            b = _slot_weights(b_store, group, grad_y.shape[1], grad_y.dtype, transposed=True)  # (b, N, r)
            part = torch.bmm(_pick(dy3, group.rows), b)
            factor = group.scale
            inv_keep = self._inv_keep_rows(plan, part, group.rows)
            if inv_keep is not None:
                factor = factor.to(part.dtype) * inv_keep
            part.mul_(factor.to(part.dtype)[:, None, None])
            _put(grad_s, group.rows, group.rank, part)
        return grad_s.view(-1, plan.rank_bound)

    def segmented_grad_x(self, grad_s: torch.Tensor, a_store: torch.Tensor, plan, seed: Seed,
                         grad_x: torch.Tensor) -> None:
        """grad_x (M, K) += keep ⊙ (dS · A_slot) per token, in place."""
        ds3 = grad_s.view(plan.batch_rows, plan.tokens_per_row, -1)
        width = grad_x.shape[1]
        drop = self._segment_drop(plan, seed, grad_x)
        # Without dropout straight into grad_x; with it into a buffer that the mask then zeroes.
        target = grad_x if drop is None else torch.zeros_like(grad_x)
        target3 = target.view(plan.batch_rows, plan.tokens_per_row, width)
        for group in plan.groups:
            a = _slot_weights(a_store, group, width, grad_s.dtype)
            _add(target3, group.rows, _pick(ds3, group.rows)[:, :, :group.rank], a)
        if drop is not None:
            grad_x.add_(target.masked_fill_(drop, 0))

    def segmented_grad_a(self, grad_s: torch.Tensor, x: torch.Tensor, plan, seed: Seed,
                         rank_capacity: Optional[int] = None) -> torch.Tensor:
        """Every slot's dA, (P, rank_capacity·K) (rank_capacity defaults to the plan's rank bound): slot i's
        first r_i·K values are Σ over its rows of dSᵀ·(keep ⊙ x), the rest 0. Summed in fp32 (float64 for
        float64)."""
        drop = self._segment_drop(plan, seed, x)
        source = x if drop is None else torch.where(drop, 0, x)
        x3 = source.view(plan.batch_rows, plan.tokens_per_row, x.shape[1])
        ds3 = grad_s.view(plan.batch_rows, plan.tokens_per_row, -1)
        grads = _grad_store(plan, rank_capacity, x.shape[1], x)
        for group in plan.groups:
            per_row = torch.bmm(_pick(ds3, group.rows)[:, :, :group.rank].transpose(1, 2), _pick(x3, group.rows))
            _sum_into_slots(grads, group, per_row.reshape(per_row.shape[0], -1))
        return grads

    def segmented_grad_b(self, grad_y: torch.Tensor, s: torch.Tensor, plan,
                         rank_capacity: Optional[int] = None) -> torch.Tensor:
        """Every slot's dB, (P, rank_capacity·N): slot i's first N·r_i values are s_i · Σ over its rows of
        dYᵀ·S[:, :r_i] as (N, r_i) row-major, the rest 0."""
        dy3 = grad_y.view(plan.batch_rows, plan.tokens_per_row, grad_y.shape[1])
        s3 = s.view(plan.batch_rows, plan.tokens_per_row, -1)
        grads = _grad_store(plan, rank_capacity, grad_y.shape[1], grad_y)
        for group in plan.groups:
            scaled = _pick(s3, group.rows)[:, :, :group.rank] * group.scale.to(s.dtype)[:, None, None]
            per_row = torch.bmm(_pick(dy3, group.rows).transpose(1, 2), scaled)  # (b, N, r)
            _sum_into_slots(grads, group, per_row.reshape(per_row.shape[0], -1))
        return grads


def _grad_store(plan, rank_capacity: Optional[int], width: int, like: torch.Tensor) -> torch.Tensor:
    """Zeros (P, R_cap·width) to sum the slots' gradients in: fp32, float64 for float64 inputs."""
    capacity = plan.rank_bound if rank_capacity is None else rank_capacity
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.zeros((plan.slot_rank.shape[0], capacity * width), dtype=dtype, device=like.device)


def _pick(t3: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The batch rows of a group: all of them (no copy) or an index_select."""
    return t3 if rows is None else t3.index_select(0, rows)


def _put(out3: torch.Tensor, rows: Optional[torch.Tensor], rank: int, part: torch.Tensor) -> None:
    """out3[rows, :, :rank] = part (a group over every row adds: rows outside it hold zeros in ``part``)."""
    if rows is None:
        out3[:, :, :rank].add_(part)
    else:
        out3[rows, :, :rank] = part


def _add(out3: torch.Tensor, rows: Optional[torch.Tensor], left: torch.Tensor, right: torch.Tensor) -> None:
    """out3[rows] += left @ right (batched); the rows of a group are distinct, so index_add_ is exact."""
    if rows is None:
        out3.baddbmm_(left, right)
    else:
        out3.index_add_(0, rows, torch.bmm(left, right))


def _slot_weights(store: torch.Tensor, group, width: int, dtype: torch.dtype, transposed: bool = False) -> torch.Tensor:
    """Each row's adapter weight of a rank group from the pool store: A (b, r, K), or B (b, N, r) when
    ``transposed`` (a slot holds A as (r, K) and B as (N, r), row-major, in its first r·width values)."""
    rank = group.rank
    flat = store.index_select(0, group.slots)[:, :rank * width]
    shaped = flat.view(-1, width, rank) if transposed else flat.view(-1, rank, width)
    return shaped.to(dtype)


def _sum_into_slots(grads: torch.Tensor, group, per_row: torch.Tensor) -> None:
    """grads[slot, :numel] += each row's gradient, summed over the rows sharing a slot in a fixed order: an
    index_add_ on the CPU (sequential), a one-hot matmul elsewhere (index_add_ would use atomics)."""
    numel = per_row.shape[1]
    target = grads[:, :numel]
    per_row = per_row.to(grads.dtype)
    if group.valid is not None:  # a group over every row: rows of other ranks carry zeros, skip them
        per_row = per_row * group.valid.to(per_row.dtype)[:, None]
    if grads.device.type == "cpu":  # into a contiguous buffer: index_add_ on a strided slice is far slower
        summed = torch.zeros((grads.shape[0], numel), dtype=grads.dtype, device=grads.device)
        target.add_(summed.index_add_(0, group.slots, per_row))
    else:
        one_hot = torch.zeros((grads.shape[0], per_row.shape[0]), dtype=per_row.dtype, device=grads.device)
        one_hot[group.slots, torch.arange(per_row.shape[0], device=grads.device)] = 1
        target.add_(one_hot @ per_row)


def _row_chunks(rows: int, columns: int, elements: int = 1 << 22):
    """(start, stop) row ranges of at most ``elements`` values: a W cast to fp32 a chunk at a time."""
    step = max(1, elements // max(columns, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(M, N) viewed as (G, M/G, N): the rows of each column-scale group."""
    return t.view(groups, t.shape[0] // groups if groups else 0, t.shape[1])


def _grouped_column_dot(a: torch.Tensor, b: torch.Tensor, groups: int, rows: int = 1024) -> torch.Tensor:
    """Σ over each group's rows of a ⊙ b: (G, N) in fp32 (float64 for float64), a chunk of rows at a time so
    that no (M, N) product is formed."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a3, b3 = _grouped(a, groups), _grouped(b, groups)
    out = torch.zeros((groups, a.shape[1]), dtype=dtype, device=a.device)
    for start in range(0, a3.shape[1], rows):
        out.add_((a3[:, start:start + rows].to(dtype) * b3[:, start:start + rows].to(dtype)).sum(1))
    return out


DEFAULT = TorchBackend("torch", _drop_mask, _realised_p)
# The Triton kernels' mask on every device: what the torch backend runs when it stands in for the kernels.
KERNEL_MASK = TorchBackend("torch-kernel-mask", _hash_drop_mask, lambda dropout_p, device: dropout_p)

forward = DEFAULT.forward
backward = DEFAULT.backward
dropout_mask = DEFAULT.dropout_mask

register_backend("torch", lambda strict: DEFAULT)
