"""How much memory a forward pass keeps for backward: the measure behind the README's memory claims."""
from __future__ import annotations

from typing import Callable, Iterable, Tuple, TypeVar

import torch

T = TypeVar("T")


def saved_activation_bytes(forward: Callable[[], T], parameters: Iterable[torch.Tensor]) -> Tuple[T, int]:
    """Runs ``forward()`` and counts the bytes autograd keeps for backward, parameters excluded.

    Every tensor saved for backward is seen through ``torch.autograd.graph.saved_tensors_hooks``; a storage
    saved twice (x kept by two matmuls, say) counts once, as it is held once, and storages of
    ``parameters`` do not count (the model holds them anyway).

    Returns:
        ``(forward()'s output, bytes)``.
    """
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters if p is not None}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = forward()
    return output, sum(saved.values())
