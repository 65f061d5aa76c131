"""Bad inputs across the API, the adapter files and the chat / merge_lora / pretrain CLIs.

Each case asserts the exception type (or exit status 2 and exactly one line on stderr), that the message
names the offending value, field or file, and, for loaders, that the model is unchanged afterwards
(every state_dict tensor and every module type compared before and after).
"""
import errno
import io
import json
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from lora_kernels import (
    FusedLoRALinear,
    load_lora,
    load_peft_adapter,
    lora_state_dict,
    replace_linear_with_fused_lora,
    save_lora,
    save_peft_adapter,
)
from minimind import chat, merge_lora, pretrain, train_tokenizer
from minimind.dataset import NoTrainableTokensError, SFTDataset
from minimind.lora_io import load_minimind_lora, save_minimind_lora
from minimind.checkpoint import BUNDLED_BASE, load_minimind
from minimind.tokenizer import MiniMindTokenizer
from test_replace import D, TinyLM

IDS = torch.arange(10).view(2, 5)


# ---------------------------------------------------------------------------------------------------
# Models and files


def base_model():
    torch.manual_seed(100)
    return TinyLM().eval()


def adapted_model(seed=0):
    model = base_model()
    torch.manual_seed(seed)
    replace_linear_with_fused_lora(model, rank=4, alpha=8, target_modules="all-linear")
    for p in lora_state_dict(model).values():
        p.normal_(0, 0.3)
    return model.eval()


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass whose forward differs from nn.Linear's."""

    def forward(self, x):
        return super().forward(x) * 2.0


def model_with_custom_linear():
    model = base_model()
    custom = ScaledLinear(D, D, bias=False)
    custom.load_state_dict(model.layers[0].q_proj.state_dict())
    model.layers[0].q_proj = custom
    return model


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def assert_unchanged(model, before):
    state, types = before
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"changed by a failed load: {changed}"


def lk_file(tmp_path, name="a.safetensors", meta=None, tensors=None):
    """A lora_kernels adapter file of adapted_model(), with its metadata / tensors edited by the callables."""
    path = tmp_path / name
    save_lora(adapted_model(), path)
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
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def pickled_payload(path):
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


# ---------------------------------------------------------------------------------------------------
# Loaders: (case id, build(tmp_path) -> (model, load), exception, words the message must contain)

Q0 = "layers.0.q_proj"
PEFT_A = "base_model.model.layers.1.up_proj.lora_A.weight"


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
    return load_file_into_base(build_dir, loader=load_peft_adapter)


def minimind_file(tensors):
    def build(tmp_path):
        path = tmp_path / "mm.pth"
        save_minimind_lora(adapted_model(), path)
        data = torch.load(path, weights_only=True)
        tensors(data)
        torch.save(data, path)
        return path
    return build


