"""PEFT's DoRA (``LoraConfig(use_dora=True)``) both ways, against PEFT itself on a tiny transformers Llama with
DoRA on every attention and MLP projection: a PEFT DoRA adapter read without PEFT, ours written and read by
PEFT, and a live PeftModel after ``fuse_peft_model`` training like PEFT (loss and every gradient, the
magnitudes' included), then saved by PEFT's ``save_pretrained``. B and the magnitudes are moved away from their
initial values first: with B = 0 and m = ‖W‖, DoRA is the base model and a wrong magnitude would go unseen.

With dropout, PEFT's ``lora_dropout`` modules of the reference are swapped for :class:`OurMask`, which draws the
seed our layer draws and applies the mask our backend regenerates from it: both models then drop the very same
elements and their losses and gradients must agree to fp32 rounding.
"""
import json
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from helpers import TOLERANCES, assert_close, relative_error, tiny_llama
from lora_kernels import (
    FusedLoRALinear,
    LoRAConfig,
    fuse_peft_model,
    load_peft_adapter,
    replace_linear_with_fused_lora,
    save_peft_adapter,
)
from lora_kernels.backends import draw_seed_tensor, get_backend, triton_available
from lora_kernels.dora import weight_norm

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 2 * len(TARGETS)  # every projection of the tiny Llama's two layers
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(),
                                                                       reason="Triton is not installed"))]


def perturb(model, seed=3):
    """B drawn from N(0, 0.05) and each magnitude scaled by 1 + N(0, 0.2), in place: g = m / ‖W + s·B·A‖ is then
    far from 1 and B·A far from 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator).to(p.dtype)
            if "lora_B" in name:
                p.copy_(0.05 * noise)
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.2 * noise)
    return model


def peft_dora(dropout=0.0):
    """PEFT's DoRA (r 4, alpha 8) on every projection of :func:`tiny_llama`, perturbed; eval mode."""
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, use_dora=True)
    torch.manual_seed(1)
    return perturb(peft.get_peft_model(tiny_llama(), config)).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def magnitudes(model):
    """{module path: magnitude} of a PEFT model or of ours."""
    found = {}
    for name, p in model.named_parameters():
        if "lora_magnitude" in name:
            path = name.replace("base_model.model.", "").split(".lora_magnitude")[0]
            found[path] = p.detach()
    return found


def assert_magnitudes_matter(model):
    """The model's magnitudes are not the norms ‖W + s·B·A‖ they start at (g = 1 would hide a lost magnitude)."""
    for name, layer in model.named_modules():
        if isinstance(layer, FusedLoRALinear):
            norm = weight_norm(layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
            assert relative_error(layer.lora_magnitude, norm) > 0.05, name


def test_peft_dora_adapter_loads_without_peft(tmp_path):
    reference = peft_dora()
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True

    ours = load_peft_adapter(tiny_llama(), tmp_path)
    layers = {name: m for name, m in ours.named_modules() if isinstance(m, FusedLoRALinear)}
    assert len(layers) == LAYERS and all(m.lora_configs["default"].use_dora for m in layers.values())
    assert_magnitudes_matter(ours)
    expected = magnitudes(reference)
    for name, magnitude in magnitudes(ours).items():
        assert torch.equal(magnitude, expected[name]), name
    trainable = {n.rsplit(".", 1)[-1] for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude"}  # as in PEFT
    assert_close(logits(ours), logits(reference), torch.float32, "logits")


def test_pickled_peft_dora_adapter_loads(tmp_path):
    reference = peft_dora()
    reference.save_pretrained(tmp_path, safe_serialization=False)
    assert_close(logits(load_peft_adapter(tiny_llama(), tmp_path)), logits(reference), torch.float32, "logits")


def ours_with_dora():
    """Our DoRA (r 4, alpha 8) on every projection of :func:`tiny_llama`, perturbed; eval mode."""
    torch.manual_seed(1)
    model = replace_linear_with_fused_lora(tiny_llama(), config=LoRAConfig(rank=4, alpha=8, use_dora=True),
                                           target_modules=TARGETS)
    return perturb(model).eval()


def test_ours_saved_loads_in_peft(tmp_path):
    ours = ours_with_dora()
    assert_magnitudes_matter(ours)
    save_peft_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys  # PEFT's form
    assert len(keys) == 3 * LAYERS

    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    expected = magnitudes(ours)
    for name, magnitude in magnitudes(loaded).items():
        assert torch.equal(magnitude, expected[name]), name
    assert_close(logits(loaded), logits(ours), torch.float32, "logits")


# ---------------------------------------------------------------------------------------------------
# fuse_peft_model: PEFT's training step


class OurMask(nn.Module):
    """A stand-in for PEFT's ``lora_dropout`` module that drops what a FusedLoRALinear on ``backend`` drops: it
    draws the seed the layer draws (one ``torch.randint`` on the default generator, at the same point of the
    forward) and applies the keep-mask the backend regenerates from it, scaled by 1 / (1 - p)."""

    def __init__(self, p: float, backend: str):
        super().__init__()
        self.p, self.keep_mask = p, get_backend(backend).dropout_mask

    def forward(self, x):
        x2d = x.reshape(-1, x.shape[-1])
        keep = self.keep_mask(draw_seed_tensor(x.device), x2d.shape, self.p, x.device)
        return (x2d * keep / (1 - self.p)).view_as(x)


def share_masks(reference, backend):
    """PEFT's dropout modules of ``reference`` replaced by :class:`OurMask` (same p)."""
    for module in reference.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            dropout = module.lora_dropout["default"]
            if isinstance(dropout, nn.Dropout):
                module.lora_dropout["default"] = OurMask(dropout.p, backend)


def training_step(model, optimizer):
    """One step of PEFT's causal-LM loss (train mode, the dropout seeds drawn under seed 7); the loss."""
    model.train()
    optimizer.zero_grad()
    torch.manual_seed(7)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


def fused_and_reference(backend, dropout):
    """Two identical PEFT DoRA models, the second converted by fuse_peft_model; each with an AdamW optimizer
    made before the conversion, and PEFT's parameter names (shared with the fused layers)."""
    reference, fused = peft_dora(dropout), peft_dora(dropout)
    share_masks(reference, backend)
    names = {name: p for name, p in fused.named_parameters() if p.requires_grad}
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for m in (reference, fused)]
    peft_magnitude = fused.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight
    assert fuse_peft_model(fused, backend=backend) is fused
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FusedLoRALinear) and layer.lora_magnitude is peft_magnitude  # shared, not copied
    return reference, fused, names, optimizers


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_peft_model_trains_like_peft(backend, dropout):
    reference, fused, names, (opt_ref, opt_fused) = fused_and_reference(backend, dropout)
    expected_loss = training_step(reference, opt_ref)
    loss = training_step(fused, opt_fused)
    assert_close(loss, expected_loss, torch.float32, "loss")
    expected = {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}
    assert sorted(expected) == sorted(names) and len(names) == 3 * LAYERS
    assert sum("lora_magnitude_vector" in name for name in names) == LAYERS
    for name, p in names.items():
        assert_close(p.grad, expected[name], torch.float32, f"grad of {name}")
    # After the optimizer step (the same update on the same gradients), eval mode: no dropout.
    assert_close(logits(fused.eval()), logits(reference.eval()), torch.float32, "logits after the step")


