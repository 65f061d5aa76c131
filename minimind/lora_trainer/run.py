"""Everything a run holds (``Run``: configuration, processes, model, data, optimizer, files, progress) and
the adapter files it writes (``adapter_files``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from lora_kernels.config import DEFAULT_ADAPTER

from ..run_dir import OutputLock, RunPaths, run_paths
from ..training import cosine_lr
from .config import TrainConfig
from .runtime import Runtime


@dataclass
class Run:
    cfg: TrainConfig
    rt: Runtime
    model: torch.nn.Module          # the model (adapters inside); saved, evaluated, answers
    train_model: torch.nn.Module    # what the step calls: model, DDP(model), and/or torch.compile'd
    tokenizer: object
    train_set: object
    eval_set: object
    optimizer: torch.optim.Optimizer
    scaler: object
    paths: RunPaths
    lock: Optional[OutputLock]
    backend: str
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    rows: List[dict] = field(default_factory=list)
    prompts: List[list] = field(default_factory=list)
    before: List[str] = field(default_factory=list)
    wandb: object = None
    tokens_since: int = 0
    time_since: float = field(default_factory=time.perf_counter)
    bar: object = None
    # The adapters trained (their names in the model), each one's (MiniMind .pth or None under --use_dora,
    # .safetensors) files and last step loss; with several adapters, the adapter each of ``prompts`` is answered with.
    names: List[str] = field(default_factory=lambda: [DEFAULT_ADAPTER])
    adapter_files: Dict[str, Tuple[Optional[Path], Path]] = field(default_factory=dict)
    last_losses: Dict[str, float] = field(default_factory=dict)
    prompt_adapters: List[Optional[str]] = field(default_factory=list)

    def log(self, text: str) -> None:
        if self.rt.main:
            from tqdm import tqdm

            tqdm.write(text)

    def lr_at(self, step: int) -> float:
        lr, total, warmup = self.cfg.learning_rate, self.total_steps, self.cfg.warmup_iters
        if self.cfg.lr_schedule == "minimind3":  # MiniMind-3 counts steps from 1: the last step gets lr/10
            return cosine_lr(step + 1, total, peak=lr, floor=lr / 10, warmup=warmup)
        return cosine_lr(step, total, peak=1.1 * lr, floor=lr / 10, warmup=warmup)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.lock is not None:
            self.lock.release()
        if self.wandb:
            self.wandb.finish()
        if self.rt.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def adapter_files(cfg: TrainConfig, model, paths: RunPaths) -> Dict[str, Tuple[Optional[Path], Path]]:
    """``{adapter: (MiniMind .pth, .safetensors)}``; several adapters get the file names a run of each alone
    would write. Under ``--use_dora`` the MiniMind file is None: its format has no DoRA magnitude, so the
    adapter is written in lora_kernels' format (the .safetensors) only."""
    if not cfg.multi:
        own = {DEFAULT_ADAPTER: paths}
    else:
        own = {name: run_paths(cfg.layout, cfg.out_dir, name, model.config.hidden_size, model.config.use_moe)
               for name in cfg.lora_names}
    return {name: (None if cfg.use_dora else p.adapter, p.adapter_safetensors) for name, p in own.items()}
