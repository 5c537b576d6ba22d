"""The stages run over a run directory: each unit is skipped when its artifact exists, so an
interrupted run resumes where it stopped, and every unit is a function of (config, inputs)."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from mta.baselines import BASELINES
from mta.data.lamp import (
    CANDIDATES_FILE,
    MIN_TRAIN_HISTORY,
    TEST_FILE,
    LampDataError,
    TaskSpec,
    User,
    get_task,
    load_candidates,
    load_test_users,
)
from mta.errors import InputError
from mta.eval import multiseed, report
from mta.files import atomic_path, read_json, sha256_file, write_json, write_npy
from mta.log import log, report_steps
from mta.methods import DEFAULT, get, units
from mta.models.encoders import Encoder, load_encoder
from mta.peft.adapter import load_adapter
from mta.precision import check_bf16
from mta.profiles import Profile, profile_from_dict
from mta.run import inputs
from mta.run.calibrate import executor_of, llm_of, settle
from mta.run.executor import Executor, Job, run_jobs
from mta.run.preflight import preflight
from mta.run.provenance import provenance
from mta.run.rundir import RunDir
from mta.seeding import derive_seed
from mta.stages.anchors import select_anchors
from mta.stages.bank import train_adapters
from mta.stages.engine import Engine
from mta.stages.matching import anchor_embeddings, match_to_anchors
from mta.stages.personalize import refuse_on_quantised_base, run_group
from mta.stages.procedure import Baseline, build_population_loras, load_population_loras
from mta.stamps import current, load_tensors, record_problem, save_sealed_tensors, sealed, stale, write_sealed


@dataclass
class Run:
    """One reproduction: a task under a profile and a seed, in its own run directory."""

    task: str
    profile: Profile
    lamp_dir: Path
    runs: Path = Path("runs")
    seed: int = 0
    n_users: int | None = None  # None: every test user
    methods: tuple[str, ...] = DEFAULT
    progress: bool = True
    run_dir: RunDir | None = None  # default: <runs>/<task>/<profile>-seed<seed>
    executor: Executor = field(default_factory=Executor)  # where stage 1b's and stage 3's groups run (mta.run.executor)
    calibration: dict | None = None  # how `settle` chose the profile's "auto" fields on this machine, if it measured

    def __post_init__(self):
        for m in self.methods:
            get(m)
        self.profile = self.profile.for_task(self.task_spec.name)  # the settings of this task (Table 4)
        check_bf16(self.profile.bf16, self.profile.device)
        refuse_on_quantised_base(self.profile, [get(m) for m in self.methods])

    @property
    def task_spec(self) -> TaskSpec:
        return get_task(self.task)

    @property
    def dir(self) -> RunDir:
        return self.run_dir or RunDir.create(self.runs, self.task_spec.name, self.profile.name, self.seed)

    @cached_property
    def candidates(self) -> list[User]:
        return load_candidates(self.lamp_dir, self.task_spec.name)

    @cached_property
    def all_test_users(self) -> list[User]:
        return load_test_users(self.lamp_dir, self.task_spec.name)

    @cached_property
    def test_users(self) -> list[User]:
        return self.all_test_users[: self.n_users] if self.n_users else self.all_test_users

    @property
    def subset(self) -> int | None:
        """N when the run covers only the first N of the test users (its report gets its own file)."""
        return self.n_users if self.n_users and self.n_users < len(self.all_test_users) else None

    @property
    def target_users(self) -> list[User]:
        """Every test user of the data file, whatever --users says (PROPER's group stage trains on them all)."""
        return self.all_test_users

    @property
    def data_files(self) -> dict[str, Path]:
        task_dir = Path(self.lamp_dir) / self.task_spec.name
        return {"candidates": task_dir / CANDIDATES_FILE, "test_users": task_dir / TEST_FILE}

    @cached_property
    def data_sha256(self) -> dict[str, str]:
        """The sha256 of each data file, read once per command: what the run's artifacts are made from."""
        return {role: sha256_file(path) for role, path in self.data_files.items()}

    def population_inputs(self, artifact: str) -> dict:
        return inputs.population(self, artifact)

    @property
    def procedures(self) -> list[str]:
        """The baselines (`mta.baselines.BASELINES`) whose methods the run includes."""
        return [name for name in BASELINES if name in {get(m).procedure for m in self.methods}]

    @property
    def artifacts(self) -> Path:
        """The folder the shared artifacts live in (a sweep point's may be another run's)."""
        return self.dir.artifacts

    @property
    def anchor_ids(self) -> list[str]:
        return [a["user_id"] for a in stage1_select(self)["anchors"]]

    @cached_property
    def llm(self) -> tuple:
        """(model, tokenizer) of the profile's LLM, loaded once."""
        p = self.profile
        log(f"loading {p.llm} ({p.dtype}, {p.device})")
        return llm_of(p)

    @cached_property
    def engine(self) -> Engine:
        return Engine(self.profile, self.task_spec, *self.llm)  # the templates of training and test prompts: `Engine`

    def settle(self) -> None:
        """The profile's "auto" fields chosen (`mta.run.calibrate`): as the run directory's config.json records them
        when it exists (a resumed run keeps its choice), else by this machine's calibration."""
        if self.profile.unsettled and self.dir.config.exists():
            stored = stored_profile(self.dir.config)
            self.profile = self.profile.replace(**{f: getattr(stored, f) for f in self.profile.unsettled})
            try:
                check_bf16(self.profile.bf16, self.profile.device)
            except ValueError:
                raise ValueError(f"{self.dir.config}: this run directory computes in bf16 autocast, which this "
                                 f"{self.profile.device} lacks natively; resume it on such a machine, or use another "
                                 f"--runs folder") from None
        if self.profile.unsettled:
            self.profile, self.calibration = settle(self.profile, self.task_spec, lambda: self.llm)
        if self.executor.kind == "auto":
            self.executor = executor_of(self.calibration_record, self.executor)

    @property
    def calibration_record(self) -> dict | None:
        """How the run's "auto" settings were chosen: this command's calibration, or the one config.json records."""
        if self.calibration is not None or not self.dir.config.exists():
            return self.calibration
        return read_json(self.dir.config).get("calibration")

    def check_inputs(self) -> None:
        """Check everything before anything is written: the device, the models and the Ray cluster
        (`mta.run.preflight`); every user of both data files (`mta.data.lamp`); no test user is a bank candidate;
        every test user has the items the run's trained methods need. Each fails naming the file, user and field."""
        candidates = {u.user_id for u in self.candidates}
        overlap = sorted(u.user_id for u in self.all_test_users if u.user_id in candidates)
        if overlap:
            raise LampDataError(f"{self.lamp_dir / self.task_spec.name}: test user {overlap[0]!r} is also a bank "
                                f"candidate ({len(overlap)} such users); bank and test users must be disjoint")
        trained = [m.name for m in map(get, self.methods) if m.trains_on_history]
        short = [u.user_id for u in self.all_test_users if len(u.history) < MIN_TRAIN_HISTORY]
        if trained and short:
            raise LampDataError(f"{self.data_files['test_users']}: user {short[0]}: profile: fewer than "
                                f"{MIN_TRAIN_HISTORY} items ({len(short)} such users); {', '.join(trained)} train on "
                                f"a user's items, each predicted from the others")
        preflight(self.profile, self.executor)

    def config_record(self) -> dict:
        """What keys this run directory: the task, the seed, the profile and the sha256 of each data file."""
        return {"task": self.task_spec.name, "seed": self.seed, "lamp_dir": str(self.lamp_dir),
                "profile": json.loads(json.dumps(dataclasses.asdict(self.profile))),
                "data": {role: {"file": str(path), "sha256": self.data_sha256[role]}
                         for role, path in self.data_files.items()}}

    def write_config(self) -> None:
        """Write config.json once, when the directory is made (`config_record` and what this command ran with,
        `mta.run.provenance`); a later command checks it against its own and stops, naming what changed, when
        the profile or a data file differs (notes change no result). Every command's provenance is added to
        provenance.json; what a killed run left under temporary names is cleared."""
        self.settle()
        config = self.config_record()
        if self.calibration is not None:
            config["calibration"] = self.calibration
        made_with = provenance(self.profile.device, {str(self.data_files[r]): h for r, h in self.data_sha256.items()},
                               {k: getattr(self.executor, k) for k in ("kind", "workers", "threads")})
        if self.dir.config.exists():
            check_config(self.dir.config, config, self.profile)
        else:
            write_json(self.dir.config, {**config, "provenance": made_with})
        history = read_json(self.dir.provenance) if self.dir.provenance.exists() else []
        write_json(self.dir.provenance, [*history, made_with])
        self.dir.remove_stale_temporaries()


def check_config(path: Path, config: dict, profile: Profile) -> None:
    """Refuse a run directory whose config.json records another task, seed, profile or data, naming what differs."""
    old = read_json(path)
    changes = [f"{k}: {old.get(k)!r} there, {config[k]!r} now" for k in ("task", "seed") if old.get(k) != config[k]]
    stored = profile_from_dict({**old["profile"], "base": "cpu"}, str(path))
    differ = [f.name for f in dataclasses.fields(Profile)
              if f.name != "notes" and getattr(stored, f.name) != getattr(profile, f.name)]
    if differ:
        changes.append(f"profile fields {', '.join(differ)}")
    for role, now in config["data"].items():
        then = (old.get("data") or {}).get(role, {}).get("sha256")
        if then != now["sha256"]:
            changes.append(f"{now['file']} ({'no checksum recorded' if then is None else f'sha256 {then[:12]} there'}"
                           f", {now['sha256'][:12]} now)")
    if changes:
        raise ValueError(f"{path}: this run directory was made with other inputs ({'; '.join(changes)}); use "
                         f"another --runs folder, or delete {path.parent} to start it again")


def stored_profile(config: Path) -> Profile:
    """The profile a run directory's config.json records (a field added since takes its default)."""
    return profile_from_dict({**read_json(config)["profile"], "base": "cpu"}, str(config))


def stage1_select(run: Run) -> dict:
    path, made_from = run.dir.anchors, inputs.stage1(run)
    if current(path, made_from):
        return read_json(path)
    p = run.profile
    n = min(len(run.candidates), p.max_candidates or len(run.candidates))
    log(f"stage 1a: embedding {n} of {len(run.candidates)} candidates with {p.stage1_encoder} (at most "
        f"{p.max_items_embedded or 'all'} items each), K-Means into V={p.n_anchors}")
    encoder = load_encoder(p.stage1_encoder, device=p.device)
    vectors, doc = select_anchors(run.candidates, run.task_spec, encoder, p.n_anchors, p.min_anchor_items, run.seed,
                                  p.encoder_batch_size, run.progress, p.empty_cluster, p.stage1_text, p.item_norm,
                                  p.kmeans_n_init, p.max_candidates, p.max_items_embedded,
                                  lambda a, b: (run.dir.stage1_chunk(a, b), inputs.vectors(run, a, b)))
    for empty in doc["clusters_without_anchor"]:
        log(f"cluster {empty['cluster']} ({empty['size']} users) has no anchor: {empty['reason']}")
    write_npy(run.dir.stage1 / "user_vectors.npy", vectors)
    log(f"stage 1a: {len(doc['anchors'])} anchors")
    return write_sealed(path, doc, made_from)


def stage1_bank(run: Run, with_stage1c: bool = False) -> None:
    """Stage 1b: the meta-LoRA of every anchor that has none made from the run's inputs. `with_stage1c` (as
    `reproduce` and a sweep run it), where the executor runs jobs side by side (worker processes, Ray): stage 1c's
    parts the run includes (`stage1c_parts`) join the bank's groups as jobs of their own; they need only stage 1a,
    and fill the worker the bank's last group leaves idle. Stage 1c then finds their artifacts made (their time is
    counted in stage 1b's)."""
    anchors = stage1_select(run)["anchors"]
    by_id = {u.user_id: u for u in run.candidates}
    todo = [a for a in (a["user_id"] for a in anchors)
            if not current(run.dir.adapter(a), inputs.adapter(run, by_id[a]))]
    if not todo:
        return
    p = run.profile
    size = run.executor.group_size(len(todo), p.group_size)
    parts = stage1c_parts(run) if with_stage1c and run.executor.side_by_side else []
    log(f"stage 1b: training {len(todo)} of {len(anchors)} meta-LoRAs (rank {p.bank.rank}, {p.bank.epochs} epochs, "
        f"at most {p.max_items_per_anchor or 'all'} items each), {size} at a time, "
        f"{run.executor.kind} executor" + (f"; beside them stage 1c's {', '.join(parts)}" if parts else ""))
    jobs = [Job(f"bank: {', '.join(g)}", "bank", tuple(g), size=len(g))
            for g in (todo[i: i + size] for i in range(0, len(todo), size))]
    jobs += [Job(f"stage 1c: {part}", "stage1c", (part,)) for part in parts]
    failed = run_jobs(run, jobs, run_job, "bank + stage 1c" if parts else "bank")
    if failed:
        raise RuntimeError(f"stage 1b: {len(failed)} group(s) failed ({'; '.join(failed.values())}); rerun to "
                           f"train them")


def bank_group(run: Run, anchor_ids: Sequence[str]) -> None:
    """Train and save the meta-LoRAs of a group of anchors together (`train_adapters`)."""
    p = run.profile
    by_id = {u.user_id: u for u in run.candidates}
    seeds = [derive_seed(run.seed, "bank", a) for a in anchor_ids]
    examples = [run.engine.examples(by_id[a].history, seed, limit=p.max_items_per_anchor, bank=True)
                for a, seed in zip(anchor_ids, seeds, strict=True)]
    paths = [run.dir.adapter(a) for a in anchor_ids]
    made_from = [inputs.adapter(run, by_id[a]) for a in anchor_ids]
    train_adapters(run.engine, paths, examples, p.bank, seeds, made_from)


def stage2_match_anchors(run: Run) -> dict:
    """Each test user's similarity to every anchor (Eq. 4). An entry of matches.json made from the run's inputs
    (the user's record, the anchors, the stage-2 settings) is kept; the run's users without one are matched and
    added (after a run on the first N users, the full run adds the rest). The anchors' embeddings are kept
    beside them (`stage2_anchor_embeddings`)."""
    path = run.dir.matches
    matches = stored_matches(run)
    todo = [u for u in run.test_users if u.user_id not in current_matches(run, matches)]
    if not todo and stale(run.dir.anchor_embeddings, inputs.anchor_embeddings(run)) is None:
        return matches
    p = run.profile
    anchor_ids = [a["user_id"] for a in stage1_select(run)["anchors"]]
    log(f"stage 2: matching {len(todo)} users ({len(run.test_users) - len(todo)} matched before) to "
        f"{len(anchor_ids)} anchors with {p.stage2_encoder}")
    encoder = load_encoder(p.stage2_encoder, device=p.device)
    start = time.perf_counter()
    anchor_emb = stage2_anchor_embeddings(run, encoder)  # (V, D)
    if not todo:
        return matches
    new = match_to_anchors(todo, anchor_ids, anchor_emb, run.task_spec, encoder, p.encoder_batch_size,
                           run.progress, p.stage2_text, start)
    matches = {**matches, **{u.user_id: sealed(new[u.user_id], inputs.match(run, u)) for u in todo}}
    write_json(path, matches)
    return matches


def stage2_anchor_embeddings(run: Run, encoder: Encoder, write: bool = True) -> np.ndarray:
    """Eq. 4's anchor side, (V, D) in stage 1's anchor order: read from stage2/anchor_embeddings.safetensors when
    it was made from the run's inputs, else embedded (and, with `write`, kept there), so matching a new user
    costs one encoder pass over that user's history."""
    path, made_from = run.dir.anchor_embeddings, inputs.anchor_embeddings(run)
    if current(path, made_from):
        return load_tensors(path)[0]["embeddings"].numpy().copy()  # not a view of the file
    by_id = {u.user_id: u for u in run.candidates}
    p = run.profile
    emb = anchor_embeddings([by_id[a["user_id"]] for a in stage1_select(run)["anchors"]], run.task_spec, encoder,
                            p.encoder_batch_size, p.stage2_text)  # (V, D)
    if write:
        with atomic_path(path) as tmp:
            save_sealed_tensors(tmp, {"embeddings": torch.from_numpy(emb)}, made_from)
    return emb


def stored_matches(run: Run) -> dict:
    """matches.json as it is; an unreadable one, or one that is not user -> sealed match, is named and taken as
    empty (every user is matched again)."""
    path = run.dir.matches
    try:
        matches = read_json(path) if path.exists() else {}
    except InputError as e:
        matches = e
    if isinstance(matches, InputError):
        why = f"it cannot be read ({matches})"
    elif not isinstance(matches, dict) or not all(isinstance(m, dict) and "made_from" in m for m in matches.values()):
        why = "it is not a user -> match record object"
    else:
        return matches
    log(f"{path}: not reused, {why}")
    return {}


def current_matches(run: Run, matches: dict) -> dict[str, dict]:
    """The entries of `matches` made from the run's inputs, for the run's test users."""
    return {u.user_id: matches[u.user_id] for u in run.test_users
            if record_problem(matches.get(u.user_id), inputs.match(run, u)) is None}


def stage1c_population(run: Run) -> None:
    """The population LoRAs the run's fuse-then-train methods fold (`Method.population`: OPPU's task LoRA)."""
    build_population_loras(run, [get(m) for m in run.methods])


def stage1c_baselines(run: Run) -> None:
    """The population LoRAs the run's methods fold, and the population-level artifacts of the baselines the run
    includes (`Procedure.build`)."""
    for part in stage1c_parts(run):
        STAGE1C[part](run)


def stage1c_parts(run: Run) -> list[str]:
    """The parts of stage 1c (`STAGE1C`) the run includes, each independent of the others: the baselines' first
    (each trains a population LoRA and more), then the population LoRAs the fuse-then-train methods fold."""
    folds = any(get(m).population != "none" for m in run.methods)
    return [*run.procedures, *(["population"] if folds else [])]


def load_baselines(run: Run) -> dict[str, Baseline]:
    """Each baseline the run includes, with whatever of its population-level artifacts exists (a unit that needs
    a missing one fails with an InputError naming it)."""
    return {name: Baseline(BASELINES[name], BASELINES[name].load(run)) for name in run.procedures}


def load_bank(run: Run) -> tuple[dict, dict[str, str]]:
    """(anchor id -> Adapter, anchor id -> why it is unusable) for every anchor of stage 1: a meta-LoRA is used
    only when it was made from the run's inputs (`mta.stamps.stale`)."""
    bank, missing = {}, {}
    by_id = {u.user_id: u for u in run.candidates}
    for a in (a["user_id"] for a in stage1_select(run)["anchors"]):
        path = run.dir.adapter(a)
        why = stale(path, inputs.adapter(run, by_id[a]))
        if why is None:
            bank[a] = load_adapter(path)
        else:
            missing[a] = f"{path}: {why}"
            log(f"bank: anchor {a} unusable, {missing[a]}")
    return bank, missing


# A unit's tries across runs: an InputError fails again until its input is fixed, a crash (a bug, a worker lost)
# may not. Three, as many as the Ray executor gives a job whose worker died; then the unit is reported, not retried.
MAX_ATTEMPTS = 3


def unit_result(run: Run, user: User, method: str) -> dict | None:
    """The (user, method) result made from the run's inputs (`mta.run.inputs.result`), or None."""
    path = run.dir.user_result(user.user_id, method)
    return read_json(path) if current(path, inputs.result(run, user, get(method))) else None


def unit_failure(run: Run, user: User, method: str) -> dict | None:
    """The (user, method) failure record made from the run's inputs, or None (a failure of other inputs is none)."""
    path = run.dir.user_failure(user.user_id, method)
    return read_json(path) if current(path, inputs.result(run, user, get(method), "failure")) else None


def record_failure(run: Run, user: User, method: str, error: str, kind: str) -> None:
    """Write the unit's failure record beside where its result would be, counting the attempt; `kind` is one of
    `report.FAILURE_KINDS`."""
    before = unit_failure(run, user, method)
    write_sealed(run.dir.user_failure(user.user_id, method),
                 {"user_id": user.user_id, "method": method, "kind": kind, "error": error,
                  "attempts": (before["attempts"] if before else 0) + 1,
                  "time": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                 inputs.result(run, user, get(method), "failure"))


def record_result(run: Run, user: User, method: str, result: dict) -> None:
    write_sealed(run.dir.user_result(user.user_id, method), result, inputs.result(run, user, get(method)))
    run.dir.user_failure(user.user_id, method).unlink(missing_ok=True)


def stage3_todo(run: Run) -> dict[str, list[str]]:
    """user id -> the methods without a result whose unit has failed fewer than MAX_ATTEMPTS times."""
    todo: dict[str, list[str]] = {}
    for u in run.test_users:
        for m in run.methods:
            if unit_result(run, u, m) is not None:
                continue
            failed = unit_failure(run, u, m)
            if failed and failed["attempts"] >= MAX_ATTEMPTS:
                log(f"user {u.user_id}, {m}: not retried, failed {failed['attempts']} times (last: {failed['error']}); "
                    f"delete {run.dir.user_failure(u.user_id, m)} to try again")
                continue
            todo.setdefault(u.user_id, []).append(m)
    return todo


def stage3_run(run: Run) -> None:
    """Every (user, method) unit without a result, unit of methods by unit, for `group_size` users at once
    (`run_group`; the last group may be smaller, down to one user). Each result is written as soon as its group
    ends; a failure is recorded apart (`record_failure`) and retried by the next run, up to MAX_ATTEMPTS tries."""
    todo = stage3_todo(run)
    if not todo:
        return
    p = run.profile
    size = run.executor.group_size(len(todo), p.group_size)
    log(f"stage 3: {sum(map(len, todo.values()))} (user, method) units to run for {len(todo)} users, {size} at a "
        f"time, {run.executor.kind} executor")
    by_unit: dict[tuple[str, ...], list[str]] = {}
    for u in run.test_users:
        for unit in units(todo.get(u.user_id, [])):
            by_unit.setdefault(tuple(m.name for m in unit), []).append(u.user_id)
    jobs = [Job(f"stage 3, {'+'.join(names)}: {', '.join(us[i: i + size])}", "stage3", tuple(us[i: i + size]),
                names, size=len(us[i: i + size]) * len(names))
            for names, us in by_unit.items() for i in range(0, len(us), size)]
    by_id = {u.user_id: u for u in run.test_users}
    for job, error in run_jobs(run, jobs, run_job, "stage 3").items():
        log(f"{job.name}: {error}")
        for uid in job.ids:
            for m in job.methods:
                record_failure(run, by_id[uid], m, error, "crash")


def stage3_group(run: Run, user_ids: Sequence[str], unit: Sequence, cache: dict) -> None:
    """Run one unit of methods for a group of users together (`run_group`) and write each (user, method) result.
    A user's InputError is recorded as its units' failure; any other exception is recorded as a crash of every
    unit of the group, then raised."""
    by_id = {u.user_id: u for u in run.test_users}
    try:
        if "bank" not in cache:  # once per process: the driver's, or a worker's
            cache["matches"] = current_matches(run, stored_matches(run))
            cache["bank"], _ = load_bank(run)
            cache["bank"].update(load_population_loras(run, [get(m) for m in run.methods]))  # `method_setup`: both
            cache["baselines"] = load_baselines(run)
        matches, bank, baselines = cache["matches"], cache["bank"], cache["baselines"]
        group = [by_id[uid] for uid in user_ids]
        results = run_group(run.engine, group, unit, matches, bank, run.seed, baselines)
    except Exception as e:
        for uid in user_ids:
            for m in unit:
                record_failure(run, by_id[uid], m.name, f"{type(e).__name__}: {e}", "crash")
        raise
    for uid, rows in results.items():
        for m, result in rows.items():
            if "error" in result:
                log(f"user {uid}, {m}: {result['error']}")
                record_failure(run, by_id[uid], m, result["error"], "input")
            else:
                record_result(run, by_id[uid], m, result)
                if (train := result.get("train")) is not None:
                    report_steps(f"stage3/{m}/{uid}", loss=train["losses"], lr=train["lrs"],
                                 grad_norm=train["grad_norms"])


def run_job(run: Run, job: Job, cache: dict) -> None:
    """One job of `mta.run.executor`, in the driver or in a worker (a process or a Ray actor)."""
    if job.kind == "bank":
        bank_group(run, job.ids)
    elif job.kind == "stage1c":
        STAGE1C[job.ids[0]](run)
    else:
        stage3_group(run, job.ids, [get(m) for m in job.methods], cache)


def collect(run: Run) -> dict[str, dict[str, dict]]:
    """method -> user id -> result, over the run's test users that have one (`missing` says why the rest lack it)."""
    rows: dict[str, dict[str, dict]] = {m: {} for m in run.methods}
    for user in run.test_users:
        for m in run.methods:
            result = unit_result(run, user, m)
            if result is not None:
                rows[m][user.user_id] = result
    return rows


def missing(run: Run, rows: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """method -> user id -> why that test user has no result: its unit failed (the failure record, and whether the
    next run retries it), or it has not run yet."""
    out: dict[str, dict[str, dict]] = {m: {} for m in run.methods}
    for user in run.test_users:
        for m in [m for m in run.methods if user.user_id not in rows[m]]:
            failed = unit_failure(run, user, m)
            out[m][user.user_id] = {"reason": "not run"} if failed is None else {
                "reason": "failed", **{k: failed[k] for k in ("kind", "error", "attempts", "time")},
                "max_attempts": MAX_ATTEMPTS,
                "record": run.dir.user_failure(user.user_id, m).relative_to(run.dir.root).as_posix()}
    return out


def results(run: Run) -> dict:
    """Every method's per-user results, scores, the users missing from each method and why, and the run's facts
    (the content of results.json)."""
    rows = collect(run)
    latency = [sum(r["seconds"].values()) for r in rows.get("mta", {}).values()]
    stage1 = run.dir.anchors
    anchors = read_json(stage1) if stale(stage1, inputs.stage1(run)) is None else {"anchors": [],
                                                                                   "clusters_without_anchor": []}
    by_id = {u.user_id: u for u in run.candidates}
    meta = {"profile": run.profile.name, "seed": run.seed, "llm": run.profile.llm,
            "notes": [*run.profile.notes, run.profile.describe()], "mta_latency_median_s": report.median(latency),
            "anchors": [a["user_id"] for a in anchors["anchors"]],
            "anchor_rules": {a["user_id"]: a.get("rule", "") for a in anchors["anchors"]},
            "clusters_without_anchor": anchors["clusters_without_anchor"],
            "stage_seconds": read_json(run.dir.timings) if run.dir.timings.exists() else {},
            "method_seconds": {m: round(sum(sum(r["seconds"].values()) for r in rs.values()), 1)
                               for m, rs in rows.items()},
            "bank_missing": [a["user_id"] for a in anchors["anchors"]
                             if stale(run.dir.adapter(a["user_id"]), inputs.adapter(run, by_id[a["user_id"]]))]}
    if run.dir.plan.exists():  # what `mta plan` estimated, set beside the measured stage times
        meta["plan"] = read_json(run.dir.plan)
    return report.build_results(run.task_spec.name, rows, meta, missing=missing(run, rows))


def write_results(run: Run) -> dict:
    """results.json, results.md, and beside them in results-lamp/ each method's predictions and the golds in
    LaMP's official format (`report.lamp_files`), for LaMP's own evaluation script."""
    result = results(run)
    path = run.dir.results_json(run.subset)
    write_json(path, result)
    for name, content in report.lamp_files(result).items():
        write_json(path.with_name(f"{path.stem}-lamp") / name, content)
    with atomic_path(run.dir.results_md(run.subset)) as tmp:
        tmp.write_text(report.render_markdown(result))
    return result


def run_and_report(run: Run) -> dict:
    stage1c_baselines(run)  # a no-op when the run has neither baseline or their artifacts exist
    stage3_run(run)
    return write_results(run)


def _if_included(name: str):
    return lambda run: BASELINES[name].build(run) if name in run.procedures else None


# The parts of stage 1c, each making its artifacts unless they were made from the run's inputs.
STAGE1C = {"population": stage1c_population, **{name: _if_included(name) for name in BASELINES}}

# Every stage `reproduce` runs, in order, under the name timings.json keeps its wall time by.
STAGES = [("stage1a_select", stage1_select), ("stage1b_bank", functools.partial(stage1_bank, with_stage1c=True)),
          *((f"stage1c_{part}", build) for part, build in STAGE1C.items()),
          ("stage2_match_anchors", stage2_match_anchors), ("stage3", stage3_run)]


def reproduce(run: Run) -> dict:
    """Every stage in order. Each stage's wall time is added to `timings.json`, so a resumed run's file
    holds the cold run's total per stage (a finished stage adds about nothing when it is skipped)."""
    start = time.perf_counter()
    torch.manual_seed(run.seed)
    timings = read_json(run.dir.timings) if run.dir.timings.exists() else {}
    for name, stage in STAGES:
        t0 = time.perf_counter()
        stage(run)
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 1)
        write_json(run.dir.timings, timings)
    result = write_results(run)
    latency = result["meta"]["mta_latency_median_s"]
    log(f"done in {time.perf_counter() - start:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}): "
        f"{run.dir.results_md(run.subset)}; median per-user MTA latency "
        f"(match + fuse + adapt + generate): {'n/a' if latency is None else f'{latency:.1f} s'}")
    return result




def reproduce_seeds(runs: list[Run], results: list[dict]) -> dict:
    """Several seeds of one reproduction: the summary across them (`mta.eval.multiseed`), next to their directories."""
    first = runs[0].dir.root
    name = first.name.replace(f"-seed{runs[0].seed}", "-seeds" + "-".join(str(r.seed) for r in runs))
    folder = first.parent / (name + (f"-{runs[0].subset}-users" if runs[0].subset else ""))
    summary = multiseed.write_summary(folder, results, [r.seed for r in runs])
    log(f"{len(runs)} seeds: {folder / 'summary.md'}")
    return summary
