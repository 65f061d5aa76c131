"""``FusedLoRALinear``: a drop-in replacement for ``nn.Linear`` with a LoRA adapter.

    y = x·Wᵀ + b + scaling · (dropout(x)·Aᵀ)·Bᵀ,     scaling = alpha / rank   (alpha / √rank with rsLoRA)

Shapes: ``weight`` W (out_features, in_features) and ``bias`` b (out_features,) exactly as in
``nn.Linear``, so the base's ``state_dict`` keys are unchanged; ``lora_A`` A (rank, in_features) and
``lora_B`` B (out_features, rank). ``alpha=None`` means ``alpha = rank``, i.e. scaling 1, MiniMind's
unscaled LoRA.

Initialisation (B = 0 in both, so a fresh adapter leaves the layer's output unchanged):

* ``"minimind"``: A ~ N(0, 0.02²), as MiniMind's LoRA;
* ``"kaiming"``: A Kaiming-uniform with a = √5, as HF PEFT and loralib.

State dict: whether merged or not, a layer saves the *unmerged* ``weight`` next to ``lora_A``/``lora_B``,
so a state dict loaded into a fresh layer counts the adapter once; loading into a merged layer keeps it
merged with the loaded adapter.

Quantized base (QLoRA): ``quantize="nf4"`` or ``"int8"`` (constructor, :meth:`FusedLoRALinear.from_linear`,
:meth:`FusedLoRALinear.quantize_base`) replaces the ``weight`` parameter by buffers holding the packed codes
and scales of :mod:`lora_kernels.quant` (``weight_data``, ``weight_absmax``, ``weight_code`` and, with double
quantization, ``weight_absmax2``, ``weight_code2``, ``weight_offset``). They follow ``state_dict``, ``.to()``
(a device move; a dtype cast leaves the fp32 scales in fp32) and ``deepcopy``; ``weight`` is then None. The
codes ``weight_data`` (uint8/int8, the bulk of the bytes) are a frozen ``nn.Parameter`` rather than a
buffer, so that ``torch.distributed.fsdp.fully_shard`` shards them like a 16-bit weight (and all-gathers
them for the kernels); the scales and codebooks are small buffers, replicated. The base is frozen; the
kernels dequantize it in the input's dtype. ``merge()`` is refused on such a layer (W
cannot hold the adapter exactly in 4 bits); :meth:`FusedLoRALinear.to_linear` dequantizes and merges.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant
from .functional import BACKENDS, _rows, lora_linear

INITS = ("minimind", "kaiming")


def _validate_lora_args(rank, alpha, dropout, init, backend) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0
                              or not math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0 (or None for alpha = rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class FusedLoRALinear(nn.Module):
    """``nn.Linear`` plus a LoRA adapter, computed by the fused :func:`lora_kernels.lora_linear`.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        rank: LoRA rank r >= 1.
        alpha: LoRA alpha > 0; None means alpha = rank (scaling 1).
        dropout: dropout probability on the LoRA path's input, in [0, 1).
        use_rslora: scale by alpha / √rank instead of alpha / rank.
        init: ``"minimind"`` or ``"kaiming"`` initialisation of ``lora_A`` (``lora_B`` starts at zero).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"`` (see :func:`lora_kernels.lora_linear`).
        quantize: None, or ``"nf4"`` / ``"int8"``: a frozen quantized base (see the module docstring).
        double_quant: with ``"nf4"``, quantize the blockwise absmax too (bitsandbytes' compress_statistics).
        freeze_base: ``weight`` and ``bias`` start with ``requires_grad=False`` (as in loralib and PEFT), so
            only ``lora_A``/``lora_B`` train and backward skips the dW GEMM; pass False to train the base too.

    Raises:
        ValueError: rank < 1, alpha <= 0, dropout outside [0, 1), unknown init, backend or quantize.

    Warns:
        UserWarning: when rank >= in·out / (in + out), the adapter has at least as many parameters as
            the layer it adapts.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int = 16,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "minimind",
        backend: str = "auto",
        device=None,
        dtype=None,
        quantize: Optional[str] = None,
        double_quant: bool = False,
        freeze_base: bool = True,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._setup_lora(in_features, out_features, rank, alpha, dropout, use_rslora, init, backend, factory)
        self._reset_base_parameters()
        if quantize is not None:
            self.quantize_base(quantize, double_quant)
        if freeze_base:
            self.freeze_base()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int = 16,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "minimind",
        backend: str = "auto",
        lora_dtype: Optional[torch.dtype] = None,
        freeze_base: bool = True,
        allow_custom_forward: bool = False,
        quantize: Optional[str] = None,
        double_quant: bool = False,
    ) -> "FusedLoRALinear":
        """Wraps an existing ``nn.Linear``, sharing its weight and bias (no copy; with ``quantize`` the
        new layer holds a quantized copy of the weight instead, and the linear is left unchanged).

        Args:
            linear: the layer to adapt.
            lora_dtype: dtype of ``lora_A``/``lora_B``; defaults to the linear's weight dtype.
            freeze_base: set ``requires_grad=False`` on the (shared) weight and bias; False leaves them as
                they are.
            allow_custom_forward: also wrap an ``nn.Linear`` subclass that overrides ``forward``; the new
                layer computes a plain linear, so the subclass's own forward is dropped.
            Others: as for the constructor.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``, or is a subclass with its own ``forward``
                (unless ``allow_custom_forward``).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if type(linear).forward is not nn.Linear.forward and not allow_custom_forward:
            raise TypeError(
                f"{type(linear).__name__} is an nn.Linear subclass with its own forward, which FusedLoRALinear "
                "would replace by a plain linear (changing the model's outputs); pass allow_custom_forward=True "
                "to wrap it anyway, or leave it out (exclude_modules)")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight = linear.weight
        layer.bias = linear.bias
        factory = {"device": linear.weight.device, "dtype": lora_dtype or linear.weight.dtype}
        layer._setup_lora(linear.in_features, linear.out_features, rank, alpha, dropout, use_rslora, init,
                          backend, factory)
        layer.train(linear.training)
        if quantize is not None:
            layer.quantize_base(quantize, double_quant)
        if freeze_base:
            layer.freeze_base()
        return layer

    def freeze_base(self) -> None:
        """Sets ``requires_grad=False`` on ``weight`` and ``bias``: only the adapter trains (a quantized
        base is frozen anyway)."""
        if self.weight is not None:
            self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def _setup_lora(self, in_features, out_features, rank, alpha, dropout, use_rslora, init, backend, factory):
        _validate_lora_args(rank, alpha, dropout, init, backend)
        if rank >= in_features * out_features / (in_features + out_features):
            warnings.warn(
                f"rank {rank} >= in*out/(in+out) = {in_features * out_features / (in_features + out_features):.1f} "
                f"for a {in_features}->{out_features} layer: the adapter has at least as many parameters as "
                "the layer itself",
                stacklevel=3,
            )
        self.in_features, self.out_features = in_features, out_features
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.init = init
        self.backend = backend
        self.lora_A = nn.Parameter(torch.empty((rank, in_features), **factory))
        self.lora_B = nn.Parameter(torch.empty((out_features, rank), **factory))
        self._merged = False
        self._merged_adapter = None  # (A, B, scaling) folded in by merge(keep_original=False)
        self._tied_weight = None  # (shared weight,) while merge_lora gives a tied weight its own copy
        self._warned_merged_training = False
        # Names under which state_dict saves the parameters (fuse_peft_model uses PEFT's names).
        self._state_dict_names = {}
        self.lora_enabled = True  # False: run the base layer alone (see lora_kernels.disable_lora)
        self.register_buffer("_weight_before_merge", None, persistent=False)
        self.quantize, self.base_dtype = None, None  # set by quantize_base
        self.reset_lora_parameters()

    # ------------------------------------------------------------------------------------ quantized base
    @torch.no_grad()
    def quantize_base(self, format: str, double_quant: bool = False) -> None:
        """Replaces the ``weight`` parameter by a frozen quantized copy (``"nf4"`` or ``"int8"``), in place.

        Raises:
            ValueError: an unknown format, double quantization with int8, or a layer already quantized.
            RuntimeError: the layer is merged.
        """
        if self.quantize is not None:
            raise ValueError(f"the base is already quantized ({self.quantize!r})")
        if self._merged:
            raise RuntimeError("cannot quantize a merged layer; call unmerge() first")
        self.use_quantized(quant.quantize(self.weight, format, double_quant), self.weight.dtype)

    def use_quantized(self, qweight: "quant.QuantizedWeight", base_dtype: torch.dtype) -> None:
        """Makes ``qweight`` (already quantized: bitsandbytes' data, say) the layer's frozen base;
        ``base_dtype`` is the dtype :meth:`to_linear` gives back."""
        if tuple(qweight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"a quantized weight of shape {tuple(qweight.shape)} does not fit a "
                             f"{self.in_features}->{self.out_features} layer (expected "
                             f"{(self.out_features, self.in_features)})")
        del self.weight
        self.register_parameter("weight", None)
        for name, t in qweight.tensors().items():
            if name == "data":  # the codes: a frozen parameter, so that FSDP2 shards them like any weight
                self.weight_data = nn.Parameter(t, requires_grad=False)
            else:
                self.register_buffer("weight_" + name, t)
        self.quantize, self.base_dtype, self.quant_blocksize = qweight.format, base_dtype, qweight.blocksize

    @property
    def qweight(self) -> Optional["quant.QuantizedWeight"]:
        """The quantized base as a :class:`lora_kernels.quant.QuantizedWeight` over this layer's buffers
        (None for a dense base)."""
        if self.quantize is None:
            return None
        tensors = {name[len("weight_"):]: t for name, t in self._buffers.items()
                   if name.startswith("weight_") and t is not None}
        tensors["data"] = self.weight_data
        return quant.QuantizedWeight.from_tensors(self.quantize, (self.out_features, self.in_features), tensors,
                                                  self.quant_blocksize)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must move a quantized base's fp32 scales and codebooks, never cast them.
        if self.quantize is None:
            return super()._apply(fn, recurse)
        kept = {name: self._buffers.pop(name) for name in list(self._buffers) if name.startswith("weight_")}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def _reset_base_parameters(self) -> None:
        # The same initialisation as nn.Linear.reset_parameters.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self) -> None:
        """Re-initialises ``lora_A`` by ``self.init`` and zeroes ``lora_B``."""
        with torch.no_grad():
            if self.init == "minimind":
                nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @property
    def scaling(self) -> float:
        """alpha / rank, or alpha / √rank with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def merged(self) -> bool:
        """True while the adapter is folded into ``weight`` (the layer then runs as a plain linear)."""
        return self._merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged and self.training and torch.is_grad_enabled() and not self._warned_merged_training \
                and (self.lora_A.requires_grad or self.lora_B.requires_grad):
            self._warned_merged_training = True
            warnings.warn("training a merged FusedLoRALinear: lora_A and lora_B get no gradient while the adapter "
                          "is folded into the weight; call unmerge() (lora_kernels.unmerge_lora(model)) first",
                          stacklevel=2)
        weight = self.weight if self.quantize is None else self.qweight
        if self._merged or not self.lora_enabled:
            if self.quantize is None:
                return F.linear(x, weight, self.bias)
            return weight.linear(_rows(x), self.bias).view(*x.shape[:-1], self.out_features)
        return lora_linear(x, weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.dropout, training=self.training, backend=self.backend)

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B·A`` (out_features, in_features), computed in fp32, returned in fp32."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Folds the adapter into ``weight`` in place: ``W ← W + scaling·B·A`` (summed in fp32).

        Args:
            keep_original: keep a copy of the unmerged weight so that :meth:`unmerge` restores it bit for
                bit (costs one weight's memory while merged). With False, a copy of the (small) adapter
                is kept instead and unmerge subtracts the delta that was added, exact up to rounding,
                even if A, B or alpha changed meanwhile.
        """
        if self._merged:
            return
        if self.quantize is not None:
            raise RuntimeError(f"cannot merge into a {self.quantize} base in place (W would have to hold the "
                               "adapter in its quantized format); to_linear() / merge_and_unload(model) "
                               "dequantize, merge and return 16-bit linears")
        if keep_original:
            self._weight_before_merge = self.weight.detach().clone()
        else:
            self._merged_adapter = (self.lora_A.detach().clone(), self.lora_B.detach().clone(), self.scaling)
        self.weight.copy_(self.weight.float() + self.delta_weight())
        self._merged = True

    def _merged_delta(self) -> torch.Tensor:
        """The delta that merge() added to the weight (fp32)."""
        a, b, scaling = self._merged_adapter
        return (b.float() @ a.float()) * scaling

    def _unmerged_weight(self) -> torch.Tensor:
        """The weight as it was before merge (a new tensor, or the kept copy)."""
        if self._tied_weight is not None:
            return self._tied_weight[0].detach()
        if self._weight_before_merge is not None:
            return self._weight_before_merge
        return (self.weight.detach().float() - self._merged_delta()).to(self.weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undoes :meth:`merge`; a no-op on an unmerged layer."""
        if not self._merged:
            return
        if self._tied_weight is not None:
            # merge_lora gave a tied weight (e.g. lm_head = embed_tokens) its own copy; share it again.
            self.weight = self._tied_weight[0]
        else:
            self.weight.copy_(self._unmerged_weight())
        self._weight_before_merge, self._merged_adapter, self._tied_weight = None, None, None
        self._merged = False

    def _untie_weight(self) -> None:
        """Gives the layer its own copy of a weight shared with another module, so that merging does not
        change that module; :meth:`unmerge` shares the original weight again."""
        if self._merged or self._tied_weight is not None:
            return
        self._tied_weight = (self.weight,)  # a tuple: not registered as a parameter of this module
        self.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=self.weight.requires_grad)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._merged:
            destination[prefix + "weight"] = self._unmerged_weight().clone()
        for name, saved in self._state_dict_names.items():
            if prefix + name in destination:
                destination[prefix + saved] = destination.pop(prefix + name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name, saved in self._state_dict_names.items():
            if prefix + saved in state_dict:
                state_dict[prefix + name] = state_dict.pop(prefix + saved)
        was_merged, keep_original = self._merged, self._weight_before_merge is not None
        was_tied = self._tied_weight is not None
        if was_merged:
            self.unmerge()  # the state dict holds the unmerged weight; merge again with the loaded adapter
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if was_tied:
            self._untie_weight()
        if was_merged:
            self.merge(keep_original=keep_original)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new plain ``nn.Linear`` holding the merged weight (this layer is left unchanged)."""
        if self.quantize is not None:  # dequantized in fp32, merged in fp32, rounded once to the base's dtype
            qweight = self.qweight
            device, dtype, requires_grad = qweight.device, self.base_dtype, False
            base = qweight.dequantize(torch.float32)
        else:
            device, dtype, requires_grad = self.weight.device, self.weight.dtype, self.weight.requires_grad
            base = self.weight.float()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=device, dtype=dtype)
        linear.weight.copy_(base if self._merged else base + self.delta_weight().to(device))
        linear.weight.requires_grad_(requires_grad)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
            linear.bias.requires_grad_(self.bias.requires_grad)
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"backend={self.backend!r}" + (", merged=True" if self._merged else "")
            + (f", quantize={self.quantize!r}" if self.quantize is not None else "")
        )
