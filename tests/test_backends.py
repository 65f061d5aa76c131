"""lora_kernels.backends: resolving a backend name, the torch backend's dropout masks and seeds, and the backend
protocol and registry (base.py), which the Triton backend joins."""
import math

import pytest
import torch

from helpers import assert_close
from lora_kernels import lora_linear, lora_linear_reference
from lora_kernels.backends import draw_seed_tensor, resolve_backend
from lora_kernels.backends import torch as torch_backend


# ---------------------------------------------------------------------------------------------------
# Resolving a name, dropout masks and seeds


def test_auto_picks_torch_on_cpu():
    assert resolve_backend("auto", torch.ones(1)) == "torch"


def test_keep_rate_within_binomial_bounds():
    # 200·300 = 60000 Bernoulli(1 - p) draws: the kept fraction has standard deviation sqrt(p(1-p)/n) ≈ 0.0018;
    # a bound of 6 standard deviations fails by chance with probability ~1e-9.
    n, p = 200 * 300, 0.3
    for seed in range(3):
        kept = torch_backend.dropout_mask(seed, (200, 300), p, torch.device("cpu")).double().mean().item()
        assert abs(kept - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.0, 1e-6, 0.1, 0.3, 0.5, 0.999999])
def test_effective_dropout_p_is_p_rounded_to_2_to_the_minus_16(p):
    q = torch_backend.effective_dropout_p(p)
    assert (q * 2**16).is_integer() and q < 1
    assert abs(q - p) <= 2**-17 or q == 1 - 2**-16  # the nearest step, or the last one below 1


def test_dropout_seed_is_a_tensor_on_the_input_device_and_advances_per_call():
    # The seed is drawn on x's device (the CPU here), from that device's generator: two calls, two seeds,
    # and the same two again after the same manual_seed.
    torch.manual_seed(3)
    first = [draw_seed_tensor(torch.device("cpu")) for _ in range(2)]
    torch.manual_seed(3)
    again = [draw_seed_tensor(torch.device("cpu")) for _ in range(2)]
    assert all(s.dtype == torch.int64 and s.shape == (1,) and s.device.type == "cpu" for s in first)
    assert first[0].item() != first[1].item()
    assert [s.item() for s in first] == [s.item() for s in again]


# ---------------------------------------------------------------------------------------------------
# The backend protocol and registry


def test_builtin_backends_follow_the_protocol():
    from lora_kernels.backends import LoRABackend, get_backend, registered_backends
    from lora_kernels.backends.triton import kernels

    assert {"torch", "triton"} <= set(registered_backends())
    assert get_backend("torch") is torch_backend.DEFAULT
    assert get_backend("triton", strict=True) is kernels(strict=True)
    assert get_backend("triton", strict=False) is kernels(strict=False)
    for backend in (torch_backend.DEFAULT, torch_backend.KERNEL_MASK, kernels(strict=True)):
        assert isinstance(backend, LoRABackend)
    # The Triton wrapper's mask is the kernels' (the torch copy of it where the kernels cannot run).
    seed = torch.tensor([5])
    assert torch.equal(kernels(strict=False).dropout_mask(seed, (6, 10), 0.3, "cpu"),
                       torch_backend.KERNEL_MASK.dropout_mask(seed, (6, 10), 0.3, "cpu"))
    with pytest.raises(ValueError, match="no backend named 'nope'"):
        get_backend("nope")


def test_a_registered_backend_is_used_by_name(monkeypatch):
    from lora_kernels.backends import base

    calls = []

    class Recording:
        def forward(self, *args):
            calls.append("forward")
            return torch_backend.DEFAULT.forward(*args)

        def backward(self, *args):
            calls.append("backward")
            return torch_backend.DEFAULT.backward(*args)

        dropout_mask = staticmethod(torch_backend.DEFAULT.dropout_mask)

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    base.register_backend("recording", lambda strict: Recording())
    assert resolve_backend("recording", torch.randn(2, 3)) == "recording"
    x, w, a, b = torch.randn(4, 6, requires_grad=True), torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2)
    y = lora_linear(x, w, None, a, b, 0.5, backend="recording")
    y.sum().backward()
    assert calls == ["forward", "backward"]
    assert_close(y, lora_linear_reference(x.double(), w.double(), None, a.double(), b.double(), 0.5), torch.float32)
    for name in ("auto", "eager", ""):
        with pytest.raises(ValueError, match="backend name"):
            base.register_backend(name, lambda strict: Recording())
