"""minimind.run_dir: the output folder's lock, the run's file names per layout, and the metrics file."""
import json
import os
import subprocess
import sys

from minimind.run_dir import OutputLock


def test_a_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs
    (tmp_path / "x.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    lock = OutputLock(tmp_path / "x.lock")
    assert f"PID {dead.pid}" in lock.acquire()
    assert json.loads((tmp_path / "x.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "x.lock").exists()

