"""Shared test tools: the per-dtype tolerances (stated once, here) and a comparison that explains itself.

Every backend is compared with the eager reference evaluated in float64 on the same (already rounded)
inputs. The error measure is ``max|actual - expected| / scale``, where ``scale`` is by default
``max|expected|``: normalising by the largest magnitude keeps entries that happen to be near zero from
dominating, and makes one number per dtype meaningful across shapes.

Where a result is a sum whose terms cancel (a gradient summed over a few rows of mixed sign), rounding
error follows the terms, not the small sum: pass ``magnitude``, the same computation evaluated on the
absolute values of every input (``magnitudes64`` in the tests), and the scale becomes
``max(Σ|terms|)``, the conditioning-aware bound of floating-point summation. The tolerances below are
the same numbers in both cases.

Why these numbers (u = unit roundoff of the dtype):
* float32, 1e-5: the core issue's bar. Products are accumulated in fp32; for the K <= a few hundred used
  in tests the accumulated error is ~sqrt(K)·u ≈ 1e-6 relative, so 1e-5 leaves a 10x margin while a
  wrong mask, scale or transpose gives errors of order 1e-1 or more.
* float16, 4e-3: u = 2^-11 ≈ 4.9e-4. A result passes through about four roundings to fp16 (S = x̃·Aᵀ,
  the base GEMM output, the LoRA add, the output store), each up to u relative to its own magnitude,
  which can approach the largest output: 4u ≈ 2e-3, doubled for margin.
* bfloat16, 3.2e-2: the same four roundings with u = 2^-8 ≈ 3.9e-3, doubled: 8u ≈ 3.1e-2.
* "tf32" (fp32 tensors with TF32 matmuls, as torch.mm under ``set_float32_matmul_precision("high")``),
  4e-3: TF32 keeps fp16's 10-bit mantissa (u = 2^-11) on the GEMM inputs and accumulates in fp32, so a
  result carries at most fp16's roundings of the operands and fewer of the outputs: fp16's bound holds.
  Only a GPU computes in TF32; the CPU interpreter computes in fp32, well inside it.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import pytest
import torch

TOLERANCES = {
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3.2e-2,
    torch.float64: 1e-12,
    "tf32": 4e-3,
}


def _scale(expected: torch.Tensor, magnitude: Optional[torch.Tensor]) -> float:
    reference = expected if magnitude is None else magnitude
    scale = reference.detach().double().abs().max().item() if reference.numel() else 0.0
    return scale if scale > 0 else 1.0


def relative_error(actual: torch.Tensor, expected: torch.Tensor, magnitude: Optional[torch.Tensor] = None) -> float:
    """max|actual - expected| / scale in float64 (0 for empty tensors); scale is max|expected|, or
    max|magnitude| when the magnitudes of the summed terms are given (see the module docstring)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if expected.numel() == 0:
        return 0.0
    return (actual - expected).abs().max().item() / _scale(expected, magnitude)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "tensor",
                 magnitude: Optional[torch.Tensor] = None) -> None:
    """Asserts shapes match and the relative error is within ``TOLERANCES[dtype]``; on failure the
    message shows the error, the tolerance and the first mismatching entries."""
    assert actual is not None, f"{name}: got None"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    tol = TOLERANCES[dtype]
    err = relative_error(actual, expected, magnitude)
    if not err <= tol:  # also catches NaN
        a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
        scale = _scale(e, magnitude)
        bad = ((a - e).abs() > tol * scale).nonzero()[:5]
        rows = "\n".join(f"  at {tuple(i.tolist())}: got {a[tuple(i)].item():.6g}, expected {e[tuple(i)].item():.6g}"
                         for i in bad)
        raise AssertionError(f"{name}: relative error {err:.3g} > {tol:g} ({dtype})\n{rows}")


def make_peft_linear(linear: torch.nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
    """HF PEFT's ``lora.Linear`` around ``linear`` (PEFT >= 0.18 takes a LoraConfig; older ones keywords)."""
    import inspect

    from peft import LoraConfig
    from peft.tuners.lora import Linear

    kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora)
    if "config" in inspect.signature(Linear.__init__).parameters:
        return Linear(linear, "default", config=LoraConfig(**kwargs), r=r, lora_alpha=alpha)
    return Linear(linear, "default", **kwargs)


needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None
                                or importlib.util.find_spec("transformers") is None,
                                reason="peft and transformers are needed")


def two_peft_adapters(tmp_path, up_rank: Optional[int] = None):
    """A tiny transformers Llama with two PEFT LoRA adapters (``"default"`` on q/v, ``"tr"`` with rsLoRA on
    v/up, ``up_proj`` at rank ``up_rank`` when given), B drawn non-zero, saved by PEFT under
    ``tmp_path / "peft"``, and a copy of the base with both loaded by ``load_peft_adapter``.

    Returns:
        ``(base, peft_model, ours)``, all in eval mode.
    """
    import copy

    from peft import LoraConfig, get_peft_model
    from test_transformers import tiny_model

    from lora_kernels import load_peft_adapter

    base = tiny_model("llama").eval()
    torch.manual_seed(1)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft.add_adapter("tr", LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["v_proj", "up_proj"],
                                      rank_pattern={"up_proj": up_rank} if up_rank else {}))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft.eval()
    peft.save_pretrained(tmp_path / "peft")  # "default" at the root, "tr" in tr/
    ours = copy.deepcopy(base)
    load_peft_adapter(ours, tmp_path / "peft")
    load_peft_adapter(ours, tmp_path / "peft" / "tr", adapter_name="tr")
    return base, peft, ours


