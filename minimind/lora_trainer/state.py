"""The training-state file that ``--resume`` continues from, and the metrics a run continues.

The state (``save_checkpoint``, ``load_checkpoint``) is one ``torch.save``'d dict, ``"format":
"minimind.train_lora"``: the adapters' A and B, and DoRA's magnitudes (``trained_tensors``), the optimizer's state (gathered whole
under --fsdp: ``optimizer_state``), the GradScaler's, the CPU and CUDA RNG states, the step, the process
count and the settings it depends on (``resume_keys``), which a resumed run must repeat. A fresh run keeps
an earlier run's metrics under a new name and removes its plots; a resumed one continues its metrics
(``start_metrics``, ``remove_earlier_plots``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from atomic_io import atomic_write, load_weights_only
from lora_kernels import lora_state_dict
from lora_kernels.fsdp import scatter_full

from ..cli import CLIError, reading, writing
from ..run_dir import read_metrics
from .config import NAMED_ADAPTERS, RESUME_DEFAULTS, resume_keys
from .run import Run


def remove_earlier_plots(run: Run) -> None:
    """A fresh run removes the plots an earlier run drew in its output folder (the loss curve, the overview
    and statistics, also in the per-adapter sub-folders of a run with several adapters), so that none of them
    is taken for this run's; the earlier run's metrics are kept (start_metrics) and redraw its curve."""
    from ..plot_lora import OVERVIEW_NAME, STATS_NAME

    plots = run.paths.plots
    folders = [plots] + ([d for d in plots.iterdir() if d.is_dir() and (d / OVERVIEW_NAME).is_file()]
                         if plots.is_dir() else [])
    found = [f for f in [run.paths.loss_curve] + [d / n for d in folders for n in (OVERVIEW_NAME, STATS_NAME)]
             if f.is_file()]
    for f in found:
        f.unlink()
    for d in folders[1:]:
        if not any(d.iterdir()):
            d.rmdir()
    if found:
        run.rt.notes.append(f"removed {len(found)} plot file(s) of an earlier run ({found[0].name}...)")


def start_metrics(run: Run) -> List[dict]:
    """The metrics rows this run continues: on resume the earlier rows up to the checkpoint's step; in a
    fresh run none, and an earlier run's file is kept under a new name instead of being overwritten."""
    path = run.paths.metrics
    if not path.is_file():
        return []
    if not run.cfg.resume or run.step == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        kept = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
        for n in range(2, 1000):  # never replace an earlier archive
            if not kept.exists():
                break
            kept = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
        with writing(kept):
            os.replace(path, kept)
        run.rt.notes.append(f"an earlier run's {path.name} is kept as {kept.name}")
        return []
    rows = read_metrics(path)
    kept = [r for r in rows if r["step"] <= run.step]
    if len(kept) != len(rows):  # rows logged after the checkpoint are logged again
        text = "".join(json.dumps(r) + "\n" for r in kept)
        with writing(path):
            atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return kept


def trained_tensors(run: Run) -> Dict[str, torch.Tensor]:
    """The adapters' A and B, and under --use_dora their magnitudes (detached, sharing the parameters' storage), as
    the training state holds them: one adapter by module path, several as ``<adapter>/<module path>.lora_A``."""
    if not run.cfg.multi:
        return lora_state_dict(run.model)
    return {f"{name}/{key}": value for name in run.names for key, value in lora_state_dict(run.model, name).items()}


