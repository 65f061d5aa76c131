"""The LoRA SFT trainer: fused = eager, resume after SIGKILL, DDP = one process, and clear errors."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minimind import train_lora
from minimind.model import MiniMindConfig, MiniMindForCausalLM, save_minimind
from minimind.train_lora import get_lr, main, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Who are you?", "你是谁？", "What is your name?", "介绍一下你自己。", "Tell me about yourself.",
             "What can you do?", "Where do you come from?", "Hello!"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny base (hidden 64, 2 layers) and a small identity data set."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    # MiniMind's head layout (8 query heads, 2 kv heads), so that a .pth without a stored config is read back
    # with the same heads.
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                            max_position_embeddings=128)
    save_minimind(MiniMindForCausalLM(config), root / "base.safetensors")
    rows = [{"conversations": [{"role": "user", "content": f"{q} ({i})"},
                               {"role": "assistant", "content": f"I am Lumen number {i}, fine-tuned with LoRA."}]}
            for i, q in enumerate(QUESTIONS * 3)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return root


def args_for(tiny, out, *extra):
    return ["--base", str(tiny / "base.safetensors"), "--data_path", str(tiny / "data.jsonl"),
            "--out_dir", str(out), "--batch_size", "4", "--max_seq_len", "48", "--log_interval", "1",
            "--learning_rate", "1e-2", "--answers", "0", "--no_progress", "--device", "cpu", *extra]


def adapter(out):
    return load_file(str(next((Path(out) / "lora").glob("*.safetensors"))))


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule():
    lr = 1e-3
    assert get_lr(0, 100, lr) == pytest.approx(lr / 10 + lr)  # MiniMind's schedule starts at 1.1·lr
    assert get_lr(50, 100, lr) == pytest.approx(lr / 10 + 0.5 * lr)
    assert get_lr(100, 100, lr) == pytest.approx(lr / 10)
    assert [get_lr(s, 100, lr, warmup=4) for s in range(4)] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr])
    assert get_lr(4, 100, lr, warmup=4) == pytest.approx(1.1 * lr)


def test_fused_and_eager_training_agree(tiny, tmp_path):
    runs = {}
    for name, extra in (("fused", ["--fused"]), ("eager", [])):
        train(parse_args(args_for(tiny, tmp_path / name, "--max_steps", "50", "--epochs", "20",
                                  "--targets", "all-linear", "--rank", "8", *extra)))
        runs[name] = (losses(tmp_path / name), adapter(tmp_path / name))
    (fused_loss, fused_w), (eager_loss, eager_w) = runs["fused"], runs["eager"]
    assert len(fused_loss) == 50
    assert max(abs(a - b) for a, b in zip(fused_loss, eager_loss)) < 1e-4
    assert fused_loss[-1] < fused_loss[0] - 0.5  # it learns (a random base: ~8.8 -> ~7.6 in 50 steps)
    for key in fused_w:
        assert (fused_w[key] - eager_w[key]).abs().max() < 1e-4, key


def test_outputs(tiny, tmp_path):
    result = train(parse_args(args_for(tiny, tmp_path, "--fused", "--max_steps", "6", "--save_interval", "3",
                                       "--eval_data", str(tiny / "data.jsonl"), "--lora_name", "lora_test")))
    out = tmp_path
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"step", "epoch", "loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert "eval_loss" in rows[2] and "eval_loss" in rows[5] and "eval_loss" not in rows[0]
    minimind_file = out / "lora" / "lora_test_64.pth"
    state = torch.load(minimind_file, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values())
    assert "model.layers.0.self_attn.q_proj.lora.A.weight" in state
    assert (out / "lora" / "lora_test_64.safetensors").is_file()
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6
    assert not [p for p in out.rglob("*.tmp")]
    assert result["steps"] == 6


def test_resume_after_sigkill_loses_nothing(tiny, tmp_path):
    # The kill comes at the first checkpoint (step 10), 90 steps before the end.
    common = ["--fused", "--max_steps", "100", "--epochs", "100", "--save_interval", "10", "--lora_dropout", "0.1"]
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
    assert proc.returncode == -signal.SIGKILL, "".join(seen)  # the run was cut off mid-training

    train(parse_args(args_for(tiny, crashed, *common, "--resume")))
    whole, resumed = adapter(tmp_path / "whole"), adapter(crashed)
    for key in whole:
        assert (whole[key] - resumed[key]).abs().max() < 1e-6, key
    assert losses(crashed) == pytest.approx(losses(tmp_path / "whole"), abs=1e-6)


def test_ddp_matches_one_process(tiny, tmp_path):
    common = ["--fused", "--max_steps", "8", "--epochs", "10"]
    train(parse_args(args_for(tiny, tmp_path / "one", *common)))
    two = args_for(tiny, tmp_path / "two", *common, "--ddp")
    two[two.index("--batch_size") + 1] = "2"  # half the per-process batch: the same global batch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minimind.train_lora", *two]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, ddp = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    for key in one:
        assert (one[key] - ddp[key]).abs().max() < 1e-5, key
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no traceback


def fails(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert words in err, err
    return err


def test_missing_data_file(tiny, tmp_path, capsys):
    argv = args_for(tiny, tmp_path)
    argv[argv.index("--data_path") + 1] = str(tmp_path / "nope.jsonl")
    fails(capsys, argv, "nope.jsonl")


def test_malformed_data_names_the_line(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text((tiny / "data.jsonl").read_text().splitlines()[0] + "\n{not json\n")
    argv = args_for(tiny, tmp_path / "out")
    argv[argv.index("--data_path") + 1] = str(bad)
    fails(capsys, argv, "bad.jsonl:2")


def test_base_that_does_not_fit_the_sizes(tiny, tmp_path, capsys):
    fails(capsys, args_for(tiny, tmp_path, "--hidden_size", "512"), "does not fit")
    fails(capsys, args_for(tiny, tmp_path, "--num_hidden_layers", "3"), "does not fit")


def test_tokenizer_larger_than_the_vocabulary(tmp_path, tiny, capsys):
    config = MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            vocab_size=300, max_position_embeddings=64)
    save_minimind(MiniMindForCausalLM(config), tmp_path / "small_vocab.safetensors")
    argv = args_for(tiny, tmp_path / "out")
    argv[argv.index("--base") + 1] = str(tmp_path / "small_vocab.safetensors")
    fails(capsys, argv, "vocabulary is 300")


def test_bf16_on_a_cpu_without_it(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_lora, "cpu_supports_bf16", lambda: False)
    fails(capsys, args_for(tiny, tmp_path, "--dtype", "bfloat16"), "no native bfloat16")


def test_unwritable_out_dir(tiny, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fails(capsys, args_for(tiny, blocker / "out"), "is not writable")


def test_disk_full_while_saving(tiny, tmp_path, capsys, monkeypatch):
    import errno

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_lora, "atomic_write", full)
    err = fails(capsys, args_for(tiny, tmp_path, "--max_steps", "2"), "no space left on the device")
    assert "metrics.jsonl" in err


def test_resume_with_other_settings_is_refused(tiny, tmp_path, capsys):
    train(parse_args(args_for(tiny, tmp_path, "--max_steps", "2", "--save_interval", "1")))
    fails(capsys, args_for(tiny, tmp_path, "--max_steps", "2", "--rank", "8", "--resume"), "--rank 16 -> 8")


def test_merge_lora_cli(tiny, tmp_path):
    from minimind.merge_lora import main as merge_main
    from minimind.model import load_minimind
    from minimind.lora_io import load_minimind_lora

    train(parse_args(args_for(tiny, tmp_path, "--fused", "--max_steps", "5")))
    lora = next((tmp_path / "lora").glob("*.pth"))
    assert merge_main(["--base", str(tiny / "base.safetensors"), "--lora", str(lora),
                       "--out", str(tmp_path / "merged.pth"), "--dtype", "float32"]) == 0
    merged = load_minimind(tmp_path / "merged.pth")
    assert not any("lora" in k for k in merged.state_dict())
    adapted = load_minimind_lora(load_minimind(tiny / "base.safetensors"), lora)
    ids = torch.arange(20).view(2, 10)
    with torch.no_grad():
        a, b = merged(ids).logits, adapted(ids).logits
    assert (a - b).abs().max() / b.abs().max() < 1e-5
