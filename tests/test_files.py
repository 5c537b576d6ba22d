"""Durable artifacts: written under a temporary name, fsynced, renamed, the folder fsynced; modes follow the umask."""

import os

import pytest

from mta import files
from mta.files import atomic_path, write_json


@pytest.fixture
def fsynced(monkeypatch):
    """The (device, inode) of everything os.fsync is called on."""
    synced = set()
    real = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def _key(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_a_file_and_its_folders_are_fsynced(tmp_path, fsynced):
    path = tmp_path / "new" / "x.json"
    write_json(path, {"a": 1})
    # the file, the folder its name was renamed into, and the folder the new folder was made in
    assert {_key(path), _key(path.parent), _key(tmp_path)} <= fsynced


def test_every_file_and_folder_of_a_folder_artifact_is_fsynced(tmp_path, fsynced):
    path = tmp_path / "adapter"
    with atomic_path(path, is_dir=True) as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    inside = [path / "weights.bin", path / "sub", path / "sub" / "config.json"]
    assert {_key(p) for p in [path, tmp_path, *inside]} <= fsynced


def test_a_folder_that_cannot_be_opened_is_not_fsynced_and_the_write_goes_on(tmp_path, monkeypatch, fsynced):
    real = os.open

    def no_folders(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(f"{path}: cannot open a folder here")
        return real(path, flags, *args)

    monkeypatch.setattr(os, "open", no_folders)
    write_json(tmp_path / "x.json", [1])
    assert (tmp_path / "x.json").read_text() == "[\n  1\n]\n"
    assert fsynced == {_key(tmp_path / "x.json")}


def test_modes_follow_the_umask(tmp_path, umask):
    write_json(tmp_path / "new" / "x.json", {})
    with atomic_path(tmp_path / "adapter", is_dir=True) as tmp:
        (tmp / "w.bin").write_bytes(b"")
    assert os.stat(tmp_path / "new" / "x.json").st_mode & 0o777 == 0o666 & ~umask
    assert os.stat(tmp_path / "new").st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(tmp_path / "adapter").st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(tmp_path / "adapter" / "w.bin").st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("is_dir", [False, True])
def test_a_crash_before_the_rename_leaves_nothing_under_the_final_name(tmp_path, monkeypatch, is_dir):
    def killed(src, dst):
        raise KeyboardInterrupt  # as a SIGINT between the fsync and the rename

    monkeypatch.setattr(files.os, "replace", killed)
    path = tmp_path / "artifact"
    with pytest.raises(KeyboardInterrupt), atomic_path(path, is_dir=is_dir) as tmp:
        (tmp / "w.bin").write_bytes(b"w") if is_dir else tmp.write_bytes(b"w")
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_version(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("{half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n  "v": 1\n}\n' and list(tmp_path.iterdir()) == [path]
