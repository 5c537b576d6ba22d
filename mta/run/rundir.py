"""The run directory: one folder per (task, profile, seed), every unit written atomically.

    runs/<task>/<profile>-seed<k>/
      config.json
      stage1/item_embeddings.npy  user_vectors.npy  anchors.json
      bank/<anchor_id>/adapter_model.safetensors  adapter_config.json  train_log.json
      stage2/matches.json
      perpcs/task_lora/  perpcs/sharers/<anchor_id>/  perpcs/gates/<anchor_id>.safetensors
      proper/population_lora/  proper/group/mixture.safetensors  users.json  train_log.json
      users/<user_id>/<method>.json
      results.json  results.md
      sweeps/<what>/<point>/...           (a sweep point: a run of its own, sharing what it can)

A unit exists only when complete (written under a temporary name in the same folder,
then renamed), so a rerun skips what exists and recomputes what is missing.
<anchor_id> and <user_id> stand for the folder names `id_folder` makes of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


_READABLE_RUN = re.compile(r"[a-z0-9][a-z0-9_.+=,-]{0,199}")


def run_folder(profile: str, seed: int) -> str:
    """`<profile>-seed<k>`. A profile name of plain lower-case characters without `..` stays as it is
    (`cpu`, `cpu+stack.lr=0.001`); any other (`--set llm=../x`, upper case) becomes `~` + `id_folder`,
    which no plain name starts with: one folder per profile name, always inside runs/<task>/."""
    plain = _READABLE_RUN.fullmatch(profile) and ".." not in profile
    return f"{profile if plain else '~' + id_folder(profile)}-seed{seed}"


class RunDirBusy(ValueError):
    """Another command holds the run directory (`RunDir.lock`)."""


@dataclass(frozen=True)
class RunDir:
    """`root` holds this run's config, per-user results and tables; `shared`, when set, is the run
    whose stage-1, bank and stage-2 artifacts this one reuses (a sweep point that changes none of them)."""

    root: Path
    shared: Path | None = None

    @classmethod
    def create(cls, runs: str | Path, task: str, profile: str, seed: int) -> RunDir:
        return cls(Path(runs) / task / run_folder(profile, seed))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this run directory for one command: a second command on it (which would clear the first's
        temporaries and race it on every unit) fails at once, naming the process that holds it. The lock
        is an flock on `.lock`, released by the kernel however the holder ends."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise RunDirBusy(f"{self.root}: in use by {holder}; wait for it to end, or use another "
                                 f"--runs folder") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete what a killed run left under a temporary name (`.<name>.*.tmp`, never read as an artifact)."""
        stale = sorted(self.root.rglob(".*.tmp"), reverse=True) if self.root.is_dir() else []
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return stale

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
        return self.artifacts / "bank" / id_folder(anchor_id)

    @property
    def perpcs_task(self) -> Path:
        return self.artifacts / "perpcs" / "task_lora"

    def perpcs_sharer(self, anchor_id: str) -> Path:
        return self.artifacts / "perpcs" / "sharers" / id_folder(anchor_id)

    def perpcs_gates(self, anchor_id: str) -> Path:
        return self.artifacts / "perpcs" / "gates" / f"{id_folder(anchor_id)}.safetensors"

    @property
    def proper_population(self) -> Path:
        return self.artifacts / "proper" / "population_lora"

    @property
    def proper_group(self) -> Path:
        return self.artifacts / "proper" / "group"

    @property
    def matches(self) -> Path:
        return self.artifacts / "stage2" / "matches.json"

    def user_result(self, user_id: str, method: str) -> Path:
        return self.root / "users" / id_folder(user_id) / f"{method}.json"

    def results_json(self, n_users: int | None = None) -> Path:
        """`results.json` for every test user; a run on the first N users writes `results-N-users.json`
        beside it, so a smaller run on the same directory never overwrites the full report."""
        return self.root / ("results.json" if n_users is None else f"results-{n_users}-users.json")

    def results_md(self, n_users: int | None = None) -> Path:
        return self.results_json(n_users).with_suffix(".md")

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"
