"""Shared test tools: the tiny models every test file builds, the adapter files and bad inputs the loader
and CLI tests share, the PEFT and bitsandbytes references and their skips.

Tiny models, one per kind: :class:`TinyLM` (a toy language model of plain ``nn.Linear`` layers, for the
library's model-level code), :func:`tiny_minimind` (a random MiniMind) with :func:`save_tiny_base` (the
trainer's base file), and :func:`tiny_transformers` (a Hugging Face Llama / Qwen2 / Qwen3). Each takes its
seed and config overrides as arguments, so every test builds exactly what it built before.

The per-dtype tolerances, the comparison that explains itself and the PEFT layer builder live in
:mod:`lora_kernels.testing` (stated and justified once there, shared with ``python -m lora_kernels.check``
and the benchmarks); they are re-exported here so that tests keep importing them from ``helpers``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_kernels import (
    iter_lora_layers,
    load_lora,
    load_peft_adapter,
    lora_state_dict,
    replace_linear_with_fused_lora,
    save_lora,
    save_peft_adapter,
)
from lora_kernels.testing import TOLERANCES, assert_close, make_peft_linear, relative_error  # noqa: F401
from minimind.checkpoint import load_minimind, save_minimind
from minimind.lora_io import save_minimind_lora
from minimind.model import MiniMindConfig, MiniMindForCausalLM

ROOT = Path(__file__).resolve().parents[1]  # the repository root (a subprocess's cwd and PYTHONPATH)
# MiniMind's real checkpoints, logits and tokenizers, from the shared fixtures checkout beside the repository
MINIMIND_FIXTURES = ROOT.parent / "shared/fixtures/minimind"


needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None
                                or importlib.util.find_spec("transformers") is None,
                                reason="peft and transformers are needed")


# ----------------------------------------------------------------- tiny models

D, F_, V = 16, 40, 50  # TinyLM's width, FFN width and vocabulary


class Block(nn.Module):
    """One TinyLM layer: square (q, o), non-square (k: D -> 8), biased (o, up, down) linears and a norm."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(D, D, bias=False), nn.Linear(D, 8, bias=False)
        self.o_proj = nn.Linear(D, D)
        self.up_proj, self.down_proj = nn.Linear(D, F_), nn.Linear(F_, D)
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        h = self.norm(x)
        h = x + self.o_proj(self.q_proj(h)) + self.k_proj(h).sum(-1, keepdim=True)
        return h + self.down_proj(torch.relu(self.up_proj(h)))


class TinyLM(nn.Module):
    """A toy language model of two :class:`Block` layers, its head tied to the embedding unless ``tied=False``."""

    def __init__(self, tied=True):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(D, V, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def base_model():
    """The TinyLM of seed 100, in eval mode: the base the adapter-file tests load into."""
    torch.manual_seed(100)
    return TinyLM().eval()


def adapted_model(seed=0, **kwargs):
    """:func:`base_model` with LoRA on every linear (rank 4, alpha 8 unless ``kwargs`` say otherwise), A and B
    drawn from N(0, 0.3) under ``seed``; eval mode."""
    model = base_model()
    torch.manual_seed(seed)
    replace_linear_with_fused_lora(model, **{"rank": 4, "alpha": 8, "target_modules": "all-linear", **kwargs})
    for p in lora_state_dict(model).values():
        p.normal_(0, 0.3)
    return model.eval()


def dora_model(seed=0, **kwargs):
    """:func:`adapted_model` with DoRA adapters: A and B drawn as there, each magnitude m the row norms
    ‖W + s·B·A‖ times U(0.5, 1.5) per row under ``seed``, so that m is not what a fresh layer would compute."""
    model = adapted_model(seed, use_dora=True, **kwargs)
    g = torch.Generator().manual_seed(seed)
    for _, layer in iter_lora_layers(model):
        for name in layer.adapter_names:
            layer.reset_lora_magnitude(name)
            magnitude = layer.lora_magnitude_of(name)
            with torch.no_grad():
                magnitude.mul_(torch.rand(magnitude.shape, generator=g) + 0.5)
    return model


def tiny_minimind(arch="minimind2", use_moe=False, seed=0, **overrides) -> MiniMindForCausalLM:
    """A random MiniMind (hidden 32, 2 layers, 4 query / 2 kv heads, vocabulary 97) drawn under ``seed``, eval
    mode; ``overrides`` replace config fields."""
    torch.manual_seed(seed)
    cfg = dict(arch=arch, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=97, use_moe=use_moe, max_position_embeddings=64)
    return MiniMindForCausalLM(MiniMindConfig(**{**cfg, **overrides})).eval()


# The trainer's base: MiniMind's head layout (8 query heads, 2 kv heads), so that a .pth without a stored
# config reads back, one layer, and the tokenizer's vocabulary.
TRAINER_BASE = dict(num_hidden_layers=1, num_attention_heads=8, vocab_size=MiniMindConfig.vocab_size)


def save_tiny_base(path, **overrides):
    """Save :func:`tiny_minimind` with :data:`TRAINER_BASE` (and ``overrides``) as a base file at ``path``."""
    save_minimind(tiny_minimind(**{**TRAINER_BASE, **overrides}), path)
    return path


TRANSFORMERS_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, head_dim=8)


