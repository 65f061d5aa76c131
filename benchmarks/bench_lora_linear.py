"""Timing of the LoRA linear (mirrors ``lora_kernels/ops/lora_linear.py``): provider × mode × shape × dropout.

Modes:

* ``forward``: the forward pass with autograd recording, as in training (it includes saving tensors for
  backward, e.g. PEFT's dropout mask); the output and its graph are released outside the timed region;
* ``backward``: ``y.backward(grad_out)`` alone; the forward that builds the graph runs in the setup;
* ``forward+backward``: both, one training step of the layer.

Gradients are reset (set to None, as ``optimizer.zero_grad()`` does) before every round, outside the timer.
Providers, shapes, devices and rounds are defined in ``benchmarks/conftest.py``.
"""
from __future__ import annotations


def _extra_info(case, mode, settings) -> dict:
    s = case.shape
    return {"kind": "kernel", "provider": case.provider, "mode": mode, "dropout_p": case.dropout_p,
            "shape": str(s), "m": s.m, "k": s.k, "n": s.n, "r": s.r,
            "device": settings.device.type, "dtype": settings.dtype_name}


def time_mode(benchmark, case, mode, settings):
    """Times ``mode`` of ``case`` with ``benchmark.pedantic``; everything but the measured work is in setup."""
    sync = settings.sync

    if mode == "forward":
        def setup():
            case.zero_grad()
            sync()

        def target():
            y = case.forward()
            sync()
            return y  # released after the timer stops

    elif mode == "backward":
        def setup():
            case.zero_grad()
            y = case.forward()
            sync()
            return (y,), {}

        def target(y):
            y.backward(case.grad_out)
            sync()

    elif mode == "forward+backward":
        def setup():
            case.zero_grad()
            sync()

        def target():
            case.forward().backward(case.grad_out)
            sync()

    else:
        raise ValueError(f"unknown mode {mode!r}")

    benchmark.pedantic(target, setup=setup, rounds=settings.rounds, warmup_rounds=settings.warmup, iterations=1)


def test_lora_linear(benchmark, settings, lora_case, shape, dropout_p, mode, provider):
    case = lora_case(provider, shape, dropout_p)
    benchmark.group = f"lora_linear {mode} {shape} p={dropout_p:g}"
    benchmark.extra_info.update(_extra_info(case, mode, settings))
    time_mode(benchmark, case, mode, settings)
