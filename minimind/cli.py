"""One error path for the command-line tools (``train_lora``, ``chat``, ``merge_lora``, ``pretrain``, ...).

An expected failure (a bad argument value, an unreadable or malformed file, a wrong checkpoint, a device
that is not there, a full disk) ends with one line on stderr that names the value, file or field, and exit
status 2; Ctrl-C ends with status 130. Anything else is a bug and keeps its traceback. A warning is one line
too (``prog: warning: message``), not Python's file, line number and source line.

Tools: :class:`CLIError` and :func:`run_cli` (the error path), :class:`ArgumentParser` (argument errors
as a CLIError, without the usage block), :func:`number` (finite, ranged numeric arguments), and the
context managers :func:`reading` and :func:`writing`, which turn the ways a file can fail to load or to be
written (missing, truncated, pickled, disk full, ...) into a CLIError naming the file.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import sys
import warnings
from typing import Callable, Iterator, NoReturn, Optional, Sequence, Union

from atomic_io import READ_ERRORS, SAFETENSORS_ERRORS, file_error_reason


class CLIError(Exception):
    """An expected failure, reported as one line (``prog: error: message``) and exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors raise :class:`CLIError`, so that :func:`run_cli` reports a
    bad argument as one line (naming the argument and the value) with exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(message)


def run_cli(prog: str, main: Callable[[Optional[Sequence[str]]], Optional[int]],
            argv: Optional[Sequence[str]] = None,
            interrupted: str = "interrupted") -> int:
    """Runs ``main(argv)`` and turns expected failures into exit statuses.

    Returns:
        ``main``'s status (0 when it returns None), 2 after a :class:`CLIError`, 130 after Ctrl-C.
    """
    def one_line(message, category, filename, lineno, file=None, line=None):
        kind = "" if category is UserWarning else f" ({category.__name__})"
        print(f"{prog}: warning{kind}: {message}", file=sys.stderr if file is None else file)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            status = main(argv)
    except CLIError as err:
        # One line, whatever the message: multi-line reports (lists of keys) are joined.
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"{prog}: error: {text}", file=sys.stderr)
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


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
    """Turns a failure to read a file inside the block into a :class:`CLIError` ``"{what}: {reason}"``.

    ``what`` names the argument and file, e.g. ``"--lora 'x.pth'"``; the loaders' messages already name the
    file and the field. Use it around loading only: a RuntimeError there is a damaged file (see
    ``atomic_io.READ_ERRORS``).
    """
    try:
        yield
    except CLIError:
        raise
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(f"{what}: {err}") from err
    except READ_ERRORS as err:
        raise CLIError(f"{what}: {file_error_reason(err)}") from err


def write_error_reason(err: BaseException) -> str:
    """One line saying why a write failed; "no space left on the device" for a full disk, whichever
    writer noticed it (``OSError`` ENOSPC, ``torch.save``'s RuntimeError, safetensors' SafetensorError)."""
    text = str(err)
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "file write failed" in text:
        return "no space left on the device"
    return file_error_reason(err)


@contextlib.contextmanager
def writing(path: Union[str, os.PathLike]) -> Iterator[None]:
    """Turns a failed write inside the block (disk full, permissions, a missing folder) into a
    :class:`CLIError` ``"could not write '<path>': <reason>"``. Writers that go through ``atomic_write``
    leave the previous file as it was."""
    try:
        yield
    except CLIError:
        raise
    except (OSError, RuntimeError) + SAFETENSORS_ERRORS as err:
        raise CLIError(f"could not write {str(path)!r}: {write_error_reason(err)}") from err
