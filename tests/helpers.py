"""Shared test tools: the PEFT and bitsandbytes references and their skips, and small fixtures.

The per-dtype tolerances, the comparison that explains itself and the PEFT layer builder live in
:mod:`lora_kernels.testing` (stated and justified once there, shared with ``python -m lora_kernels.check``
and the benchmarks); they are re-exported here so that tests keep importing them from ``helpers``.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import pytest
import torch

from lora_kernels.testing import TOLERANCES, assert_close, make_peft_linear, relative_error  # noqa: F401


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
