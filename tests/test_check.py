"""``python -m lora_kernels.check`` (the device check) as far as a CPU can run it: argument parsing, the
no-CUDA exit, and the correctness path on Triton's interpreter at tiny shapes, including its failure exit."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, TOLERANCES
from lora_kernels import check

CUDA = torch.cuda.is_available()


def test_parse_shapes():
    assert check.parse_shapes("8192x768x768:16, 1x4096x11008:64") == [(8192, 768, 768, 16), (1, 4096, 11008, 64)]
    for bad in ("8x8:4", "8x8x8", "0x8x8:4", "axbxc:d"):
        with pytest.raises(Exception, match="MxKxN:rank|>= 1"):
            check.parse_shapes(bad)


def test_defaults_are_the_benchmark_shapes_and_the_test_tolerances():
    from benchmarks.conftest import _shapes

    assert [(s.m, s.k, s.n, s.r) for s in _shapes(torch.device("cuda"), quick=False)] == list(check.BENCH_SHAPES)
    assert check.TOLERANCES == {"fp32": TOLERANCES[torch.float32], "tf32": TOLERANCES["tf32"],
                                "fp16": TOLERANCES[torch.float16], "bf16": TOLERANCES[torch.bfloat16]}


@pytest.mark.skipif(CUDA, reason="checks the message shown where torch sees no CUDA device")
def test_without_cuda_it_says_so_and_exits_2():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "lora_kernels.check", "--no-timing"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "--interpret" in done.stderr


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter path")
def test_interpreter_correctness_passes_and_a_mismatch_fails(capsys, monkeypatch):
    args = ["--interpret", "--shapes", "9x20x12:3", "--precision", "fp32", "fp16", "bf16"]
    assert check.main(args) == 0
    out = capsys.readouterr()
    assert out.out.count("| ok |") == 8 and "MISMATCH" not in out.out  # 2 precisions x bias x dropout
    assert "bf16 skipped" in out.err
    monkeypatch.setitem(check.TOLERANCES, "fp32", 0.0)  # nothing is exact: every fp32 row must now fail
    assert check.main(args[:-2]) == 1
    out = capsys.readouterr().out
    assert out.count("MISMATCH") == 4 and "4 mismatch(es)" in out


def test_swept_tritons_are_the_committed_reports():
    """check.SWEPT (what `check` tells users is covered) equals the committed default sweeps (not --quick
    or --only subsets): their Triton and archs, read from each report.json."""
    import json

    committed = {}
    for report in (ROOT / "benchmarks" / "results" / "compile-gate").rglob("report.json"):
        data = json.loads(report.read_text())
        if "--quick" in data["command"] or "--only" in data["command"]:
            continue  # a subset (of cases or of kinds), not a sweep users can rely on
        archs = {int(line.split(":")[0][2:]) for line in data["summary"]}
        committed.setdefault(data["triton"], set()).update(archs)
    assert {v: set(a) for v, a in check.SWEPT.items()} == committed


def test_stack_lines_name_the_stack_and_warn_without_a_sweep(monkeypatch):
    import triton

    lines = check.stack_lines()
    assert f"torch {torch.__version__}" in lines[0] and f"Triton {triton.__version__}" in lines[0]
    monkeypatch.setattr(triton, "__version__", "0.0.1")
    lines = check.stack_lines()
    assert "Triton 0.0.1" in lines[0] and lines[1].startswith("WARNING: no committed compile-gate sweep covers Triton 0.0.1")