LOADER_CASES = [
    ("missing file", load_file_into_base(lambda t: t / "nope.safetensors"), FileNotFoundError, ["nope.safetensors"]),
    ("directory instead of a file", load_file_into_base(lambda t: t), FileNotFoundError, ["not a file"]),
    ("truncated safetensors", load_file_into_base(lambda t: truncated(lk_file(t))), ValueError,
     ["a.safetensors", "cannot read"]),
    ("truncated pth", load_file_into_base(lambda t: truncated(lk_file(t, "a.pth"))), ValueError, ["a.pth"]),
    ("pickle payload", load_file_into_base(lambda t: pickled_payload(t / "evil.pth")), ValueError,
     ["evil.pth", "weights_only"]),
    ("garbage bytes", load_file_into_base(lambda t: (t / "g.pt").write_bytes(b"not a tensor file" * 9) and t / "g.pt"),
     ValueError, ["g.pt"]),
    ("NaN in lora_B", load_file_into_base(lambda t: lk_file(t, tensors=nan_at(f"{Q0}.lora_B"))), ValueError,
     [f"{Q0}.lora_B", "non-finite", "a.safetensors"]),
    ("inf in lora_A", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d[f"{Q0}.lora_A"].fill_(float("inf")))), ValueError, [f"{Q0}.lora_A", "non-finite"]),
    ("integer tensor", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d.update({f"{Q0}.lora_A": d[f"{Q0}.lora_A"].long()}))), ValueError,
     [f"{Q0}.lora_A", "torch.int64"]),
    ("metadata layers not JSON", load_file_into_base(lambda t: lk_file(
        t, meta=lambda layers, m: m.update(layers_raw="{oops"))), ValueError, ["'layers'", "not valid JSON"]),
    ("metadata layers a list", load_file_into_base(lambda t: lk_file(
        t, meta=lambda layers, m: m.update(layers_raw="[1, 2]"))), ValueError, ["'layers'", "list"]),
    ("dropout 5.0 on layer 1 only", load_file_into_base(lambda t: lk_file(
        t, meta=set_layer("layers.1.up_proj", "dropout", 5.0))), ValueError, ["layers.1.up_proj", "dropout", "5.0"]),
    ("alpha NaN", load_file_into_base(lambda t: lk_file(t, meta=set_layer(Q0, "alpha", float("nan")))), ValueError,
     [Q0, "alpha", "nan"]),
    ("alpha 0 into existing layers", load_file_into_adapted(lambda t: lk_file(t, meta=set_layer(Q0, "alpha", 0))),
     ValueError, [Q0, "alpha", "got 0"]),
    ("alpha negative into existing layers", load_file_into_adapted(lambda t: lk_file(
        t, meta=set_layer("layers.1.o_proj", "alpha", -8))), ValueError, ["layers.1.o_proj", "alpha", "-8"]),
    ("use_rslora as a string", load_file_into_adapted(lambda t: lk_file(t, meta=set_layer(Q0, "use_rslora", "false"))),
     ValueError, [Q0, "use_rslora", "'false'"]),
    ("rank as a string", load_file_into_base(lambda t: lk_file(t, meta=set_layer(Q0, "rank", "4"))), ValueError,
     [Q0, "rank", "'4'"]),
    ("rank contradicting lora_A", load_file_into_base(lambda t: lk_file(t, meta=set_layer(Q0, "rank", 16))), ValueError,
     [Q0, "rank", "16"]),
    ("layer settings not an object", load_file_into_base(lambda t: lk_file(
        t, meta=lambda layers, m: layers.update({Q0: [4, 8]}))), ValueError, [Q0, "[4, 8]"]),
    ("newer format_version", load_file_into_base(lambda t: lk_file(
        t, meta=lambda layers, m: m.update(format_version="7"))), ValueError, ["format_version", "'7'"]),
    ("unexpected key", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d.update({"layers.0.q_proj.weight": torch.zeros(D, D)}))), ValueError,
     ["layers.0.q_proj.weight"]),
    ("lora_A without lora_B", load_file_into_base(lambda t: lk_file(t, tensors=lambda d: d.pop(f"{Q0}.lora_B"))),
     ValueError, [Q0, "without"]),
    ("wrong shape", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d.update({f"{Q0}.lora_A": torch.zeros(4, D + 1)}))), ValueError, [Q0, "(4, 17)"]),
    ("module not in the model", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d.update({"layers.7.q_proj.lora_A": torch.zeros(4, D),
                                       "layers.7.q_proj.lora_B": torch.zeros(D, 4)}))), ValueError,
     ["layers.7.q_proj", "no such module"]),
    ("adapter on an embedding", load_file_into_base(lambda t: lk_file(
        t, tensors=lambda d: d.update({"embed.lora_A": torch.zeros(4, D), "embed.lora_B": torch.zeros(D, 4)}))),
     ValueError, ["embed", "Embedding"]),
    ("nn.Linear subclass with its own forward", lambda t: (model_with_custom_linear(), lambda m: load_lora(
        m, lk_file(t))), ValueError, [Q0, "ScaledLinear", "allow_custom_forward"]),
    ("pth metadata not strings", load_file_into_base(lambda t: torch.save(
        {"tensors": lora_state_dict(adapted_model()), "metadata": {"layers": 5}}, t / "m.pth") or t / "m.pth"),
     ValueError, ["m.pth", "metadata"]),
    # PEFT adapter directories
    ("PEFT config missing", load_peft(lambda t: t), FileNotFoundError, ["adapter_config.json"]),
    ("PEFT config not JSON", load_peft(lambda t: peft_dir(t, config=lambda c: "{r: 4")), ValueError,
     ["adapter_config.json", "not valid JSON"]),
    ("PEFT config a list", load_peft(lambda t: peft_dir(t, config=lambda c: [c])), ValueError,
     ["adapter_config.json", "list"]),
    ('PEFT r "16"', load_peft(lambda t: peft_dir(t, config=set_config(r="4"))), ValueError,
     ["adapter_config.json", "r must be an integer >= 1", "'4'"]),
    ("PEFT r 0", load_peft(lambda t: peft_dir(t, config=set_config(r=0))), ValueError, ["r must be", "got 0"]),
    ("PEFT lora_alpha NaN", load_peft(lambda t: peft_dir(t, config=set_config(lora_alpha=float("nan")))), ValueError,
     ["lora_alpha", "nan"]),
    ("PEFT lora_alpha 0", load_peft(lambda t: peft_dir(t, config=set_config(lora_alpha=0))), ValueError,
     ["lora_alpha", "got 0"]),
    ("PEFT lora_alpha null", load_peft(lambda t: peft_dir(t, config=set_config(lora_alpha=None))), ValueError,
     ["lora_alpha", "None"]),
    ('PEFT use_rslora "false"', load_peft(lambda t: peft_dir(t, config=set_config(use_rslora="false"))), ValueError,
     ["use_rslora", "'false'"]),
    ("PEFT lora_dropout 5", load_peft(lambda t: peft_dir(t, config=set_config(lora_dropout=5))), ValueError,
     ["lora_dropout", "5"]),
    ("PEFT bad alpha_pattern entry on one layer", load_peft(lambda t: peft_dir(
        t, config=set_config(alpha_pattern={"layers.1.q_proj": "x"}))), ValueError,
     ["alpha_pattern['layers.1.q_proj']", "'x'"]),
    ("PEFT negative rank_pattern entry", load_peft(lambda t: peft_dir(
        t, config=set_config(rank_pattern={"up_proj": -4}))), ValueError, ["rank_pattern['up_proj']", "-4"]),
    ("PEFT rank_pattern a list", load_peft(lambda t: peft_dir(t, config=set_config(rank_pattern=["q_proj"]))),
     ValueError, ["rank_pattern must be an object"]),
    ("PEFT hostile rank_pattern key", load_peft(lambda t: peft_dir(
        t, config=set_config(rank_pattern={"(.*.*.*)*X": 4}))), ValueError, ["rank_pattern", "(.*.*.*)*X"]),
    ("PEFT invalid regex key", load_peft(lambda t: peft_dir(t, config=set_config(alpha_pattern={"q_(proj": 2}))),
     ValueError, ["q_(proj", "regular expression"]),
    ("PEFT other peft_type", load_peft(lambda t: peft_dir(t, config=set_config(peft_type="IA3"))), ValueError,
     ["peft_type", "IA3"]),
    ("PEFT DoRA", load_peft(lambda t: peft_dir(t, config=set_config(use_dora=True))), ValueError, ["DoRA"]),
    ("PEFT weights missing", load_peft(lambda t: (peft_dir(t) / "adapter_model.safetensors").unlink()
                                       or t / "peft"), FileNotFoundError, ["adapter_model.safetensors"]),
    ("PEFT truncated weights", load_peft(lambda t: truncated(peft_dir(t) / "adapter_model.safetensors").parent),
     ValueError, ["adapter_model.safetensors"]),
    ("PEFT NaN weight", load_peft(lambda t: peft_dir(t, tensors=nan_at(PEFT_A))), ValueError, [PEFT_A, "non-finite"]),
    ("PEFT rank contradicting r", load_peft(lambda t: peft_dir(t, config=set_config(r=2))), ValueError,
     ["rank 4", "the config says 2"]),
    # MiniMind's format
    ("MiniMind NaN adapter", load_file_into_base(minimind_file(nan_at("layers.0.q_proj.lora.A.weight")),
                                                 loader=load_minimind_lora), ValueError,
     ["mm.pth", "layers.0.q_proj.lora.A.weight", "non-finite"]),
    ("MiniMind pickle payload", load_file_into_base(lambda t: pickled_payload(t / "mm.pth"), loader=load_minimind_lora),
     ValueError, ["mm.pth", "weights_only"]),
]


