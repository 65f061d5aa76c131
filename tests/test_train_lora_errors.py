"""Bad input to ``python -m minimind.train_lora``: one line on stderr naming the value or file, exit status 2,
nothing half-written. Runs ``main(argv)`` in-process; the base is a random hidden-32 model."""
import errno
import json
import pickle
from pathlib import Path

import pytest
import torch

from helpers import Payload, save_tiny_base
from minimind.train_lora import main, parse_args, train


def conversations(n, answer="I am Lumen, fine-tuned with LoRA.", question="Who are you?"):
    return "".join(json.dumps({"conversations": [{"role": "user", "content": f"{question} ({i})"},
                                                 {"role": "assistant", "content": answer}]}) + "\n"
                   for i in range(n))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A base, data, a finished run (its checkpoint and metrics) and an assortment of bad files."""
    root = tmp_path_factory.mktemp("errors")
    save_tiny_base(root / "base.safetensors")
    (root / "data.jsonl").write_text(conversations(8))
    (root / "bad_line.jsonl").write_text(conversations(1) + "{not json\n")
    (root / "two.jsonl").write_text(conversations(2))
    (root / "truncated_answers.jsonl").write_text(conversations(8, question="word " * 200))
    with open(root / "payload.pth", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Payload()}, f)
    (root / "truncated.safetensors").write_bytes((root / "base.safetensors").read_bytes()[:5000])
    (root / "garbage_tokenizer.json").write_text("this is not a tokenizer {")
    save_tiny_base(root / "small_vocab.safetensors", vocab_size=300)
    run = root / "run"
    train(parse_args(common(root, run) + SAME))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({"step": 1}, root / "missing_keys.pt")
    key = next(iter(state["lora"]))
    torch.save({**state, "lora": {**state["lora"], key: torch.zeros(3, 3)}}, root / "size_mismatch.pt")
    torch.save({**state, "lora": {**state["lora"], "model.extra.lora_A": torch.zeros(1)}}, root / "unknown_key.pt")
    with open(root / "payload_checkpoint.pt", "wb") as f:
        pickle.dump({"step": Payload()}, f)
    return root


def common(root, out):
    return ["--base", str(root / "base.safetensors"), "--data_path", str(root / "data.jsonl"), "--out_dir", str(out),
            "--batch_size", "4", "--max_seq_len", "40", "--rank", "4", "--answers", "0", "--no_progress",
            "--device", "cpu", "--log_interval", "1"]


def damaged_metrics(root, out):
    """A copy of the finished run whose metrics.jsonl has a broken line in the middle."""
    import shutil

    shutil.copytree(root / "run", out, dirs_exist_ok=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n{\"step\": oops\n" + "\n".join(lines[1:]) + "\n")


SAME = ["--max_steps", "2", "--save_interval", "1"]  # the settings of the finished run in `files`
CASES = [
    # (id, extra arguments (ROOT and OUT replaced), words the message must contain, preparation)
    ("lr-nan", ["--learning_rate", "nan"], "'nan'", None),
    ("lr-inf", ["--learning_rate", "inf"], "'inf'", None),
    ("lr-zero", ["--learning_rate", "0"], "--learning_rate", None),
    ("lr-text", ["--learning_rate", "fast"], "'fast'", None),
    ("grad-clip-nan", ["--grad_clip", "nan"], "--grad_clip", None),
    ("batch-zero", ["--batch_size", "0"], "--batch_size", None),
    ("rank-zero", ["--rank", "0"], "--rank", None),
    ("dropout-one", ["--lora_dropout", "1"], "--lora_dropout", None),
    ("loraplus-negative", ["--loraplus_lr_ratio", "-4"], "--loraplus_lr_ratio", None),
    ("device-mps", ["--device", "mps"], "--device mps", None),
    ("device-nonsense", ["--device", "banana"], "'banana'", None),
    ("base-pickle-payload", ["--base", "ROOT/payload.pth"], "payload.pth", None),
    ("base-truncated-safetensors", ["--base", "ROOT/truncated.safetensors"], "truncated.safetensors", None),
    ("base-missing", ["--base", "ROOT/nope.pth"], "nope.pth", None),
    ("base-hidden-mismatch", ["--hidden_size", "512"], "--hidden_size 512", None),
    ("tokenizer-garbage", ["--tokenizer", "ROOT/garbage_tokenizer.json"], "garbage_tokenizer.json", None),
    ("tokenizer-larger-than-vocab", ["--base", "ROOT/small_vocab.safetensors"], "vocabulary is 300", None),
    ("data-missing", ["--data_path", "ROOT/nope.jsonl"], "nope.jsonl", None),
    ("data-bad-line", ["--data_path", "ROOT/bad_line.jsonl"], "bad_line.jsonl:2", None),
    ("data-answers-truncated-away", ["--data_path", "ROOT/truncated_answers.jsonl"], "max_seq_len", None),
    ("targets-unknown", ["--targets", "no_such_proj"], "no_such_proj", None),
    ("out-dir-and-save-dir", ["--save_dir", "OUT"], "--save_dir", None),
    ("base-and-from-weight", ["--from_weight", "full_sft"], "--from_weight", None),
    ("fsdp-and-ddp", ["--fsdp", "--ddp"], "give --fsdp", None),
    ("fsdp-without-torchrun", ["--fsdp"], "--fsdp needs torchrun", None),
    ("resume-missing", ["--resume"], "checkpoint.pt", None),
    ("resume-missing-keys", ["--resume", "ROOT/missing_keys.pt"], "missing lora", None),
    ("resume-size-mismatch", ["--resume", "ROOT/size_mismatch.pt", *SAME], "has shape (3, 3)", None),
    ("resume-unknown-key", ["--resume", "ROOT/unknown_key.pt", *SAME], "model.extra.lora_A", None),
    ("resume-pickle-payload", ["--resume", "ROOT/payload_checkpoint.pt"], "payload_checkpoint.pt", None),
    ("resume-other-settings", ["--resume", "ROOT/run/checkpoint.pt", *SAME, "--rank", "8"], "--rank 4 -> 8", None),
    ("resume-damaged-metrics", ["--resume", *SAME], "metrics.jsonl:2", damaged_metrics),
    ("resume-fewer-steps", ["--resume", "ROOT/run/checkpoint.pt", "--max_steps", "1", "--save_interval", "1"],
     "has trained 2 steps", None),
    # several adapters at once
    ("adapters-fewer-names", ["--data_path", "ROOT/data.jsonl,ROOT/data.jsonl", "--lora_name", "qa"],
     "--data_path gives 2 data set(s)", None),
    ("adapters-more-names", ["--lora_name", "qa,tr"], "--lora_name 2 name(s) (qa, tr)", None),
    ("adapters-repeated-name", ["--data_path", "ROOT/data.jsonl,ROOT/data.jsonl", "--lora_name", "qa,qa"],
     "the name 'qa' is given twice", None),
    ("adapters-fsdp", ["--data_path", "ROOT/data.jsonl,ROOT/data.jsonl", "--lora_name", "qa,tr", "--fsdp"],
     "--fsdp trains one adapter per run", None),
    ("adapters-bad-name", ["--data_path", "ROOT/data.jsonl,ROOT/data.jsonl", "--lora_name", "qa,t r"], "'t r'", None),
    ("adapters-data-too-small", ["--data_path", "ROOT/data.jsonl,ROOT/two.jsonl", "--lora_name", "qa,tr"],
     "two.jsonl' (adapter 'tr') has 2 conversations, fewer than one batch of 4", None),
    ("adapters-eval-count", ["--data_path", "ROOT/data.jsonl,ROOT/data.jsonl", "--lora_name", "qa,tr",
                             "--eval_data", "ROOT/data.jsonl"], "--eval_data gives 1 data set(s) for 2 adapters", None),
    ("adapters-resume-single-state", ["--data_path", "ROOT/data.jsonl,ROOT/data.jsonl", "--lora_name", "qa,tr",
                                      "--resume", "ROOT/run/checkpoint.pt", *SAME], "--lora_name None -> 'qa,tr'", None),
]


@pytest.mark.parametrize("extra, words, prepare", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(files, tmp_path, capsys, extra, words, prepare):
    out = tmp_path / "out"
    if prepare:
        prepare(files, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}
    argv = common(files, out) + [a.replace("ROOT", str(files)).replace("OUT", str(out)) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("train_lora: error: ") and words in err, err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}
    assert after == before  # nothing written, nothing changed


def test_dora_with_minimind_layout_is_one_line(files, tmp_path, capsys):
    """--use_dora writes our format; MiniMind's layout (--save_dir) names a MiniMind .pth adapter: refused, one line."""
    argv = common(files, tmp_path / "out")
    argv[argv.index("--out_dir")] = "--save_dir"
    assert main(argv + ["--use_dora"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--use_dora" in err and "give --out_dir" in err, err
    assert not (tmp_path / "out").exists()


def test_cuda_asked_on_a_machine_without_it(files, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(common(files, tmp_path) + ["--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_unwritable_out_dir(files, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert main(common(files, tmp_path / "a_file" / "out")) == 2
    assert "is not writable" in capsys.readouterr().err


def test_a_non_finite_loss_stops_the_run_before_writing_an_adapter(files, tmp_path, capsys):
    assert main(common(files, tmp_path) + ["--learning_rate", "1e30", "--max_steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err or "the loss is nan" in err or "the loss is inf" in err, err
    assert not (tmp_path / "lora").exists() and not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:595] PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),  # how torch.save reports a full disk
], ids=["oserror-enospc", "torch-runtimeerror"])
def test_disk_full_during_a_save_keeps_the_earlier_files(files, tmp_path, capsys, monkeypatch, failure):
    """The disk fills up during the second save: exit 2, the first save's checkpoint and adapters intact."""
    real_save, calls, saved_before = torch.save, [], {}

    def outputs():  # the run's files, without its lock, its metrics (appended every step) and temporary files
        return {p: p.read_bytes() for p in tmp_path.rglob("*")
                if p.is_file() and p.suffix not in (".lock", ".tmp") and p.name != "metrics.jsonl"}

    def save_until_full(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # the training state of the second save (the first wrote it, then the adapter)
            saved_before.update(outputs())
            Path(path).write_bytes(b"half a checkpoint")  # the write got this far
            raise failure
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    assert main(common(files, tmp_path) + ["--max_steps", "4", "--save_interval", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint.pt" in err and "no space left" in err, err
    assert {p.name for p in saved_before} >= {"checkpoint.pt", "lora_identity_32.pth", "lora_identity_32.safetensors"}
    assert outputs() == saved_before
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "train_lora.lock").exists()


def test_safetensors_error_while_saving_the_adapter(files, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError
    import safetensors.torch

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(common(files, tmp_path) + ["--max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora_identity_32.safetensors" in err and "no space left" in err, err
    assert not list(tmp_path.rglob("*.tmp"))
