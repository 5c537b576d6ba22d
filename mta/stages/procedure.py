"""How a Table-1 baseline that is not fuse-then-train plugs into the stages: a `Procedure` of its own
(`Method.procedure` names it), the run it reads its population-level inputs from, and the population LoRAs
Per-Pcs and PROPER start from and OPPU folds (`Method.population`). The baselines themselves live in
`mta.baselines`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from mta.data.lamp import TaskSpec, User
from mta.log import log
from mta.methods import Method
from mta.peft.adapter import Adapter, load_adapter
from mta.profiles import LoRASpec, Profile
from mta.seeding import derive_seed
from mta.stages.bank import train_adapter
from mta.stages.engine import Engine
from mta.stamps import current


class RunContext(Protocol):
    """What a baseline's population-level stage reads of its run (`mta.run.pipeline.Run` is one)."""

    profile: Profile
    seed: int
    progress: bool

    @property
    def task_spec(self) -> TaskSpec: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def candidates(self) -> list[User]: ...

    @property
    def target_users(self) -> list[User]: ...

    @property
    def anchor_ids(self) -> list[str]: ...

    @property
    def artifacts(self) -> Path: ...

    def population_inputs(self, artifact: str) -> dict:
        """What a population-level artifact is made from (`mta.stamps`: checked before reuse)."""
        ...


@dataclass(frozen=True)
class Procedure:
    """A Table-1 baseline's own set-up of a user's weights (`Method.procedure`). `build` makes its
    population-level artifacts in the run directory (keeping those made from the run's inputs, `mta.stamps`)
    and `load` reads those (None when they are not there). `begin` sets up what every user shares (W0 + its
    population LoRA, ...); `parts` makes the own part of each of a group of users (one user is a group of one) on
    it, each as (part, seconds, details) or the InputError that stopped it; `serve` puts the parts in slots of one
    batched decode."""

    build: Callable[[RunContext], None]
    load: Callable[[RunContext], object | None]
    begin: Callable[[Engine, object | None], None]
    parts: Callable[[Engine, Sequence[User], object, Sequence[int]], list]
    serve: Callable[[Engine, Sequence], None]


class Baseline(NamedTuple):
    """A procedure with the population-level artifacts its stage-3 units read (None: not built)."""

    procedure: Procedure
    artifacts: object | None


def train_population_lora(run: RunContext, path: Path, spec: LoRASpec, seed: int, what: str) -> None:
    """A LoRA on the population (one query with its gold per bank candidate, `Engine.population_examples`), saved
    as a PEFT adapter; one made from the run's inputs is kept."""
    if current(path, run.population_inputs(what)):
        return
    examples = run.engine.population_examples(run.candidates, seed, run.profile.population_items, spec)
    log(f"stage 1c: {what} on {len(examples)} population examples (rank {spec.rank})")
    train_adapter(run.engine, path, examples, spec, seed, probe=True, made_from=run.population_inputs(what))


def population_path(run: RunContext, name: str) -> Path:
    return run.artifacts / "population" / name


def build_population_loras(run: RunContext, methods: Sequence[Method]) -> None:
    """Stage 1c for the fuse-then-train methods that fold a population LoRA (`Method.population`, OPPU's task
    LoRA): each named recipe of the profile trained once, shared by every user and method that names it."""
    for name in dict.fromkeys(m.population for m in methods if m.population != "none"):
        train_population_lora(run, population_path(run, name), getattr(run.profile, name),
                              derive_seed(run.seed, name), name)


def load_population_loras(run: RunContext, methods: Sequence[Method]) -> dict[str, Adapter]:
    """Recipe name -> the population LoRA of that name, for those the methods fold and stage 1c made."""
    names = dict.fromkeys(m.population for m in methods if m.population != "none")
    return {n: load_adapter(population_path(run, n)) for n in names
            if current(population_path(run, n), run.population_inputs(n))}
