"""One error path for the command-line tools (``train_lora``, ``chat``, ``merge_lora``, ``pretrain``, ...).

An expected failure (a bad argument value, an unreadable or malformed file, a wrong checkpoint, a device
that is not there, a full disk) ends with one line on stderr that names the value, file or field, and exit
status 2; Ctrl-C ends with status 130. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Optional, Sequence


class CLIError(Exception):
    """An expected failure, reported as one line (``prog: error: message``) and exit status 2."""


class CLIArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors raise :class:`CLIError` (one line, exit status 2 through
    :func:`run_cli`) instead of printing the usage and calling ``sys.exit``."""

    def error(self, message: str):
        raise CLIError(f"{message} (see {self.prog} --help)")


def run_cli(prog: str, main: Callable[[Optional[Sequence[str]]], Optional[int]],
            argv: Optional[Sequence[str]] = None,
            interrupted: str = "interrupted") -> int:
    """Runs ``main(argv)`` and turns expected failures into exit statuses.

    Returns:
        ``main``'s status (0 when it returns None), 2 after a :class:`CLIError`, 130 after Ctrl-C.
    """
    try:
        status = main(argv)
    except CLIError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)


def number(low: Optional[float] = None, high: Optional[float] = None, *, integer: bool = False,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` for a finite number in a range, with an error that names the value.

    ``number(0, low_open=True)`` is a positive float; ``number(1, integer=True)`` an int >= 1.
    """
    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if integer else 'a number'}, got {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {text}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high:g}, got {text}")
        return value
    return parse
