"""The run directory: one folder per (task, profile, seed), every unit written atomically.

    runs/<task>/<profile>-seed<k>/
      config.json
      stage1/item_embeddings.npy  user_vectors.npy  anchors.json
      bank/<anchor_id>/adapter_model.safetensors  adapter_config.json  train_log.json
      stage2/matches.json
      users/<user_id>/<method>.json
      results.json  results.md
      sweeps/<what>/<point>/...           (a sweep point: a run of its own, sharing what it can)

A unit exists only when complete (written under a temporary name in the same folder,
then renamed), so a rerun skips what exists and recomputes what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np


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
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def safe_name(user_id: str) -> str:
    """A user or anchor id as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", user_id)


@dataclass(frozen=True)
class RunDir:
    """`root` holds this run's config, per-user results and tables; `shared`, when set, is the run
    whose stage-1, bank and stage-2 artifacts this one reuses (a sweep point that changes none of them)."""

    root: Path
    shared: Path | None = None

    @classmethod
    def create(cls, runs: str | Path, task: str, profile: str, seed: int) -> "RunDir":
        return cls(Path(runs) / task / f"{profile}-seed{seed}")

    @property
    def artifacts(self) -> Path:
        return self.shared or self.root

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def stage1(self) -> Path:
        return self.artifacts / "stage1"

    @property
    def anchors(self) -> Path:
        return self.stage1 / "anchors.json"

    def adapter(self, anchor_id: str) -> Path:
        return self.artifacts / "bank" / safe_name(anchor_id)

    @property
    def matches(self) -> Path:
        return self.artifacts / "stage2" / "matches.json"

    def user_result(self, user_id: str, method: str) -> Path:
        return self.root / "users" / safe_name(user_id) / f"{method}.json"

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"
