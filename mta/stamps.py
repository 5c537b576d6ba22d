"""What each artifact was made from, and whether it is still the artifact today's inputs make.

An artifact's `made_from` is a dict of named digests of its inputs (the data it read, the settings it depends on,
the seed, the task). It is written with the artifact, in the same atomic rename, beside a checksum of the
artifact's content, in one of three ways:

    a JSON record        the keys "made_from" and "checksum" (sha256 of the record's canonical JSON without it)
    a tensor file        safetensors metadata "made_from" and "checksum" (sha256 of every tensor's name,
                         dtype, shape and bytes)
    a folder             made_from.json inside it: "made_from" and the sha256 of every other file

`stale(path, made_from)` says why an artifact cannot be reused (missing, unreadable, no record of its inputs,
made from other inputs - naming which -, or changed since it was written), or None when it can. Nothing here
knows what a run's inputs are: `mta.run.inputs` computes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mta.errors import InputError
from mta.files import read_json, sha256_file, write_json
from mta.log import log

FOLDER_STAMP = "made_from.json"


def digest(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON (sorted keys, no spaces): the same on every machine and Python."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sealed(record: dict, made_from: dict) -> dict:
    """`record` with its inputs and the checksum of both."""
    body = {**record, "made_from": made_from}
    return {**body, "checksum": digest(body)}


def write_sealed(path: str | os.PathLike, record: dict, made_from: dict) -> dict:
    """Write `sealed(record, made_from)` to `path` and return it."""
    record = sealed(record, made_from)
    write_json(path, record)
    return record


def record_problem(record: Any, made_from: dict) -> str | None:
    """Why a sealed record (a file's or one entry's) is not the one `made_from` makes, or None."""
    if not isinstance(record, dict) or "made_from" not in record or "checksum" not in record:
        return "it holds no record of its inputs"
    if digest({k: v for k, v in record.items() if k != "checksum"}) != record["checksum"]:
        return "it changed after it was written (its checksum does not match)"
    return _other_inputs(record["made_from"], made_from)


def _other_inputs(recorded: Any, made_from: dict) -> str | None:
    if recorded == made_from:
        return None
    if not isinstance(recorded, dict):
        return "it holds no record of its inputs"
    changed = sorted(k for k in {*recorded, *made_from} if recorded.get(k) != made_from.get(k))
    return f"it was made from other inputs ({', '.join(changed)})"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_sealed_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], made_from: dict,
                        metadata: dict[str, str] | None = None) -> None:
    """A safetensors file (written by the caller under `mta.files.atomic_path`) that records its inputs."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, path, metadata={"format": "pt", **(metadata or {}), "made_from": json.dumps(made_from),
                                       "checksum": tensors_digest(tensors)})


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a damaged file is an InputError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def seal_folder(folder: Path, made_from: dict) -> None:
    """Write made_from.json into `folder` (a folder artifact being written under `atomic_path`): its inputs and
    the sha256 of every file in it."""
    write_json(folder / FOLDER_STAMP, {"made_from": made_from, "files": _file_digests(folder)})


def _file_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != FOLDER_STAMP}


def stale(path: str | os.PathLike, made_from: dict) -> str | None:
    """Why the artifact at `path` (a sealed JSON record, tensor file or folder) cannot be reused, or None."""
    path = Path(path)
    if not path.exists():
        return "it does not exist"
    try:
        if path.is_dir():
            stamp = read_json(path / FOLDER_STAMP) if (path / FOLDER_STAMP).is_file() else None
            if not isinstance(stamp, dict) or "made_from" not in stamp:
                return "it holds no record of its inputs"
            if _file_digests(path) != stamp.get("files"):
                return "its files changed after it was written"
            return _other_inputs(stamp["made_from"], made_from)
        if path.suffix == ".safetensors":
            tensors, metadata = load_tensors(path)
            if "made_from" not in metadata or "checksum" not in metadata:
                return "it holds no record of its inputs"
            if tensors_digest(tensors) != metadata["checksum"]:
                return "it changed after it was written (its checksum does not match)"
            return _other_inputs(json.loads(metadata["made_from"]), made_from)
        return record_problem(read_json(path), made_from)
    except (InputError, OSError, ValueError) as e:
        return f"it cannot be read ({e})"


def current(path: str | os.PathLike, made_from: dict) -> bool:
    """Whether the artifact at `path` can be reused (`stale`); one that exists but cannot is named, with why."""
    why = stale(path, made_from)
    if why is not None and os.path.lexists(path):
        log(f"{path}: not reused, {why}")
    return why is None