def test_save_pretrained_after_fuse_saves_the_trained_magnitudes(tmp_path):
    reference, fused, names, (_, optimizer) = fused_and_reference("torch", 0.0)
    initial = {name: p.detach().clone() for name, p in names.items()}
    for _ in range(2):
        training_step(fused, optimizer)
    assert any(k.endswith("q_proj.lora_magnitude_vector.default.weight") for k in fused.state_dict())

    fused.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) == 3 * LAYERS
    for name, p in names.items():
        key = name.replace(".default", "").removesuffix(".weight") if "magnitude" in name \
            else name.replace(".default", "")
        assert torch.equal(saved[key], p.detach()), key
        assert not torch.equal(saved[key], initial[name]), f"{key} is the initial value"
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert_close(logits(loaded), logits(fused.eval()), torch.float32, "logits")


def test_fused_model_loads_and_switches_dora_adapters(tmp_path):
    other = perturb(peft_dora(), seed=11)
    other.save_pretrained(tmp_path)
    fused = fuse_peft_model(peft_dora())
    fused.load_adapter(tmp_path, "other", is_trainable=True)  # PEFT's method, routed to our layers
    fused.set_adapter("other")
    layer = fused.base_model.model.model.layers[1].mlp.down_proj
    assert layer.lora_magnitude_of("other").requires_grad and not layer.lora_magnitude.requires_grad
    expected = logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval())
    assert_close(logits(fused.eval()), expected, torch.float32, "logits of the loaded adapter")

    magnitude = layer.lora_magnitude
    fused.load_adapter(tmp_path, "default", is_trainable=True)  # into the adapter it has: copied in place
    fused.set_adapter("default")
    assert layer.lora_magnitude is magnitude and torch.equal(magnitude, layer.lora_magnitude_of("other"))
    assert_close(logits(fused.eval()), expected, torch.float32, "logits after loading into 'default'")


# ---------------------------------------------------------------------------------------------------
# fp16 and bf16: ours against PEFT evaluated in float64 on the same rounded weights


@pytest.mark.parametrize("dtype,backend", [(torch.float16, "torch"), pytest.param(torch.float16, "triton", marks=(
    pytest.mark.skipif(not triton_available(), reason="Triton is not installed"))), (torch.bfloat16, "torch")])
def test_half_precision(tmp_path, dtype, backend):
    """Logits (PEFT's file read by us) and the fused training step's loss within TOLERANCES[dtype] of PEFT in
    float64. A gradient at the end of a Llama's backward carries the rounding of every layer behind it, which
    PEFT's own run in ``dtype`` shows (up to ~TOLERANCES[dtype] on the small k_proj gradients): each of ours
    may exceed PEFT's own error by at most TOLERANCES[dtype]."""
    exact = peft_dora().to(dtype).double().train()
    half = peft_dora().to(dtype)
    half.save_pretrained(tmp_path)
    ours = load_peft_adapter(tiny_llama().to(dtype), tmp_path, backend=backend)
    assert_close(logits(ours), logits(exact.eval()), dtype, "logits")

    fused = peft_dora().to(dtype)
    params = {name: p for name, p in fused.named_parameters() if p.requires_grad}
    fuse_peft_model(fused, backend=backend)
    losses = []
    for model in (exact, half, fused):
        model.train()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.detach())
    assert_close(losses[2], losses[0], dtype, "loss")
    expected, peft_half = ({n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (exact, half))
    for name, p in params.items():
        bound = relative_error(peft_half[name], expected[name]) + TOLERANCES[dtype]
        assert relative_error(p.grad, expected[name]) <= bound, f"grad of {name}"


def test_fuse_warns_where_several_active_adapters_include_dora():
    """PEFT without dropout lets a second active DoRA adapter rescale the first's output; ours add the terms
    (README), so converting such a model says where outputs will differ from PEFT's."""
    model = peft_dora()
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "other"])
    with pytest.warns(UserWarning, match=r"2 layers .*several active adapters, one of them DoRA"):
        fuse_peft_model(model)
    single = peft_dora()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fuse_peft_model(single)  # one active adapter: no warning
