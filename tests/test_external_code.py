"""lora_kernels inside code this project did not write: MiniMind's own LoRA conventions, transformers +
PEFT + Trainer checkpoints, torch.compile of a user model, and bad files handed to the library.

Each test is a reproducer from a user trial; the ones that found bugs (PEFT's merge_and_unload/unload after
fuse_peft_model, torch.compile with dynamic=True, a text file given as an adapter) now guard their fixes.
"""
import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import TOLERANCES
import lora_kernels as lk

needs_hf = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed"),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on a shared, loaded 2-core machine: with 2 OpenMP threads each one can take 30 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------
# MiniMind's own code patterns (github jingyaogong/minimind, model/model_lora.py and model_minimind.py)


class _MiniMindLoRA(nn.Module):
    """MiniMind's ``LoRA`` module, verbatim in substance: ``B(A(x))``, A ~ N(0, 0.02²), B = 0."""

    def __init__(self, in_features, out_features, rank):
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        self.A.weight.data.normal_(mean=0.0, std=0.02)
        self.B.weight.data.zero_()

    def forward(self, x):
        return self.B(self.A(x))


def _minimind_apply_lora(model, rank):
    """MiniMind's ``apply_lora``: monkey-patches every square linear's forward."""
    for _, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.in_features == module.out_features:
            lora = _MiniMindLoRA(module.in_features, module.out_features, rank)
            setattr(module, "lora", lora)

            def forward_with_lora(x, layer1=module.forward, layer2=lora):
                return layer1(x) + layer2(x)

            module.forward = forward_with_lora


def _minimind_load_lora(model, path):
    """MiniMind's ``load_lora``."""
    state_dict = torch.load(path, map_location="cpu")
    state_dict = {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    for name, module in model.named_modules():
        if hasattr(module, "lora"):
            lora_state = {k.replace(f"{name}.lora.", ""): v for k, v in state_dict.items() if f"{name}.lora." in k}
            module.lora.load_state_dict(lora_state)


class _Block(nn.Module):
    """MiniMind's block shape: ``hidden_states += residual`` on the (dropout of the) o_proj output."""

    def __init__(self, dim=32, dropout=0.0):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.up_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.down_proj = nn.Linear(2 * dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        residual = x
        h = self.resid_dropout(self.o_proj(torch.tanh(self.q_proj(x))))
        h += residual  # in place on the LoRA layer's output (nn.Dropout(0) returns its input)
        return h + self.down_proj(F.silu(self.up_proj(h)))


class _TinyLM(nn.Module):
    def __init__(self, vocab=40, dim=32, dropout=0.0):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([_Block(dim, dropout) for _ in range(2)])
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def _lm_loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_in_place_residual_add_with_many_adapters_in_one_batch():
    """MiniMind's ``h += residual`` on a LoRA output under a segmented mixed batch of 6 adapters: the per-row
    losses and every adapter's gradients equal each row run alone with its adapter active."""
    torch.manual_seed(0)
    model = _TinyLM()
    lk.replace_linear_with_fused_lora(model, rank=4, target_modules="all-linear")
    names = ["default"] + [f"a{i}" for i in range(1, 6)]
    for name in names[1:]:
        lk.add_adapter(model, name, config=lk.LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for _, layer in lk.iter_lora_layers(model):
            for name in layer.adapter_names:
                layer.lora_params(name)[1].normal_(0, 0.2)
    ids = torch.randint(0, 40, (len(names), 12), generator=torch.Generator().manual_seed(1))

    def row_losses(logits, rows):
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[rows, 1:], reduction="none").mean(1)

    with lk.mixed_adapters(model, names):
        mixed = row_losses(model(ids), slice(None))
        mixed.sum().backward()
        assert any(layer._pool is not None for _, layer in lk.iter_lora_layers(model))  # the segmented path
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for i, name in enumerate(names):
        lk.set_adapter(model, name)
        alone = row_losses(model(ids[i:i + 1]), slice(i, i + 1))
        alone.sum().backward()
        torch.testing.assert_close(mixed[i], alone[0], rtol=TOLERANCES[torch.float32], atol=1e-6)
    assert len(grads) == 2 * len(names) * 4 * 2  # A and B of 6 adapters on 4 linears in 2 blocks
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=TOLERANCES[torch.float32], atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_in_place_residual_add_on_lora_output_trains(dropout, use_dora):
    torch.manual_seed(0)
    model = _TinyLM(dropout=dropout)
    lk.replace_linear_with_fused_lora(model, rank=4, dropout=0.1, target_modules="all-linear", use_dora=use_dora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(10):
        loss = _lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_gradients_equal_minimind_apply_lora_with_equal_weights():
    torch.manual_seed(0)
    base = _TinyLM()
    theirs = copy.deepcopy(base)
    _minimind_apply_lora(theirs, rank=4)
    for name, p in theirs.named_parameters():
        p.requires_grad_(".lora." in name)
    ours = lk.replace_linear_with_fused_lora(copy.deepcopy(base), rank=4, target_modules="square")
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if hasattr(module, "lora"):
                module.lora.B.weight.normal_(0, 0.05)
                layer = ours.get_submodule(name)
                layer.lora_A.copy_(module.lora.A.weight)
                layer.lora_B.copy_(module.lora.B.weight)
    assert sorted(n for n, _ in lk.iter_lora_layers(ours)) == sorted(
        n for n, m in theirs.named_modules() if hasattr(m, "lora"))
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(2))
    loss_theirs, loss_ours = _lm_loss(theirs, ids), _lm_loss(ours, ids)
    loss_theirs.backward()
    loss_ours.backward()
    # Tighter than the fp32 bar on purpose: the same ops on the same fp32 values, so only the order of a few
    # additions may differ (an exact bound of its own, not a dtype tolerance).
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-6, atol=1e-6)
    for name, module in theirs.named_modules():
        if hasattr(module, "lora"):
            layer = ours.get_submodule(name)
            # the fp32 bar, relative; 1e-7: an absolute floor for gradient entries near zero
            torch.testing.assert_close(layer.lora_A.grad, module.lora.A.weight.grad,
                                       rtol=TOLERANCES[torch.float32], atol=1e-7)
            torch.testing.assert_close(layer.lora_B.grad, module.lora.B.weight.grad,
                                       rtol=TOLERANCES[torch.float32], atol=1e-7)


def test_minimind_format_adapter_is_read_by_minimind_load_lora(tmp_path):
    from minimind.lora_io import save_minimind_lora

    torch.manual_seed(0)
    base = _TinyLM().eval()
    ours = lk.replace_linear_with_fused_lora(copy.deepcopy(base), rank=4, target_modules="square").eval()
    with torch.no_grad():
        for _, layer in lk.iter_lora_layers(ours):
            layer.lora_B.normal_(0, 0.05)
    save_minimind_lora(ours, tmp_path / "a.pth")
    theirs = copy.deepcopy(base)
    _minimind_apply_lora(theirs, rank=4)
    _minimind_load_lora(theirs, tmp_path / "a.pth")
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids), ours(ids), rtol=0, atol=1e-3)  # the file is fp16, as MiniMind's:
        # an absolute bound on logits for weights stored in fp16, not the table's relative measure