def tiny_transformers(family="llama", **overrides):
    """A random Hugging Face causal LM of ``family`` (``"llama"``, ``"qwen2"``, ``"qwen3"``) built offline from
    :data:`TRANSFORMERS_TINY` (and ``overrides``) under seed 0, in fp32 (train mode, as transformers builds it);
    skips the test without transformers."""
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**TRANSFORMERS_TINY, **overrides})).float()


def tiny_llama():
    """The tiny Llama the PEFT interoperability tests train (intermediate 64, 32 positions), eval mode."""
    return tiny_transformers("llama", vocab_size=64, intermediate_size=64, max_position_embeddings=32).eval()


# ----------------------------------------------------------------- the trainer's files


QUESTIONS = ["Who are you?", "你是谁？", "What is your name?", "介绍一下你自己。", "Tell me about yourself.",
             "What can you do?", "Where do you come from?", "Hello!"]


def write_data(path, n=24):
    """``n`` identity conversations (a question, "I am Lumen number i, ...") as SFT JSONL at ``path``."""
    rows = [{"conversations": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"},
                               {"role": "assistant", "content": f"I am Lumen number {i}, fine-tuned with LoRA."}]}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def args_for(tiny, out, *extra):
    """The trainer's argv for a few quick CPU steps over the ``tiny`` fixture's base and data into ``out``."""
    return ["--base", str(tiny / "base.safetensors"), "--data_path", str(tiny / "data.jsonl"),
            "--out_dir", str(out), "--batch_size", "4", "--max_seq_len", "40", "--log_interval", "1",
            "--learning_rate", "2e-2", "--rank", "4", "--answers", "0", "--no_progress", "--device", "cpu", *extra]


def adapter(out):
    """The tensors of the adapter a run saved under ``out/lora``."""
    return load_file(str(next((Path(out) / "lora").glob("*.safetensors"))))


def losses(metrics_file):
    """The per-step losses of a run's metrics file."""
    return [json.loads(line)["loss"] for line in Path(metrics_file).read_text().splitlines()]


# ----------------------------------------------------------------- bad inputs: files the loader and CLI tests share
#
# Each builder makes a valid file first, then breaks one thing in it; the checks assert the exception (or exit
# status 2 and exactly one line on stderr), that the message names the offending value, field or file, and,
# for loaders, that the model is unchanged afterwards (every state_dict tensor and every module type).

Q0 = "layers.0.q_proj"


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass whose forward differs from nn.Linear's."""

    def forward(self, x):
        return super().forward(x) * 2.0


def model_with_custom_linear():
    """:func:`base_model` with ``layers.0.q_proj`` a :class:`ScaledLinear` of the same weight."""
    model = base_model()
    custom = ScaledLinear(D, D, bias=False)
    custom.load_state_dict(model.layers[0].q_proj.state_dict())
    model.layers[0].q_proj = custom
    return model


def snapshot(model):
    """(a copy of every state_dict tensor, the type of every module) of ``model``."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def assert_unchanged(model, before):
    """``model`` has the module types and state_dict tensors of :func:`snapshot`'s ``before``."""
    state, types = before
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"changed by a failed load: {changed}"


def lk_file(tmp_path, name="a.safetensors", meta=None, tensors=None, model=adapted_model):
    """A lora_kernels adapter file of ``model()`` (adapted_model(); dora_model() for a DoRA file), with its
    metadata / tensors edited by the callables."""
    path = tmp_path / name
    save_lora(model(), path)
    if meta is None and tensors is None:
        return path
    with safe_open(str(path), framework="pt") as f:
        data, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    if meta is not None:
        layers = json.loads(metadata["layers"])
        meta(layers, metadata)
        metadata["layers"] = metadata.get("layers_raw", json.dumps(layers))
        metadata.pop("layers_raw", None)
    if tensors is not None:
        tensors(data)
    save_file(data, str(path), metadata=metadata)
    return path


def set_layer(name, field, value):
    def edit(layers, metadata):
        layers[name][field] = value
    return edit


def truncated(path):
    """Cut the file at ``path`` to its first half."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


class Payload:
    """Pickles to a call of os.system: what an attacker's checkpoint holds."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def pickled_payload(path):
    """A .pth at ``path`` whose unpickling would run :class:`Payload`."""
    with open(path, "wb") as f:
        pickle.dump({"layers.0.q_proj.lora_A": Payload()}, f)
    return path


