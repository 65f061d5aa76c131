"""The compile gate (``python -m lora_kernels.check --aot``) on a representative subset, and its stand-in GPU.

The kernels are compiled for real targets (sm90, sm80) with the installed Triton and ptxas, in a subprocess
without ``TRITON_INTERPRET`` (in this process ``triton.jit`` built interpreter functions). The subset
(``--quick``): decode M = 17 and training M = 8192, N = K = 768, ranks 16 and 100 (rank blocks 16 and 64,
a rank that is a multiple of 16 and one that is not), every combination of bias, dropout and trainable W, and the
segmented primitives (64 rows x 64 tokens); sm90 in bf16 and TF32, sm80 in bf16: every kernel of
forward and backward in both MMA forms (about 130 compilations, ~1-2 minutes on 2 cores with a cold Triton
cache). The full sweep's report is in benchmarks/results/compile-gate/.
"""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT
from lora_kernels.ops import aot
from lora_kernels.ops.standin import GPUS, stand_in_gpu

_missing = aot.missing_tools()
needs_ptxas = pytest.mark.skipif(_missing is not None, reason=f"compile gate: {_missing}")


def _env():
    """This environment without TRITON_INTERPRET (kernels compile for real), with this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    return env


def _run(args, timeout):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick_gate(tmp_path_factory):
    """sm90 in bf16 and TF32, sm80 in bf16: two gate processes side by side (one per core); merged report."""
    runs = []
    for arch, precisions in (("90", ["bf16", "tf32"]), ("80", ["bf16"])):
        out = tmp_path_factory.mktemp(f"gate{arch}")
        command = [sys.executable, "-m", "lora_kernels.check", "--aot", "--quick", "--arch", arch, "--precision",
                   *precisions, "--out", str(out)]
        runs.append((out, subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)))
    codes, stdout, report = [], "", {"failures": [], "errors": [], "kernels": []}
    for out, proc in runs:
        out_text, err_text = proc.communicate(timeout=900)
        codes.append(proc.returncode)
        stdout += out_text + err_text
        if (out / "report.json").exists():
            part = json.loads((out / "report.json").read_text())
            for key in report:
                report[key] += part[key]
    return codes, stdout, report


@needs_ptxas
def test_quick_gate_passes(quick_gate):
    codes, stdout, report = quick_gate
    assert codes == [0, 0], "\n".join(report["failures"]) or stdout[-3000:]
    assert report["failures"] == [] and report["errors"] == []
    kernels = report["kernels"]
    for arch in (90, 80):
        roles = {role for k in kernels if k["arch"] == arch for role in k["roles"]}
        assert roles >= {"down", "forward", "dY", "sum", "dX", "dA", "dW", "mask"}, (arch, roles)
        assert roles >= {"seg-S", "seg-y", "seg-dS", "seg-dX", "seg-dA", "seg-dB"}, (arch, roles)  # ops.segmented
    for k in kernels:
        if k["default"]:
            assert k["spill_stores"] == k["spill_loads"] == 0, k
            assert k["shared"] <= GPUS[k["arch"]].max_shared_mem, k
            assert 0 < k["registers"] <= 255, k
    # sm90 bf16 GEMMs (forward, dX, dY pass) run on warpgroup MMA; sm80 has no wgmma at all
    wide = [k for k in kernels if k["arch"] == 90 and k["precision"] == "bf16" and k["constexprs"].get("BLOCK_M", 0) >= 64
            and set(k["roles"]) & {"forward", "dX", "dY"}]
    assert wide and all(k["mma"] == "HGMMA" for k in wide)
    assert all(k["mma"] != "HGMMA" for k in kernels if k["arch"] == 80)
    # dW reads dYᵀ along its contiguous dimension with cp.async, not 2-byte scalar loads
    dw = [k for k in kernels if "dW" in k["roles"] and k["precision"] == "bf16"]
    assert dw and all(k["scalar_16bit_loads"] == 0 and k["ldgsts"] > 0 for k in dw)
    assert "| kernel |" in stdout  # the table is the CLI's output


def _report(**changes):
    base = dict(arch=90, kernel="_lora_matmul_kernel", roles=["forward"], precision="bf16",
                constexprs={"BLOCK_M": 128, "BLOCK_N": 256, "num_warps": 8, "num_stages": 3}, default=True,
                cases=1, example="bf16 M=8192", shared=147_456, registers=200, mma="HGMMA")
    base.update(changes)
    return aot.KernelReport(**base)


def test_verdicts_flag_each_failure_kind():
    """The gate's rules, on made-up reports: each kind of failure is caught, autotune candidates only fail
    on compile errors, small-M GEMMs may use HMMA."""
    assert aot.verdicts([_report()], []) == []
    assert "shared memory" in aot.verdicts([_report(shared=232_449)], [])[0]
    assert aot.verdicts([_report(arch=80, mma="HMMA", shared=166_912)], []) == []
    assert "shared memory" in aot.verdicts([_report(arch=86, mma="HMMA", shared=101_377)], [])[0]
    assert "spills" in aot.verdicts([_report(spill_loads=4)], [])[0]
    assert "no wgmma" in aot.verdicts([_report(mma="HMMA")], [])[0]
    assert "no wgmma" in aot.verdicts([_report(roles=["dY"], mma="HMMA")], [])[0]
    assert aot.verdicts([_report(mma="HMMA", constexprs={"BLOCK_M": 32})], []) == []  # decode tile
    assert aot.verdicts([_report(mma="HMMA", precision="tf32")], []) == []
    assert aot.verdicts([_report(default=False, shared=300_000, spill_stores=8, mma="HMMA")], []) == []
    failures = aot.verdicts([], [aot.CompileError(80, "bf16 M=1", "CompilationError: boom\nmore")])
    assert failures == ["sm80: compile error in bf16 M=1: CompilationError: boom"]


def test_kinds_filter_the_cases():
    """``check --aot --only KIND``: each case has one kind of aot.KINDS, the filter keeps exactly those, and the
    segmented cases are 64 rows of 64 tokens (and of 1 outside --quick) at K = N 4096 and 512, rank bounds 16
    and 64, dropout on and off."""
    from lora_kernels import check

    every = list(aot.cases(("bf16",), quick=True))
    assert {c.kind for c in every} == set(aot.KINDS)
    only = list(aot.cases(("bf16",), quick=True, kinds=("segmented",)))
    assert only == [c for c in every if c.kind == "segmented"] and len(only) == 2 * 2 * 2
    assert {(c.m, c.segment_tokens, c.k, c.n, c.rank) for c in only} == {
        (4096, 64, w, w, r) for w in (4096, 512) for r in (16, 64)}
    assert len(list(aot.cases(("bf16",), kinds=("segmented",)))) == 16  # + 64 rows of one token
    parser = check.build_parser()
    assert parser.parse_args(["--aot", "--only", "segmented", "dora"]).only == ["segmented", "dora"]
    only_action = next(a for a in parser._actions if a.dest == "only")
    assert tuple(only_action.choices) == aot.KINDS


def test_stand_in_refuses_the_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("this process compiles for real (a CUDA machine)")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with stand_in_gpu(90):
            pass


_STUB_SCRIPT = """
import torch
from triton.runtime.errors import OutOfResources
from lora_kernels.ops import configs, lora_linear as ops
from lora_kernels.ops.standin import stand_in_gpu

