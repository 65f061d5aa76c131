"""The LoRA SFT trainer: fused = eager = compiled, LoRA+, resume after SIGKILL, DDP under torchrun = one
process, MiniMind's current interface and file layout, and the output folder's lock.

Every run is a few steps of a tiny random base (hidden 32, 1 layer): the assertions compare runs with each
other, so they need no trained model. Bad input: tests/test_train_lora_errors.py.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import MINIMIND_FIXTURES, ROOT, TOLERANCES, adapter, args_for, losses
from minimind import train_lora
from minimind.run_dir import OutputLock
from minimind.train_lora import main, parse_args, train
from minimind.training import cosine_lr

FIXTURES = MINIMIND_FIXTURES


def assert_same_losses(got, expected, tol):
    assert len(got) == len(expected) > 0
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, expected))
    assert worst <= tol, f"per-step losses differ by {worst:.3g} (relative) > {tol}: {got} vs {expected}"


def test_lr_schedules_of_both_generations():
    lr, total = 1e-3, 100
    minimind2 = [lr / 10 + 0.5 * lr * (1 + math.cos(math.pi * s / total)) for s in (0, 50, 100)]
    minimind3 = [lr * (0.1 + 0.45 * (1 + math.cos(math.pi * s / total))) for s in (0, 50, 100)]
    assert [cosine_lr(s, total, 1.1 * lr, lr / 10) for s in (0, 50, 100)] == pytest.approx(minimind2)
    assert [cosine_lr(s, total, lr, lr / 10) for s in (0, 50, 100)] == pytest.approx(minimind3)
    assert [cosine_lr(s, total, lr, 0.0, warmup=4) for s in range(4)] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr])
    assert cosine_lr(150, total, lr, 1e-5) == pytest.approx(1e-5)  # the floor after the last step


def test_fused_and_eager_train_alike(tiny, tmp_path):
    """Per-step losses (fp32, 1e-5) and the adapters agree between MiniMind's unfused LoRA and --fused."""
    runs = {}
    for name, extra in (("eager", []), ("fused", ["--fused"])):
        train(parse_args(args_for(tiny, tmp_path / name, "--max_steps", "8", "--targets", "all-linear", *extra)))
        runs[name] = (losses(tmp_path / name / "metrics.jsonl"), adapter(tmp_path / name))
    (eager_loss, eager_w), (fused_loss, fused_w) = runs["eager"], runs["fused"]
    assert eager_loss[-1] < eager_loss[0] - 0.1  # it learns
    assert_same_losses(fused_loss, eager_loss, TOLERANCES[torch.float32])
    for key in eager_w:
        assert (fused_w[key] - eager_w[key]).abs().max() <= 1e-4 * eager_w[key].abs().max(), key


def test_num_workers_feed_the_same_batches(tiny, tmp_path):
    """--num_workers N: a DataLoader with N worker processes gives the losses of the in-process one."""
    for workers in ("0", "2"):
        train(parse_args(args_for(tiny, tmp_path / workers, "--max_steps", "3", "--num_workers", workers)))
    assert losses(tmp_path / "2" / "metrics.jsonl") == losses(tmp_path / "0" / "metrics.jsonl")


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_use_compile_gives_the_losses_of_eager_mode(tiny, tmp_path, fused):
    """--use_compile 1 compiles the model with our LoRA layers (Inductor on the CPU): the same per-step losses."""
    extra = ["--max_steps", "3", *(["--fused"] if fused else [])]
    train(parse_args(args_for(tiny, tmp_path / "plain", *extra)))
    train(parse_args(args_for(tiny, tmp_path / "compiled", *extra, "--use_compile", "1")))
    assert_same_losses(losses(tmp_path / "compiled" / "metrics.jsonl"), losses(tmp_path / "plain" / "metrics.jsonl"),
                       TOLERANCES[torch.float32])


