"""The files of one training run and who owns them: where each goes (``RunPaths``, in our layout or
MiniMind's), the lock that gives the output to one run at a time (``OutputLock``), and the metrics file,
appended one JSON line per log step and read back on resume (``append_metrics``, ``read_metrics``).
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from .cli import CLIError, writing


def check_out_dir(out_dir: Path) -> None:
    """Fails early, in words, when the output folder cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as err:
        raise CLIError(f"output folder {str(out_dir)!r} is not writable: {err.strerror or err}")


@dataclass
class RunPaths:
    """Every file a run writes (see ``minimind.train_lora``'s docstring for what each holds)."""

    adapter: Path        # MiniMind's format
    adapter_safetensors: Path
    checkpoint: Path
    metrics: Path
    loss_curve: Path
    plots: Path          # folder of lora_overview.png and lora_stats.json
    lock: Path

    def outputs(self) -> List[Path]:
        from .plot_lora import OVERVIEW_NAME, STATS_NAME

        return [self.adapter, self.adapter_safetensors, self.checkpoint, self.metrics, self.loss_curve,
                self.plots / OVERVIEW_NAME, self.plots / STATS_NAME]


def run_paths(layout: str, out_dir: Union[str, os.PathLike], lora_name: str, hidden_size: int,
              use_moe: bool) -> RunPaths:
    """Where a run's files go: ``layout`` ``"ours"`` (``--out_dir``) or ``"minimind"`` (``--save_dir``)."""
    stem = f"{lora_name}_{hidden_size}" + ("_moe" if use_moe else "")
    out = Path(out_dir)
    if layout == "minimind":  # MiniMind: the adapter in save_dir, the training state in ../checkpoints
        state = out.parent / "checkpoints"
        return RunPaths(out / f"{stem}.pth", state / f"{stem}.safetensors", state / f"{stem}_resume.pth",
                        state / f"{stem}_metrics.jsonl", state / f"{stem}_loss_curve.png", state / f"{stem}_plots",
                        state / f"{stem}.lock")
    return RunPaths(out / "lora" / f"{stem}.pth", out / "lora" / f"{stem}.safetensors", out / "checkpoint.pt",
                    out / "metrics.jsonl", out / "loss_curve.png", out, out / "train_lora.lock")


class OutputLock:
    """A lock file naming the PID and host of the run that owns the output; a dead owner's lock is taken over."""

    def __init__(self, path: Path):
        self.path = path
        self.held = False

    def acquire(self) -> Optional[str]:
        """Takes the lock; returns a note when a stale lock was taken over. Raises CLIError when it is held."""
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or self._alive(owner):
                    who = f"PID {owner['pid']} on {owner['host']}" if owner else "another run"
                    raise CLIError(f"{self.path.parent} is in use by another training run ({who}; lock file "
                                   f"{self.path}): wait for it to finish or choose another output folder")
                self.path.unlink(missing_ok=True)
                note = f"took over a stale lock of PID {owner['pid']} (no longer running): {self.path}"
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
            self.held = True
            return note
        raise CLIError(f"could not take the lock {self.path}: another run keeps creating it")

    def _owner(self) -> Optional[dict]:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner.get("pid"), int) else {"pid": -1, "host": socket.gethostname()}
        except (OSError, ValueError, AttributeError):
            return {"pid": -1, "host": socket.gethostname()}  # unreadable: left by a crash while writing it

    @staticmethod
    def _alive(owner: dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return True  # another machine's process: we cannot tell, so we do not steal it
        if owner["pid"] <= 0:
            return False
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def append_metrics(path: Path, row: dict) -> None:
    """Appends one JSON line (the file is never rewritten while a run logs)."""
    with writing(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> List[dict]:
    """The rows of a metrics file. A last line cut off by a crash is dropped; any other damage is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"{path} is not readable: {err}")
    lines = text.split("\n")
    rows = []
    for number_, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or "loss" not in row:
                raise ValueError("expected an object with an integer 'step' and a 'loss'")
        except ValueError as err:
            if number_ == len(lines) and not text.endswith("\n"):
                break  # the last line of a run killed mid-write
            raise CLIError(f"{path}:{number_} is damaged ({err}); fix or remove that line to resume")
        rows.append(row)
    return rows
