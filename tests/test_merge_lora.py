"""minimind.merge_lora: bad input ends in one line and exit status 2; a full disk keeps the earlier output; a
tied head's delta is kept."""
import errno
import os

import pytest
import torch

from helpers import (
    assert_one_line_error,
    garbage,
    minimind_adapter,
    nan_adapter,
    pickled_payload,
    truncated,
)
from minimind import merge_lora
from minimind.checkpoint import BUNDLED_BASE, load_minimind

CLI_CASES = [
    ("truncated adapter",
     lambda t: ["--base", str(BUNDLED_BASE), "--lora", str(truncated(minimind_adapter(t)[0])),
                "--out", str(t / "m.pth")], ["--lora", "adapter.safetensors"]),
    ("NaN adapter",
     lambda t: ["--base", str(BUNDLED_BASE), "--lora", str(nan_adapter(t)), "--out", str(t / "m.pth")],
     ["nan.safetensors", "non-finite"]),
    ("missing base",
     lambda t: ["--base", str(t / "none.pth"), "--lora", str(minimind_adapter(t)[0]), "--out", str(t / "m.pth")],
     ["--base", "none.pth"]),
    ("pickled adapter",
     lambda t: ["--base", str(BUNDLED_BASE), "--lora", str(pickled_payload(t / "evil.pth")), "--out", str(t / "m.pth")],
     ["evil.pth", "weights_only"]),
    ("--dtype int8",
     lambda t: ["--base", "b", "--lora", "l", "--out", "o", "--dtype", "int8"], ["--dtype", "int8"]),
    ("unwritable --out",
     lambda t: ["--base", str(BUNDLED_BASE), "--lora", str(minimind_adapter(t)[0]),
                "--out", str(garbage(t, "file") / "sub" / "m.pth")], ["could not write", "m.pth"]),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, words):
    assert_one_line_error(merge_lora, argv(tmp_path), capsys, words)


# ---------------------------------------------------------------------------------------------------
# A full disk: exit 2, the earlier output byte-identical, no temporary file left


def full_disk_writer(kind):
    """A writer that writes part of the file, then fails as a full disk does, raising what ``kind`` raises."""
    def writer(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x00" * 1000)
        if kind == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if kind == "RuntimeError":  # torch.save's message
            raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed "
                               "writing file data/3: file write failed")
        import safetensors
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          "message: \"No space left on device\" })")
    return writer


@pytest.mark.parametrize("suffix,writer,kind", [
    (".safetensors", "safetensors.torch.save_file", "OSError"),
    (".safetensors", "safetensors.torch.save_file", "SafetensorError"),
    (".pth", "torch.save", "RuntimeError"),
    (".pth", "torch.save", "OSError"),
])
def test_merge_lora_full_disk_keeps_the_earlier_output(tmp_path, monkeypatch, capsys, suffix, writer, kind):
    adapter, _ = minimind_adapter(tmp_path)
    out = tmp_path / f"merged{suffix}"
    argv = ["--base", str(BUNDLED_BASE), "--lora", str(adapter), "--out", str(out)]
    assert merge_lora.main(argv) == 0
    earlier = out.read_bytes()
    monkeypatch.setattr(writer, full_disk_writer(kind))
    capsys.readouterr()
    assert merge_lora.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left on the device" in err and str(out) in err, err
    assert out.read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([adapter.name, out.name])


# ---------------------------------------------------------------------------------------------------
# A tied head


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_merge_lora_cli_keeps_a_tied_head_delta(tmp_path, suffix):
    adapter, adapted = minimind_adapter(tmp_path, targets=["lm_head", "q_proj"])
    assert adapted.config.tie_word_embeddings
    out = tmp_path / f"merged{suffix}"
    assert merge_lora.main(["--base", str(BUNDLED_BASE), "--lora", str(adapter), "--out", str(out),
                            "--dtype", "float32"]) == 0
    ids = torch.arange(1, 17).view(2, 8)
    with torch.no_grad():
        expected, base = adapted(ids).logits, load_minimind()(ids).logits
        got = load_minimind(out)(ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    # Not a dtype tolerance: the merged file rounds W + s·B·A once per weight, and the logits carry that
    # rounding through the whole model (an absolute bound on logits of magnitude ~10).
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