def test_outputs_and_loraplus(tiny, tmp_path):
    result = train(parse_args(args_for(tiny, tmp_path, "--fused", "--max_steps", "6", "--save_interval", "3",
                                       "--eval_data", str(tiny / "data.jsonl"), "--lora_name", "lora_test",
                                       "--loraplus_lr_ratio", "4")))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"step", "epoch", "loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert "eval_loss" in rows[2] and "eval_loss" in rows[5] and "eval_loss" not in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"]  # LoRA+ trains
    state = torch.load(tmp_path / "lora" / "lora_test_32.pth", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values())
    assert "model.layers.0.self_attn.q_proj.lora.A.weight" in state
    assert (tmp_path / "lora" / "lora_test_32.safetensors").is_file()
    for png in ("loss_curve.png", "lora_overview.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads((tmp_path / "lora_stats.json").read_text())
    assert len(stats["layers"]) == len(state) // 2
    opt_groups = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert opt_groups[1]["lr"] == pytest.approx(4 * opt_groups[0]["lr"])  # LoRA+: B at 4x A's rate
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 6
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "train_lora.lock").exists()
    assert result["steps"] == 6


def test_resume_after_sigkill_loses_nothing(tiny, tmp_path):
    # The kill comes at the first checkpoint (step 4); the resumed run must equal one uninterrupted run.
    common = ["--fused", "--max_steps", "12", "--epochs", "10", "--save_interval", "4", "--lora_dropout", "0.1"]
    train(parse_args(args_for(tiny, tmp_path / "whole", *common)))

    crashed = tmp_path / "crashed"
    cmd = [sys.executable, "-m", "minimind.train_lora", *args_for(tiny, crashed, *common)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in proc.stdout:  # wait for the first checkpoint, then kill without warning
        seen.append(line)
        if line.startswith("checkpoint: step"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert (crashed / "train_lora.lock").exists()  # the killed run's lock: stale, taken over below
    (crashed / ".checkpoint.pt.killed.tmp").write_bytes(b"half a file")  # as a kill inside a save leaves

    train(parse_args(args_for(tiny, crashed, *common, "--resume")))
    whole, resumed = adapter(tmp_path / "whole"), adapter(crashed)
    for key in whole:
        assert (whole[key] - resumed[key]).abs().max() < 1e-6, key
    assert losses(crashed / "metrics.jsonl") == pytest.approx(losses(tmp_path / "whole" / "metrics.jsonl"), abs=1e-6)
    assert not list(crashed.rglob("*.tmp"))


def test_resume_extends_a_finished_run(tiny, tmp_path, capsys):
    """--resume with a larger --max_steps continues a finished run: steps 1-4 are the 4-step run's, and steps
    5-8 follow the learning-rate schedule of an 8-step run (as if planned that long from the start)."""
    common = ["--fused", "--epochs", "10", "--save_interval", "2"]
    train(parse_args(args_for(tiny, tmp_path / "planned", *common, "--max_steps", "8")))
    train(parse_args(args_for(tiny, tmp_path / "short", *common, "--max_steps", "4")))
    short = metrics_rows(tmp_path / "short")
    capsys.readouterr()
    train(parse_args(args_for(tiny, tmp_path / "short", *common, "--max_steps", "8", "--resume")))
    assert "--max_steps 4 -> 8" in capsys.readouterr().out
    extended, planned = metrics_rows(tmp_path / "short"), metrics_rows(tmp_path / "planned")
    assert [r["step"] for r in extended] == list(range(1, 9)) and extended[:4] == short
    assert [r["lr"] for r in extended[4:]] == pytest.approx([r["lr"] for r in planned[4:]], rel=1e-12)
    assert [r["lr"] for r in extended[:4]] != pytest.approx([r["lr"] for r in planned[:4]], rel=1e-6)
    assert torch.load(tmp_path / "short" / "checkpoint.pt", weights_only=True)["step"] == 8
    assert extended[-1]["loss"] < extended[3]["loss"]  # the extra steps trained


def test_rank_warning_is_one_line(tiny, tmp_path, capsys):
    """A rank as large as the layer (16 on 32 -> 32 linears) warns in one line, not Python's source line."""
    assert main(args_for(tiny, tmp_path, "--max_steps", "1", "--rank", "16", "--targets", "q_proj")) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and err[0].startswith("train_lora: warning: rank 16"), err
    assert ".py:" not in err[0]


def test_torchrun_turns_ddp_on_and_matches_one_process(tiny, tmp_path):
    """Under torchrun without --ddp (as MiniMind): two processes of batch 2 train as one process of batch 4."""
    common = ["--fused", "--max_steps", "3", "--epochs", "10"]
    train(parse_args(args_for(tiny, tmp_path / "one", *common)))
    two = args_for(tiny, tmp_path / "two", *common)
    two[two.index("--batch_size") + 1] = "2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minimind.train_lora", *two]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "x 2 processes" in done.stdout
    one, ddp = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    for key in one:
        assert (one[key] - ddp[key]).abs().max() < 1e-5, key
    assert losses(tmp_path / "two" / "metrics.jsonl") == pytest.approx(losses(tmp_path / "one" / "metrics.jsonl"),
                                                                       abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# MiniMind's current interface (trainer/train_lora.py at jingyaogong/minimind d65ef2c, 2026-08-21)


def test_minimind_current_arguments_parse_with_their_meaning(tmp_path):
    cfg = parse_args([
        "--save_dir", str(tmp_path / "out"), "--lora_name", "lora_medical", "--epochs", "10", "--batch_size", "32",
        "--learning_rate", "1e-4", "--device", "cpu", "--dtype", "bfloat16", "--num_workers", "8",
        "--accumulation_steps", "2", "--grad_clip", "1.0", "--log_interval", "10", "--save_interval", "1000",
        "--hidden_size", "768", "--num_hidden_layers", "8", "--max_seq_len", "340", "--use_moe", "1",
        "--data_path", "../dataset/lora_medical.jsonl", "--from_weight", "full_sft", "--from_resume", "1",
        "--use_wandb", "--wandb_project", "MiniMind-LoRA", "--use_compile", "1",
    ])
    assert cfg.layout == "minimind" and cfg.out_dir == str(tmp_path / "out")
    assert cfg.base == str(tmp_path / "out" / "full_sft_768_moe.pth")  # {save_dir}/{name}_{hidden}[_moe].pth
    assert (cfg.lora_name, cfg.epochs, cfg.batch_size, cfg.learning_rate) == ("lora_medical", 10, 32, 1e-4)
    assert (cfg.device, cfg.dtype, cfg.num_workers, cfg.accumulation_steps) == ("cpu", "bfloat16", 8, 2)
    assert (cfg.grad_clip, cfg.log_interval, cfg.save_interval, cfg.max_seq_len) == (1.0, 10, 1000, 340)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.use_moe) == (768, 8, True)
    assert cfg.data_path == "../dataset/lora_medical.jsonl"
    assert cfg.resume == "if-present"  # --from_resume 1: continue when a training state exists
    assert cfg.use_wandb and cfg.wandb_project == "MiniMind-LoRA" and cfg.use_compile
    # MiniMind's defaults where only the name is given: hidden 768, no MoE.
    assert parse_args(["--save_dir", "d", "--from_weight", "pretrain"]).base == str(Path("d") / "pretrain_768.pth")


def test_the_2025_names_still_parse():
    cfg = parse_args(["--out_dir", "o", "--dim", "512", "--n_layers", "8", "--ddp", "--local_rank", "0",
                      "--use_moe", "false", "--warmup_iters", "5"])
    assert (cfg.layout, cfg.out_dir, cfg.hidden_size, cfg.num_hidden_layers) == ("ours", "o", 512, 8)
    assert cfg.ddp and cfg.use_moe is False and cfg.warmup_iters == 5


@pytest.mark.skipif(not (FIXTURES / "minimind3_tiny_dense.pth").is_file(),
                    reason=f"MiniMind fixtures not found under {FIXTURES} (needs the shared fixtures checkout)")
def test_minimind_layout_header_and_saved_files(tiny, tmp_path, capsys):
    """With --save_dir and no --learning_rate the header says our default and MiniMind's; the closing lines
    name files that are where they say."""
    argv = args_for(tiny, tmp_path / "unused", "--max_steps", "1", "--lora_name", "lora_x")
    out_at = argv.index("--out_dir")
    argv[out_at:out_at + 2] = ["--save_dir", str(tmp_path / "out")]
    lr_at = argv.index("--learning_rate")
    del argv[lr_at:lr_at + 2]
    assert main(argv) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.strip().startswith("optimizer"))
    assert "learning rate 0.005 (the default; MiniMind's train_lora.py uses 0.0001" in header, header
    saved = next(line for line in out.splitlines() if line.startswith("saved "))
    named = [Path(w) for w in saved.split() if w.endswith((".pth", ".safetensors"))]
    assert [p.suffix for p in named] == [".pth", ".safetensors"] and all(p.is_file() for p in named), saved
    assert named[1].parent == tmp_path / "checkpoints"  # our extra files beside the training state


