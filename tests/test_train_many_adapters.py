"""The trainer with 16 adapters at once (``--data_path a.jsonl,...,p.jsonl --lora_name a,...,p``): each adapter
trains exactly as alone on its own rows, metrics.jsonl has every adapter's loss, the progress bar shows their
mean and the worst one, the shared files' names stay short, and an interrupted run resumes exactly.

Every run is a tiny random base (hidden 32, 1 layer), batch 2 of each data set and short rows; the data sets
differ in size (2 to 17 conversations: 1 to 8 steps per epoch) and in their rows' lengths.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, args_for
from minimind import train_lora
from minimind.cli import CLIError
from minimind.lora_trainer.config import run_stem
from minimind.train_lora import main, parse_args, train

N = 16
NAMES = [f"ad{k:02d}" for k in range(N)]
WORDS = ["cat", "dog", "sun", "moon", "tree", "water", "fire", "bread", "snow", "rain", "stone", "bird", "fish",
         "leaf", "milk", "salt"]


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: the machines that run the suite are small and shared, and 16 runs of a tiny model
    gain nothing from a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_sets(tmp_path_factory):
    """16 SFT data sets, adapter k's of 2 + k conversations on its own word, rows of several lengths."""
    folder = tmp_path_factory.mktemp("many")
    paths = []
    for k, word in enumerate(WORDS):
        rows = [{"conversations": [{"role": "user", "content": f"{word} {i}?" + " more" * (i % 3)},
                                   {"role": "assistant", "content": f"{word.upper()} {k}-{i}" + "!" * (i % 4)}]}
                for i in range(2 + k)]
        path = folder / f"{NAMES[k]}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        paths.append(path)
    return paths


def skip_plots(monkeypatch):
    """The end-of-run figures (an overview per adapter, about 1 s each here, and the loss curve) are not drawn:
    the runs they would cost time in are compared by their files and metrics."""
    from minimind import plot_lora

    monkeypatch.setattr(plot_lora, "plot_adapter", lambda *args, **kwargs: {})
    monkeypatch.setattr(plot_lora, "plot_loss", lambda *args, **kwargs: None)


def many_args(data_sets, *extra):
    return ["--data_path", ",".join(map(str, data_sets)), "--lora_name", ",".join(NAMES), "--batch_size", "2",
            "--max_seq_len", "40", *extra]


def adapter_file(out, name):
    return load_file(str(Path(out) / "lora" / f"{name}_32.safetensors"))


