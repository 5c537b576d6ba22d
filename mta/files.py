"""Atomic file writes, the one JSON reader, and ids as folder names: every artifact is written under a
temporary name in its folder and renamed into place, so a reader sees a whole file or none."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mta.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


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