def test_from_weight_and_save_dir_use_minimind_paths(tiny, tmp_path, monkeypatch, capsys):
    save_dir = tmp_path / "out"
    save_dir.mkdir()
    shutil.copy(FIXTURES / "minimind3_tiny_dense.pth", save_dir / "full_sft_64.pth")
    argv = ["--save_dir", str(save_dir), "--from_weight", "full_sft", "--hidden_size", "64", "--lora_name",
            "lora_x", "--tokenizer", str(FIXTURES / "tokenizer_minimind3"), "--data_path", str(tiny / "data.jsonl"),
            "--batch_size", "4", "--max_seq_len", "40", "--save_interval", "2", "--max_steps", "4", "--log_interval", "1",
            "--answers", "0", "--no_progress", "--device", "cpu"]
    original_log_step = train_lora.log_step

    def interrupt_at_step_3(run, *args):
        if run.step == 3:
            raise KeyboardInterrupt  # Ctrl-C after the save at step 2
        original_log_step(run, *args)

    monkeypatch.setattr(train_lora, "log_step", interrupt_at_step_3)
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.undo()
    lora = torch.load(save_dir / "lora_x_64.pth", weights_only=True)  # where MiniMind's save_lora writes it
    assert set(lora) == {f"model.layers.{i}.self_attn.{m}.lora.{h}.weight"
                         for i in (0, 1) for m in ("q_proj", "o_proj") for h in "AB"}  # MiniMind's square linears
    state_dir = tmp_path / "checkpoints"  # MiniMind's ../checkpoints beside ../out
    assert torch.load(state_dir / "lora_x_64_resume.pth", weights_only=True)["step"] == 2
    assert sorted(p.name for p in save_dir.iterdir()) == ["full_sft_64.pth", "lora_x_64.pth"]
    # --from_resume 1 continues from that state (and would start afresh without one).
    assert main([*argv, "--from_resume", "1"]) == 0
    assert [r["step"] for r in map(json.loads, (state_dir / "lora_x_64_metrics.jsonl").read_text().splitlines())] \
        == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------
