"""Initialisations that rewrite the base weight (PiSSA, OLoRA), and their conversion to a plain LoRA.

PEFT's ``init_lora_weights="pissa"`` / ``"pissa_niter_<n>"`` / ``"olora"``, with s = scaling (alpha / rank, or
alpha / √rank), r = rank and W (out, in) taken in fp32 (fp64 for an fp64 base):

* PiSSA (Meng et al. 2024): W = U·diag(σ)·Vᵀ (the full SVD; with ``pissa_niter_<n>`` ``torch.svd_lowrank`` of
  rank r with n subspace iterations, a randomized approximation that draws from torch's global generator);
  the r principal triplets give, with σ_r / s split evenly between the two factors,

      A = diag(√(σ_r / s))·V_rᵀ   (r, in),        B = U_r·diag(√(σ_r / s))   (out, r),

  so s·B·A = U_r·diag(σ_r)·V_rᵀ, W's best rank-r approximation.
* OLoRA (Büyükakyüz 2024): W = Q·R (reduced QR); B = Q[:, :r] (out, r), A = R[:r] (r, in), with no split of
  s (PEFT's choice: s·B·A = s·Q_r·R_r).

Either way the base keeps the residual W_res = W − s·B·A, so the layer's initial output is the base's (the
residual is taken with A and B as stored, i.e. after their rounding to the adapter's dtype; only the rounding
of W_res to the base's dtype remains). Both need r <= min(in, out).

Conversion (PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``): with A0, B0 the
initial factors, a trained adapter on the residual base is, on the original base W,

    W_res + s·B·A = W + s·(B·A − B0·A0) = W + s'·B'·A',     A' = [A; A0] (2r, in),  B' = [B, −B0] (out, 2r)

a plain LoRA of rank 2r whose alpha' keeps s' = s: 2·alpha (alpha' / 2r = alpha / r), or √2·alpha with rsLoRA
(alpha' / √(2r) = alpha / √r). A DoRA magnitude carries over unchanged: the norm ‖W + s'·B'·A'‖ PEFT takes on
the original base is ‖W_res + s·B·A‖. With a quantized residual (QPiSSA: ``from_linear(..., init="pissa",
quantize="nf4")``) the converted adapter on W differs from the model by W_res's quantization error.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .config import LoRAConfig, is_residual_init, pissa_niter


def pissa_factors(weight: torch.Tensor, rank: int, scaling: float, niter=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's ``(A, B)`` of ``weight`` (see the module docstring), in weight's dtype.

    Args:
        weight: W (out, in), floating point (fp32 or fp64: the SVD runs in its dtype).
        rank: r, 1 <= r <= min(out, in).
        scaling: s > 0; σ_r / s is split between A and B so that s·B·A is W's rank-r truncation.
        niter: None for the full SVD, else ``torch.svd_lowrank`` with q = r and ``niter`` subspace iterations.

    Returns:
        A (r, in), B (out, r).
    """
    if niter is None:
        left, sigma, right_t = torch.linalg.svd(weight, full_matrices=False)
        left, sigma, right_t = left[:, :rank], sigma[:rank], right_t[:rank]
    else:
        left, sigma, right = torch.svd_lowrank(weight, q=rank, niter=niter)
        right_t = right.t()
    root = torch.sqrt(sigma / scaling)
    return root[:, None] * right_t, left * root[None, :]