def metrics_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_sixteen_adapters_at_once_equal_each_trained_alone(tiny, data_sets, tmp_path, capsys, monkeypatch, fused):
    """20 steps of 16 adapters in mixed batches (fp32) give each adapter, each step's loss and the evaluation
    loss at the end of the run of it alone on the same rows (1e-5), with per-adapter clipping that bites (on
    about 3/4 of the adapters' steps, on some adapters of a step and not others); metrics.jsonl holds all 16
    losses and their mean; the progress bar shows the mean and the worst adapter, not 16 fields.

    The learning rate is 5e-3: the mixed batch's GEMMs reduce in another order than a run alone's (7e-8 of the
    largest gradient), and AdamW turns that into lr·Δg/eps on a gradient element near its eps (1e-8): at 2e-2
    with LoRA+ 4 one element of one adapter's q_proj B (gradient -1.06e-9) differed by 5e-5 after 20 steps;
    at 5e-3 the worst weight differs by 3e-6."""
    common = ["--max_steps", "20", "--epochs", "40", "--grad_clip", "0.05", "--learning_rate", "5e-3",
              "--save_interval", "20", *(["--fused"] if fused else [])]
    together = tmp_path / "together"
    if not fused:  # the figures of 16 adapters are checked once, with --fused
        skip_plots(monkeypatch)
    argv = [a for a in args_for(tiny, together, *common, *many_args(data_sets), "--eval_data",
                                ",".join(map(str, data_sets))) if a != "--no_progress"]
    result = train(parse_args(argv))
    out = capsys.readouterr()
    rows = metrics_rows(together / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    for row in rows:
        assert {f"loss/{name}" for name in NAMES} <= row.keys()
        assert row["loss"] == pytest.approx(sum(row[f"loss/{name}"] for name in NAMES) / N, abs=1e-5)
    # The bar: "loss=<mean>, worst=<adapter> <its loss>, lr=..., tok_s=..."; no loss_<name> field.
    bar = [part for part in out.err.split("\r") if "worst=" in part]
    assert bar and "loss_ad" not in out.err
    last, final = rows[-1], bar[-1]
    worst = max(NAMES, key=lambda name: last[f"loss/{name}"])
    assert f"worst={worst} {last[f'loss/{worst}']:.4f}" in final and f"loss={last['loss']:.4f}" in final, final
    assert final.index("loss=") < final.index("worst=") < final.index("lr=") < final.index("tok_s=")
    assert f"saved {N} adapters: " in out.out
    if fused:
        assert (together / "loss_curve.png").is_file()
        assert all((together / name / "lora_overview.png").is_file() for name in NAMES)
    weights = {name: adapter_file(together, name) for name in NAMES}

    skip_plots(monkeypatch)

    for name, data in zip(NAMES, data_sets):
        alone = tmp_path / name
        train(parse_args(args_for(tiny, alone, *common, "--data_path", str(data), "--lora_name", name,
                                  "--batch_size", "2", "--max_seq_len", "40", "--eval_data", str(data))))
        expected = adapter_file(alone, name)
        assert set(expected) == set(weights[name]) and len(expected) > 0
        for key in expected:
            assert (expected[key] - weights[name][key]).abs().max() <= 1e-5, (name, key)
        assert [r[f"loss/{name}"] for r in rows] == \
            pytest.approx([r["loss"] for r in metrics_rows(alone / "metrics.jsonl")], abs=1e-5), name
        assert rows[-1][f"eval_loss/{name}"] == pytest.approx(metrics_rows(alone / "metrics.jsonl")[-1]["eval_loss"],
                                                              abs=1e-5), name
    capsys.readouterr()
    key = next(iter(weights["ad00"]))
    assert all(not torch.equal(weights[a][key], weights[b][key]) for a, b in zip(NAMES, NAMES[1:]))
    assert all(weights[name][key].abs().max() > 1e-3 for name in NAMES)  # each learned something
    assert result["last_loss/ad15"] < result["first_loss/ad15"]


def test_sixteen_adapters_resume_where_they_stopped(tiny, data_sets, tmp_path, monkeypatch, capsys):
    """MiniMind's layout (--save_dir): the shared files take the short stem ``ad00+15more_<hash>``; a run
    interrupted after the checkpoint of step 3 continues with --from_resume 1 from that state (every adapter's
    weights and optimizer state) and ends where an uninterrupted run ends. Resuming with one data set changed
    is refused naming that entry, not the 16 paths twice."""
    def argv(out, data=data_sets):
        return ["--base", str(tiny / "base.safetensors"), "--save_dir", str(out / "lora"), "--fused",
                "--max_steps", "6", "--save_interval", "3", "--learning_rate", "2e-2", "--rank", "4", "--answers",
                "0", "--no_progress", "--device", "cpu", "--log_interval", "1", *many_args(data)]

    skip_plots(monkeypatch)
    stem = run_stem(parse_args(argv(tmp_path)))
    assert stem.startswith("ad00+15more_") and len(stem) == len("ad00+15more_") + 8
    train(parse_args(argv(tmp_path / "whole")))
    original_log_step = train_lora.log_step

    def interrupt_at_step_5(run, *args):
        if run.step == 5:
            raise KeyboardInterrupt
        original_log_step(run, *args)

    with monkeypatch.context() as patch:
        patch.setattr(train_lora, "log_step", interrupt_at_step_5)
        assert main(argv(tmp_path / "resumed")) == 130
    state_file = tmp_path / "resumed" / "checkpoints" / f"{stem}_32_resume.pth"
    state = torch.load(state_file, weights_only=True)
    assert state["step"] == 3 and {k.split("/")[0] for k in state["lora"]} == set(NAMES)
    train(parse_args(argv(tmp_path / "resumed") + ["--from_resume", "1"]))
    for name in NAMES:
        whole = load_file(str(tmp_path / "whole" / "checkpoints" / f"{name}_32.safetensors"))
        resumed = load_file(str(tmp_path / "resumed" / "checkpoints" / f"{name}_32.safetensors"))
        for key in whole:
            assert (whole[key] - resumed[key]).abs().max() < 1e-6, (name, key)
    whole_rows = metrics_rows(tmp_path / "whole" / "checkpoints" / f"{stem}_32_metrics.jsonl")
    resumed_rows = metrics_rows(tmp_path / "resumed" / "checkpoints" / f"{stem}_32_metrics.jsonl")
    assert [r["step"] for r in resumed_rows] == list(range(1, 7))
    for name in NAMES:
        assert [r[f"loss/{name}"] for r in resumed_rows] == pytest.approx([r[f"loss/{name}"] for r in whole_rows],
                                                                          abs=1e-6)
    capsys.readouterr()
    swapped = data_sets[:3] + [data_sets[4]] + data_sets[4:]
    assert main(argv(tmp_path / "resumed", swapped) + ["--from_resume", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--data_path (16 entries) #4 " in err and "ad03.jsonl' -> " in err and err.count(".jsonl") == 2, err
    assert len(err.splitlines()) == 1


def test_shared_file_stem_and_defaults_scale_with_the_adapters(tmp_path):
    """Up to 3 adapters the shared files are named ``a+b+c`` (as before); more, or names too long to join,
    take ``<first>+<n-1>more_<8 hex>``, the same for the same names in the same order only. Past 3 adapters
    one prompt per adapter is answered unless --answers says otherwise; a name over 200 characters is refused
    in one line (its files' names would pass 255 bytes)."""
    def cfg(names, *extra):
        return parse_args(["--data_path", ",".join(["x.jsonl"] * len(names)), "--lora_name", ",".join(names),
                           "--out_dir", str(tmp_path), *extra])

    assert run_stem(cfg(["a", "b"])) == "a+b" and run_stem(cfg(["a", "b", "c"])) == "a+b+c"
    assert cfg(["a", "b", "c"]).answers == 3 and cfg(NAMES).answers == 1 and cfg(NAMES, "--answers", "2").answers == 2
    many = run_stem(cfg(NAMES))
    assert many == run_stem(cfg(NAMES)) and many != run_stem(cfg(NAMES[::-1]))
    assert many != run_stem(cfg(NAMES[:-1])) and run_stem(cfg(NAMES[:-1])).startswith("ad00+14more_")
    long = ["x" * 90, "y" * 90]
    assert run_stem(cfg(long)).startswith("x" * 40 + "+1more_")
    with pytest.raises(CLIError, match="201 characters"):
        cfg(["a", "z" * 201])
    with pytest.raises(CLIError, match="201 characters"):
        parse_args(["--lora_name", "z" * 201, "--out_dir", str(tmp_path)])


def test_the_step_benchmark_runs(tiny, capsys):
    """``python -m benchmarks.many_adapters_step`` (the README's timing of one step of many adapters against the
    runs alone) on the tiny base: both sides train and the ratio is printed."""
    if str(ROOT) not in sys.path:  # `pytest tests` (not `python -m pytest`) does not put the repo root on the path
        sys.path.insert(0, str(ROOT))
    from benchmarks import many_adapters_step

    assert many_adapters_step.main(["--adapters", "3", "--steps", "2", "--batch_size", "2", "--max_seq_len", "40",
                                    "--rank", "4", "--base", str(tiny / "base.safetensors"), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["adapters"] == 3 and result["together_ms"] > 0 and result["alone_ms"] > 0 and result["ratio"] > 0
