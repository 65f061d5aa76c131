"""atomic_io: the file reaches the disk before it replaces the old one, a failed write changes nothing, and
what a killed write left behind is found and removed."""
import os

import pytest

import atomic_io
from atomic_io import atomic_write, remove_stale_temporaries


def test_fsync_before_the_rename_and_of_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic_io.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(atomic_io.os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    target = tmp_path / "file.bin"
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"))
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].startswith(str(tmp_path / ".file.bin.")) and events[2][1] == str(tmp_path)
    assert target.read_bytes() == b"new" and oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("file write failed")])
def test_a_failed_write_keeps_the_old_file(tmp_path, error):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")

    def half_then_fail(tmp):
        open(tmp, "wb").write(b"ne")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_remove_stale_temporaries_takes_only_the_files_own(tmp_path):
    for name in (".checkpoint.pt.ab12.tmp", ".checkpoint.pt.zz.tmp", ".other.pt.ab12.tmp", "checkpoint.pt"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path / "checkpoint.pt")
    assert sorted(p.name for p in removed) == [".checkpoint.pt.ab12.tmp", ".checkpoint.pt.zz.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.ab12.tmp", "checkpoint.pt"]


def test_lora_kernels_io_keeps_its_name():
    from lora_kernels.io import atomic_write as old_name

    assert old_name is atomic_write
