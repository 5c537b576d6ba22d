"""Durable atomic file writes, the one JSON reader, and ids as folder names: every artifact is written under a
temporary name in its folder, flushed to disk and renamed into place, so a reader sees a whole file or none,
and a finished artifact survives an OS crash where the filesystem honours fsync."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mta.errors import InputError


def _fsync_path(path: Path, is_dir: bool = False) -> None:
    """fsync one file or folder. A folder that cannot be opened or synced (some platforms and filesystems
    refuse) is skipped: the rename is then as durable as the OS makes it."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    except OSError:
        if not is_dir:
            raise
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if not is_dir or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, then `root` itself."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                _fsync_path(Path(folder, name))
        _fsync_path(Path(folder), is_dir=True)


def _make_parents(folder: Path) -> None:
    """`mkdir -p folder` (modes from the umask), each new folder's entry synced into its parent."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _fsync_path(new.parent, is_dir=True)


def _temporary(path: Path, is_dir: bool) -> Path:
    """A new, empty sibling `.<name>.<random>.tmp` of `path`, created with mode 0666 (a folder 0777) less the
    umask, as an ordinary file or folder would be."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            if is_dir:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


@contextlib.contextmanager
def atomic_path(path: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (a file, or a folder with `is_dir`) to write; only if the block
    succeeds: fsync what it wrote (every file and folder inside a folder), rename it onto `path`, fsync
    the parent folder. On failure `path` is untouched and the temporary is removed."""
    path = Path(path)
    _make_parents(path.parent)
    tmp = _temporary(path, is_dir)
    try:
        yield tmp
        _fsync_tree(tmp) if is_dir else _fsync_path(tmp)
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_path(path.parent, is_dir=True)
    finally:
        if not is_dir:
            tmp.unlink(missing_ok=True)
        elif tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    """The one JSON reader: a missing or malformed file fails naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_MAX_EXACT = 120  # the longest name that is the plain escape of its id
_HEAD = 96  # escaped characters kept before the hash when the escape is longer


def id_folder(uid: str) -> str:
    """A user or anchor id as a folder name: one per id, always inside its parent.

    [a-z0-9_-] are kept (`news_headline-a310` as is), an upper-case letter becomes
    `+` and its lower case (`A1` -> `+a1`), any other character (a leading `-` too)
    %xx per UTF-8 byte (`.` -> `%2e`). So names are lower-case ASCII without `.`:
    distinct where the filesystem folds case or normalises Unicode, never `.`,
    `..`, hidden or `*.tmp`, and they decode back to the id. An escape over 120
    characters becomes its first 96, `~` and 16 hex of sha256(id): only two such
    long ids can collide (odds 2**-64 a pair). An empty id raises ValueError.
    """
    if not isinstance(uid, str):
        raise TypeError(f"id must be a str, not {type(uid).__name__}")
    if not uid:
        raise ValueError("id must not be empty")
    parts = []
    for i, c in enumerate(uid):
        if c in _SAFE and (i or c != "-"):
            parts.append(c)
        elif "A" <= c <= "Z":
            parts.append("+" + c.lower())
        else:
            parts.extend(f"%{b:02x}" for b in c.encode("utf-8", "surrogatepass"))
    escaped = "".join(parts)
    if len(escaped) <= _MAX_EXACT:
        return escaped
    head = escaped[:_HEAD]
    # don't end on half an escape
    cut = max(head.rfind("%", len(head) - 2), head.rfind("+", len(head) - 1))
    if cut != -1:
        head = head[:cut]
    digest = hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{head}~{digest[:16]}"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The file's sha256, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