# ----------------------------------------------------------------------------------------------------------
# transformers + PEFT


def _tiny_llama():
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(cfg).state_dict()

    def fresh():
        model = transformers.LlamaForCausalLM(cfg)
        model.load_state_dict(state)
        return model.eval()

    return fresh


def _fused_peft_case():
    """The base factory, the fused PEFT model over it and input ids (skips without peft and transformers)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    fresh = _tiny_llama()
    return fresh, _fused_peft_llama(fresh), torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _fused_peft_llama(fresh):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(fresh(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    lk.fuse_peft_model(model)
    with torch.no_grad():
        for _, layer in lk.iter_lora_layers(model):
            layer.lora_B.normal_(0, 0.1)
    return model.eval()


def test_trainer_style_checkpoint_of_fused_peft_model_reloads_in_peft(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from peft import PeftModel

    fresh, model, ids = _fused_peft_case()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model.save_pretrained(tmp_path / "ckpt")  # what transformers.Trainer calls at each save_steps
        reloaded = PeftModel.from_pretrained(fresh(), tmp_path / "ckpt").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=TOLERANCES[torch.float32])
        assert (expected - fresh()(input_ids=ids).logits).abs().max() > 1e-3  # the adapter did something


@pytest.mark.parametrize("merge", ["lora_kernels", "peft"])
def test_merge_and_unload_of_fused_peft_model_saves_a_plain_model(tmp_path, merge):
    """Ours on the PeftModel, or PEFT's own method (routed to our layers by fuse_peft_model): both give the
    base model with merged plain linears under the base's key names, which transformers reloads."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    fresh, model, ids = _fused_peft_case()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = lk.merge_and_unload(model).get_base_model() if merge == "lora_kernels" else model.merge_and_unload()
        merged.save_pretrained(tmp_path / "merged")
        again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=0, atol=TOLERANCES[torch.float32])


