"""minimind.cli: the command-line tools' one error path (one line, exit status 2; 130 on Ctrl-C; a bug keeps its
traceback; warnings as one line) and the numeric argument type."""
import argparse
import warnings

import pytest

from minimind.cli import CLIError, number, run_cli


def test_an_expected_failure_is_one_line_and_status_2(capsys):
    def main(argv):
        raise CLIError("--data x.jsonl: missing keys (2):\n  a\n  b")

    assert run_cli("tool", main, []) == 2
    err = capsys.readouterr().err
    assert err == "tool: error: --data x.jsonl: missing keys (2): a b\n"  # the lines of the message joined


def test_status_ctrl_c_and_bugs(capsys):
    assert run_cli("tool", lambda argv: None, []) == 0
    assert run_cli("tool", lambda argv: 3, []) == 3

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_cli("tool", interrupted, [], interrupted="stopped") == 130
    assert capsys.readouterr().err == "tool: stopped\n"

    def bug(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_cli("tool", bug, [])


def test_a_warning_is_one_line(capsys):
    def main(argv):
        warnings.warn("rank 16 >= in*out")
        warnings.warn("old name", DeprecationWarning)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert run_cli("tool", main, []) == 0
    assert capsys.readouterr().err.splitlines() == ["tool: warning: rank 16 >= in*out",
                                                    "tool: warning (DeprecationWarning): old name"]


@pytest.mark.parametrize("kwargs,text,expected", [
    ({"low": 0, "low_open": True}, "0.5", 0.5),
    ({"low": 1, "integer": True}, "3", 3),
    ({"low": 0, "high": 1}, "1", 1.0),
])
def test_number_accepts_the_range(kwargs, text, expected):
    value = number(**kwargs)(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("kwargs,text,words", [
    ({"low": 0, "low_open": True}, "0", "must be > 0, got 0"),
    ({"low": 1, "integer": True}, "2.5", "expected an integer, got '2.5'"),
    ({"low": 0, "high": 1, "high_open": True}, "1", "must be < 1, got 1"),
    ({}, "nan", "expected a finite number, got 'nan'"),
    ({}, "inf", "expected a finite number, got 'inf'"),
])
def test_number_refuses_naming_the_value(kwargs, text, words):
    with pytest.raises(argparse.ArgumentTypeError, match=words):
        number(**kwargs)(text)