# ----------------------------------------------------------------- third-party references, checked first
#
# A test that compares us with bitsandbytes first asks whether bitsandbytes, on this stack, computes what
# the formats define: on some CPUs it does not (bitsandbytes 0.50 sends small NF4 shapes to a C++ kernel
# that, on an AVX-512 machine, dequantizes up to 2.1 away from the input where NF4's rounding allows 0.47).
# A comparison with a function found wrong skips, naming the versions and the error; the test has checked
# our result against the definition before that, so nothing goes unchecked.


def nf4_definition(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, numel: int,
                   blocksize: int = 64) -> torch.Tensor:
    """code[nibble] * absmax[block] in float64 (exact: both are fp32 values), flat, even elements in the high
    nibble."""
    byte = packed.reshape(-1).to(torch.int64)
    nibbles = torch.stack((byte >> 4, byte & 15), dim=1).reshape(-1)[:numel]
    return code.double()[nibbles] * absmax.double().repeat_interleave(blocksize)[:numel]


def bnb_nf4_weight(packed: torch.Tensor, state, absmax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (N, K) float64 weight a bitsandbytes NF4 ``QuantState`` defines over ``packed`` (row-major
    packing), nested scales expanded by their own definition (code2[absmax] · absmax2[group] + offset), or
    with the given per-block ``absmax`` instead."""
    if absmax is None:
        absmax = state.absmax.double()
        if state.nested:
            groups = torch.arange(absmax.numel()) // state.state2.blocksize
            absmax = (state.state2.code.double()[state.absmax.long()] * state.state2.absmax.double()[groups]
                      + state.offset.double())
    numel = state.shape[0] * state.shape[1]
    return nf4_definition(packed, absmax, state.code, numel, state.blocksize).reshape(tuple(state.shape))


def _bitsandbytes_errors(bnb) -> dict:
    """{function: how far it is from its definition} for each bitsandbytes function the tests compare with,
    probed on one small random weight (64 x 96: the shapes its CPU kernels take)."""
    F = bnb.functional
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    wrong = {}
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    blocks = w.reshape(-1, 64).abs().amax(dim=1)
    if not torch.equal(state.absmax, blocks):
        wrong["quantize_4bit"] = "its absmax is not each block's largest magnitude"
    else:  # each code the nearest NF4 value to w / absmax (ties may go either way: compare distances)
        scaled = (w.reshape(-1, 64) / blocks[:, None]).reshape(-1).double()
        chosen = nf4_definition(packed, torch.ones_like(blocks), state.code, w.numel())
        best = (scaled[:, None] - state.code.double()[None, :]).abs().min(dim=1).values
        if not torch.all((scaled - chosen).abs() <= best + 1e-7):
            wrong["quantize_4bit"] = "a code is not the nearest NF4 value"
    got = F.dequantize_4bit(packed, state).reshape(-1).double()
    err = (got - nf4_definition(packed, state.absmax, state.code, w.numel())).abs().max().item()
    if err > 1e-6 * blocks.max().item():
        wrong["dequantize_4bit"] = f"up to {err:.3g} from code[nibble]·absmax[block] (NF4 rounds by at most 0.47 here)"
    cb, scb, _ = F.int8_vectorwise_quant(w.half())
    expected = torch.round(w.half().float() * (127.0 / w.half().float().abs().amax(dim=1))[:, None])
    if not torch.equal(cb.float(), expected):
        wrong["int8_vectorwise_quant"] = "a code is not round(127·w / rowmax)"
    deq = F.int8_vectorwise_dequant(cb, scb).double()
    err = (deq - cb.double() * scb.double()[:, None] / 127).abs().max().item()
    if err > 1e-6 * scb.max().item():
        wrong["int8_vectorwise_dequant"] = f"up to {err:.3g} from code·rowmax/127"
    layer = bnb.nn.Linear4bit(96, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict({"weight": w})
    layer = layer.to("cpu")
    x = torch.randn(5, 96, generator=g)
    with torch.no_grad():
        wq = bnb_nf4_weight(layer.weight.data, layer.weight.quant_state)
        err = (layer(x).double() - x.double() @ wq.t()).abs().max().item()
    if err > 1e-4:
        wrong["Linear4bit.forward"] = f"up to {err:.3g} from x·(code[nibble]·absmax)ᵀ"
    return wrong


_BNB_PROBE = {}


def checked_bitsandbytes(*functions: str):
    """bitsandbytes, where it runs on this machine's CPU and each of ``functions`` (names as in
    ``_bitsandbytes_errors``) agrees with its definition on this stack; otherwise ``pytest.skip`` with the
    versions and what is wrong. Probed once per session."""
    if not _BNB_PROBE:
        try:
            import bitsandbytes as bnb

            _BNB_PROBE.update(module=bnb, wrong=_bitsandbytes_errors(bnb), reason=None)
        except Exception as err:  # noqa: BLE001 - any reason it cannot run here is the skip reason
            _BNB_PROBE.update(module=None, wrong={}, reason=f"bitsandbytes does not run on the CPU here: "
                                                               f"{type(err).__name__}: {err}")
    if _BNB_PROBE["reason"]:
        pytest.skip(_BNB_PROBE["reason"])
    bnb = _BNB_PROBE["module"]
    wrong = {f: _BNB_PROBE["wrong"][f] for f in functions if f in _BNB_PROBE["wrong"]}
    if wrong:
        pytest.skip(f"bitsandbytes {bnb.__version__} (torch {torch.__version__}, CPU capability "
                    f"{torch.backends.cpu.get_cpu_capability()}) is wrong here, so it cannot be the reference: "
                    + "; ".join(f"{f}: {why}" for f, why in wrong.items()))
    return bnb