def test_peft_unload_after_fuse_returns_the_base_model():
    fresh, model, ids = _fused_peft_case()
    with torch.no_grad():
        base_logits = fresh()(input_ids=ids).logits
        unloaded = model.unload()
        torch.testing.assert_close(unloaded(input_ids=ids).logits, base_logits, rtol=0, atol=TOLERANCES[torch.float32])


def test_peft_disable_adapter_after_fuse_runs_the_base_model():
    """TRL's DPO trainer takes its reference model this way."""
    fresh, model, ids = _fused_peft_case()
    with torch.no_grad():
        base_logits = fresh()(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapter matters, so the test can fail
    torch.testing.assert_close(disabled, base_logits, rtol=0, atol=TOLERANCES[torch.float32])
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)  # exact: the same computation again


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_lora_dropout_gives_the_same_gradients(use_reentrant):
    """TrainingArguments(gradient_checkpointing=True) recomputes each layer: the dropout mask must be redrawn
    identically in the recomputation."""
    pytest.importorskip("transformers")
    from peft import LoraConfig, get_peft_model

    fresh = _tiny_llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))

    def grads(checkpointing):
        base = fresh()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        torch.manual_seed(5)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
        if checkpointing and use_reentrant:
            model.enable_input_require_grads()
        lk.fuse_peft_model(model)
        with torch.no_grad():
            for _, layer in lk.iter_lora_layers(model):
                layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        model.train()
        torch.manual_seed(123)
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: (layer.lora_A.grad, layer.lora_B.grad) for name, layer in lk.iter_lora_layers(model)}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 14
    for name in plain:
        # the fp32 bar, relative; 1e-7: an absolute floor for gradient entries near zero
        torch.testing.assert_close(checkpointed[name][0], plain[name][0], rtol=TOLERANCES[torch.float32], atol=1e-7)
        torch.testing.assert_close(checkpointed[name][1], plain[name][1], rtol=TOLERANCES[torch.float32], atol=1e-7)


for _test in (test_trainer_style_checkpoint_of_fused_peft_model_reloads_in_peft,
              test_merge_and_unload_of_fused_peft_model_saves_a_plain_model,
              test_peft_unload_after_fuse_returns_the_base_model,
              test_peft_disable_adapter_after_fuse_runs_the_base_model,
              test_gradient_checkpointing_with_lora_dropout_gives_the_same_gradients):
    for _mark in needs_hf:
        _mark(_test)


# ----------------------------------------------------------------------------------------------------------
# torch.compile of a user model


def _compiled_losses(compile_kwargs, lengths):
    torch.manual_seed(0)
    model = _TinyLM()
    lk.replace_linear_with_fused_lora(model, rank=4, alpha=8, dropout=0.1, target_modules="all-linear")
    model.train()
    run = torch.compile(model, **compile_kwargs) if compile_kwargs is not None else model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(1)
    losses = []
    for i, length in enumerate(lengths):
        ids = torch.randint(0, 40, (2, length), generator=torch.Generator().manual_seed(100 + i))
        loss = _lm_loss(run, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_compiled_user_model_with_dropout_matches_eager_and_compiles_twice_at_most():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    lengths = [8, 12, 16, 10]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = _compiled_losses(dict(backend=counter, fullgraph=True), lengths)
    eager = _compiled_losses(None, lengths)
    assert counter.frame_count <= 2  # static, then one automatic-dynamic graph for every later length
    # the fp32 bar, relative; 1e-6: an absolute floor for losses near zero
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=TOLERANCES[torch.float32], atol=1e-6)


def test_fullgraph_dynamic_true_compiles():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    layer = lk.FusedLoRALinear(16, 16, rank=4, dropout=0.1)
    counter = CompileCounter()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=counter)
    for length in (3, 5, 7):
        compiled(torch.randn(length, 16, requires_grad=True)).sum().backward()
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------------------------------------
# bad files


@pytest.mark.parametrize("text", ["hello\nworld\n", "root:x:0:0:root:/root:/bin/bash\n"])
def test_text_file_as_adapter_is_a_value_error(tmp_path, text):
    path = tmp_path / "adapter.pth"
    path.write_text(text)
    model = nn.Sequential(nn.Linear(4, 4))
    try:
        lk.load_lora(model, path)
    except ValueError as err:
        assert "adapter.pth" in str(err)
    except Exception as err:  # noqa: BLE001 - the bug: any other exception type
        raise AssertionError(f"{type(err).__name__}: {err}") from err
    else:
        raise AssertionError("a text file was accepted as an adapter")
