"""lora_kernels.peft_live: a PeftModel after fuse_peft_model trains, and PEFT's own save_pretrained and the
transformers Trainer save the trained adapter."""
import pytest
import torch
from safetensors import safe_open

from helpers import TOLERANCES, tiny_llama


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
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, atol=TOLERANCES[torch.float32], rtol=0)


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
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=TOLERANCES[torch.float32], rtol=0)
