"""``FusedLoRALinear``: a drop-in replacement for ``nn.Linear`` with a LoRA adapter.

    y = x·Wᵀ + b + scaling · (dropout(x)·Aᵀ)·Bᵀ,     scaling = alpha / rank   (alpha / √rank with rsLoRA)

Shapes: ``weight`` W (out_features, in_features) and ``bias`` b (out_features,) exactly as in
``nn.Linear``, so the base's ``state_dict`` keys are unchanged; ``lora_A`` A (rank, in_features) and
``lora_B`` B (out_features, rank). ``alpha=None`` means ``alpha = rank``, i.e. scaling 1, MiniMind's
unscaled LoRA.

Initialisation (B = 0 in both, so a fresh adapter leaves the layer's output unchanged):

* ``"minimind"``: A ~ N(0, 0.02²), as MiniMind's LoRA;
* ``"kaiming"``: A Kaiming-uniform with a = √5, as HF PEFT and loralib.

Initialisations that rewrite the base (:mod:`lora_kernels.init`, PEFT's ``init_lora_weights`` of the same
name): ``"pissa"`` / ``"pissa_niter_<n>"`` (A, B from W's principal singular vectors) and ``"olora"`` (from W's
QR) set A and B from W and leave the residual W − s·B·A in ``weight``, in place: as in PEFT, a layer made by
:meth:`FusedLoRALinear.from_linear` shares the linear's weight, so the user's ``nn.Linear`` (and any module
tied to its weight) holds the residual too. The layer keeps copies of the initial A0, B0 (non-persistent
buffers ``lora_initial_A`` / ``lora_initial_B``, or ``lora_adapters.<name>.lora_initial_*``: r·(in + out)
more elements, not in state dicts) so that :func:`lora_kernels.save_lora` and
:func:`lora_kernels.save_peft_adapter` can write the adapter converted to a plain LoRA on the original base,
and so that :meth:`FusedLoRALinear.delete_adapter` puts W back. On a quantized base they are refused (it
cannot take the residual exactly); ``from_linear(..., quantize=...)`` runs them on the dense weight (a copy:
the linear is left unchanged) and quantizes the residual, PiSSA's QPiSSA.

State dict: whether merged or not, a layer saves the *unmerged* ``weight`` next to ``lora_A``/``lora_B``,
so a state dict loaded into a fresh layer counts the adapter once; loading into a merged layer keeps it
merged with the loaded adapter.

Named adapters: a layer holds any number of adapters, each with its own :class:`LoRAConfig` (rank, alpha,
dropout, ...). The adapter named ``"default"`` lives in ``lora_A`` / ``lora_B`` (so code and files that
know one adapter per layer keep working, with the same state_dict keys); the others in
``lora_adapters.<name>.lora_A`` / ``.lora_B``. ``rank``, ``alpha``, ``dropout``, ``use_rslora``, ``init``
and ``scaling`` are the default adapter's. :meth:`set_adapter` chooses the active adapters, whose LoRA
terms add up; switching allocates nothing and moves no weights. One active adapter runs one fused
:func:`lora_kernels.lora_linear` call; several run one fused call over their concatenation
(:mod:`lora_kernels.mixed`), sharing one dropout mask, except in training with different dropout p, where
the first runs fused and the others' terms are added in eager PyTorch. Inside
:func:`lora_kernels.mixed_adapters`, each row of the batch runs its own adapter instead.

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
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant
from .config import DEFAULT_ADAPTER, LoRAConfig, check_adapter_name, is_residual_init
from .dora import dora_linear, weight_norm
from .functional import _rows, backend_names, lora_linear
from .init import residual_factors, residual_init_problem
from .mixed import AdapterTerm, lora_linear_mixed, lora_linear_stacked
from .pool import AdapterPool, Slots


def _check_backend(backend) -> None:
    if backend not in backend_names():
        raise ValueError(f"backend must be one of {backend_names()}, got {backend!r}")


def _rename_saved_keys(layer: "FusedLoRALinear", destination, prefix: str, local_metadata) -> None:
    """State-dict post-hook: the layer's keys (its named adapters' included) under their saved names."""
    for name, saved in layer._saved_names().items():
        if prefix + name in destination:
            destination[prefix + saved] = destination.pop(prefix + name)


class LoRAAdapter(nn.Module):
    """The parameters of one named (non-default) adapter of a :class:`FusedLoRALinear` (``lora_magnitude``: a
    DoRA adapter's m, else None)."""

    def __init__(self, lora_A: nn.Parameter, lora_B: nn.Parameter,
                 lora_magnitude: Optional[nn.Parameter] = None) -> None:
        super().__init__()
        self.lora_A, self.lora_B = lora_A, lora_B
        self.register_parameter("lora_magnitude", lora_magnitude)
        # A PiSSA / OLoRA adapter's initial A0, B0 (lora_kernels.init); not saved in state dicts.
        self.register_buffer("lora_initial_A", None, persistent=False)
        self.register_buffer("lora_initial_B", None, persistent=False)


class FusedLoRALinear(nn.Module):
    """``nn.Linear`` plus a LoRA adapter, computed by the fused :func:`lora_kernels.lora_linear`.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        rank: LoRA rank r >= 1.
        alpha: LoRA alpha > 0; None means alpha = rank (scaling 1).
        dropout: dropout probability on the LoRA path's input, in [0, 1).
        use_rslora: scale by alpha / √rank instead of alpha / rank.
        init: ``"minimind"`` or ``"kaiming"`` initialisation of ``lora_A`` (``lora_B`` starts at zero).
        use_dora: DoRA: a trainable magnitude ``lora_magnitude`` (out_features,) beside A and B, the layer
            computing :func:`lora_kernels.dora_linear` (PEFT's ``use_dora=True``).
            Any of these six left None takes :class:`LoRAConfig`'s default, where the defaults live.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"`` (see :func:`lora_kernels.lora_linear`).
        quantize: None, or ``"nf4"`` / ``"int8"``: a frozen quantized base (see the module docstring).
        double_quant: with ``"nf4"``, quantize the blockwise absmax too (bitsandbytes' compress_statistics).
        freeze_base: ``weight`` and ``bias`` start with ``requires_grad=False`` (as in loralib and PEFT), so
            only ``lora_A``/``lora_B`` train and backward skips the dW GEMM; pass False to train the base too.
        config: a :class:`LoRAConfig` instead of rank/alpha/dropout/use_rslora/init/use_dora (not both).
        adapter_name: the name of the layer's first adapter (``"default"``: ``lora_A`` / ``lora_B``).

    Raises:
        ValueError: rank < 1, alpha <= 0, dropout outside [0, 1), unknown init, backend or quantize; a PiSSA /
            OLoRA init with rank > min(in_features, out_features).

    Warns:
        UserWarning: when rank >= in·out / (in + out), the adapter has at least as many parameters as
            the layer it adapts.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: Optional[int] = None,
        alpha: Optional[float] = None,
        dropout: Optional[float] = None,
        use_rslora: Optional[bool] = None,
        init: Optional[str] = None,
        use_dora: Optional[bool] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
        quantize: Optional[str] = None,
        double_quant: bool = False,
        freeze_base: bool = True,
        config: Optional[LoRAConfig] = None,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        config = LoRAConfig.resolve(config, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                    init=init, use_dora=use_dora)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._base_initialised = False  # until _reset_base_parameters: inits that read W wait for it
        self._setup_lora(in_features, out_features, config, backend, factory, adapter_name)
        self._reset_base_parameters()
        self._base_initialised = True
        for name, adapter_config in self.lora_configs.items():  # PiSSA / OLoRA read W: now it is initialised
            if is_residual_init(adapter_config.init):
                self.reset_lora_parameters(name)
        if quantize is not None:
            self._quantize_new_base(quantize, double_quant)
        else:  # a DoRA magnitude is the norm of the weight just initialised
            self.reset_lora_magnitude(adapter_name)
        if freeze_base:
            self.freeze_base()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: Optional[int] = None,
        alpha: Optional[float] = None,
        dropout: Optional[float] = None,
        use_rslora: Optional[bool] = None,
        init: Optional[str] = None,
        use_dora: Optional[bool] = None,
        backend: str = "auto",
        lora_dtype: Optional[torch.dtype] = None,
        freeze_base: bool = True,
        allow_custom_forward: bool = False,
        config: Optional[LoRAConfig] = None,
        adapter_name: str = DEFAULT_ADAPTER,
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
        config = LoRAConfig.resolve(config, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                    init=init, use_dora=use_dora)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight = linear.weight
        if quantize is not None and is_residual_init(config.init):
            # The residual is quantized, not written back: the linear is left unchanged, as with any quantize.
            layer.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
        layer.bias = linear.bias
        factory = {"device": linear.weight.device, "dtype": lora_dtype or linear.weight.dtype}
        layer._setup_lora(linear.in_features, linear.out_features, config, backend, factory, adapter_name)
        layer.train(linear.training)
        if quantize is not None:
            layer._quantize_new_base(quantize, double_quant)
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

    def _setup_lora(self, in_features, out_features, config: LoRAConfig, backend, factory, adapter_name):
        _check_backend(backend)
        check_adapter_name(adapter_name)
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.lora_configs: Dict[str, LoRAConfig] = {}  # adapter name -> its settings, in the order added
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.register_parameter("lora_magnitude", None)  # the default adapter's DoRA magnitude
        # The default adapter's initial A0, B0 after PiSSA / OLoRA (lora_kernels.init); not saved in state dicts.
        self.register_buffer("lora_initial_A", None, persistent=False)
        self.register_buffer("lora_initial_B", None, persistent=False)
        self._active: Tuple[str, ...] = (adapter_name,)  # the adapters asked for (set_adapter)
        self._running: Tuple[str, ...] = ()  # those of them this layer has: what forward computes
        self._merged = False
        self._merged_adapter = None  # [(A, B, scaling, g or None), ...] folded in by merge(keep_original=False)
        self._tied_weight = None  # (shared weight,) while merge_lora gives a tied weight its own copy
        self._warned_merged_training = False
        # True: state_dict saves (and load_state_dict reads) the parameters under PEFT's names (fuse_peft_model).
        self._peft_names = False
        self.register_state_dict_post_hook(_rename_saved_keys)
        self.lora_enabled = True  # False: run the base layer alone (see lora_kernels.disable_lora)
        self._mixed = None  # the per-row adapters inside lora_kernels.mixed_adapters (a _MixedRows)
        self._pool = None  # the adapters' stacked storage for segmented mixed batches (an AdapterPool), made lazily
        self.register_buffer("_weight_before_merge", None, persistent=False)
        self.quantize, self.base_dtype = None, None  # set by quantize_base
        self.add_adapter(adapter_name, config, dtype=factory["dtype"], _stacklevel=4)

    # -----------------------------------------------------------------------------------------------
    # Named adapters

    def _warn_large_rank(self, rank: int, stacklevel: int) -> None:
        in_features, out_features = self.in_features, self.out_features
        if rank >= in_features * out_features / (in_features + out_features):
            warnings.warn(
                f"rank {rank} >= in*out/(in+out) = {in_features * out_features / (in_features + out_features):.1f} "
                f"for a {in_features}->{out_features} layer: the adapter has at least as many parameters as "
                "the layer itself",
                stacklevel=stacklevel,
            )

    def _unknown(self, name: str) -> ValueError:
        return ValueError(f"no adapter named {name!r} in this layer (it has {list(self.lora_configs)})")

    def add_adapter(self, name: str, config: LoRAConfig, dtype: Optional[torch.dtype] = None,
                    _stacklevel: int = 2) -> None:
        """Adds a new adapter ``name`` with ``config`` (A initialised by ``config.init``, B = 0; a DoRA
        adapter's magnitude m = ‖W + s·B·A‖ per row), inactive unless :meth:`set_adapter` already asked for
        ``name``.

        Args:
            dtype: of the new A and B (and m); defaults to the dtype of the layer's other adapters, else the weight's.

        Raises:
            ValueError: a bad or duplicate name, naming it; a PiSSA / OLoRA init on a quantized base or with
                rank > min(in, out) (nothing is added then).
        """
        check_adapter_name(name)
        if not isinstance(config, LoRAConfig):
            raise TypeError(f"config must be a lora_kernels.LoRAConfig, got {type(config).__name__}")
        if name in self.lora_configs:
            raise ValueError(f"the layer already has an adapter named {name!r}")
        if self._merged:
            raise RuntimeError(f"cannot add adapter {name!r} to a merged layer; unmerge it first")
        problem = residual_init_problem(config, self.in_features, self.out_features, self.quantize)
        if problem is not None:
            raise ValueError(f"adapter {name!r}: {problem}")
        self._warn_large_rank(config.rank, _stacklevel + 1)
        if dtype is None:
            dtype = next((a.dtype for a, _ in map(self.lora_params, self.lora_configs)),
                         self.weight.dtype if self.weight is not None else self.base_dtype)
        factory = {"device": self._base_device, "dtype": dtype}
        lora_A = nn.Parameter(torch.empty((config.rank, self.in_features), **factory))
        lora_B = nn.Parameter(torch.empty((self.out_features, config.rank), **factory))
        magnitude = nn.Parameter(torch.empty(self.out_features, **factory)) if config.use_dora else None
        if name == DEFAULT_ADAPTER:
            self.lora_A, self.lora_B, self.lora_magnitude = lora_A, lora_B, magnitude
        else:
            if "lora_adapters" not in self._modules:
                self.lora_adapters = nn.ModuleDict()
            self.lora_adapters[name] = LoRAAdapter(lora_A, lora_B, magnitude)
        self.lora_configs[name] = config
        self.reset_lora_parameters(name)
        self._update_running()

    def delete_adapter(self, name: str) -> None:
        """Removes adapter ``name`` and its parameters (also from the active ones).

        Raises:
            ValueError: no such adapter. RuntimeError: the layer is merged.
        """
        if name not in self.lora_configs:
            raise self._unknown(name)
        if self._merged:
            raise RuntimeError(f"cannot delete adapter {name!r} from a merged layer; unmerge it first")
        self._restore_residual_base(name)
        if self._pool is not None:
            self._pool.release(name)
        del self.lora_configs[name]
        if name == DEFAULT_ADAPTER:
            self.lora_A, self.lora_B, self.lora_magnitude = None, None, None
        else:
            del self.lora_adapters[name]
        self._active = tuple(n for n in self._active if n != name)
        self._update_running()

    def set_adapter(self, names: Union[str, Sequence[str]], strict: bool = True) -> None:
        """Makes ``names`` (one name or a list) the active adapters; their LoRA terms add up. An empty list
        runs the base alone. Allocates nothing, moves no weights.

        Args:
            strict: every name must be an adapter of this layer (``lora_kernels.set_adapter`` passes False:
                a layer without one of the model's adapters skips it).

        Raises:
            ValueError: (strict) a name the layer does not have. RuntimeError: the layer is merged.
        """
        names = (names,) if isinstance(names, str) else tuple(names)
        if strict:
            for name in names:
                if name not in self.lora_configs:
                    raise self._unknown(name)
        if self._merged and names != self._active:
            raise RuntimeError("cannot switch adapters on a merged layer; unmerge it first")
        self._active = tuple(dict.fromkeys(names))
        self._update_running()

    def _update_running(self) -> None:
        self._running = tuple(n for n in self._active if n in self.lora_configs)

    @property
    def adapter_names(self) -> List[str]:
        """The names of this layer's adapters, in the order they were added."""
        return list(self.lora_configs)

    @property
    def active_adapters(self) -> List[str]:
        """The adapters this layer computes (the active ones it has), in order."""
        return list(self._running)

    def lora_params(self, name: str = DEFAULT_ADAPTER) -> Tuple[nn.Parameter, nn.Parameter]:
        """``(lora_A, lora_B)`` of adapter ``name``.

        Raises:
            ValueError: no such adapter.
        """
        if name not in self.lora_configs:
            raise self._unknown(name)
        if name == DEFAULT_ADAPTER:
            return self.lora_A, self.lora_B
        adapter = self.lora_adapters[name]
        return adapter.lora_A, adapter.lora_B

    def lora_initial_of(self, name: str = DEFAULT_ADAPTER) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(A0, B0)``, the initial factors of adapter ``name`` if a PiSSA / OLoRA initialisation wrote the
        residual into this layer's base, else None (:mod:`lora_kernels.init`).

        Raises:
            ValueError: no such adapter.
        """
        if name not in self.lora_configs:
            raise self._unknown(name)
        owner = self if name == DEFAULT_ADAPTER else self.lora_adapters[name]
        if owner.lora_initial_A is None:
            return None
        return owner.lora_initial_A, owner.lora_initial_B

    def _set_lora_initial(self, name: str, initial: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        owner = self if name == DEFAULT_ADAPTER else self.lora_adapters[name]
        owner.lora_initial_A, owner.lora_initial_B = (None, None) if initial is None else initial

    def lora_magnitude_of(self, name: str = DEFAULT_ADAPTER) -> Optional[nn.Parameter]:
        """Adapter ``name``'s DoRA magnitude m (out_features,), None for a plain LoRA adapter.

        Raises:
            ValueError: no such adapter.
        """
        if name not in self.lora_configs:
            raise self._unknown(name)
        return self.lora_magnitude if name == DEFAULT_ADAPTER else self.lora_adapters[name].lora_magnitude

    def _default_config(self) -> LoRAConfig:
        config = self.lora_configs.get(DEFAULT_ADAPTER)
        if config is None:
            raise AttributeError(f"the layer has no {DEFAULT_ADAPTER!r} adapter (it has {list(self.lora_configs)}); "
                                 "use layer.lora_configs[name]")
        return config

    def _set_default(self, **changes) -> None:
        self.lora_configs[DEFAULT_ADAPTER] = self._default_config().replace(**changes)

    rank = property(lambda self: self._default_config().rank, doc="The default adapter's rank.")
    alpha = property(lambda self: self._default_config().lora_alpha,
                     lambda self, value: self._set_default(alpha=value), doc="The default adapter's alpha.")
    dropout = property(lambda self: self._default_config().dropout,
                       lambda self, value: self._set_default(dropout=value), doc="The default adapter's dropout.")
    use_rslora = property(lambda self: self._default_config().use_rslora,
                          lambda self, value: self._set_default(use_rslora=value),
                          doc="The default adapter's rsLoRA setting.")
    init = property(lambda self: self._default_config().init, lambda self, value: self._set_default(init=value),
                    doc="The default adapter's initialisation.")

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

    def _quantize_new_base(self, format: str, double_quant: bool) -> None:
        """:meth:`quantize_base` for a layer being built: a DoRA magnitude then starts at the norm of the
        quantized weight, as PEFT's does on a bitsandbytes base."""
        self.quantize_base(format, double_quant)
        for name in self.lora_configs:
            self.reset_lora_magnitude(name)

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
    def _base_device(self) -> torch.device:
        """Where the base lives (its weight, or its quantized codes)."""
        return self.weight.device if self.weight is not None else self.weight_data.device

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

    def reset_lora_parameters(self, adapter_name: str = DEFAULT_ADAPTER) -> None:
        """Re-initialises the adapter by its config's ``init``: A random and B = 0 (``"minimind"``,
        ``"kaiming"``), or A and B from W with the residual left in the base (``"pissa"``,
        ``"pissa_niter_<n>"``, ``"olora"``: :meth:`_init_residual`); then a DoRA adapter's magnitude becomes
        ‖W + s·B·A‖ per row, with the residual in place (PEFT's order and initialisation).

        Raises:
            ValueError: a PiSSA / OLoRA init on a quantized base, or rank > min(in, out).
            RuntimeError: a PiSSA / OLoRA init on a merged layer.
        """
        lora_A, lora_B = self.lora_params(adapter_name)
        init = self.lora_configs[adapter_name].init
        if is_residual_init(init):
            self._init_residual(adapter_name)
        else:
            with torch.no_grad():
                if init == "minimind":
                    nn.init.normal_(lora_A, mean=0.0, std=0.02)
                else:
                    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
                nn.init.zeros_(lora_B)
        self.reset_lora_magnitude(adapter_name)

    @torch.no_grad()
    def _init_residual(self, adapter_name: str) -> None:
        """PiSSA / OLoRA (:mod:`lora_kernels.init`): A and B from W (fp32, or fp64 for an fp64 base), the
        residual W − s·B·A (with A and B as stored) written into ``weight`` in place, A0 and B0 kept. A second
        call first puts W back (W_res + s·B0·A0), so resetting does not subtract twice."""
        config = self.lora_configs[adapter_name]
        lora_A, lora_B = self.lora_params(adapter_name)
        problem = residual_init_problem(config, self.in_features, self.out_features, self.quantize)
        if problem is not None:
            raise ValueError(f"adapter {adapter_name!r}: {problem}")
        if self._merged:
            raise RuntimeError(f"cannot initialise adapter {adapter_name!r} with init={config.init!r} on a merged "
                               "layer (its weight holds the merged adapters); unmerge it first")
        if not getattr(self, "_base_initialised", True) or self.weight.is_meta or lora_A.is_meta:
            # W is not there yet: the constructor comes back after initialising it; on the meta device the
            # values come from a checkpoint anyway.
            nn.init.zeros_(lora_A)
            nn.init.zeros_(lora_B)
            return
        compute = torch.promote_types(self.weight.dtype, torch.float32)
        weight = self.weight.detach().to(compute, copy=True)
        initial = self.lora_initial_of(adapter_name)
        if initial is not None:
            weight.addmm_(initial[1].to(compute), initial[0].to(compute), alpha=config.scaling)
        new_A, new_B = residual_factors(weight, config)
        lora_A.copy_(new_A)
        lora_B.copy_(new_B)
        weight.addmm_(lora_B.to(compute), lora_A.to(compute), alpha=-config.scaling)
        self.weight.copy_(weight)
        self._set_lora_initial(adapter_name, (lora_A.detach().clone(), lora_B.detach().clone()))

    @torch.no_grad()
    def _restore_residual_base(self, adapter_name: str) -> None:
        """Adds a PiSSA / OLoRA adapter's s·B0·A0 back to a dense base (W = W_res + s·B0·A0, to the base's
        rounding) and forgets A0, B0; a quantized residual is left as it is."""
        initial = self.lora_initial_of(adapter_name)
        if initial is None:
            return
        if self.quantize is None:
            compute = torch.promote_types(self.weight.dtype, torch.float32)
            weight = self.weight.detach().to(compute, copy=True)
            weight.addmm_(initial[1].to(compute), initial[0].to(compute), alpha=self.lora_configs[adapter_name].scaling)
            self.weight.copy_(weight)
        self._set_lora_initial(adapter_name, None)

    @torch.no_grad()
    def reset_lora_magnitude(self, adapter_name: str = DEFAULT_ADAPTER) -> None:
        """Sets a DoRA adapter's magnitude to ‖W + s·B·A‖ per row, the norm of the weight it sees now (a
        no-op for plain LoRA, and on the meta device)."""
        magnitude = self.lora_magnitude_of(adapter_name)
        if magnitude is None or magnitude.is_meta:
            return
        lora_A, lora_B = self.lora_params(adapter_name)
        weight = self.weight if self.quantize is None else self.qweight
        magnitude.copy_(weight_norm(weight, lora_A, lora_B, self.lora_configs[adapter_name].scaling, "torch"))

    @property
    def scaling(self) -> float:
        """The default adapter's alpha / rank, or alpha / √rank with rsLoRA (see :class:`LoRAConfig`)."""
        return self._default_config().scaling

    @property
    def merged(self) -> bool:
        """True while the adapter is folded into ``weight`` (the layer then runs as a plain linear)."""
        return self._merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged and self.training and torch.is_grad_enabled() and not self._warned_merged_training \
                and any(p.requires_grad for name in self._running for p in self.lora_params(name)):
            self._warned_merged_training = True
            warnings.warn("training a merged FusedLoRALinear: lora_A and lora_B get no gradient while the adapter "
                          "is folded into the weight; call unmerge() (lora_kernels.unmerge_lora(model)) first",
                          stacklevel=2)
        running = self._running
        weight = self.weight if self.quantize is None else self.qweight
        if self._mixed is not None and self.lora_enabled and not self._merged:
            return self._forward_mixed(x, weight)
        if self._merged or not self.lora_enabled or not running:
            if self.quantize is None:
                return F.linear(x, weight, self.bias)
            return weight.linear(_rows(x), self.bias).view(*x.shape[:-1], self.out_features)
        dora = any(self.lora_configs[n].use_dora for n in running)
        if len(running) > 1 and not torch.compiler.is_compiling() and not dora \
                and (not self.training or len({self.lora_configs[n].dropout for n in running}) == 1):
            # Several active adapters sharing one dropout p: one fused call over their concatenation (under
            # torch.compile the per-adapter path below, whose fused op is a traceable custom op).
            return lora_linear_stacked(x, weight, self.bias, [self._adapter_term(n) for n in running],
                                       training=self.training, backend=self.backend)
        first = running[0]
        lora_A, lora_B = (self.lora_A, self.lora_B) if first == DEFAULT_ADAPTER else self.lora_params(first)
        config = self.lora_configs[first]
        if config.use_dora:
            y = dora_linear(x, weight, self.bias, lora_A, lora_B, self.lora_magnitude_of(first), config.scaling,
                            dropout_p=config.dropout, training=self.training, backend=self.backend)
        else:
            y = lora_linear(x, weight, self.bias, lora_A, lora_B, config.scaling,
                            dropout_p=config.dropout, training=self.training, backend=self.backend)
        for name in running[1:]:  # active adapters with different dropout p (training), or DoRA: eager PyTorch
            y = y + self._lora_term(x, name, weight)
        return y

    def _adapter_term(self, name: str) -> AdapterTerm:
        config = self.lora_configs[name]
        return AdapterTerm(*self.lora_params(name), config.scaling, config.dropout, self.lora_magnitude_of(name))

    def _forward_mixed(self, x: torch.Tensor, weight) -> torch.Tensor:
        """The mixed batch of :func:`lora_kernels.mixed_adapters`: row i of x with adapter ``names[i]``."""
        mixed = self._mixed
        if x.dim() < 2 or x.shape[0] != len(mixed.names):
            got = (f"leading size {x.shape[0]}" if x.dim() >= 2 else "no leading (batch) dimension")
            raise ValueError(f"mixed_adapters: layer {mixed.path!r} got an input of shape {tuple(x.shape)} with "
                             f"{got}, but len(names) = {len(mixed.names)}; names must give one adapter per row "
                             "of the leading dimension of every LoRA layer's input")
        used, index, host = mixed.rows_for(self, x.device)
        terms = mixed.terms_for(self, used)
        return lora_linear_mixed(x, weight, self.bias, terms, index, training=self.training, backend=self.backend,
                                 store=mixed.store_for(self, used, terms, host))

    def pooled(self, names: Sequence[str]) -> Optional[Slots]:
        """Puts adapters ``names`` in this layer's :class:`lora_kernels.pool.AdapterPool` (their parameters become
        views of their slots until :meth:`unpool`) and returns where they sit; None where they cannot share a
        store (see :meth:`lora_kernels.pool.AdapterPool.place`)."""
        if self._pool is None:
            self._pool = AdapterPool(self.in_features, self.out_features)
        return self._pool.place([(name, *self.lora_params(name)) for name in names])

    def unpool(self) -> None:
        """Gives the pooled parameters their own storage back (the pool keeps its slots for the next time)."""
        if self._pool is not None:
            self._pool.unalias()

    def _lora_term(self, x: torch.Tensor, name: str, weight) -> torch.Tensor:
        """``scaling · (dropout(x)·Aᵀ)·Bᵀ`` of adapter ``name``, differentiable by autograd; for a DoRA adapter
        PEFT's term ``(g − 1)⊙(x̃·Wᵀ) + g⊙scaling·(x̃·Aᵀ)·Bᵀ``, g = m / ‖W + s·B·A‖ (detached norm)."""
        lora_A, lora_B = self.lora_params(name)
        config = self.lora_configs[name]
        if self.training and config.dropout > 0:
            x = F.dropout(x, config.dropout, True)
        term = F.linear(F.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype)) * config.scaling
        magnitude = self.lora_magnitude_of(name)
        if magnitude is None:
            return term
        g = (magnitude.float() / weight_norm(weight, lora_A, lora_B, config.scaling, "torch")).to(x.dtype)
        base = F.linear(x, weight) if self.quantize is None else weight.linear(_rows(x)).view(term.shape)
        return (g - 1) * base + g * term

    def delta_weight(self, adapter_names: Optional[Sequence[str]] = None) -> torch.Tensor:
        """What merging ``adapter_names`` (default: the active adapters this layer has) adds to the unmerged
        weight, (out_features, in_features) in fp32: ``Σ scaling · B·A``; with DoRA adapters ``W' − W`` for
        the merged weight ``W' = c ⊙ W + Σ_a g_a ⊙ (s_a·B_a·A_a)`` (g_a = m_a / ‖W + s_a·B_a·A_a‖ per row,
        1 for a LoRA adapter; c = 1 + Σ_a (g_a − 1)), which is ``g ⊙ (W + s·B·A) − W`` for one adapter."""
        names = self._running if adapter_names is None else adapter_names
        if any(self.lora_configs[name].use_dora for name in names):
            base = self._unmerged_base32()
            return _merged_weight(base, self._merge_terms(names, base)).sub_(base)
        delta = torch.zeros((self.out_features, self.in_features), dtype=torch.float32, device=self._base_device)
        for name in names:
            lora_A, lora_B = self.lora_params(name)
            delta.addmm_(lora_B.detach().float(), lora_A.detach().float(), alpha=self.lora_configs[name].scaling)
        return delta

    def _unmerged_base32(self) -> torch.Tensor:
        """The unmerged base weight in fp32 (a quantized base dequantized)."""
        if self.quantize is not None:
            return self.qweight.dequantize(torch.float32)
        return (self._unmerged_weight() if self._merged else self.weight.detach()).float()

    def _merge_terms(self, names: Sequence[str], base: torch.Tensor) -> list:
        """``[(A, B, scaling, g or None)]`` in fp32 for merging ``names`` into the fp32 ``base``: g is a DoRA
        adapter's m / ‖base + s·B·A‖, fixed when the merge happens (unmerge divides by the same g)."""
        terms = []
        for name in names:
            lora_A, lora_B = (p.detach().float() for p in self.lora_params(name))
            scaling, magnitude = self.lora_configs[name].scaling, self.lora_magnitude_of(name)
            g = None if magnitude is None else magnitude.detach().float() / weight_norm(base, lora_A, lora_B, scaling,
                                                                                         "torch")
            terms.append((lora_A.clone(), lora_B.clone(), scaling, g))
        return terms

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Folds the active adapters into ``weight`` in place: ``W ← W + Σ scaling·B·A`` (summed in fp32); with
        DoRA adapters ``W ← c ⊙ W + Σ_a g_a ⊙ (s_a·B_a·A_a)`` (:meth:`delta_weight`), PEFT's ``g ⊙ (W + s·B·A)``
        for one.

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
        base = self.weight.float()
        terms = self._merge_terms(self._running, base)
        if keep_original:
            self._weight_before_merge = self.weight.detach().clone()
        else:
            self._merged_adapter = terms
        self.weight.copy_(_merged_weight(base, terms))
        self._merged = True

    def _unmerged_weight(self) -> torch.Tensor:
        """The weight as it was before merge (a new tensor, or the kept copy)."""
        if self._tied_weight is not None:
            return self._tied_weight[0].detach()
        if self._weight_before_merge is not None:
            return self._weight_before_merge
        return _unmerged_weight(self.weight.detach().float(), self._merged_adapter).to(self.weight.dtype)

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

    def _saved_names(self) -> Dict[str, str]:
        """Our state-dict keys (relative to the layer) -> the keys they are saved under: PEFT's
        (``base_layer.weight``, ``lora_A.<adapter>.weight``, ...) for a layer made by ``fuse_peft_model``,
        else none."""
        if not self._peft_names:
            return {}
        names = {"weight": "base_layer.weight", "bias": "base_layer.bias"}
        for adapter in self.lora_configs:
            ours = "" if adapter == DEFAULT_ADAPTER else f"lora_adapters.{adapter}."
            for leaf in ("lora_A", "lora_B"):
                names[ours + leaf] = f"{leaf}.{adapter}.weight"
            names[ours + "lora_magnitude"] = f"lora_magnitude_vector.{adapter}.weight"
        return names

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._merged:
            destination[prefix + "weight"] = self._unmerged_weight().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Renamed before anything reads them: the named adapters' children get their keys from this dict.
        for name, saved in self._saved_names().items():
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
        linear.weight.copy_(base if self._merged else _merged_weight(base, self._merge_terms(self._running, base)))
        linear.weight.requires_grad_(requires_grad)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
            linear.bias.requires_grad_(self.bias.requires_grad)
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        head = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
        if list(self.lora_configs) == [DEFAULT_ADAPTER] and self._running == (DEFAULT_ADAPTER,):
            head += (f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
                     + ("use_dora=True, " if self._default_config().use_dora else ""))
        else:
            head += "adapters={" + ", ".join(f"{name!r}: rank {c.rank} alpha {c.lora_alpha:g} dropout {c.dropout:g}"
                                             + (" dora" if c.use_dora else "")
                                             for name, c in self.lora_configs.items()) + "}, "
            head += f"active={list(self._running)}, "
        return (head + f"backend={self.backend!r}" + (", merged=True" if self._merged else "")
                + (f", quantize={self.quantize!r}" if self.quantize is not None else ""))


def _merged_weight(base: torch.Tensor, terms: Sequence[tuple]) -> torch.Tensor:
    """``c ⊙ W + Σ_a g_a ⊙ (s_a·B_a·A_a)`` in fp32 for :meth:`FusedLoRALinear._merge_terms`' terms (g_a = 1, and
    no contribution to c − 1, for a LoRA adapter): the weight whose linear is the layer's output without dropout."""
    merged = base.clone()
    for lora_A, lora_B, scaling, g in terms:
        if g is None:
            merged.addmm_(lora_B, lora_A, alpha=scaling)
        else:
            merged.addcmul_(base, (g - 1)[:, None]).addmm_(lora_B * g[:, None], lora_A, alpha=scaling)
    return merged


def _unmerged_weight(merged: torch.Tensor, terms: Sequence[tuple]) -> torch.Tensor:
    """The inverse of :func:`_merged_weight`: ``W = (W' − Σ_a g_a ⊙ (s_a·B_a·A_a)) / c``, with the g of merge time."""
    base = merged.clone()
    column_scale = torch.ones_like(base[:, 0])
    for lora_A, lora_B, scaling, g in terms:
        base.addmm_(lora_B if g is None else lora_B * g[:, None], lora_A, alpha=-scaling)
        if g is not None:
            column_scale.add_(g - 1)
    return base.div_(column_scale[:, None])
