"""The run directory: one folder per (task, profile, seed), every unit written atomically.

    runs/<task>/<profile>-seed<k>/
      config.json  provenance.json (what each command on it ran with)  plan.json (`mta plan`'s estimate)
      run.log (every command's log lines)
      stage1/user_vectors.npy  anchors.json  vectors/<first>-<last>.safetensors (a chunk of stage 1a)
      bank/<anchor_id>/adapter_model.safetensors  adapter_config.json  train_log.json
      stage2/matches.json  anchor_embeddings.safetensors (the anchors' Eq. 4 embeddings)
      perpcs/task_lora/  perpcs/sharers/<anchor_id>/  perpcs/gates/<anchor_id>.safetensors
      proper/population_lora/  proper/group/mixture.safetensors  users.json  train_log.json
      users/<user_id>/<method>.json  <method>.error.json (a failed unit: retried by the next run)
      results.json  results.md
      sweeps/<what>/<point>/...           (a sweep point: a run of its own, sharing what it can)

A unit exists only when complete (written under a temporary name in the same folder,
then renamed), and records what it was made from (`mta.stamps`, `mta.run.inputs`), so a rerun keeps
what today's inputs would make again and recomputes the rest.
<anchor_id> and <user_id> stand for the folder names `id_folder` makes of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mta.files import id_folder

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
        """Delete what a killed run left under a temporary name (`.<name>.*.tmp`, never read as an artifact).
        Symbolic links are removed, never followed, so nothing outside the run directory is touched."""
        stale = []
        for folder, dirs, files in os.walk(self.root):  # does not descend into linked folders
            here = {name for name in [*dirs, *files] if name.startswith(".") and name.endswith(".tmp")}
            stale += sorted(Path(folder, name) for name in here)
            dirs[:] = [d for d in dirs if d not in here]
        for path in stale:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        return stale

    @property
    def artifacts(self) -> Path:
        return self.shared or self.root

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def plan(self) -> Path:
        """What `mta plan` counted and estimated for this run (`mta.run.plan`)."""
        return self.root / "plan.json"

    @property
    def stage1(self) -> Path:
        return self.artifacts / "stage1"

    @property
    def anchors(self) -> Path:
        return self.stage1 / "anchors.json"

    def stage1_chunk(self, first: int, last: int) -> Path:
        """Stage 1a's user vectors of candidates [first, last), saved as their chunk finishes."""
        return self.stage1 / "vectors" / f"{first:07d}-{last:07d}.safetensors"

    def adapter(self, anchor_id: str) -> Path:
        return self.artifacts / "bank" / id_folder(anchor_id)

    @property
    def matches(self) -> Path:
        return self.artifacts / "stage2" / "matches.json"

    @property
    def anchor_embeddings(self) -> Path:
        return self.artifacts / "stage2" / "anchor_embeddings.safetensors"

    def user_result(self, user_id: str, method: str) -> Path:
        return self.root / "users" / id_folder(user_id) / f"{method}.json"

    def user_failure(self, user_id: str, method: str) -> Path:
        """A (user, method) unit's failure record (its error, kind, time and attempts), never its result."""
        return self.root / "users" / id_folder(user_id) / f"{method}.error.json"

    def results_json(self, n_users: int | None = None) -> Path:
        """`results.json` for every test user; a run on the first N users writes `results-N-users.json`
        beside it, so a smaller run on the same directory never overwrites the full report."""
        return self.root / ("results.json" if n_users is None else f"results-{n_users}-users.json")

    def results_md(self, n_users: int | None = None) -> Path:
        return self.results_json(n_users).with_suffix(".md")

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"
