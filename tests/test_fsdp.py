"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over FusedLoRALinear layers, dense or quantized base.

Two CPU processes (gloo, ``torch.multiprocessing`` spawn) each train on half of every global batch; their
losses, averaged, must equal one process training on the whole batch (fp32, 1e-5), with the base (16-bit
weights, or the quantized codes) sharded over the two ranks and only the LoRA parameters in the optimizer (a DoRA
model's magnitudes among them, sharded too); ``gathered_lora`` gives the whole adapter (the magnitudes
included), and ``save_lora`` refuses the shards. Then the trainer's
``--fsdp`` under torchrun: the losses, saved adapters and a resumed run equal one process's.
"""
import gc
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from lora_kernels import FusedLoRALinear, lora_state_dict, mark_only_lora_as_trainable, save_lora
from lora_kernels.fsdp import gathered_lora
from helpers import ROOT, TOLERANCES, adapter, args_for, losses

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover - every CPU build has gloo
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):  # pragma: no cover - torch >= 2.6 exports it here
    pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)", allow_module_level=True)

WORLD = 2
STEPS = 3


def _model(quantize, use_dora=False):
    torch.manual_seed(0)
    model = nn.Sequential(FusedLoRALinear(40, 64, rank=4, quantize=quantize, use_dora=use_dora, backend="torch"),
                          nn.GELU(),
                          FusedLoRALinear(64, 40, rank=8, quantize=quantize, use_dora=use_dora, backend="torch"))
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


def _worker(rank, port, quantize, use_dora, results, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = _model(quantize, use_dora)
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        base = "weight_data" if quantize else "weight"
        full, local = model[0].get_parameter(base).shape, model[0].get_parameter(base).to_local().shape
        # A DoRA magnitude (64,) is a DTensor shard too: the rows of this rank
        magnitude = model[0].lora_magnitude.to_local().shape[0] if use_dora else None
        xs, ys = _batches()
        rows = xs.shape[1] // WORLD
        losses, optimizer = _train(model, xs[:, rank * rows:(rank + 1) * rows], ys[:, rank * rows:(rank + 1) * rows])
        dist.all_reduce(losses)
        in_optimizer = sum(p.numel() for group in optimizer.param_groups for p in group["params"])  # global sizes
        try:
            save_lora(model, os.path.join(tmp, f"shards{rank}.safetensors"))
            refused = ""
        except ValueError as err:
            refused = str(err)
        with gathered_lora(model):  # every rank enters; rank 0 keeps the whole adapter
            # As lists: a tensor sent through the queue would need this process alive to be read.
            state = {k: (type(v).__name__, v.tolist()) for k, v in lora_state_dict(model).items()}
        if rank == 0:
            results.put((losses / WORLD).tolist())
            results.put((tuple(full), tuple(local), in_optimizer, refused, state, magnitude))
            results.close()
            results.join_thread()  # sent before this process starts to exit
        # The sharded model, its optimizer state and the device mesh hold the gloo group: destroyed only at
        # interpreter exit, its threads were seen to abort there ("terminate called without an active
        # exception", SIGABRT, one run in a few dozen). Release them now, while Python is whole, and let both
        # ranks reach the teardown together.
        del model, optimizer, mesh
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("quantize, use_dora", [(None, False), ("nf4", False), ("int8", False), (None, True)],
                         ids=["dense", "nf4", "int8", "dora"])
def test_fsdp2_two_processes_match_one(quantize, use_dora, tmp_path):
    xs, ys = _batches()
    model = _model(quantize, use_dora)
    single, _ = _train(model, xs, ys)

    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    torch.multiprocessing.start_processes(_worker, args=(_free_port(), quantize, use_dora, results, str(tmp_path)),
                                          nprocs=WORLD, join=True, start_method="spawn")
    sharded = results.get(timeout=300)  # generous: a loaded shared machine
    (full, local, in_optimizer, refused, state, magnitude) = results.get(timeout=300)

    assert torch.allclose(torch.tensor(sharded), single, rtol=0, atol=TOLERANCES[torch.float32]), \
        (sharded, single.tolist())
    assert local[0] * WORLD == full[0], f"the base is not sharded over {WORLD} ranks: {local} of {full}"
    lora = sum(p.numel() for n, p in _model(quantize, use_dora).named_parameters() if "lora_" in n)
    assert in_optimizer == lora, "the optimizer holds the (sharded) LoRA parameters and nothing else"
    if use_dora:
        assert magnitude * WORLD == 64, f"the magnitude is not sharded over {WORLD} ranks: {magnitude} of 64 rows"
        assert sum(key.endswith(".lora_magnitude") for key in state) == 2, sorted(state)
    assert "FSDP2 shard" in refused and not list(tmp_path.glob("shards*")), f"save_lora wrote shards: {refused!r}"
    expected = lora_state_dict(model)
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        kind, got = state[key][0], torch.tensor(state[key][1])
        assert kind == "Tensor" and got.shape == value.shape, f"{key}: a {kind} of shape {tuple(got.shape)}"
        assert torch.allclose(got, value, rtol=0, atol=TOLERANCES[torch.float32]), key


# ---------------------------------------------------------------------------------------------------
# The trainer: torchrun --nproc_per_node 2 -m minimind.train_lora --fsdp


def _torchrun(args, script=("-m", "minimind.train_lora")):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           *script, *args]
    # The checkout on PYTHONPATH: a script given by path (not -m) imports minimind from it, installed or not.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})


def _half_batch(args):
    args = list(args)
    args[args.index("--batch_size") + 1] = str(int(args[args.index("--batch_size") + 1]) // WORLD)
    return args


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_trainer_fsdp_matches_one_process(tiny, tmp_path, quantize):
    """--fsdp: two processes of batch 2 train as one process of batch 4 (fp32, 1e-5); the saved adapters
    (both formats) are the whole matrices, equal to the single process's."""
    from minimind.train_lora import parse_args, train

    common = ["--fused", "--max_steps", "3", "--epochs", "10", "--answers", "1", "--eval_data",
              str(tiny / "data.jsonl"), *(["--quantize", quantize] if quantize else [])]
    train(parse_args(args_for(tiny, tmp_path / "one", *common)))
    done = _torchrun(_half_batch(args_for(tiny, tmp_path / "two", *common, "--fsdp")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "x 2 processes (FSDP2, the base sharded)" in done.stdout
    assert losses(tmp_path / "two" / "metrics.jsonl") == pytest.approx(losses(tmp_path / "one" / "metrics.jsonl"),
                                                                       abs=1e-5)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")}
    evals = {name: [(r["step"], r["eval_loss"]) for r in got if "eval_loss" in r] for name, got in rows.items()}
    assert [s for s, _ in evals["two"]] == [s for s, _ in evals["one"]] == [3]  # every rank joins the evaluation
    assert evals["two"][0][1] == pytest.approx(evals["one"][0][1], abs=1e-5)
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 0
    for key in one:
        assert two[key].shape == one[key].shape, f"{key}: saved {tuple(two[key].shape)}, whole {one[key].shape}"
        assert (one[key] - two[key]).abs().max() < 1e-5, key
    pth = {name: torch.load(next((tmp_path / name / "lora").glob("*.pth")), weights_only=True)
           for name in ("one", "two")}
    assert pth["one"].keys() == pth["two"].keys()
    for key, value in pth["one"].items():  # MiniMind's format: fp16
        assert torch.equal(pth["two"][key], value), key


def test_trainer_fsdp_resumes_where_it_stopped(tiny, tmp_path):
    """A --fsdp run stopped after its first checkpoint and resumed equals one uninterrupted --fsdp run: the
    checkpoint holds the whole adapter and optimizer state, and each process takes its shard back."""
    stop = tmp_path / "stop_after_first_checkpoint.py"
    stop.write_text("import sys\nfrom minimind import train_lora\nsave = train_lora.checkpoint\n\n\n"
                    "def checkpoint(run):\n    save(run)\n    raise KeyboardInterrupt\n\n\n"
                    "train_lora.checkpoint = checkpoint\nsys.exit(train_lora.main(sys.argv[1:]))\n")
    common = ["--fused", "--max_steps", "4", "--epochs", "10", "--save_interval", "2", "--lora_dropout", "0.1",
              "--fsdp"]
    whole = _torchrun(_half_batch(args_for(tiny, tmp_path / "whole", *common)))
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    stopped = _torchrun(_half_batch(args_for(tiny, tmp_path / "resumed", *common)), script=(str(stop),))
    assert stopped.returncode != 0, "the stop after the first checkpoint did not happen"
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 2
    resumed = _torchrun(_half_batch(args_for(tiny, tmp_path / "resumed", *common, "--resume")))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert losses(tmp_path / "resumed" / "metrics.jsonl") == pytest.approx(
        losses(tmp_path / "whole" / "metrics.jsonl"), abs=1e-6)
    a, b = adapter(tmp_path / "whole"), adapter(tmp_path / "resumed")
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-6, key