def optimizer_state(run: Run) -> dict:
    """The optimizer's state to save. Under --fsdp its moments are shards: every process takes part in
    gathering them whole (keyed by parameter name), and rank 0 receives them."""
    if not run.cfg.fsdp:
        return run.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(run.model, run.optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(run: Run, optimizer: Optional[dict] = None) -> None:
    """The training state (adapter, optimizer, scaler, RNG, step, the settings it depends on), atomically.

    Args:
        optimizer: the optimizer's state (:func:`optimizer_state`); None: ``run.optimizer.state_dict()``.
    """
    state = {
        "format": "minimind.train_lora",
        "lora": {k: v.cpu() for k, v in trained_tensors(run).items()},
        "optimizer": run.optimizer.state_dict() if optimizer is None else optimizer,
        "scaler": run.scaler.state_dict(),
        "step": run.step,
        "world_size": run.rt.world_size,
        "fsdp": run.cfg.fsdp,  # the optimizer state is keyed by parameter name then
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "config": {k: getattr(run.cfg, k) for k in resume_keys(run.cfg)},
    }
    with writing(run.paths.checkpoint):
        atomic_write(run.paths.checkpoint, lambda tmp: torch.save(state, tmp))


def setting_change(key: str, before, after) -> str:
    """``--key before -> after``; a list of many adapters' names or data sets (comma-separated, as many before
    as after) names the entries that differ instead of repeating both lists whole."""
    if key in ("lora_name", "data_path") and isinstance(before, str) and isinstance(after, str):
        old, new = before.split(","), after.split(",")
        if len(old) == len(new) > NAMED_ADAPTERS:
            diffs = [f"#{i + 1} {a.strip()!r} -> {b.strip()!r}" for i, (a, b) in enumerate(zip(old, new)) if a != b]
            return (f"--{key} ({len(old)} entries) " + ", ".join(diffs[:3])
                    + (f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""))
    return f"--{key} {before!r} -> {after!r}"


def load_checkpoint(run: Run) -> int:
    """Checks a training state against this run, then restores it; returns the steps already done.

    Raises:
        CLIError: no such file (except with --from_resume 1, which then starts afresh), an unreadable file,
            missing fields, other settings, or LoRA tensors that do not fit (all named).
    """
    cfg = run.cfg
    path = Path(cfg.resume) if cfg.resume not in ("auto", "if-present") else run.paths.checkpoint
    flag = "--from_resume 1" if cfg.resume == "if-present" else "--resume"
    if not path.is_file():
        if cfg.resume == "if-present":
            run.rt.notes.append(f"--from_resume 1: no training state at {path}; starting afresh")
            return 0
        raise CLIError(f"{flag}: no training state at {str(path)!r}")
    with reading(f"{flag}: training state {str(path)!r}"):
        state = load_weights_only(path)
    needed = ("lora", "optimizer", "scaler", "step", "rng_cpu", "config")
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise CLIError(f"{flag}: {str(path)!r} is not a training state of this trainer (missing {', '.join(missing)})")
    if not isinstance(state["config"], dict) or not isinstance(state["lora"], dict) or \
            not isinstance(state["step"], int) or state["step"] < 0:
        raise CLIError(f"{flag}: {str(path)!r} has a malformed 'config', 'lora' or 'step' field")
    keys = resume_keys(cfg) + (("lora_name",) if "lora_name" in state["config"] and not cfg.multi else ())
    keys = tuple(k for k in keys if k != "max_steps")  # may change: the run is extended (or cut short)
    saved = {k: state["config"].get(k, RESUME_DEFAULTS.get(k)) for k in keys}
    changed = [setting_change(k, saved[k], getattr(cfg, k)) for k in keys if saved[k] != getattr(cfg, k)]
    if state.get("world_size", 1) != run.rt.world_size:  # the global batch is batch_size x processes
        changed.append(f"{state.get('world_size', 1)} -> {run.rt.world_size} processes")
    if state.get("fsdp", False) != cfg.fsdp:
        changed.append("without --fsdp -> --fsdp" if cfg.fsdp else "--fsdp -> without it")
    if changed:
        raise CLIError(f"{flag}: {path} was made with other settings: " + "; ".join(changed))
    if state["step"] > run.total_steps:
        raise CLIError(f"{flag}: {path} has trained {state['step']} steps, more than this run's {run.total_steps} "
                       "(--max_steps / --epochs); give a larger --max_steps")
    earlier = state["config"].get("max_steps")
    if earlier != cfg.max_steps:
        # The learning-rate schedule is a function of the run's total steps: the steps still to come follow
        # the schedule of the new total, as if the run had been planned that long from the start.
        run.rt.notes.append(f"{flag}: --max_steps {earlier} -> {cfg.max_steps}: steps {state['step'] + 1}-"
                            f"{run.total_steps} follow the learning-rate schedule over {run.total_steps} steps "
                            f"(the first {state['step']} followed the earlier run's)")
    params = trained_tensors(run)
    problems = [f"unknown tensor {k}" for k in state["lora"] if k not in params]
    problems += [f"missing tensor {k}" for k in params if k not in state["lora"]]
    problems += [f"{k} has shape {tuple(v.shape)}, the model needs {tuple(params[k].shape)}"
                 for k, v in state["lora"].items() if k in params and (not isinstance(v, torch.Tensor)
                                                                        or v.shape != params[k].shape)]
    if problems:
        raise CLIError(f"{flag}: {path} does not fit this model: {'; '.join(problems[:4])}"
                       + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""))
    try:
        if cfg.fsdp:  # saved whole (optimizer_state): each process keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(run.model, run.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        rng_cpu = state["rng_cpu"]
        torch.get_rng_state().copy_(rng_cpu)  # a wrong size or dtype raises here, before anything is set
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
        raise CLIError(f"{flag}: {path} has an optimizer or RNG state that does not fit: {err}")
    with torch.no_grad():
        for name, value in state["lora"].items():
            params[name].copy_(scatter_full(params[name], value))  # --fsdp: this process's shard
    torch.set_rng_state(rng_cpu)
    if state.get("rng_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["step"]