def peft_dir(tmp_path, config=None, tensors=None):
    """A PEFT adapter directory of adapted_model(), with its config / tensors edited by the callables."""
    directory = tmp_path / "peft"
    save_peft_adapter(adapted_model(), directory)
    if config is not None:
        path = directory / "adapter_config.json"
        data = json.loads(path.read_text())
        data = config(data) or data
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    if tensors is not None:
        path = directory / "adapter_model.safetensors"
        with safe_open(str(path), framework="pt") as f:
            data = {k: f.get_tensor(k) for k in f.keys()}
        tensors(data)
        save_file(data, str(path))
    return directory


def set_config(**fields):
    return lambda config: config.update(fields)


def nan_at(key):
    def edit(data):
        data[key] = data[key].clone()
        data[key][0, 0] = float("nan")
    return edit



# Loader cases: (case id, build(tmp_path) -> (model, load), exception, words the message must contain)


def load_file_into_base(build_path, loader=load_lora, model=base_model):
    """A case: ``loader(model(), build_path(tmp_path))``."""
    def build(tmp_path):
        path = build_path(tmp_path)
        return model(), lambda m: loader(m, path)
    return build


def load_file_into_adapted(build_path):
    """A case loading into a model that already has adapters (other A, B and alpha)."""
    return load_file_into_base(build_path, model=lambda: adapted_model(seed=5))


def load_peft(build_dir):
    """A case: ``load_peft_adapter(base_model(), build_dir(tmp_path))``."""
    return load_file_into_base(build_dir, loader=load_peft_adapter)


def minimind_file(tensors):
    """A MiniMind-format .pth of adapted_model(), its tensors edited by the callable."""
    def build(tmp_path):
        path = tmp_path / "mm.pth"
        save_minimind_lora(adapted_model(), path)
        data = torch.load(path, weights_only=True)
        tensors(data)
        torch.save(data, path)
        return path
    return build


def assert_load_refused(tmp_path, build, exception, words):
    """Run a loader case: the load raises ``exception``, its message holds every one of ``words``, and the
    model is as it was."""
    model, load = build(tmp_path)
    before = snapshot(model)
    with pytest.raises(exception) as err:
        load(model)
    message = str(err.value)
    assert all(word in message for word in words), message
    assert_unchanged(model, before)


# The command-line tools: bad input ends with exit status 2 and one line on stderr (minimind.cli's error path)


def assert_one_line_error(tool, args, capsys, words):
    """``tool.main(args)`` returns 2 and writes one ``error:`` line to stderr holding every one of ``words``."""
    capsys.readouterr()
    assert tool.main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err
    assert all(word in lines[0] for word in words), lines[0]


def nan_adapter(tmp_path):
    """A rank-2 adapter of the bundled MiniMind with a NaN in one lora_B (tmp_path / "nan.safetensors")."""
    model = load_minimind()
    replace_linear_with_fused_lora(model, rank=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.fill_(float("nan"))
    path = tmp_path / "nan.safetensors"
    save_lora(model, path)
    return path


def minimind_adapter(tmp_path, name="adapter.safetensors", targets="square"):
    """A rank-2 adapter of the bundled MiniMind, B drawn non-zero: (its path, the adapted model)."""
    model = load_minimind()
    torch.manual_seed(0)
    replace_linear_with_fused_lora(model, rank=2, target_modules=targets)
    for p in lora_state_dict(model).values():
        p.normal_(0, 0.05)
    path = tmp_path / name
    save_lora(model, path)
    return path, model


def garbage(tmp_path, name, data=b"\x00garbage{"):
    """A file of ``data`` (no format at all by default) at tmp_path / name."""
    path = tmp_path / name
    path.write_bytes(data)
    return path


def tokenizer_dir(tmp_path):
    """A tokenizer folder whose tokenizer.json is truncated JSON."""
    (tmp_path / "tok").mkdir()
    garbage(tmp_path / "tok", "tokenizer.json", b'{"model": 12')
    return tmp_path / "tok"


# ----------------------------------------------------------------- PEFT references


def two_peft_adapters(tmp_path, up_rank: Optional[int] = None):
    """A tiny transformers Llama with two PEFT LoRA adapters (``"default"`` on q/v, ``"tr"`` with rsLoRA on
    v/up, ``up_proj`` at rank ``up_rank`` when given), B drawn non-zero, saved by PEFT under
    ``tmp_path / "peft"``, and a copy of the base with both loaded by ``load_peft_adapter``.

    Returns:
        ``(base, peft_model, ours)``, all in eval mode.
    """
    import copy

    from peft import LoraConfig, get_peft_model

    from lora_kernels import load_peft_adapter

    base = tiny_transformers("llama").eval()
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
