"""An adapter pool: one layer's adapters in stacked storage, so that a batch refers to them by slot.

Slot i of a pool holds adapter i's ``lora_A`` (r_i, K) in ``a_store[i, :r_i·K]`` and its ``lora_B``
(N, r_i) in ``b_store[i, :N·r_i]``, both row-major; the stores are (P, R_cap·K) and (P, R_cap·N), R_cap the
largest rank held, so adapters of different ranks share them. The adapters' parameters stay ordinary
``nn.Parameter`` objects (optimizers see no difference): the pool makes each one a view of its slot
(``param.data = view``), and the segmented kernels read the stores directly, so a mixed batch of 64 adapters
stacks nothing per call and an optimizer step inside a mixed batch updates the store itself.

The parameters are views of the pool only while :func:`lora_kernels.mixed_adapters` runs a batch through it
(:meth:`AdapterPool.unalias` at the end of the context gives each its own storage back), so that outside a
mixed batch they are ordinary tensors to every saver, optimizer and library (safetensors refuses tensors that
share a storage). The pool keeps its slots between contexts: entering one copies each adapter into its own
slot. Adding an adapter takes a free slot; deleting frees its slot; switching copies nothing. Only a pool
that is full, or an adapter of a larger rank than R_cap, reallocates (capacity doubles). Whatever replaces a
parameter's storage (``model.to(...)``, ``load_state_dict(assign=True)``, ``param.data = ...``) is noticed at
the next :meth:`AdapterPool.place`, which puts the adapter back in (a new store on a new device or dtype).
Parameters that are not plain tensors (FSDP2's DTensors) are not pooled: :meth:`AdapterPool.place` returns
None and the caller stacks them for the call.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch


class Slots(NamedTuple):
    """A store and where adapters sit in it: ``slots[a]`` is adapter a's slot (in the caller's order),
    ``ranks`` the rank held in each slot of the store (0: free). ``plans`` (a dict, or None) lets the caller
    keep the plans of a fixed row layout (:mod:`lora_kernels.segmented`) for as long as it keeps these slots."""

    a_store: torch.Tensor
    b_store: torch.Tensor
    slots: Tuple[int, ...]
    ranks: Tuple[int, ...]
    plans: Optional[dict] = None


class AdapterPool:
    """The stacked storage of one :class:`lora_kernels.FusedLoRALinear`'s adapters (see the module docstring).

    Args:
        in_features, out_features: K and N of the layer.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.a_store: Optional[torch.Tensor] = None
        self.b_store: Optional[torch.Tensor] = None
        self._slot: Dict[str, int] = {}
        self._params: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = []  # per slot; None: free
        self.reallocations = 0  # stores allocated so far (tests and benchmarks read it)

    @property
    def capacity(self) -> int:
        return len(self._params)

    @property
    def rank_capacity(self) -> int:
        return 0 if self.a_store is None else self.a_store.shape[1] // max(self.in_features, 1)

    def slot_of(self, name: str) -> Optional[int]:
        return self._slot.get(name)

    def ranks(self) -> Tuple[int, ...]:
        """The rank held in each slot (0 for a free slot)."""
        return tuple(0 if p is None else p[0].shape[0] for p in self._params)

    def _views(self, slot: int, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
        k, n = self.in_features, self.out_features
        return self.a_store[slot, :rank * k].view(rank, k), self.b_store[slot, :n * rank].view(n, rank)

    def _holds(self, slot: int, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
        """True when the parameters are still the views of ``slot`` (nothing replaced their storage)."""
        held = self._params[slot]
        if held is None or held[0] is not lora_A or held[1] is not lora_B:
            return False
        rank = lora_A.shape[0]
        if rank > self.rank_capacity or lora_A.dtype != self.a_store.dtype or lora_A.device != self.a_store.device:
            return False
        view_a, view_b = self._views(slot, rank)
        return lora_A.data_ptr() == view_a.data_ptr() and lora_B.data_ptr() == view_b.data_ptr() \
            and lora_A.stride() == view_a.stride() and lora_B.stride() == view_b.stride()

    def unalias(self) -> None:
        """Gives every pooled parameter its own storage again (a copy of its slot) and keeps the slots, so the
        next :meth:`place` copies each adapter back into its own slot without reallocating anything."""
        for held in self._params:
            self._own_storage(held or ())

    def release(self, name: str) -> None:
        """Frees ``name``'s slot (its parameters keep their values: they own a copy from then on)."""
        slot = self._slot.pop(name, None)
        if slot is not None:
            self._own_storage(self._params[slot])
            self._params[slot] = None

    def _own_storage(self, params) -> None:
        """Copies each of ``params`` that is still a view of the stores into storage of its own."""
        if self.a_store is None:
            return
        stores = {self.a_store.untyped_storage().data_ptr(), self.b_store.untyped_storage().data_ptr()}
        with torch.inference_mode(False), torch.no_grad():  # a copy made under inference_mode could not train
            for param in params:
                if param.untyped_storage().data_ptr() in stores:
                    param.data = param.data.clone()

    def place(self, adapters: Sequence[Tuple[str, torch.Tensor, torch.Tensor]]) -> Optional[Slots]:
        """Makes every adapter ``(name, lora_A, lora_B)`` live in the pool (those already there are checked,
        not copied) and returns where they sit, or None when they cannot share a store (different dtypes or
        devices, or parameters that are not plain tensors)."""
        if not adapters:
            return None
        with torch.inference_mode(False):  # the store must be an ordinary tensor even when serving starts it
            return self._place(adapters)

    def _place(self, adapters) -> Optional[Slots]:
        first = adapters[0][1]
        for _, lora_A, lora_B in adapters:
            for t in (lora_A, lora_B):
                if type(t.data) is not torch.Tensor or t.dtype != first.dtype or t.device != first.device \
                        or t.is_inference():
                    return None
        if self.a_store is not None and (self.a_store.dtype != first.dtype or self.a_store.device != first.device):
            self._start_over()
        missing = [(name, a, b) for name, a, b in adapters
                   if name not in self._slot or not self._holds(self._slot[name], a, b)]
        if missing:
            self._make_room(missing, first)
            with torch.no_grad():  # names that keep their slot first: a new name must not take a claimed slot
                for name, lora_A, lora_B in sorted(missing, key=lambda m: m[0] not in self._slot):
                    slot = self._slot.get(name)
                    if slot is None:
                        slot = self._params.index(None)
                        self._slot[name] = slot
                    self._put(slot, lora_A, lora_B)
        return Slots(self.a_store, self.b_store, tuple(self._slot[name] for name, _, _ in adapters), self.ranks(), {})

    def _put(self, slot: int, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        view_a, view_b = self._views(slot, lora_A.shape[0])
        view_a.copy_(lora_A.detach())
        view_b.copy_(lora_B.detach())
        lora_A.data, lora_B.data = view_a, view_b
        self._params[slot] = (lora_A, lora_B)

    def _start_over(self) -> None:
        """Forgets the store (the parameters moved to another device or dtype and own their storage)."""
        self.a_store = self.b_store = None
        self._slot.clear()
        self._params = []

    def _make_room(self, missing, like: torch.Tensor) -> None:
        """Grows the store (capacity doubling) when the missing adapters need more slots or a larger rank."""
        names = {name for name, _, _ in missing}
        new_slots = sum(1 for name in names if name not in self._slot)
        free = sum(1 for p in self._params if p is None)
        need_rank = max([a.shape[0] for _, a, _ in missing] + [self.rank_capacity])
        if self.a_store is not None and new_slots <= free and need_rank <= self.rank_capacity:
            return
        live = [(slot, p) for slot, p in enumerate(self._params) if p is not None and self._holds(slot, *p)]
        needed = len(live) + sum(1 for name in names if name not in self._slot or self._params[self._slot[name]] is None
                                 or not self._holds(self._slot[name], *self._params[self._slot[name]]))
        if self.a_store is None:
            capacity = max(needed, 1)
        elif needed > self.capacity:
            capacity = max(needed, 2 * self.capacity)  # room for the next adapters without another reallocation
        else:
            capacity = self.capacity  # a larger rank only
        factory = {"dtype": like.dtype, "device": like.device}
        self.a_store = torch.zeros((capacity, need_rank * self.in_features), **factory)
        self.b_store = torch.zeros((capacity, need_rank * self.out_features), **factory)
        self.reallocations += 1
        self._params = [None] * capacity
        with torch.no_grad():
            for slot, (lora_A, lora_B) in live:
                self._put(slot, lora_A, lora_B)
        # Names whose parameters were replaced keep their slot only if place() is about to fill it again.
        self._slot = {name: slot for name, slot in self._slot.items()
                      if self._params[slot] is not None or name in names}


def stack_adapters(adapters: Sequence[Tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> Slots:
    """A store for one call from separate (lora_A, lora_B) tensors (a copy: the functional API, and
    parameters a pool cannot hold); adapter a sits in slot a."""
    ranks = [a.shape[0] for a, _ in adapters]
    top = max(ranks)
    a_rows = [torch.nn.functional.pad(a.detach().to(dtype).reshape(1, -1), (0, (top - r) * a.shape[1]))
              for (a, _), r in zip(adapters, ranks)]
    b_rows = [torch.nn.functional.pad(b.detach().to(dtype).reshape(1, -1), (0, (top - r) * b.shape[0]))
              for (_, b), r in zip(adapters, ranks)]
    return Slots(torch.cat(a_rows), torch.cat(b_rows), tuple(range(len(adapters))), tuple(ranks))
