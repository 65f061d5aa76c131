"""Where a run runs: ``Runtime`` (device, process rank and count, autocast), the device and dtype checks,
the DDP/FSDP process setup (``setup_runtime``), setup errors agreed across processes (``agree``), and
FSDP2 sharding of the model (``shard_model``).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from ..cli import CLIError
from .config import TrainConfig


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    autocast_dtype: Optional[torch.dtype] = None  # None: fp32
    notes: List[str] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 arithmetic (x86 AVX512-BF16/AMX, or Arm BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")
    return bool(set(flags.split()) & {"avx512_bf16", "amx_bf16", "bf16"})


def _checked_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: there are {torch.cuda.device_count()} GPUs (cuda:0 ...)")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception:  # each backend (mps, xpu, ...) says "not available" in its own way
            raise CLIError(f"--device {name}: no such device on this machine; use --device cpu")
    return device


def setup_runtime(cfg: TrainConfig) -> Runtime:
    if cfg.ddp or cfg.fsdp:
        if "RANK" not in os.environ:
            flag = "--fsdp" if cfg.fsdp else "--ddp"
            raise CLIError(f"{flag} needs torchrun (RANK is not set): torchrun --nproc_per_node N -m "
                           f"minimind.train_lora {flag} ...")
        use_cuda = torch.cuda.is_available() and not cfg.device.startswith("cpu")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        rt = Runtime(device, dist.get_rank(), dist.get_world_size())
    else:
        rt = Runtime(_checked_device(cfg.device))
    if cfg.dtype == "auto" and rt.device.type == "cuda":
        rt.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif cfg.dtype in ("bfloat16", "float16"):
        wanted = getattr(torch, cfg.dtype)
        if rt.device.type == "cpu" and (wanted == torch.float16 or not cpu_supports_bf16()):
            rt.notes.append(f"--dtype {cfg.dtype}: not native on this CPU; running in float32 (as MiniMind does)")
        elif rt.device.type == "cuda" and wanted == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise CLIError("--dtype bfloat16: this GPU does not support bfloat16; use --dtype float16")
        else:
            rt.autocast_dtype = wanted
    return rt


def agree(rt: Runtime, error: Optional[CLIError]) -> None:
    """Under DDP, every process stops when one of them failed during setup (instead of waiting forever)."""
    if rt.world_size > 1:
        flag = torch.tensor([1.0 if error else 0.0])
        dist.all_reduce(flag)
        if flag.item() and error is None:
            raise CLIError("another process failed during setup (its message is above)")
    if error is not None:
        raise error


def shard_model(model) -> None:
    """--fsdp: FSDP2 over each transformer block, then the rest (embeddings, norms, the tied head).

    Every process has loaded the whole base (and quantized it) before this; from here on each holds its
    shard, and a block's base is all-gathered for that block's forward and backward only.
    """
    from lora_kernels.fsdp import shard_lora_model

    # A block returns its KV cache (k, v) as views, which nothing writes in place: FSDP2's warning about in-place
    # ops on view outputs does not apply.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    shard_lora_model(model, model.model.layers)
