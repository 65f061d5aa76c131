"""minimind.run_dir: the output folder's lock, the run's file names per layout, and the metrics file."""
import json
import os
import subprocess
import sys

import pytest

from minimind.cli import CLIError
from minimind.run_dir import OutputLock, append_metrics, read_metrics, run_paths


def test_a_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs
    (tmp_path / "x.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    lock = OutputLock(tmp_path / "x.lock")
    assert f"PID {dead.pid}" in lock.acquire()
    assert json.loads((tmp_path / "x.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "x.lock").exists()


def test_a_held_lock_refuses_a_second_run(tmp_path):
    first, second = OutputLock(tmp_path / "x.lock"), OutputLock(tmp_path / "x.lock")
    first.acquire()
    try:
        with pytest.raises(CLIError, match=str(os.getpid())):
            second.acquire()
        assert json.loads((tmp_path / "x.lock").read_text())["pid"] == os.getpid()  # still the first run's
    finally:
        first.release()
    assert not (tmp_path / "x.lock").exists()


def test_run_paths_of_both_layouts(tmp_path):
    ours = run_paths("ours", tmp_path / "out", "lora_x", 64, False)
    assert ours.adapter == tmp_path / "out" / "lora" / "lora_x_64.pth"
    assert ours.adapter_safetensors == tmp_path / "out" / "lora" / "lora_x_64.safetensors"
    assert ours.metrics == tmp_path / "out" / "metrics.jsonl"
    mm = run_paths("minimind", tmp_path / "save", "lora_x", 64, True)  # MiniMind: the state in ../checkpoints
    assert mm.adapter == tmp_path / "save" / "lora_x_64_moe.pth"
    assert mm.checkpoint == tmp_path / "checkpoints" / "lora_x_64_moe_resume.pth"


def test_metrics_read_back_and_a_cut_last_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0, "lr": 1e-3}]
    for row in rows:
        append_metrics(path, row)
    assert read_metrics(path) == rows
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 3, "lo')  # a run killed mid-write
    assert read_metrics(path) == rows
    path.write_text(json.dumps(rows[0]) + "\n{oops}\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(CLIError, match="metrics.jsonl:2 is damaged"):
        read_metrics(path)
