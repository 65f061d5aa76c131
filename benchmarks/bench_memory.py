"""Memory of the LoRA linear per provider: bytes saved for backward (every device) and, on CUDA, the peak
memory of one forward+backward.

These are benchmarks only so that ``pytest benchmarks/ --benchmark-only`` runs them with the rest and their
numbers land in the same JSON: each one "times" a single instrumented forward+backward (group ``memory``;
that time is not a result) and stores the measurements in ``benchmark.extra_info``:

* ``saved_bytes``: bytes of the distinct tensor storages autograd keeps for backward, parameters excluded
  (counted with ``torch.autograd.graph.saved_tensors_hooks`` while the forward runs). For the frozen
  ``linear`` this is 0: it needs only W, a parameter, to give x its gradient.
* ``peak_bytes`` (CUDA only): ``torch.cuda.max_memory_allocated()`` during forward+backward minus what was
  allocated before it (the inputs and parameters), so it covers activations, temporaries and gradients.
"""
from __future__ import annotations

import torch

from lora_kernels.memory import saved_activation_bytes


def measure(case, settings) -> dict:
    """One forward+backward of ``case``: saved bytes, and the CUDA peak when on CUDA."""
    case.zero_grad()
    on_cuda = settings.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(settings.device)
        torch.cuda.reset_peak_memory_stats(settings.device)
        before = torch.cuda.memory_allocated(settings.device)
    y, saved = saved_activation_bytes(case.forward, case.parameters)
    y.backward(case.grad_out)
    del y
    result = {"saved_bytes": saved}
    if on_cuda:
        torch.cuda.synchronize(settings.device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(settings.device) - before
    case.zero_grad()
    return result


def test_memory(benchmark, settings, lora_case, shape, dropout_p, provider):
    case = lora_case(provider, shape, dropout_p)
    case.forward().backward(case.grad_out)  # compile (for `compiled`) and warm allocators outside the count
    s = case.shape
    benchmark.group = "memory"
    benchmark.extra_info.update({"kind": "memory", "provider": provider, "dropout_p": dropout_p, "shape": str(s),
                                 "m": s.m, "k": s.k, "n": s.n, "r": s.r,
                                 "device": settings.device.type, "dtype": settings.dtype_name})
    result = benchmark.pedantic(measure, args=(case, settings), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
