"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for models with :class:`FusedLoRALinear` layers.

Sharding is FSDP2's own: :func:`shard_lora_model` only applies ``fully_shard`` in the usual order (each
block, then the root), so the base (16-bit weights, or the quantized codes, which are a frozen parameter) is
split across ranks and all-gathered one block at a time. What FSDP2 does not do for us is hand an adapter to
code that writes files: after sharding, ``lora_A``/``lora_B`` (and a DoRA ``lora_magnitude``) are ``DTensor`` shards, and writing them from one
rank gives a file with half of every matrix (or a torch pickle of ``DTensor`` objects). :func:`gathered_lora`
makes them whole for the length of a ``with`` block, on every rank, so ``save_lora``, ``lora_state_dict`` and
``save_minimind_lora`` see the full adapter; ``save_lora`` refuses a ``DTensor`` outright.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Tuple

import torch
from torch import nn

from .config import LORA_PARAM_NAMES



def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a ``torch.distributed`` ``DTensor`` (what FSDP2 makes of a parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def shard_lora_model(model: nn.Module, blocks: Iterable[nn.Module], mesh=None) -> nn.Module:
    """``fully_shard`` each of ``blocks``, then ``model`` itself (its remaining parameters: embeddings, norms).

    Call it before building the optimizer: sharding replaces every parameter by a ``DTensor`` parameter, so an
    optimizer built earlier would hold the old ones. Freeze the base first (``mark_only_lora_as_trainable``):
    FSDP2 keeps ``requires_grad`` and only reduce-scatters gradients that exist.

    Args:
        model: the model, on its device, with its ``FusedLoRALinear`` layers in place (quantized or not).
        blocks: the modules to shard one by one, e.g. the transformer layers; each is all-gathered for its own
            forward and backward only.
        mesh: a 1-D ``DeviceMesh``; None: all ranks of the default process group, on ``model``'s device type.

    Returns:
        ``model``, sharded in place.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized, or this torch has no FSDP2.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_lora_model needs an initialized process group (torch.distributed."
                           "init_process_group, e.g. under torchrun); none is initialized")
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:  # pragma: no cover - torch >= 2.6 has it
        raise RuntimeError(f"this torch ({torch.__version__}) has no torch.distributed.fsdp.fully_shard (FSDP2): "
                           "torch >= 2.6 is needed") from err
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _sharded_lora(model: nn.Module) -> List[Tuple[nn.Module, str, nn.Parameter]]:
    return [(module, name, param) for module in model.modules()
            for name, param in module.named_parameters(recurse=False)
            if name in LORA_PARAM_NAMES and is_sharded(param)]


@contextlib.contextmanager
def gathered_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every ``lora_A``/``lora_B``/``lora_magnitude`` of ``model`` (all adapters) is a whole, ordinary tensor.

    A collective: every rank must enter it, in the same order as its other collectives (then any of them, e.g.
    rank 0 alone, may save). Only the adapters are gathered, never the base. The full tensors are detached
    copies, so the block is for reading (saving, statistics): on leaving, the sharded parameters (which the
    optimizer holds) are put back unchanged. Without sharded LoRA parameters it does nothing.

    Yields:
        ``model``.
    """
    swapped = _sharded_lora(model)
    for module, name, param in swapped:
        module._parameters[name] = nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad)
    try:
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def scatter_full(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (the whole tensor, the same on every rank) laid out like ``target`` (a ``DTensor`` or not),
    without communication: each rank keeps its own shard. For loading a gathered state into sharded parameters.
    """
    if not is_sharded(target):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                             src_data_rank=None)


def check_not_sharded(tensors: Dict[str, torch.Tensor], what: str) -> None:
    """Raises ValueError naming the first ``DTensor`` shard in ``tensors`` (a file would hold a part of it).

    Raises:
        ValueError: some tensor is a ``DTensor``.
    """
    sharded = [k for k, v in tensors.items() if is_sharded(v)]
    if sharded:
        raise ValueError(f"{what}: {sharded[0]} (and {len(sharded) - 1} more) is an FSDP2 shard (DTensor), not the "
                         "whole tensor; save inside `with lora_kernels.fsdp.gathered_lora(model):`, entered on every "
                         "rank")
