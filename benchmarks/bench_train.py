"""End-to-end: one MiniMind SFT optimizer step (forward, backward, AdamW) on the same model and batch, with

* ``full``: full-parameter SFT, every parameter trained (no adapter);
* ``minimind_lora``: MiniMind's own LoRA, reproduced here: ``B(A(x))`` added to each square linear by
  replacing its ``forward`` (what MiniMind users run today);
* ``eager_lora``: ``python -m minimind.train_lora`` without ``--fused``: ``FusedLoRALinear(backend="eager")``,
  the same maths differentiated by autograd;
* ``fused_lora``: ``python -m minimind.train_lora --fused``: ``backend="auto"`` (Triton on CUDA, the fused
  torch backend elsewhere).

All LoRA variants adapt the square linears (MiniMind's rule: q_proj and o_proj), rank 16, alpha = rank (the
trainer's defaults), no dropout, base frozen. On CUDA the step runs under bf16 autocast with fp32 weights, as
the trainer does. The report turns the median step time into steps/s and tokens/s
(``extra_info["tokens_per_step"]``). Skipped, with the reason, when the ``minimind`` package does not import.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import pytest
import torch
import torch.nn as nn

VARIANTS = ("full", "minimind_lora", "eager_lora", "fused_lora")
RANK = 16


@dataclass(frozen=True)
class TrainSetup:
    hidden_size: int
    num_hidden_layers: int
    batch_size: int
    seq_len: int


def _train_setup(settings) -> TrainSetup:
    if settings.quick:
        return TrainSetup(hidden_size=64, num_hidden_layers=2, batch_size=2, seq_len=32)
    if settings.device.type == "cuda":
        return TrainSetup(hidden_size=768, num_hidden_layers=16, batch_size=16, seq_len=512)  # MiniMind2, 104M
    # MiniMind2-small widths (hidden 512, vocab 6400) with 4 of its 8 layers: a few seconds per step on 2 cores.
    return TrainSetup(hidden_size=512, num_hidden_layers=4, batch_size=2, seq_len=128)


class _MiniMindLoRA(nn.Module):
    """MiniMind's LoRA module: y = B(A(x)), A ~ N(0, 0.02²), B = 0, no scaling."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.A.weight, std=0.02)
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


def _apply_minimind_lora(model: nn.Module, rank: int) -> None:
    """MiniMind's ``apply_lora``: a ``lora`` child on every square linear and a forward that adds it."""
    from lora_kernels import find_target_linears

    for name in find_target_linears(model, "square"):
        linear = model.get_submodule(name)
        lora = _MiniMindLoRA(linear.in_features, linear.out_features, rank).to(linear.weight.device)
        linear.lora = lora
        base_forward = linear.forward
        linear.forward = lambda x, base_forward=base_forward, lora=lora: base_forward(x) + lora(x)
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name)


def _build(variant: str, setup: TrainSetup, settings):
    """The model with ``variant``'s adapters (same base weights for every variant) and its optimizer."""
    model_module = pytest.importorskip("minimind.model", reason="the minimind package is not importable here")
    from lora_kernels import replace_linear_with_fused_lora, resolve_backend

    torch.manual_seed(0)
    config = model_module.MiniMindConfig(hidden_size=setup.hidden_size, num_hidden_layers=setup.num_hidden_layers)
    model = model_module.MiniMindForCausalLM(config).to(settings.device)
    backend = "-"
    if variant == "minimind_lora":
        _apply_minimind_lora(model, RANK)
        backend = "autograd"
    elif variant in ("eager_lora", "fused_lora"):
        requested = "eager" if variant == "eager_lora" else "auto"
        replace_linear_with_fused_lora(model, rank=RANK, target_modules="square", backend=requested)
        backend = resolve_backend(requested, torch.empty(0, device=settings.device))
    elif variant != "full":
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    info = {"backend": backend, "trainable_params": sum(p.numel() for p in trainable),
            "total_params": sum(p.numel() for p in model.parameters()), "vocab_size": config.vocab_size}
    return model, optimizer, info


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, settings, variant):
    setup = _train_setup(settings)
    model, optimizer, info = _build(variant, setup, settings)
    generator = torch.Generator(device=settings.device).manual_seed(0)
    ids = torch.randint(0, info["vocab_size"], (setup.batch_size, setup.seq_len), generator=generator,
                        device=settings.device)
    amp = (torch.autocast(settings.device.type, dtype=settings.dtype) if settings.dtype != torch.float32
           else contextlib.nullcontext())

    def zero_grad():
        optimizer.zero_grad(set_to_none=True)
        settings.sync()

    def step():
        with amp:
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        settings.sync()

    benchmark.group = "train"
    benchmark.extra_info.update({
        "kind": "train", "variant": variant, "rank": RANK, **info, **asdict(setup),
        "tokens_per_step": setup.batch_size * setup.seq_len,
        "device": settings.device.type,
        "dtype": "fp32" if settings.dtype == torch.float32 else f"{settings.dtype_name} autocast, fp32 weights",
    })
    rounds = 2 if settings.quick else (20 if settings.device.type == "cuda" else 4)
    benchmark.pedantic(step, setup=zero_grad, rounds=rounds, warmup_rounds=1 if settings.quick else 2,
                       iterations=1)
