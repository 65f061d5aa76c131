"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over FusedLoRALinear layers, dense or quantized base.

Two CPU processes (gloo, ``torch.multiprocessing`` spawn) each train on half of every global batch; their
losses, averaged, must equal one process training on the whole batch (fp32, 1e-5), with the base (16-bit
weights, or the quantized codes) sharded over the two ranks and only the LoRA parameters in the optimizer.
"""
import os
import socket

import pytest
import torch
import torch.nn as nn

from lora_kernels import FusedLoRALinear, mark_only_lora_as_trainable

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover - every CPU build has gloo
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):  # pragma: no cover - torch >= 2.6 exports it here
    pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)", allow_module_level=True)

WORLD = 2
STEPS = 3


def _model(quantize):
    torch.manual_seed(0)
    model = nn.Sequential(FusedLoRALinear(40, 64, rank=4, quantize=quantize, backend="torch"), nn.GELU(),
                          FusedLoRALinear(64, 40, rank=8, quantize=quantize, backend="torch"))
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B, std=0.1)  # B != 0 so that both adapters' gradients matter
    return mark_only_lora_as_trainable(model)


def _batches():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 8, 40, generator=g), torch.randn(STEPS, 8, 40, generator=g)


def _train(model, xs, ys):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for x, y in zip(xs, ys):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), optimizer


def _worker(rank, port, quantize, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = _model(quantize)
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        base = "weight_data" if quantize else "weight"
        full, local = model[0].get_parameter(base).shape, model[0].get_parameter(base).to_local().shape
        xs, ys = _batches()
        rows = xs.shape[1] // WORLD
        losses, optimizer = _train(model, xs[:, rank * rows:(rank + 1) * rows], ys[:, rank * rows:(rank + 1) * rows])
        dist.all_reduce(losses)
        in_optimizer = sum(p.numel() for group in optimizer.param_groups for p in group["params"])  # global sizes
        if rank == 0:
            results.put((losses / WORLD).tolist())
            results.put((tuple(full), tuple(local), in_optimizer))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("quantize", [None, "nf4", "int8"])
def test_fsdp2_two_processes_match_one(quantize):
    xs, ys = _batches()
    single, _ = _train(_model(quantize), xs, ys)

    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    torch.multiprocessing.start_processes(_worker, args=(_free_port(), quantize, results), nprocs=WORLD,
                                          join=True, start_method="spawn")
    sharded = results.get(timeout=300)  # generous: a loaded shared machine
    (full, local, in_optimizer) = results.get(timeout=300)

    assert torch.allclose(torch.tensor(sharded), single, rtol=0, atol=1e-5), (sharded, single.tolist())
    assert local[0] * WORLD == full[0], f"the base is not sharded over {WORLD} ranks: {local} of {full}"
    lora = sum(p.numel() for n, p in _model(quantize).named_parameters() if "lora_" in n)
    assert in_optimizer == lora, "the optimizer holds the (sharded) LoRA parameters and nothing else"
