"""Crash-safe file writes shared by ``lora_kernels`` and ``minimind`` (neither depends on the other for it).

``atomic_write(path, write)`` lets ``write`` fill a temporary file beside ``path``, flushes it to the disk
(``fsync``), renames it over ``path`` and fsyncs the folder, so after a crash or a full disk ``path`` holds
either the old bytes or the new ones, never half of each. ``remove_stale_temporaries`` deletes what a killed
process left behind. ``load_weights_only`` is the one ``torch.load`` both packages read pickled tensor files
with: no code runs, and no warning about pickle protocols precedes the caller's own error message.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Union

PathLike = Union[str, os.PathLike]


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
