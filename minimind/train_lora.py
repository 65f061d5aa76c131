"""MiniMind LoRA SFT: ``python -m minimind.train_lora [--fused] [...]``.

MiniMind's LoRA trainer, with the same argument names, on lora_kernels. With no argument it fine-tunes the
bundled tiny base on the bundled identity data (a couple of minutes on a laptop CPU). Reads top to bottom:
arguments, setup (device, dtype, distributed), model and data, the learning-rate schedule, evaluation and
answers, checkpoints, the loop, then the final outputs.

Outputs under ``--out_dir``:

* ``lora/{lora_name}_{hidden_size}[_moe].pth``: the adapter in MiniMind's format (fp16, MiniMind key names,
  read by MiniMind's own ``load_lora``), and the same adapter as ``.safetensors`` (``lora_kernels.save_lora``);
* ``metrics.jsonl``: one JSON object per log step (``step``, ``epoch``, ``loss``, ``lr``, ``tokens_per_s``,
  and ``eval_loss`` when evaluated);
* ``loss_curve.png`` at the end;
* ``checkpoint.pt``: the training state every ``--save_interval`` steps, for ``--resume``.

Every file is written to a temporary name and renamed, so a crash never leaves half a file.

The loss of one optimizer step is the mean cross-entropy over all assistant tokens of its micro-batches
(on all processes), plus the MoE auxiliary loss. Normalising by the global token count (rather than
averaging per-micro-batch means as MiniMind does) makes gradient accumulation and DDP give exactly the
gradient of one large batch.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lora_kernels import (
    disable_lora,
    lora_state_dict,
    lora_summary,
    replace_linear_with_fused_lora,
    save_lora,
    triton_available,
)
from lora_kernels.io import atomic_write

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_BASE = ASSETS / "base.safetensors"
BUNDLED_DATA = ASSETS / "lora_identity.jsonl"
CHECKPOINT_NAME = "checkpoint.pt"
IGNORE_INDEX = -100


class TrainError(Exception):
    """A problem with the user's input or environment: reported in one line, without a traceback."""