x, w = torch.zeros(40, 64, dtype=torch.float16), torch.zeros(48, 64, dtype=torch.float16)
a, b = torch.zeros(8, 64, dtype=torch.float16), torch.zeros(48, 8, dtype=torch.float16)
with stand_in_gpu(arch=90, launch="stub") as gpu:
    y, s = ops.forward(x, w, None, a, b, 2.0, 0.0, 1)
    names = [r.kernel_name for r in gpu.kernels]
    assert names == ["_lora_down_kernel", "_lora_matmul_kernel"], names
    assert gpu.kernels[1].compiled.metadata.target.arch == 90
    huge = configs.KernelConfig(128, 256, 128, num_warps=8, num_stages=4)  # ~390 KB of stages
    cfgs = configs.kernel_configs(x.device, x.dtype, 40, 48, 64, 8)
    try:
        with configs.override_configs(configs.LoRAKernelConfigs(huge, huge, huge, cfgs.down, cfgs.grad_output_pass,
                                                                cfgs.grad_a)):
            ops.forward(x, w, None, a, b, 2.0, 0.0, 1)
    except OutOfResources as err:
        print("OutOfResources", err)
print("stub ok", configs._device_info is not None)
"""


@needs_ptxas
def test_stub_launch_runs_the_launch_path():
    """Stub mode: the launchers run to the final launch (kernels compiled for sm90, not launched), and the
    load step checks shared memory against the stand-in's limit, as a real H100 would."""
    done = _run(["-c", _STUB_SCRIPT], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OutOfResources" in done.stdout and "shared memory" in done.stdout
    assert "stub ok" in done.stdout