@pytest.mark.parametrize("build,exception,words", [c[1:] for c in LOADER_CASES], ids=[c[0] for c in LOADER_CASES])
def test_loader_refuses_and_changes_nothing(tmp_path, build, exception, words):
    model, load = build(tmp_path)
    before = snapshot(model)
    with pytest.raises(exception) as err:
        load(model)
    message = str(err.value)
    assert all(word in message for word in words), message
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------------
# The API: (case id, call, exception, words)

@pytest.fixture
def long_prompt_data(tmp_path):
    """SFT data whose answers all start after token 8 (tmp_path / "long_prompts.jsonl")."""
    path = tmp_path / "long_prompts.jsonl"
    rows = [{"conversations": [{"role": "user", "content": "please tell me a long story " * 4},
                               {"role": "assistant", "content": "ok"}]}] * 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


API_CASES = [
    ("rank 0", lambda t: FusedLoRALinear(4, 4, rank=0), ValueError, ["rank", "got 0"]),
    ("alpha NaN", lambda t: FusedLoRALinear(4, 4, rank=2, alpha=float("nan")), ValueError, ["alpha", "nan"]),
    ("dropout 1", lambda t: FusedLoRALinear(4, 4, rank=2, dropout=1.0), ValueError, ["dropout", "1.0"]),
    ("from_linear on a subclass with its own forward",
     lambda t: FusedLoRALinear.from_linear(ScaledLinear(4, 4), rank=2), TypeError,
     ["ScaledLinear", "allow_custom_forward"]),
    ("from_linear on a conv", lambda t: FusedLoRALinear.from_linear(nn.Conv1d(4, 4, 1), rank=2), TypeError,
     ["Conv1d"]),
    ("SFT data whose answers are all cut",
     lambda t: SFTDataset(t / "long_prompts.jsonl", MiniMindTokenizer.from_pretrained(), max_seq_len=8),
     NoTrainableTokensError, ["long_prompts.jsonl", "max_seq_len=8"]),
]