# ---------------------------------------------------------------------------------------------------
# Arguments


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (0/1, true/false), got {text!r}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m minimind.train_lora",
        description="MiniMind LoRA SFT on lora_kernels (MiniMind's train_lora arguments, plus --fused).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # MiniMind's arguments, same names and meaning.
    p.add_argument("--out_dir", default="out", help="where the adapter, metrics, curve and checkpoint go")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=16, help="sequences per step (per process with --ddp)")
    p.add_argument("--learning_rate", type=float, default=5e-3)
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="autocast dtype; auto = bfloat16 on CUDA (float16 where bf16 is missing), float32 on CPU")
    p.add_argument("--use_wandb", action="store_true", help="log to Weights & Biases (needs `pip install wandb`)")
    p.add_argument("--wandb_project", default="MiniMind-LoRA")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel; launch with torchrun")
    p.add_argument("--accumulation_steps", type=int, default=1)
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    p.add_argument("--warmup_iters", type=int, default=0, help="linear warm-up steps before the cosine schedule")
    p.add_argument("--log_interval", type=int, default=10, help="steps between metrics lines")
    p.add_argument("--save_interval", type=int, default=100, help="steps between training-state checkpoints")
    p.add_argument("--hidden_size", "--dim", dest="hidden_size", type=int, default=None,
                   help="the base's hidden size (default: read from --base); a mismatch is an error")
    p.add_argument("--num_hidden_layers", "--n_layers", dest="num_hidden_layers", type=int, default=None,
                   help="the base's layer count (default: read from --base)")
    p.add_argument("--max_seq_len", type=int, default=160, help="truncate conversations to this many tokens")
    p.add_argument("--use_moe", type=_bool, default=None, help="the base is MoE (default: read from --base)")
    p.add_argument("--data_path", default=str(BUNDLED_DATA), help="MiniMind SFT JSONL")
    p.add_argument("--lora_name", default="lora_identity", help="adapter file name stem")
    # Ours.
    p.add_argument("--fused", action="store_true", help="lora_kernels' fused LoRA (Triton on CUDA, fused torch on CPU)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, MiniMind's unscaled LoRA)")
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--targets", default="square",
                   help="'square' (MiniMind), 'all-linear', or comma-separated module names (q_proj,v_proj)")
    p.add_argument("--base", default=str(BUNDLED_BASE), help="MiniMind checkpoint (.pth or .safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or its folder (default: the bundled one)")
    p.add_argument("--arch", default=None, choices=["minimind2", "minimind3"], help="default: read from --base")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a training-state checkpoint (default path: OUT_DIR/checkpoint.pt)")
    p.add_argument("--eval_data", default=None, help="SFT JSONL for an evaluation loss at each save and at the end")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: all epochs)")
    p.add_argument("--answers", type=int, default=3, help="prompts answered before/after (0 disables)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (log lines instead)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "accumulation_steps", "log_interval", "save_interval", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_seq_len < 8:
        p.error(f"--max_seq_len must be >= 8, got {args.max_seq_len}")
    if args.learning_rate <= 0:
        p.error(f"--learning_rate must be > 0, got {args.learning_rate}")
    if not 0.0 <= args.lora_dropout < 1.0:
        p.error(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.max_steps < 0 or args.warmup_iters < 0 or args.grad_clip < 0:
        p.error("--max_steps, --warmup_iters and --grad_clip must be >= 0")
    return args


# ---------------------------------------------------------------------------------------------------
# Setup: processes, device, dtype


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    autocast_dtype: Optional[torch.dtype] = None  # None: run in fp32

    @property
    def main(self) -> bool:
        return self.rank == 0


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 arithmetic (x86 AVX512-BF16/AMX, or Arm BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")
    words = set(flags.split())
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def setup_runtime(args) -> Runtime:
    if args.ddp:
        if "RANK" not in os.environ:
            raise TrainError("--ddp needs torchrun: torchrun --nproc_per_node N -m minimind.train_lora --ddp ...")
        use_cuda = torch.cuda.is_available() and not args.device.startswith("cpu")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        try:
            device = torch.device(args.device)
        except RuntimeError as err:
            raise TrainError(f"--device {args.device!r} is not a device: {err}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError(f"--device {args.device} asked for CUDA, but torch sees no GPU; use --device cpu")

    if args.dtype == "auto":
        dtype = None
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif args.dtype == "float32":
        dtype = None
    else:
        dtype = getattr(torch, args.dtype)
        if device.type == "cpu" and dtype == torch.float16:
            raise TrainError("--dtype float16 needs CUDA; on the CPU use --dtype float32 or bfloat16")
        if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_supports_bf16():
            raise TrainError("--dtype bfloat16: this CPU has no native bfloat16 (no avx512_bf16/amx_bf16/bf16 "
                             "flag); use --dtype float32")
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise TrainError("--dtype bfloat16: this GPU does not support bfloat16; use --dtype float16")
    return Runtime(device=device, rank=rank, world_size=world, autocast_dtype=dtype)


def check_out_dir(out_dir: Path) -> None:
    """Fails early, in words, when the output folder cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as err:
        raise TrainError(f"--out_dir {str(out_dir)!r} is not writable: {err.strerror or err}")


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turns a failed write (disk full, permissions) into a one-line TrainError naming the file."""
    try:
        yield
    except OSError as err:
        reason = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise TrainError(f"could not write {what}: {reason}")


# ---------------------------------------------------------------------------------------------------
# Model, tokenizer, data


def load_base(args, rt: Runtime):
    """The base model (all parameters frozen) and its tokenizer, checked against the arguments."""
    from .model import load_minimind
    from .tokenizer import MiniMindTokenizer

    base = Path(args.base)
    if not base.is_file():
        hint = " (the bundled base is missing: reinstall the package)" if base == BUNDLED_BASE else ""
        raise TrainError(f"--base {str(base)!r}: no such file{hint}")
    overrides = {k: v for k, v in (("hidden_size", args.hidden_size), ("num_hidden_layers", args.num_hidden_layers),
                                   ("use_moe", args.use_moe), ("arch", args.arch)) if v is not None}
    try:
        model = load_minimind(base, **overrides)
    except (ValueError, KeyError, TypeError) as err:
        given = ", ".join(f"--{k} {v}" for k, v in overrides.items()) or "the defaults"
        raise TrainError(f"--base {str(base)!r} does not fit {given}: {err}")
    for name, value in overrides.items():
        if getattr(model.config, name) != value:
            raise TrainError(f"--base {str(base)!r} has {name}={getattr(model.config, name)}, not --{name} {value}")

    try:
        tokenizer = MiniMindTokenizer.from_pretrained(args.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise TrainError(f"--tokenizer {args.tokenizer!r}: {err}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TrainError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}: they do not belong together (see --tokenizer)")
    model.requires_grad_(False)
    return model.to(rt.device), tokenizer


def add_lora(model, args, rt: Runtime) -> str:
    """Adds the adapters in place; returns a description of the backend."""
    targets = args.targets
    if targets not in ("square", "all-linear"):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    backend = "auto" if args.fused else "eager"
    torch.manual_seed(args.seed)  # the same A on every process and in fused and eager runs
    try:
        replace_linear_with_fused_lora(model, rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout,
                                       target_modules=targets, backend=backend)
    except (ValueError, TypeError) as err:
        raise TrainError(f"--targets {args.targets!r}: {err}")
    if not args.fused:
        return "eager (MiniMind's unfused LoRA; add --fused for lora_kernels)"
    if rt.device.type == "cuda" and triton_available():
        return "fused: Triton kernels"
    return ("fused: torch backend (Triton kernels need a CUDA GPU; none is used here)"
            if rt.device.type != "cuda" else "fused: torch backend (Triton is not importable)")


def load_sft(path: Optional[str], tokenizer, max_seq_len: int, flag: str):
    from .dataset import SFTDataset

    try:
        return SFTDataset(path, tokenizer, max_seq_len=max_seq_len, pad=False)
    except (FileNotFoundError, ValueError) as err:
        raise TrainError(f"{flag} {path!r}: {err}")


def collate(batch, pad_id: int):
    """(input_ids, labels) padded on the right, and the number of real tokens."""
    from .dataset import pad_batch

    ids, labels = pad_batch(batch, pad_id)
    return ids, labels, sum(len(item[0]) for item in batch)


def epoch_micro_batches(n: int, epoch: int, args, rt: Runtime) -> List[List[int]]:
    """This process's micro-batches for one epoch, as dataset indices.

    One permutation per (seed, epoch), cut into global batches of ``batch_size × world_size`` (an
    incomplete last batch is dropped); process r takes positions r, r + W, ... of each global batch, so a
    run on W processes sees exactly the batches of a single process with W times its batch size.
    """
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    global_batch = args.batch_size * rt.world_size
    batches = []
    for start in range(0, n - global_batch + 1, global_batch):
        chunk = order[start:start + global_batch]
        batches.append(chunk[rt.rank::rt.world_size])
    return batches


# ---------------------------------------------------------------------------------------------------
# Learning rate, loss, evaluation, answers


def get_lr(step: int, total: int, lr: float, warmup: int = 0) -> float:
    """Linear warm-up over ``warmup`` steps, then MiniMind's ``lr/10 + 0.5·lr·(1 + cos(π·t/T))``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t, span = step - warmup, max(1, total - warmup)
    return lr / 10 + 0.5 * lr * (1 + math.cos(math.pi * t / span))


def token_loss_sum(model, ids: torch.Tensor, labels: torch.Tensor):
    """Summed cross-entropy over the assistant tokens, and the MoE auxiliary loss."""
    out = model(ids)
    logits = out.logits[:, :-1].float()
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, out.aux_loss


@torch.no_grad()
def evaluate(model, dataset, args, rt: Runtime) -> float:
    """Mean cross-entropy per assistant token over ``dataset`` (on this process)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), args.batch_size):
        ids, labels, _ = collate([dataset[i] for i in range(start, min(start + args.batch_size, len(dataset)))],
                                 dataset.tokenizer.pad_token_id)
        ids, labels = ids.to(rt.device), labels.to(rt.device)
        with autocast(rt):
            loss_sum, _ = token_loss_sum(model, ids, labels)
        total += loss_sum.item()
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


def autocast(rt: Runtime):
    if rt.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(rt.device.type, dtype=rt.autocast_dtype)


def sample_prompts(dataset, k: int) -> List[List[dict]]:
    """The first k distinct opening user turns of the data (with their system message, if any)."""
    prompts, seen = [], set()
    for i in range(len(dataset)):
        if len(prompts) >= k:
            break
        messages = dataset.conversation(i)
        head = [m for m in messages[:2] if m["role"] == "system"]
        user = next((m for m in messages if m["role"] == "user"), None)
        if user is None or user["content"] in seen:
            continue
        seen.add(user["content"])
        prompts.append(head + [user])
    return prompts


@torch.no_grad()
def answer(model, tokenizer, prompts: List[List[dict]], rt: Runtime, max_new_tokens: int = 48) -> List[str]:
    """Greedy answers, one per prompt."""
    from .generate import generate

    was_training = model.training
    model.eval()
    answers = []
    for messages in prompts:
        ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)],
                           device=rt.device)
        with autocast(rt):
            out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.0,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


