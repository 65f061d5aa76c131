"""benchmarks/report.py on a small synthetic pytest-benchmark JSON: ratios, missing providers, memory, training."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest tests` (not `python -m pytest`) does not put the repo root on the path
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402

SHAPE = {"shape": "M64-K32-N32-r4", "m": 64, "k": 32, "n": 32, "r": 4}
BIG = {"shape": "M64-K128-N256-r8", "m": 64, "k": 128, "n": 256, "r": 8}


def kernel(provider, median_ms, mode="forward+backward", p=0.1, shape=SHAPE):
    return {"name": f"test_lora_linear[{shape['shape']}-p{p:g}-{mode}-{provider}]",
            "stats": {"median": median_ms / 1e3, "iqr": median_ms / 1e4, "rounds": 5},
            "extra_info": {"kind": "kernel", "provider": provider, "mode": mode, "dropout_p": p, **shape}}


def memory(provider, saved, p=0.1, peak=None):
    info = {"kind": "memory", "provider": provider, "dropout_p": p, "saved_bytes": saved, **SHAPE}
    if peak is not None:
        info["peak_bytes"] = peak
    return {"name": f"test_memory[{provider}]", "stats": {"median": 1e-3, "iqr": 0, "rounds": 1}, "extra_info": info}


def train(variant, median_s, tokens=256):
    return {"name": f"test_train_step[{variant}]", "stats": {"median": median_s, "iqr": 0.0, "rounds": 3},
            "extra_info": {"kind": "train", "variant": variant, "backend": "torch", "tokens_per_step": tokens,
                           "trainable_params": 1000, "hidden_size": 64, "num_hidden_layers": 2, "batch_size": 2,
                           "seq_len": 128, "rank": 16, "dtype": "fp32"}}


def synthetic():
    benchmarks = [
        # Case 1 (p = 0.1, fwd+bwd): every CPU provider.
        kernel("linear", 1.0), kernel("eager", 3.0), kernel("peft", 4.0), kernel("torch", 2.0),
        # Case 2 (p = 0, fwd+bwd): no peft and no linear in this case.
        kernel("eager", 5.0, p=0.0), kernel("torch", 2.5, p=0.0),
        # A forward row and a second, larger shape that must sort after the first.
        kernel("linear", 0.5, mode="forward"), kernel("torch", 0.75, mode="forward"),
        kernel("linear", 10.0, shape=BIG), kernel("torch", 12.0, shape=BIG),
        memory("linear", 0), memory("peft", 4096), memory("torch", 2048),
        train("full", 2.0), train("eager_lora", 1.6), train("fused_lora", 0.8),
        {"name": "test_something_else", "stats": {"median": 1.0}, "extra_info": {}},  # not ours: ignored
    ]
    return {
        "machine_info": {"python_version": "3.11.7", "lora_bench": {
            "device": "cpu", "device_name": "Test CPU, 2 cores", "dtype": "fp32", "torch": "2.13.0",
            "triton": "3.9.0", "peft": "0.21.2", "torch_threads": 2, "rounds": 5, "warmup_rounds": 1,
            "skipped_providers": {"triton": "needs a CUDA device"}}},
        "commit_info": {"id": "0123456789abcdef", "dirty": True},
        "datetime": "2026-11-23T12:00:00.000000+00:00",
        "version": "5.2.3",
        "benchmarks": benchmarks,
    }


def test_kernel_ratios_are_time_ratios_within_one_case():
    results = report.collect(synthetic())
    timings = results.kernel[(SHAPE["shape"], 0.1, "forward+backward")]
    r = report.kernel_ratios(timings, "torch")
    assert r["x_linear"] == pytest.approx(2.0)  # 2 ms / 1 ms
    assert r["vs_eager"] == pytest.approx(1.5)  # 3 ms / 2 ms: 1.5x faster than eager
    assert r["vs_peft"] == pytest.approx(2.0)  # 4 ms / 2 ms
    assert report.kernel_ratios(timings, "linear")["x_linear"] == pytest.approx(1.0)


def test_missing_providers_give_no_ratio():
    results = report.collect(synthetic())
    r = report.kernel_ratios(results.kernel[(SHAPE["shape"], 0.0, "forward+backward")], "torch")
    assert r == {"x_linear": None, "vs_eager": pytest.approx(2.0), "vs_peft": None}
    assert report.ratio(None, 1.0) is None and report.ratio(1.0, 0.0) is None


def test_shapes_sort_by_size_and_foreign_rows_are_ignored():
    results = report.collect(synthetic())
    assert results.shape_order == [SHAPE["shape"], BIG["shape"]]
    assert not results.duplicates
    assert set(results.train) == {"full", "eager_lora", "fused_lora"}


def test_markdown_has_header_headline_memory_and_training():
    md = report.render(synthetic())
    assert "Test CPU, 2 cores" in md and "fp32" in md and "torch 2.13.0" in md and "triton 3.9.0" in md
    assert "`0123456789` (with uncommitted changes)" in md
    assert "not in this run: `triton`: needs a CUDA device" in md
    # Headline: fwd+bwd, one row per (shape, dropout); torch vs peft and vs eager.
    assert "| M64-K32-N32-r4 | 0.1 | 1.00 | 3.00 | 4.00 | 2.00 | 2.00× | 1.50× |" in md
    assert "| M64-K32-N32-r4 | 0 | – | 5.00 | – | 2.50 | – | 2.00× |" in md
    # Full table row: median, IQR, x linear, vs eager, vs peft.
    assert "| M64-K32-N32-r4 | 0.1 | torch | 2.00 | 0.200 | 2.00× | 1.50× | 2.00× |" in md
    assert "| M64-K32-N32-r4 | 0.1 | linear | 0.500 | 0.050 | 1.00× | – | – |" in md  # the forward section
    # Memory: saved bytes and the ratio to PEFT; no CUDA column on a CPU run.
    assert "| M64-K32-N32-r4 | 0.1 | torch | 2.00 KiB | 0.50× |" in md
    assert "| shape | dropout | provider | saved for backward | ÷ peft |\n" in md  # no peak column
    # Training: 256 tokens / 0.8 s = 320 tokens/s; 2.0 / 0.8 = 2.5x faster than full SFT, 2x than eager LoRA.
    assert "| fused_lora | torch | 1.00k | 800 | 1.25 | 320 | 2.50× | 2.00× |" in md
    assert "MiniMind LoRA" not in md  # that variant is not in this run, so no column for it


def test_header_flags_a_busy_machine():
    data = synthetic()
    bench = data["machine_info"]["lora_bench"]
    bench.update(load_average_start=0.1, load_average_end=2.1, cpu_count=2)  # 2 threads of ours: quiet
    assert "load average at start / end: 0.1 / 2.1 on 2 cores\n" in report.render(data)
    bench.update(load_average_start=1.5)  # someone else was busy before we started
    assert "1.5 / 2.1 on 2 cores: other work shared the machine" in report.render(data)
    bench.update(load_average_start=None)
    assert "load average at start / end: – / 2.1 on 2 cores\n" in report.render(data)


def test_commit_from_the_environment_when_the_tree_had_no_git():
    data = synthetic()
    data["commit_info"] = {"id": "unversioned", "dirty": False}  # what pytest-benchmark writes without git
    assert "- commit: –;" in report.render(data)
    data["machine_info"]["lora_bench"]["commit"] = "fedcba9876543210"
    assert "- commit: `fedcba9876` (from LORA_BENCH_COMMIT);" in report.render(data)


def test_cuda_peak_memory_column_appears_when_measured():
    data = synthetic()
    data["benchmarks"] = [memory("peft", 4096, peak=3 * 2 ** 20), memory("torch", 2048, peak=2 ** 20)]
    md = report.render(data)
    assert "| M64-K32-N32-r4 | 0.1 | torch | 2.00 KiB | 0.50× | 1.00 MiB | 0.33× |" in md


def test_duplicate_rows_are_reported():
    data = synthetic()
    data["benchmarks"].append(kernel("torch", 9.0))
    results = report.collect(data)
    assert results.kernel[(SHAPE["shape"], 0.1, "forward+backward")]["torch"].median == pytest.approx(9e-3)
    assert "Rows seen more than once" in report.render(data)


def test_dora_rows_are_compared_with_peft_dora_not_with_plain_lora():
    data = synthetic()
    data["benchmarks"] += [kernel("peft_dora", 8.0), kernel("torch_dora", 5.0),
                           memory("peft_dora", 8192), memory("torch_dora", 2048)]
    results = report.collect(data)
    r = report.kernel_ratios(results.kernel[(SHAPE["shape"], 0.1, "forward+backward")], "torch_dora")
    assert r == {"x_linear": pytest.approx(5.0), "vs_eager": None, "vs_peft": pytest.approx(1.6)}  # 8 ms / 5 ms
    md = report.render(data)
    # Headline: PEFT's DoRA column beside PEFT's, ours against each family's own.
    assert ("| shape | dropout | linear (ms) | eager (ms) | peft (ms) | torch (ms) | peft_dora (ms) | torch_dora (ms) "
            "| torch vs peft | torch_dora vs peft_dora | torch vs eager |") in md
    assert "| M64-K32-N32-r4 | 0.1 | 1.00 | 3.00 | 4.00 | 2.00 | 8.00 | 5.00 | 2.00× | 1.60× | 1.50× |" in md
    assert "| M64-K32-N32-r4 | 0 | – | 5.00 | – | 2.50 | – | – | – | – | 2.00× |" in md
    assert "| M64-K32-N32-r4 | 0.1 | torch_dora | 5.00 | 0.500 | 5.00× | – | 1.60× |" in md
    # Memory: a DoRA row divided by PEFT's DoRA (2048 / 8192), a LoRA row still by PEFT's LoRA.
    assert "| M64-K32-N32-r4 | 0.1 | torch_dora | 2.00 KiB | 0.25× |" in md
    assert "| M64-K32-N32-r4 | 0.1 | torch | 2.00 KiB | 0.50× |" in md


def test_cli_writes_markdown_and_chart(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(synthetic()))
    out = tmp_path / "out"
    assert report.main([str(path), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert md.startswith("# lora_kernels benchmarks")
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the report still writes its markdown, without a chart
        assert not (out / "report.png").exists()
    else:
        assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "![chart](report.png)" in md
    assert "Forward+backward" in capsys.readouterr().out


def test_cli_rejects_a_file_that_is_not_pytest_benchmark_json(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"hello": 1}))
    assert report.main([str(path)]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing.json")]) == 2
