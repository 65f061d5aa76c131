"""replace_linear_with_fused_lora on Hugging Face transformers models built offline from tiny configs,
against the PEFT-wrapped twin with the same adapter."""
import copy
import importlib.util
import json

import pytest
import torch

from helpers import TRANSFORMERS_TINY, assert_close, tiny_transformers
from lora_kernels import (
    FusedLoRALinear,
    fuse_peft_model,
    load_peft_adapter,
    replace_linear_with_fused_lora,
    save_peft_adapter,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),  # transformers via peft
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed"),
]
VOCAB = TRANSFORMERS_TINY["vocab_size"]


def twins(family, rank=4, alpha=8):
    """(ours, PEFT's) over copies of one base, every linear but lm_head adapted, with the same A and B."""
    from peft import LoraConfig, get_peft_model

    base = tiny_transformers(family)
    torch.manual_seed(1)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear"))
    ours = replace_linear_with_fused_lora(copy.deepcopy(base), rank=rank, alpha=alpha, target_modules="all-linear")
    torch.manual_seed(2)
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, FusedLoRALinear):
                twin = peft.get_submodule("base_model.model." + name)
                twin.lora_B["default"].weight.normal_(0, 0.1)  # non-zero B: the adapter matters from step 0
                layer.lora_A.copy_(twin.lora_A["default"].weight)
                layer.lora_B.copy_(twin.lora_B["default"].weight)
    return ours, peft


def batch(seed):
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def test_llama_trains_like_peft_step_by_step():
    ours, peft = twins("llama")
    lora_layers = [n for n, m in ours.named_modules() if isinstance(m, FusedLoRALinear)]
    assert len(lora_layers) == 2 * 7  # q, k, v, o, gate, up, down in each layer; lm_head left alone
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    assert sum(p.numel() for p in trainable(ours)) == sum(p.numel() for p in trainable(peft))
    optimizers = [torch.optim.AdamW(trainable(m), lr=1e-2) for m in (ours, peft)]
    history = []
    for step in range(3):
        losses = []
        for model, opt in zip((ours, peft), optimizers):
            opt.zero_grad()
            loss = model(**batch(0)).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_close(losses[0], losses[1], torch.float32, f"loss at step {step}")
        history.append(losses[0].item())
    assert history[-1] < history[0] - 0.05  # the adapters learn the batch
    for name in lora_layers:
        twin = peft.get_submodule("base_model.model." + name)
        assert_close(ours.get_submodule(name).lora_B, twin.lora_B["default"].weight, torch.float32, name)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_forward_and_backward_match_peft(family):
    ours, peft = twins(family, rank=3, alpha=5)
    inputs = batch(0)
    out_ours, out_peft = ours(**inputs), peft(**inputs)
    assert_close(out_ours.logits, out_peft.logits, torch.float32, "logits")
    out_ours.loss.backward()
    out_peft.loss.backward()
    layer = ours.model.layers[1].self_attn.k_proj
    twin = peft.base_model.model.model.layers[1].self_attn.k_proj
    assert_close(layer.lora_A.grad, twin.lora_A["default"].weight.grad, torch.float32, "dA")
    assert_close(layer.lora_B.grad, twin.lora_B["default"].weight.grad, torch.float32, "dB")


def test_llama_adapter_round_trip_through_peft_files(tmp_path):
    from peft import PeftModel

    _, peft = twins("llama")
    peft.save_pretrained(tmp_path / "peft")
    ours = load_peft_adapter(tiny_transformers("llama"), tmp_path / "peft")
    inputs = batch(3)
    expected = peft(**inputs).logits
    assert_close(ours(**inputs).logits, expected, torch.float32, "logits")

    save_peft_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    back = PeftModel.from_pretrained(tiny_transformers("llama"), tmp_path / "ours")
    assert type(back).__name__ == "PeftModelForCausalLM"
    assert_close(back(**inputs).logits, expected, torch.float32, "logits")


def test_fuse_peft_model_on_a_peft_llama():
    _, peft = twins("llama")
    fused = fuse_peft_model(copy.deepcopy(peft))
    assert sum(isinstance(m, FusedLoRALinear) for m in fused.modules()) == 14
    inputs = batch(4)
    loss_fused, loss_peft = fused(**inputs).loss, peft(**inputs).loss
    assert_close(loss_fused, loss_peft, torch.float32, "loss")
    loss_fused.backward()
    loss_peft.backward()
    layer = fused.base_model.model.model.layers[0].mlp.down_proj
    twin = peft.base_model.model.model.layers[0].mlp.down_proj
    assert_close(layer.lora_A.grad, twin.lora_A["default"].weight.grad, torch.float32, "dA")


def test_gpt2_conv1d_is_refused_with_a_clear_message():
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB,
                                                                 n_positions=16, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match="matched no nn.Linear.*Conv1D.*GPT-2"):
        replace_linear_with_fused_lora(model, target_modules="all-linear")
    with pytest.raises(TypeError, match="c_attn' is a Conv1D.*transposed"):
        replace_linear_with_fused_lora(model, target_modules=["c_attn"])


# ---------------------------------------------------------------------------------------------------
# fuse_peft_model inside transformers.Trainer and with several live PEFT adapters


