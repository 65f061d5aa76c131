"""Crash-safe file writes and safe file readers shared by ``lora_kernels`` and ``minimind`` (neither depends
on the other for them).

Writing: ``atomic_write(path, write)`` lets ``write`` fill a temporary file beside ``path``, flushes it to the
disk (``fsync``), renames it over ``path`` and fsyncs the folder, so after a crash or a full disk ``path``
holds either the old bytes or the new ones, never half of each. ``remove_stale_temporaries`` deletes what a
killed process left behind.

Reading: ``load_weights_only`` is the one ``torch.load`` both packages read pickled tensor files with: no code
runs, and no warning about pickle protocols precedes the caller's own error message. ``read_tensor_file``
reads a safetensors or torch file (told apart by its content) and ``read_json_object`` a JSON config, each
naming the file in its errors; ``READ_ERRORS`` (``SAFETENSORS_ERRORS`` among them) are what such a read
raises when the file, not the program, is at fault, and ``file_error_reason`` says why in one line.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple, Union

PathLike = Union[str, os.PathLike]

try:
    from safetensors import SafetensorError

    SAFETENSORS_ERRORS: Tuple[type, ...] = (SafetensorError,)
except ImportError:  # older safetensors: its errors then surface as they come
    SAFETENSORS_ERRORS = ()

# What reading a tensor file raises when the file (not the program) is at fault: unreadable (OSError), a
# damaged torch zip (RuntimeError), malformed content (ValueError, EOFError), a pickle that weights_only
# refuses (UnpicklingError), a damaged safetensors file (SafetensorError).
# torch.load's weights-only unpickler meets a text or other non-tensor file with KeyError or IndexError (an
# opcode byte it has no entry for), not with UnpicklingError.
READ_ERRORS = (OSError, RuntimeError, ValueError, EOFError, KeyError, IndexError,
               pickle.UnpicklingError) + SAFETENSORS_ERRORS


# ---------------------------------------------------------------------------------------------------
# Writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path: PathLike, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms (Windows) cannot open a folder; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if not (directory and err.errno in (errno.EINVAL, errno.EBADF)):  # folders that cannot be fsynced
            raise
    finally:
        os.close(fd)


def temporary_prefix(path: PathLike) -> str:
    """The name prefix of ``path``'s temporary files (``.{name}.``; they end in ``.tmp``)."""
    return f".{Path(path).name}."


def atomic_write(path: PathLike, write: Callable[[str], object]) -> None:
    """Calls ``write(tmp_path)``, fsyncs the file, renames it to ``path`` and fsyncs the folder.

    Any exception (a full disk raising ``OSError``, ``RuntimeError`` from ``torch.save`` or
    ``SafetensorError``) removes the temporary file and propagates; ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_path(path.parent, directory=True)


def remove_stale_temporaries(path: PathLike) -> List[Path]:
    """Deletes the temporary files that a killed :func:`atomic_write` of ``path`` left; returns them.

    Call it only while no other process can be writing ``path`` (e.g. under the output folder's lock).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.glob(temporary_prefix(path) + "*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ---------------------------------------------------------------------------------------------------
# Reading


def load_weights_only(path: PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain containers only.

    torch warns when a file's pickle protocol is not the one it writes; the load either works, and the
    warning says nothing the caller needs, or it is refused, and the caller names the file and the reason
    itself. The warning is silenced so that a failure is one message, not two.

    Raises:
        whatever ``torch.load`` raises (OSError, pickle.UnpicklingError, RuntimeError, ...).
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*")
        return torch.load(path, map_location="cpu", weights_only=True)


def file_error_reason(err: BaseException) -> str:
    """One line saying why a tensor file could not be read, from the exception its reader raised.

    ``torch.load`` explains a refused pickle (or a damaged zip) in a paragraph; the line kept is the one
    that says what was found.
    """
    if isinstance(err, pickle.UnpicklingError):
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        found = [line for line in lines if "Unsupported" in line or "GLOBAL" in line]
        detail = found[0] if found else (lines[-1] if lines else type(err).__name__)
        return f"not a plain tensor file (weights_only loading refused it: {detail})"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    if isinstance(err, (KeyError, IndexError)):
        return "not a torch or safetensors file (its bytes are not a pickle torch can read)"
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    text = text.split(". This is an internal miniz error")[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _is_safetensors(path: Path) -> bool:
    """True for a safetensors file (an 8-byte header length, then the JSON header), whatever its suffix."""
    with open(path, "rb") as f:
        head = f.read(9)
    return path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


def read_tensor_file(path: PathLike) -> Tuple[Any, Dict[str, str]]:
    """Reads a safetensors file, or a torch file (``.pth``/``.pt``/``.bin``, ...) with
    ``weights_only=True``, never running pickled code. The format is told by the content.

    Returns:
        ``(content, metadata)``: a dict of tensors and the safetensors metadata, or whatever the torch
        file holds and ``{}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read (truncated, not a tensor file, a pickle with code in it),
            naming the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist" if not path.exists() else f"{str(path)!r} is not a file")
    try:
        if _is_safetensors(path):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        return load_weights_only(path), {}
    except FileNotFoundError:
        raise
    except READ_ERRORS as err:
        raise ValueError(f"cannot read {str(path)!r}: {file_error_reason(err)}") from err


def read_json_object(path: PathLike) -> Dict[str, Any]:
    """The JSON object in ``path`` (a config file).

    Raises:
        ValueError: the file is not UTF-8 JSON or holds something other than an object, naming the file.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got a {type(data).__name__}")
    return data