def olora_factors(weight: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's ``(A, B)`` of ``weight`` (W (out, in), fp32 or fp64): A = R[:r] (r, in), B = Q[:, :r] (out, r)
    of the reduced QR W = Q·R."""
    q, r = torch.linalg.qr(weight)
    return r[:rank].contiguous(), q[:, :rank].contiguous()


def residual_init_problem(config: LoRAConfig, in_features: int, out_features: int,
                          quantize: Optional[str] = None) -> Optional[str]:
    """Why ``config.init`` cannot initialise an adapter of a ``in_features -> out_features`` layer whose base is
    quantized as ``quantize`` (None: dense); None when it can, or when the init leaves the base alone.

    A quantized base cannot hold the residual exactly (PEFT refuses PiSSA there, and requantizes for OLoRA); the
    message says how to get PiSSA's QPiSSA instead: decompose the dense weight, quantize the residual.
    """
    if not is_residual_init(config.init):
        return None
    if quantize is not None:
        return (f"init={config.init!r} writes the residual W - s*B*A into the base weight, which is quantized "
                f"({quantize!r}) here and cannot hold it exactly; initialise on the dense weight and quantize the "
                f"residual instead: FusedLoRALinear.from_linear(linear, init={config.init!r}, quantize={quantize!r}) "
                f"or replace_linear_with_fused_lora(model, init={config.init!r}, quantize={quantize!r}), or add the "
                "adapter before quantize_base()")
    limit = min(in_features, out_features)
    if config.rank > limit:
        return (f"init={config.init!r} takes the first rank directions of W, so rank must be <= "
                f"min(in_features, out_features) = {limit} for a {in_features}->{out_features} layer, "
                f"got rank {config.rank}")
    return None


def check_residual_inits(model: torch.nn.Module, paths, config: LoRAConfig) -> None:
    """Checks, before anything changes, that ``config``'s PiSSA / OLoRA init (if it is one) can initialise the
    linear layers at ``paths`` (``config.for_module(path)`` each; a plain ``nn.Linear`` counts as dense, since
    ``from_linear(..., quantize=...)`` decomposes the dense weight).

    Raises:
        ValueError: listing every layer it cannot initialise, and why.
    """
    if not is_residual_init(config.init):
        return
    problems = []
    for path in paths:
        module = model.get_submodule(path)
        problem = residual_init_problem(config.for_module(path), module.in_features, module.out_features,
                                        getattr(module, "quantize", None))
        if problem is not None:
            problems.append(f"{path}: {problem}")
    if problems:
        raise ValueError("; ".join(problems[:10]) + (f"; ... and {len(problems) - 10} more" if len(problems) > 10
                                                     else ""))


def residual_factors(weight: torch.Tensor, config: LoRAConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of ``config.init`` (``"pissa"``, ``"pissa_niter_<n>"`` or ``"olora"``) for ``weight``.

    Raises:
        ValueError: an init that does not rewrite the base, or rank > min(out, in) (naming both).
    """
    if not is_residual_init(config.init):
        raise ValueError(f"init {config.init!r} does not rewrite the base weight (expected 'pissa', "
                         "'pissa_niter_<n>' or 'olora')")
    problem = residual_init_problem(config, weight.shape[1], weight.shape[0])
    if problem is not None:
        raise ValueError(problem)
    if config.init == "olora":
        return olora_factors(weight, config.rank)
    return pissa_factors(weight, config.rank, config.scaling, pissa_niter(config.init))


def converted_config(config: LoRAConfig) -> LoRAConfig:
    """The config of the converted adapter: rank 2r, alpha 2·alpha (√2·alpha with rsLoRA), the same scaling,
    an init that leaves the base alone (PEFT's ``init_lora_weights=True``)."""
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    return config.replace(rank=2 * config.rank, alpha=config.lora_alpha * factor, init="kaiming")


def converted_lora(lora_A: torch.Tensor, lora_B: torch.Tensor, initial_A: torch.Tensor,
                   initial_B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``A' = [A; A0]`` (2r, in) and ``B' = [B, −B0]`` (out, 2r): B'·A' = B·A − B0·A0 (detached, A's dtype)."""
    lora_A, lora_B = lora_A.detach(), lora_B.detach()
    return (torch.cat([lora_A, initial_A.to(lora_A)], dim=0),
            torch.cat([lora_B, -initial_B.to(lora_B)], dim=1))


def converted_adapters(layers: Mapping[str, Any], adapter: str) -> Dict[str, Tuple[LoRAConfig, torch.Tensor,
                                                                                   torch.Tensor]]:
    """For every layer (module path -> :class:`lora_kernels.FusedLoRALinear`) whose adapter ``adapter`` was
    initialised by PiSSA / OLoRA: ``(converted config, A', B')``, the plain LoRA that gives the same layer on
    the original base (module docstring). Other layers are left out.

    Raises:
        ValueError: a layer whose adapter has a PiSSA / OLoRA init but no longer holds its initial A0, B0
            (they are not part of state dicts or adapter files), naming the layer.

    Warns:
        UserWarning: a layer whose residual base is quantized (the conversion is then exact only up to the
            residual's quantization error).
    """
    converted, quantized = {}, []
    for name, layer in layers.items():
        if adapter not in layer.lora_configs:
            continue
        config = layer.lora_configs[adapter]
        initial = layer.lora_initial_of(adapter)
        if initial is None:
            if is_residual_init(config.init):
                raise ValueError(
                    f"{name}: adapter {adapter!r} has init={config.init!r}, but the layer does not hold its initial "
                    "A0 and B0 (they live only in the layer that ran the initialisation, not in state dicts or "
                    "files), so it cannot be converted to a LoRA on the original base; save it with "
                    "convert_to_lora=False (a file for the residual base)")
            continue
        if layer.quantize is not None:
            quantized.append(name)
        lora_A, lora_B = layer.lora_params(adapter)
        converted[name] = (converted_config(config), *converted_lora(lora_A, lora_B, *initial))
    if quantized:
        warnings.warn(f"adapter {adapter!r}: layers {quantized[:5]} keep a quantized residual base; the converted "
                      "LoRA on the original base differs from this model by the residual's quantization error",
                      stacklevel=3)
    return converted