def peft_model(family, two_adapters=False, use_dora=False):
    """A PEFT model over the tiny base; with ``two_adapters``, a second adapter "other" (another rank,
    rsLoRA, partly other layers) is added and made active, as a user would train it."""
    from peft import LoraConfig, get_peft_model

    base = tiny_transformers(family)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            use_dora=use_dora))
    if two_adapters:
        model.add_adapter("other", LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "up_proj"]))
        model.set_adapter("other")
    return model


class _Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        ids = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _trainer_run(model, out_dir, stop_after=None, resume=None):
    """6 steps of transformers.Trainer (AdamW, linear decay, a checkpoint every 3 steps, gradient
    accumulation over 2 batches); ``stop_after``: interrupted after that step, as a killed job would be."""
    import transformers

    class Stop(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_after:
                control.should_training_stop = True

    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=6, save_steps=3, save_strategy="steps", per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, seed=3, report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[Stop()])
    trainer.train(resume_from_checkpoint=resume)
    return model


@pytest.mark.parametrize("family,two_adapters,use_dora", [("llama", False, False), ("qwen2", False, False),
                                                          ("llama", True, False), ("llama", False, True)])
def test_trainer_resume_after_fuse_peft_model_continues_the_trained_adapter(tmp_path, family, two_adapters, use_dora):
    """Trainer(resume_from_checkpoint=...) calls PEFT's load_adapter, which finds only PEFT's own layer
    classes: unrouted, it loaded nothing into the converted layers and the resumed run restarted from the
    untrained adapter (logits 0.18-0.34 away). Resumed, the run must end where the uninterrupted one does:
    the adapter, AdamW's moments and the schedule all restored."""
    fused = lambda: fuse_peft_model(peft_model(family, two_adapters, use_dora))  # noqa: E731
    whole = _trainer_run(fused(), tmp_path / "whole")
    _trainer_run(fused(), tmp_path / "cut", stop_after=3)
    resumed = _trainer_run(fused(), tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
    ids = batch(7)["input_ids"]
    with torch.no_grad():
        expected, got = whole(ids).logits, resumed(ids).logits
        untrained = fused()(ids).logits
    assert (expected - untrained).abs().max() > 1e-3  # training moved the adapter, so the test can fail
    assert_close(got, expected, torch.float32, "logits after resuming")


def _requires_grad(model):
    """Which adapter parameters train, by the model's state-dict names (PEFT's, also after fuse_peft_model)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in trainable}


def test_fuse_peft_model_keeps_two_live_adapters_switched_by_peft_set_adapter(tmp_path):
    from peft import PeftModel

    peft = peft_model("llama", two_adapters=True)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    twin = copy.deepcopy(peft)
    state = peft.state_dict()
    fused = fuse_peft_model(peft)
    assert sum(isinstance(m, FusedLoRALinear) for m in fused.modules()) == 2 * 4  # q, v, down, up per block
    assert fused.state_dict().keys() == state.keys()
    ids = batch(5)["input_ids"]
    with torch.no_grad():
        logits = {}
        for name in ("other", "default", "other"):
            twin.set_adapter(name)
            fused.set_adapter(name)
            assert fused.active_adapter == name and fused.active_adapters == [name]
            assert _requires_grad(fused) == _requires_grad(twin)  # PEFT: the active adapter trains, others frozen
            logits[name] = twin(ids).logits
            assert_close(fused(ids).logits, logits[name], torch.float32, f"logits with {name!r} active")
        assert (logits["default"] - logits["other"]).abs().max() > 1e-3

        fused.save_pretrained(tmp_path / "saved")  # "default" at the root, "other" in saved/other, as PEFT does
        again = PeftModel.from_pretrained(tiny_transformers("llama"), tmp_path / "saved")
        again.load_adapter(tmp_path / "saved" / "other", "other")
        again.set_adapter("other")
        assert_close(again(ids).logits, logits["other"], torch.float32, "PEFT reloading the saved 'other'")

        fused.delete_adapter("other")
        assert list(fused.peft_config) == ["default"] and fused.active_adapters == ["default"]
        assert_close(fused(ids).logits, logits["default"], torch.float32, "logits after deleting 'other'")


def test_peft_load_adapter_after_fuse_adds_a_new_adapter_as_peft_does(tmp_path):
    donor = peft_model("qwen2", two_adapters=True)
    with torch.no_grad():
        for name, param in donor.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    donor.save_pretrained(tmp_path / "donor")
    plain, fused = peft_model("qwen2"), fuse_peft_model(peft_model("qwen2"))
    ids = batch(6)["input_ids"]
    with torch.no_grad():
        for model in (plain, fused):
            model.load_adapter(tmp_path / "donor" / "other", "other", is_trainable=True)
        assert _requires_grad(fused) == _requires_grad(plain)
        assert fused.training == plain.training
        for name in ("other", "default"):
            plain.set_adapter(name)
            fused.set_adapter(name)
            assert_close(fused(ids).logits, plain(ids).logits, torch.float32, f"logits with {name!r} active")


def test_peft_add_adapter_after_fuse_is_refused_before_anything_changes():
    from peft import LoraConfig

    fused = fuse_peft_model(peft_model("llama"))
    state = fused.state_dict()
    with pytest.raises(RuntimeError, match="add_adapter after fuse_peft_model.*before fuse_peft_model"):
        fused.add_adapter("more", LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    assert list(fused.peft_config) == ["default"] and fused.state_dict().keys() == state.keys()