# ---------------------------------------------------------------------------------------------------
# Checkpoints and outputs


def adapter_paths(out_dir: Path, args, config) -> Dict[str, Path]:
    stem = f"{args.lora_name}_{config.hidden_size}" + ("_moe" if config.use_moe else "")
    return {"minimind": out_dir / "lora" / f"{stem}.pth", "safetensors": out_dir / "lora" / f"{stem}.safetensors"}


# Settings that must not change when resuming (the run would otherwise silently become another run).
RESUME_KEYS = ("base", "data_path", "rank", "alpha", "lora_dropout", "targets", "batch_size", "accumulation_steps",
               "epochs", "learning_rate", "warmup_iters", "max_seq_len", "seed", "max_steps")


def save_checkpoint(path: Path, model, optimizer, scaler, step: int, args) -> None:
    state = {
        "lora": {k: v.cpu() for k, v in lora_state_dict(model).items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "args": {k: getattr(args, k) for k in RESUME_KEYS},
    }
    with writing(str(path)):
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, model, optimizer, scaler, args) -> int:
    """Restores the training state; returns the number of optimizer steps already done."""
    if not path.is_file():
        raise TrainError(f"--resume: no checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign or damaged file
        raise TrainError(f"--resume: {str(path)!r} is not a readable training checkpoint: {err}")
    changed = [f"--{k} {state['args'].get(k)!r} -> {getattr(args, k)!r}" for k in RESUME_KEYS
               if state["args"].get(k) != getattr(args, k)]
    if changed:
        raise TrainError("--resume: the checkpoint was made with other settings: " + "; ".join(changed))
    with torch.no_grad():
        params = lora_state_dict(model)
        for name, value in state["lora"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])


