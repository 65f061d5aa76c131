"""minimind.pretrain: bad input ends in one line and exit status 2."""
import pytest

from helpers import assert_one_line_error, garbage, pickled_payload, tokenizer_dir
from minimind import pretrain

CLI_CASES = [
    ("--lr nan", lambda t: ["--lr", "nan"], ["--lr", "nan"]),
    ("--batch-size 0", lambda t: ["--batch-size", "0"], ["--batch-size", "0"]),
    ("--steps -1", lambda t: ["--steps", "-1"], ["--steps", "-1"]),
    ("missing --data", lambda t: ["--data", str(t / "none.jsonl"), "--out", str(t / "o.safetensors")],
     ["--data", "none.jsonl"]),
    ("garbage --tokenizer", lambda t: ["--tokenizer", str(tokenizer_dir(t))],
     ["--tokenizer", "tokenizer.json"]),
    ("malformed --data line",
     lambda t: ["--data", str(garbage(t, "d.jsonl", b'{"text": "ok"}\n{oops\n')), "--out", str(t / "o.safetensors")],
     ["d.jsonl:2", "invalid JSON"]),
    ("answers cut by --max-seq-len",
     lambda t: ["--steps", "0", "--sft-data", str(t / "long_prompts.jsonl"), "--max-seq-len", "8", "--out", str(t / "o.safetensors")],
     ["long_prompts.jsonl", "max_seq_len=8"]),
    ("--init pickle payload",
     lambda t: ["--init", str(pickled_payload(t / "init.pth")), "--out", str(t / "o.safetensors")],
     ["--init", "init.pth"]),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, long_prompt_data, argv, words):
    assert_one_line_error(pretrain, argv(tmp_path), capsys, words)
