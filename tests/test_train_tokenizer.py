"""minimind.train_tokenizer: bad input ends in one line and exit status 2."""
import pytest

from helpers import assert_one_line_error
from minimind import train_tokenizer

CLI_CASES = [
    ("--vocab-size 10", lambda t: ["--vocab-size", "10", "--out", str(t / "tok")],
     ["--vocab-size", "10"]),
    ("missing --data",
     lambda t: ["--data", str(t / "none.jsonl"), "--out", str(t / "tok")], ["--data", "none.jsonl"]),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, words):
    assert_one_line_error(train_tokenizer, argv(tmp_path), capsys, words)