def write_metrics(path: Path, rows: List[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    with writing(str(path)):
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_metrics(path: Path, up_to_step: int) -> List[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= up_to_step]


def plot_loss(rows: List[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per assistant token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with writing(str(path)):
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Training


def log(rt: Runtime, text: str) -> None:
    if rt.main:
        from tqdm import tqdm

        tqdm.write(text)


def train(args) -> Dict[str, object]:
    """Runs the whole job; returns a summary (paths, first and last loss). Raises TrainError on bad input."""
    from tqdm import tqdm

    from .lora_io import save_minimind_lora

    rt = setup_runtime(args)
    out_dir = Path(args.out_dir)
    if rt.main:
        check_out_dir(out_dir)
    model, tokenizer = load_base(args, rt)
    backend = add_lora(model, args, rt)
    train_set = load_sft(args.data_path, tokenizer, args.max_seq_len, "--data_path")
    eval_set = load_sft(args.eval_data, tokenizer, args.max_seq_len, "--eval_data") if args.eval_data else None
    if len(train_set) < args.batch_size * rt.world_size:
        raise TrainError(f"--data_path has {len(train_set)} conversations, fewer than one batch of "
                         f"{args.batch_size * rt.world_size}; lower --batch_size")

    batches_per_epoch = len(epoch_micro_batches(len(train_set), 0, args, rt))
    steps_per_epoch = math.ceil(batches_per_epoch / args.accumulation_steps)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    lora_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.autocast_dtype == torch.float16)
    paths = adapter_paths(out_dir, args, model.config)
    ckpt_path = out_dir / CHECKPOINT_NAME if args.resume in (None, "auto") else Path(args.resume)
    metrics_path = out_dir / "metrics.jsonl"
    done = load_checkpoint(ckpt_path, model, optimizer, scaler, args) if args.resume else 0
    rows = read_metrics(metrics_path, done) if (args.resume and rt.main) else []

    summary = lora_summary(model)
    cfg = model.config
    prompts = sample_prompts(train_set, args.answers) if rt.main else []
    before = []
    if prompts:
        with disable_lora(model):
            before = answer(model, tokenizer, prompts, rt)
    log(rt, "\n".join([
        "MiniMind LoRA SFT",
        f"  base       {args.base}  ({cfg.arch}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers"
        f"{', MoE' if cfg.use_moe else ''}, {summary.total - summary.trainable:,} base parameters)",
        f"  LoRA       rank {args.rank}, alpha {args.alpha if args.alpha is not None else args.rank:g}, dropout "
        f"{args.lora_dropout:g}, targets {args.targets!r}: {summary.lora_layers} layers",
        f"  trainable  {summary.trainable:,} parameters ({summary.percent:.2f}% of {summary.total:,})",
        f"  backend    {backend}",
        f"  device     {rt.device}" + (f" x {rt.world_size} processes" if rt.world_size > 1 else "")
        + f", dtype {rt.autocast_dtype or torch.float32}".replace("torch.", ""),
        f"  data       {args.data_path}: {len(train_set)} conversations, batch {args.batch_size * rt.world_size}"
        f" x {args.accumulation_steps} accumulation, {args.epochs} epochs = {total_steps} steps"
        + (f" (resuming after step {done})" if done else ""),
        f"  output     {out_dir}",
    ]))

    wandb = None
    if args.use_wandb and rt.main:
        try:
            import wandb as wandb_module

            wandb = wandb_module
            wandb.init(project=args.wandb_project, config=vars(args))
        except ImportError:
            log(rt, "--use_wandb: wandb is not installed (pip install wandb); continuing without it")

    ddp_model = model
    if rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                            find_unused_parameters=bool(cfg.use_moe))

    model.train()
    step = done
    bar = tqdm(total=total_steps, initial=done, disable=not rt.main or args.no_progress, unit="step",
               dynamic_ncols=True)
    tokens_since, time_since = 0, time.perf_counter()
    pad_id = tokenizer.pad_token_id
    while step < total_steps:
        epoch = step // steps_per_epoch
        micro = epoch_micro_batches(len(train_set), epoch, args, rt)
        windows = [micro[i:i + args.accumulation_steps] for i in range(0, len(micro), args.accumulation_steps)]
        for window in windows[step - epoch * steps_per_epoch:]:
            batches = [collate([train_set[i] for i in idx], pad_id) for idx in window]
            n_tokens = torch.tensor([float(sum(int((b[1][:, 1:] != IGNORE_INDEX).sum()) for b in batches))])
            if rt.world_size > 1:
                dist.all_reduce(n_tokens)
            lr = get_lr(step, total_steps, args.learning_rate, args.warmup_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss_sum, aux_sum = torch.zeros((), device=rt.device), torch.zeros((), device=rt.device)
            for j, (ids, labels, real_tokens) in enumerate(batches):
                ids, labels = ids.to(rt.device), labels.to(rt.device)
                sync = j == len(batches) - 1 or rt.world_size == 1
                with (contextlib.nullcontext() if sync else ddp_model.no_sync()), autocast(rt):
                    ce_sum, aux = token_loss_sum(ddp_model, ids, labels)
                    loss = ce_sum * rt.world_size / n_tokens.to(rt.device).clamp(min=1) + aux / len(batches)
                scaler.scale(loss).backward()
                loss_sum += ce_sum.detach()
                aux_sum += aux.detach() / len(batches)
                tokens_since += real_tokens
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(lora_params, args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if rt.world_size > 1:
                dist.all_reduce(loss_sum)
            step_loss = loss_sum.item() / max(n_tokens.item(), 1) + aux_sum.item()
            elapsed = time.perf_counter() - time_since
            tok_s = tokens_since * rt.world_size / max(elapsed, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)

            is_save = step % args.save_interval == 0 or step == total_steps
            if rt.main and (step % args.log_interval == 0 or step == total_steps or step == done + 1):
                row = {"step": step, "epoch": epoch + 1, "loss": round(step_loss, 6), "lr": lr,
                       "tokens_per_s": round(tok_s, 1)}
                if eval_set is not None and is_save:
                    row["eval_loss"] = round(evaluate(model, eval_set, args, rt), 6)
                rows.append(row)
                write_metrics(metrics_path, rows)
                if wandb:
                    wandb.log(row, step=step)
                if args.no_progress:
                    log(rt, json.dumps(row))
                tokens_since, time_since = 0, time.perf_counter()
            if rt.main and is_save:
                save_checkpoint(ckpt_path, model, optimizer, scaler, step, args)
                if args.no_progress:
                    log(rt, f"checkpoint: step {step} -> {ckpt_path}")
            if step >= total_steps:
                break
    bar.close()

    result: Dict[str, object] = {"steps": step, "paths": paths, "metrics": metrics_path}
    if rt.main:
        with writing(str(paths["minimind"])):
            save_minimind_lora(model, paths["minimind"])
        with writing(str(paths["safetensors"])):
            save_lora(model, paths["safetensors"])
        if rows:
            plot_loss(rows, out_dir / "loss_curve.png", f"{args.lora_name}: rank {args.rank}, {backend.split(':')[0]}")
            result.update(first_loss=rows[0]["loss"], last_loss=rows[-1]["loss"])
        lines = [f"saved {paths['minimind']} (MiniMind format) and {paths['safetensors'].name}",
                 f"metrics {metrics_path}, curve {out_dir / 'loss_curve.png'}"]
        if rows:
            lines.insert(0, f"loss {rows[0]['loss']:.4f} (step {rows[0]['step']}) -> {rows[-1]['loss']:.4f} "
                            f"(step {rows[-1]['step']})")
        if prompts:
            after = answer(model, tokenizer, prompts, rt)
            result["answers"] = list(zip([p[-1]["content"] for p in prompts], before, after))
            lines.append("before -> after (adapter off / on):")
            for question, old, new in result["answers"]:
                lines += [f"  Q: {question}", f"     off: {old}", f"     on:  {new}"]
        log(rt, "\n".join(lines))
    if wandb:
        wandb.finish()
    if rt.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except TrainError as err:
        print(f"train_lora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train_lora: interrupted; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