# One run per output folder


def test_a_second_run_in_a_busy_output_folder_is_refused(tiny, tmp_path, capsys):
    lock = OutputLock(tmp_path / "train_lora.lock")
    tmp_path.mkdir(exist_ok=True)
    lock.acquire()  # this test process is the live owner
    try:
        assert main(args_for(tiny, tmp_path, "--max_steps", "1")) == 2
        err = capsys.readouterr().err
        assert f"PID {os.getpid()}" in err and "in use by another training run" in err
        assert not (tmp_path / "metrics.jsonl").exists()  # nothing written
    finally:
        lock.release()


def test_new_runs_keep_the_old_metrics(tiny, tmp_path):
    texts = []
    for steps in ("3", "2", "1"):  # three runs within the same second: three files, none replaced
        train(parse_args(args_for(tiny, tmp_path, "--max_steps", steps)))
        texts.append((tmp_path / "metrics.jsonl").read_text())
    kept = sorted(p.read_text() for p in tmp_path.glob("metrics.*.jsonl"))
    assert kept == sorted(texts[:2]) and [len(t.splitlines()) for t in texts] == [3, 2, 1]


# ---------------------------------------------------------------------------------------------------
# Several adapters at once


def write_translations(path, n=12):
    words = ["cat", "dog", "sun", "moon", "tree", "water", "fire", "bread"]
    rows = [{"conversations": [{"role": "user", "content": f"Translate to French: the {words[i % len(words)]} ({i})"},
                               {"role": "assistant", "content": f"Réponse {i}: le mot français, s'il vous plaît."}]}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def adapter_file(out, name):
    return load_file(str(Path(out) / "lora" / f"{name}_32.safetensors"))


def metrics_rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_two_adapters_at_once_equal_each_trained_alone(tiny, tmp_path, fused):
    """20 steps of "qa" and "tr" in mixed batches (fp32) give each adapter, and each step's loss, of a run of it
    alone on the same rows. The data sets differ in size (24 and 12: "tr" goes round twice as often), the
    last accumulation window of "tr"'s epochs is short, LoRA+ and per-adapter clipping are on."""
    tr_data = write_translations(tmp_path / "tr.jsonl")
    common = ["--max_steps", "20", "--accumulation_steps", "2", "--loraplus_lr_ratio", "4", "--grad_clip", "0.02",
              "--epochs", "30", "--save_interval", "10", *(["--fused"] if fused else [])]
    both = tmp_path / "both"
    paths = f"{tiny / 'data.jsonl'},{tr_data}"
    result = train(parse_args(args_for(tiny, both, *common, "--data_path", paths, "--lora_name", "qa,tr",
                                       "--eval_data", paths)))
    for name, data in (("qa", tiny / "data.jsonl"), ("tr", tr_data)):
        train(parse_args(args_for(tiny, tmp_path / name, *common, "--data_path", str(data), "--lora_name", name,
                                  "--eval_data", str(data))))
        alone, together = adapter_file(tmp_path / name, name), adapter_file(both, name)
        assert set(alone) == set(together) and len(alone) > 0
        for key in alone:
            assert (alone[key] - together[key]).abs().max() <= 1e-5, (name, key)
        assert alone[key].abs().max() > 1e-3  # it learned something
        alone_losses = [r["loss"] for r in metrics_rows(tmp_path / name)]
        assert [r[f"loss/{name}"] for r in metrics_rows(both)] == pytest.approx(alone_losses, abs=1e-5)
        alone_evals = [r["eval_loss"] for r in metrics_rows(tmp_path / name) if "eval_loss" in r]
        assert len(alone_evals) == 2  # steps 10 and 20, each adapter on its own evaluation set
        assert [r[f"eval_loss/{name}"] for r in metrics_rows(both) if "eval_loss" in r] == \
            pytest.approx(alone_evals, abs=1e-5)
        pth = torch.load(both / "lora" / f"{name}_32.pth", weights_only=True)  # MiniMind's format, as alone
        assert pth.keys() == torch.load(tmp_path / name / "lora" / f"{name}_32.pth", weights_only=True).keys()
    assert not torch.equal(adapter_file(both, "qa")[key], adapter_file(both, "tr")[key])
    rows = metrics_rows(both)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[0]["loss"] == pytest.approx((rows[0]["loss/qa"] + rows[0]["loss/tr"]) / 2, abs=1e-6)
    assert result["last_loss/qa"] < result["first_loss/qa"] and result["last_loss/tr"] < result["first_loss/tr"]
    assert (both / "qa" / "lora_overview.png").is_file() and (both / "tr" / "lora_overview.png").is_file()


def test_a_new_run_removes_the_plots_of_an_earlier_one(tiny, tmp_path, monkeypatch):
    """A run with two adapters draws a curve and an overview per adapter; a later one-adapter run in the same
    folder, interrupted before it draws its own, leaves none of them to be taken for its own."""
    tr_data = write_translations(tmp_path / "tr.jsonl")
    train(parse_args(args_for(tiny, tmp_path, "--fused", "--max_steps", "1", "--data_path",
                              f"{tiny / 'data.jsonl'},{tr_data}", "--lora_name", "qa,tr")))
    drawn = [tmp_path / "loss_curve.png"] + [tmp_path / n / f for n in ("qa", "tr")
                                             for f in ("lora_overview.png", "lora_stats.json")]
    assert all(p.is_file() for p in drawn)

    def interrupt(run, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_lora, "log_step", interrupt)
    assert main(args_for(tiny, tmp_path, "--fused", "--max_steps", "2")) == 130
    assert not any(p.exists() for p in drawn) and not (tmp_path / "qa").exists()
    assert len(list(tmp_path.glob("metrics.*.jsonl"))) == 1  # the earlier run's metrics are kept


def test_two_adapters_resume_where_they_stopped(tiny, tmp_path, monkeypatch):
    """Interrupted after the checkpoint of step 4, the run resumes both adapters' weights and optimizer states
    and ends where an uninterrupted run ends."""
    tr_data = write_translations(tmp_path / "tr.jsonl")
    common = ["--fused", "--max_steps", "8", "--save_interval", "4", "--data_path",
              f"{tiny / 'data.jsonl'},{tr_data}", "--lora_name", "qa,tr"]
    train(parse_args(args_for(tiny, tmp_path / "whole", *common)))
    original_log_step = train_lora.log_step

    def interrupt_at_step_6(run, *args):
        if run.step == 6:
            raise KeyboardInterrupt
        original_log_step(run, *args)

    monkeypatch.setattr(train_lora, "log_step", interrupt_at_step_6)
    assert main(args_for(tiny, tmp_path / "resumed", *common)) == 130
    monkeypatch.undo()
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and {k.split("/")[0] for k in state["lora"]} == {"qa", "tr"}
    train(parse_args(args_for(tiny, tmp_path / "resumed", *common, "--resume")))
    for name in ("qa", "tr"):
        whole, resumed = adapter_file(tmp_path / "whole", name), adapter_file(tmp_path / "resumed", name)
        for key in whole:
            assert (whole[key] - resumed[key]).abs().max() < 1e-6, (name, key)
    assert [r["loss/tr"] for r in metrics_rows(tmp_path / "resumed")] == \
        pytest.approx([r["loss/tr"] for r in metrics_rows(tmp_path / "whole")], abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# --use_dora


def test_dora_trains_like_eager_resumes_exactly_and_its_file_merges_and_chats(tiny, tmp_path, monkeypatch, capsys):
    """--use_dora: the header says DoRA; the adapter is written in our format only, with the magnitudes (which
    trained, at lora_B's learning rate); fused and eager (PEFT's maths, B·A formed) runs agree (fp32); a run
    interrupted after its checkpoint resumes bit for bit (A, B, the magnitudes and their optimizer state); the
    file merges (minimind.merge_lora) into the logits of the adapted model and loads in minimind.chat."""
    from lora_kernels import lora_state_dict
    from minimind import chat, merge_lora
    from minimind.checkpoint import load_minimind
    from minimind.lora_io import load_adapter
    from lora_kernels.testing import assert_close

    common = ["--use_dora", "--max_steps", "6", "--epochs", "10", "--save_interval", "3", "--lora_dropout", "0.1",
              "--loraplus_lr_ratio", "2"]
    capsys.readouterr()
    train(parse_args(args_for(tiny, tmp_path / "whole", "--fused", *common)))
    out = capsys.readouterr().out
    assert "  DoRA       rank 4" in out and "MiniMind's .pth has no DoRA" in out, out
    files = sorted(p.name for p in (tmp_path / "whole" / "lora").iterdir())
    assert files == ["lora_identity_32.safetensors"], files  # no MiniMind .pth: its format has no magnitude
    saved = adapter(tmp_path / "whole")
    magnitudes = {k: v for k, v in saved.items() if k.endswith(".lora_magnitude")}
    assert sorted(magnitudes) == [f"model.layers.0.self_attn.{m}.lora_magnitude" for m in ("o_proj", "q_proj")]
    base = load_minimind(tiny / "base.safetensors")
    q_norms = base.model.layers[0].self_attn.q_proj.weight.norm(dim=1)  # m at the start (B = 0)
    assert (magnitudes["model.layers.0.self_attn.q_proj.lora_magnitude"] - q_norms).abs().max() > 1e-3  # trained
    state = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert set(state["lora"]) == set(saved) and state["config"]["use_dora"] is True
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 3 and groups[2]["lr"] == pytest.approx(groups[1]["lr"]) and groups[2]["weight_decay"] == 0

    train(parse_args(args_for(tiny, tmp_path / "eager", *common)))
    assert_same_losses(losses(tmp_path / "eager" / "metrics.jsonl"), losses(tmp_path / "whole" / "metrics.jsonl"),
                       TOLERANCES[torch.float32])

    original_log_step = train_lora.log_step

    def interrupt_at_step_5(run, *args):
        if run.step == 5:
            raise KeyboardInterrupt  # after the checkpoint of step 3
        original_log_step(run, *args)

    monkeypatch.setattr(train_lora, "log_step", interrupt_at_step_5)
    assert main(args_for(tiny, tmp_path / "resumed", "--fused", *common)) == 130
    monkeypatch.undo()
    train(parse_args(args_for(tiny, tmp_path / "resumed", "--fused", *common, "--resume")))
    resumed = adapter(tmp_path / "resumed")
    assert resumed.keys() == saved.keys() and all(torch.equal(resumed[k], v) for k, v in saved.items())
    assert losses(tmp_path / "resumed" / "metrics.jsonl") == losses(tmp_path / "whole" / "metrics.jsonl")

    dora_file = tmp_path / "whole" / "lora" / "lora_identity_32.safetensors"
    merged = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--base", str(tiny / "base.safetensors"), "--lora", str(dora_file), "--out", str(merged),
                            "--dtype", "float32"]) == 0
    ids = torch.arange(1, 17).view(2, 8)
    with torch.no_grad():
        expected = load_adapter(load_minimind(tiny / "base.safetensors"), dora_file).eval()(ids).logits
        got, before = load_minimind(merged)(ids).logits, base(ids).logits
    assert (expected - before).abs().max() > 1e-3  # the adapter matters
    assert_close(got, expected, torch.float32, "logits of the merged DoRA adapter")

    loaded = []
    monkeypatch.setattr(chat, "load_adapter", lambda model, *a, **k: loaded.append(load_adapter(model, *a, **k)))
    assert chat.main(["--weights", str(tiny / "base.safetensors"), "--lora", str(dora_file), "--prompt", "Who are you?",
                      "--temperature", "0", "--max-new-tokens", "4"]) == 0
    assert ">>> Who are you?" in capsys.readouterr().out
    in_chat = lora_state_dict(loaded[0])
    assert in_chat.keys() == saved.keys() and all(torch.equal(in_chat[k], v) for k, v in saved.items())


def test_dora_resume_checks_use_dora_and_reads_older_states(tiny, tmp_path, capsys):
    """A training state records --use_dora (a resume that changes it is refused by name); a state written before
    the flag existed reads as a run without DoRA."""
    common = ["--fused", "--max_steps", "2", "--save_interval", "1"]
    train(parse_args(args_for(tiny, tmp_path, *common)))
    assert main(args_for(tiny, tmp_path, *common, "--max_steps", "3", "--use_dora", "--resume")) == 2
    assert "--use_dora False -> True" in capsys.readouterr().err
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["config"]["use_dora"]
    torch.save(state, tmp_path / "checkpoint.pt")
    train(parse_args(args_for(tiny, tmp_path, *common, "--max_steps", "3", "--resume")))
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