@pytest.mark.parametrize("call,exception,words", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses(tmp_path, long_prompt_data, call, exception, words):
    with pytest.raises(exception) as err:
        call(tmp_path)
    assert all(word in str(err.value) for word in words), str(err.value)


def test_replace_refuses_a_custom_forward_without_changing_the_model():
    model = model_with_custom_linear()
    before = snapshot(model)
    with torch.no_grad():
        expected = model(IDS)
    with pytest.raises(TypeError, match="layers.0.q_proj: ScaledLinear.*allow_custom_forward"):
        replace_linear_with_fused_lora(model, rank=2, target_modules="square")
    assert_unchanged(model, before)
    # Opting in wraps it (and drops its forward, as the message says); excluding it leaves its outputs alone.
    replace_linear_with_fused_lora(model, rank=2, target_modules="square", exclude_modules=[Q0])
    with torch.no_grad():
        assert torch.equal(model(IDS), expected)
    opted = replace_linear_with_fused_lora(model_with_custom_linear(), rank=2, target_modules=[Q0],
                                           allow_custom_forward=True)
    assert isinstance(opted.layers[0].q_proj, FusedLoRALinear)


# ---------------------------------------------------------------------------------------------------
# The CLIs, in-process: (case id, tool, argv builder, words the single stderr line must contain)


def nan_adapter(tmp_path):
    model = load_minimind()
    replace_linear_with_fused_lora(model, rank=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.fill_(float("nan"))
    path = tmp_path / "nan.safetensors"
    save_lora(model, path)
    return path


def minimind_adapter(tmp_path, name="adapter.safetensors", targets="square"):
    model = load_minimind()
    torch.manual_seed(0)
    replace_linear_with_fused_lora(model, rank=2, target_modules=targets)
    for p in lora_state_dict(model).values():
        p.normal_(0, 0.05)
    path = tmp_path / name
    save_lora(model, path)
    return path, model


def garbage(tmp_path, name, data=b"\x00garbage{"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def base_copy(tmp_path, name="base.safetensors"):
    path = tmp_path / name
    path.write_bytes(BUNDLED_BASE.read_bytes())
    return path


def tokenizer_dir(tmp_path):
    (tmp_path / "tok").mkdir()
    garbage(tmp_path / "tok", "tokenizer.json", b'{"model": 12')
    return tmp_path / "tok"


def wrong_model_adapter(tmp_path):
    path = tmp_path / "other.safetensors"
    save_lora(adapted_model(), path)
    return path


PROMPT = ["--prompt", "hi", "--max-new-tokens", "4", "--temperature", "0"]
CLI_CASES = [
    ("chat missing --lora", chat, lambda t: ["--lora", "/missing/file.pth", *PROMPT], ["--lora", "/missing/file.pth"]),
    ("chat --top-p 0", chat, lambda t: ["--top-p", "0", *PROMPT], ["--top-p", "0"]),
    ("chat --top-p 1.5", chat, lambda t: ["--top-p", "1.5", *PROMPT], ["--top-p", "1.5"]),
    ("chat --repetition-penalty 0", chat, lambda t: ["--repetition-penalty", "0", *PROMPT],
     ["--repetition-penalty", "0"]),
    ("chat --temperature nan", chat, lambda t: [*PROMPT, "--temperature", "nan"], ["--temperature", "nan"]),
    ("chat --temperature -1", chat, lambda t: [*PROMPT, "--temperature", "-1"], ["--temperature", "-1"]),
    ("chat --top-k -1", chat, lambda t: ["--top-k", "-1", *PROMPT], ["--top-k", "-1"]),
    ("chat --prompt not UTF-8", chat, lambda t: ["--prompt", "\udcff hi", "--max-new-tokens", "4"],
     ["--prompt", "not UTF-8"]),
    ("chat --max-new-tokens abc", chat, lambda t: ["--prompt", "hi", "--max-new-tokens", "abc"],
     ["--max-new-tokens", "abc"]),
    ("chat --max-new-tokens = context", chat, lambda t: ["--prompt", "hi", "--max-new-tokens", "256"],
     ["--max-new-tokens 256", "context is 256"]),
    ("chat truncated --weights", chat, lambda t: ["--weights", str(truncated(base_copy(t))), *PROMPT],
     ["--weights", "base.safetensors"]),
    ("chat pickled --weights", chat, lambda t: ["--weights", str(pickled_payload(t / "w.pth")), *PROMPT],
     ["--weights", "w.pth", "weights_only"]),
    ("chat garbage --tokenizer", chat, lambda t: ["--tokenizer", str(tokenizer_dir(t)), *PROMPT],
     ["--tokenizer", "tokenizer.json"]),
    ("chat NaN --lora", chat, lambda t: ["--lora", str(nan_adapter(t)), *PROMPT], ["nan.safetensors", "non-finite"]),
    ("chat --lora for another model", chat, lambda t: ["--lora", str(wrong_model_adapter(t)), *PROMPT],
     ["other.safetensors", "layers.0.q_proj"]),
    ("merge_lora truncated adapter", merge_lora,
     lambda t: ["--base", str(BUNDLED_BASE), "--lora", str(truncated(minimind_adapter(t)[0])),
                "--out", str(t / "m.pth")], ["--lora", "adapter.safetensors"]),
    ("merge_lora NaN adapter", merge_lora,
     lambda t: ["--base", str(BUNDLED_BASE), "--lora", str(nan_adapter(t)), "--out", str(t / "m.pth")],
     ["nan.safetensors", "non-finite"]),
    ("merge_lora missing base", merge_lora,
     lambda t: ["--base", str(t / "none.pth"), "--lora", str(minimind_adapter(t)[0]), "--out", str(t / "m.pth")],
     ["--base", "none.pth"]),
    ("merge_lora pickled adapter", merge_lora,
     lambda t: ["--base", str(BUNDLED_BASE), "--lora", str(pickled_payload(t / "evil.pth")), "--out", str(t / "m.pth")],
     ["evil.pth", "weights_only"]),
    ("merge_lora --dtype int8", merge_lora,
     lambda t: ["--base", "b", "--lora", "l", "--out", "o", "--dtype", "int8"], ["--dtype", "int8"]),
    ("merge_lora unwritable --out", merge_lora,
     lambda t: ["--base", str(BUNDLED_BASE), "--lora", str(minimind_adapter(t)[0]),
                "--out", str(garbage(t, "file") / "sub" / "m.pth")], ["could not write", "m.pth"]),
    ("pretrain --lr nan", pretrain, lambda t: ["--lr", "nan"], ["--lr", "nan"]),
    ("pretrain --batch-size 0", pretrain, lambda t: ["--batch-size", "0"], ["--batch-size", "0"]),
    ("pretrain --steps -1", pretrain, lambda t: ["--steps", "-1"], ["--steps", "-1"]),
    ("pretrain missing --data", pretrain, lambda t: ["--data", str(t / "none.jsonl"), "--out", str(t / "o.safetensors")],
     ["--data", "none.jsonl"]),
    ("pretrain garbage --tokenizer", pretrain, lambda t: ["--tokenizer", str(tokenizer_dir(t))],
     ["--tokenizer", "tokenizer.json"]),
    ("pretrain malformed --data line", pretrain,
     lambda t: ["--data", str(garbage(t, "d.jsonl", b'{"text": "ok"}\n{oops\n')), "--out", str(t / "o.safetensors")],
     ["d.jsonl:2", "invalid JSON"]),
    ("pretrain answers cut by --max-seq-len", pretrain,
     lambda t: ["--steps", "0", "--sft-data", str(t / "long_prompts.jsonl"), "--max-seq-len", "8", "--out", str(t / "o.safetensors")],
     ["long_prompts.jsonl", "max_seq_len=8"]),
    ("pretrain --init pickle payload", pretrain,
     lambda t: ["--init", str(pickled_payload(t / "init.pth")), "--out", str(t / "o.safetensors")],
     ["--init", "init.pth"]),
    ("train_tokenizer --vocab-size 10", train_tokenizer, lambda t: ["--vocab-size", "10", "--out", str(t / "tok")],
     ["--vocab-size", "10"]),
    ("train_tokenizer missing --data", train_tokenizer,
     lambda t: ["--data", str(t / "none.jsonl"), "--out", str(t / "tok")], ["--data", "none.jsonl"]),
]


@pytest.mark.parametrize("tool,argv,words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_status_2(tmp_path, capsys, long_prompt_data, tool, argv, words):
    args = argv(tmp_path)
    capsys.readouterr()
    assert tool.main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err
    assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # Python's stdin uses either, by locale
def test_chat_non_utf8_stdin(monkeypatch, capsys, errors):
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe hello\n"), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    assert chat.main(["--temperature", "0", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "standard input is not UTF-8" in err[0], err


def test_chat_non_utf8_stdin_subprocess(tmp_path):
    """The real thing once: bytes that are not UTF-8 piped into python -m minimind.chat."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                         os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "minimind.chat", "--max-new-tokens", "4"], input=b"\xff\xfe hi\n",
                          capture_output=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr.decode(errors="replace")
    err = done.stderr.decode(errors="replace").strip().splitlines()
    assert len(err) == 1 and "standard input is not UTF-8" in err[0], err


def test_chat_ctrl_c_is_130(monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "reply", interrupt)
    assert chat.main(PROMPT) == 130


def test_chat_unexpected_errors_keep_their_traceback(monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(chat, "reply", bug)
    with pytest.raises(ZeroDivisionError):
        chat.main(PROMPT)


def test_chat_shortens_the_answer_not_the_prompt(monkeypatch, capsys):
    seen = {}

    def fake_generate(model, ids, max_new_tokens, **kwargs):
        seen.update(prompt=ids[0].tolist(), max_new_tokens=max_new_tokens)
        return iter(())

    monkeypatch.setattr(chat, "stream_generate", fake_generate)
    question = "tell me everything about pandas " * 20
    assert chat.main(["--prompt", question, "--max-new-tokens", "200"]) == 0
    tokenizer = MiniMindTokenizer.from_pretrained()
    full = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True)
    assert 56 < len(full) < 256  # longer than 256 - 200 tokens, shorter than the context
    assert seen == {"prompt": full, "max_new_tokens": 256 - len(full)}
    assert f"limited to {256 - len(full)} new tokens" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# A full disk during merge_lora: exit 2, the earlier output byte-identical, no temporary file left


def full_disk_writer(kind):
    """A writer that writes part of the file, then fails as a full disk does, raising what ``kind`` raises."""
    def writer(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x00" * 1000)
        if kind == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if kind == "RuntimeError":  # torch.save's message
            raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed "
                               "writing file data/3: file write failed")
        import safetensors
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          "message: \"No space left on device\" })")
    return writer


@pytest.mark.parametrize("suffix,writer,kind", [
    (".safetensors", "safetensors.torch.save_file", "OSError"),
    (".safetensors", "safetensors.torch.save_file", "SafetensorError"),
    (".pth", "torch.save", "RuntimeError"),
    (".pth", "torch.save", "OSError"),
])
def test_merge_lora_full_disk_keeps_the_earlier_output(tmp_path, monkeypatch, capsys, suffix, writer, kind):
    adapter, _ = minimind_adapter(tmp_path)
    out = tmp_path / f"merged{suffix}"
    argv = ["--base", str(BUNDLED_BASE), "--lora", str(adapter), "--out", str(out)]
    assert merge_lora.main(argv) == 0
    earlier = out.read_bytes()
    monkeypatch.setattr(writer, full_disk_writer(kind))
    capsys.readouterr()
    assert merge_lora.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left on the device" in err and str(out) in err, err
    assert out.read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([adapter.name, out.name])


# ---------------------------------------------------------------------------------------------------
# Patterns that would make a backtracking regex engine hang


@pytest.mark.parametrize("key", ["(.*.*.*)*X", "(a+)+b", "(q|qq)*_proj", r"(\w+)\1", ".*.*.*.*X", "x" * 2000])
def test_hostile_rank_pattern_fails_within_a_second(tmp_path, key):
    directory = peft_dir(tmp_path, config=set_config(rank_pattern={key: 4}))
    model = base_model()
    before = snapshot(model)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="rank_pattern key"):
        load_peft_adapter(model, directory)
    assert time.perf_counter() - start < 1.0
    assert_unchanged(model, before)


def test_regex_patterns_peft_writes_still_apply(tmp_path):
    """The bound refuses only risky patterns: a real regex key still selects its layers."""
    model = base_model()
    torch.manual_seed(0)
    replace_linear_with_fused_lora(model, rank=4, alpha=8, target_modules="all-linear")
    save_peft_adapter(model, tmp_path / "p")
    config_path = tmp_path / "p" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["alpha_pattern"] = {r"layers\.1\..*_proj": 2}
    config_path.write_text(json.dumps(config))
    loaded = load_peft_adapter(base_model(), tmp_path / "p")
    assert loaded.layers[1].up_proj.alpha == 2 and loaded.layers[1].q_proj.alpha == 2
    assert loaded.layers[0].up_proj.alpha == 8


# ---------------------------------------------------------------------------------------------------
# Silent wrong results that are now right (or refused)


@torch.no_grad()
def test_merged_state_dict_counts_the_adapter_once():
    torch.manual_seed(0)
    layer = FusedLoRALinear(8, 6, rank=2)
    layer.lora_B.normal_()
    x = torch.randn(3, 8)
    expected = layer(x)
    for keep in (True, False):
        layer.merge(keep_original=keep)
        fresh = FusedLoRALinear(8, 6, rank=2)
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(fresh(x), expected)
        # Loading into a merged layer keeps it merged, with the loaded adapter.
        merged = FusedLoRALinear(8, 6, rank=2)
        merged.merge()
        merged.load_state_dict(layer.state_dict())
        assert merged.merged
        torch.testing.assert_close(merged(x), expected)
        merged.unmerge()
        torch.testing.assert_close(merged.weight, fresh.weight)
        layer.unmerge()


def test_unmerge_after_changing_b_restores_the_weight():
    torch.manual_seed(0)
    layer = FusedLoRALinear(8, 6, rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    original = layer.weight.detach().clone()
    layer.merge(keep_original=False)
    with torch.no_grad():
        layer.lora_B.mul_(3.0)
    layer.alpha = 5.0
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, atol=1e-6, rtol=0)


def test_training_a_merged_layer_warns_once():
    layer = FusedLoRALinear(8, 6, rank=2, freeze_base=False)  # a trained W: backward runs, LoRA gets nothing
    layer.merge()
    layer.train()
    with pytest.warns(UserWarning, match="no gradient.*unmerge"):
        layer(torch.randn(2, 8)).sum().backward()
    assert layer.lora_B.grad is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 8))  # once per layer
        layer.eval()
        layer(torch.randn(2, 8))


def test_merge_lora_on_a_tied_head_keeps_the_embedding():
    from lora_kernels import merge_lora as merge, unmerge_lora

    model = base_model()  # lm_head.weight is embed.weight
    embedding = model.embed.weight.detach().clone()
    replace_linear_with_fused_lora(model, rank=2, target_modules=["lm_head"])
    with torch.no_grad():
        model.lm_head.lora_B.normal_()
        expected = model(IDS)
    merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected)
    assert torch.equal(model.embed.weight, embedding)
    unmerge_lora(model)
    assert model.lm_head.weight is model.embed.weight and torch.equal(model.embed.weight, embedding)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_merge_lora_cli_keeps_a_tied_head_delta(tmp_path, suffix):
    adapter, adapted = minimind_adapter(tmp_path, targets=["lm_head", "q_proj"])
    assert adapted.config.tie_word_embeddings
    out = tmp_path / f"merged{suffix}"
    assert merge_lora.main(["--base", str(BUNDLED_BASE), "--lora", str(adapter), "--out", str(out),
                            "--dtype", "float32"]) == 0
    ids = torch.arange(1, 17).view(2, 8)
    with torch.no_grad():
        expected, base = adapted(ids).logits, load_minimind()(ids).logits
        got = load_minimind(out)(ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------
# PEFT's own save_pretrained after fuse_peft_model


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def test_peft_save_pretrained_after_fuse_saves_the_trained_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from lora_kernels import fuse_peft_model

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    fuse_peft_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        untrained = tiny_llama()(input_ids=ids).logits
    assert (trained - untrained).abs().max() > 1e-3
    assert any(k.endswith("q_proj.lora_A.default.weight") for k in model.state_dict())  # PEFT's names, as before

    model.save_pretrained(tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, atol=1e-5, rtol=0)


def test_transformers_trainer_checkpoints_real_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lora_kernels import fuse_peft_model

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    fuse_peft_model(model)  # the one added line
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2,
                                          per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                                          use_cpu=True, logging_steps=1,
                                          dataloader_num_workers=0)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    with safe_open(str(checkpoint / "adapter_model.safetensors"), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert len(saved) == 2 * 2 * 2
    b = saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert b.abs().max() > 0  # B starts at zero: a trained adapter, not the initial one
    model.eval()
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
