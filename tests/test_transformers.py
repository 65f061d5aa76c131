"""replace_linear_with_fused_lora on Hugging Face transformers models built offline from tiny configs,
against the PEFT-wrapped twin with the same adapter."""
import copy
import importlib.util
import json

import pytest
import torch

from helpers import assert_close
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
VOCAB = 64
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, head_dim=8)


def tiny_model(family):
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**TINY)).float()


def twins(family, rank=4, alpha=8):
    """(ours, PEFT's) over copies of one base, every linear but lm_head adapted, with the same A and B."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model(family)
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
    ours = load_peft_adapter(tiny_model("llama"), tmp_path / "peft")
    inputs = batch(3)
    expected = peft(**inputs).logits
    assert_close(ours(**inputs).logits, expected, torch.float32, "logits")

    save_peft_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    back = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours")
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
