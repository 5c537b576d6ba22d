"""A finished run as a library: a new user's history in, their answers out (docs/running.md, "Personalising a new
user from Python").

`Personalizer.from_run` loads once what every user shares: the base model (`Run.engine`), the bank, the stage-2
encoder and the anchors' Eq. 4 embeddings (stored by stage 2). `personalize` then costs one encoder pass over the
user's history and the method's own work (fuse, train the stacked LoRA); `generate` answers queries with it;
`answer_many` does both for a group of users at once. Each step is the batch pipeline's own
(`mta.stages.personalize`), on its engine and with its unit seed, so a test user's answers are the run's."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mta.baselines import BASELINES
from mta.data.lamp import MIN_TRAIN_HISTORY, LampDataError, User, user_problems, validate_user
from mta.errors import InputError
from mta.files import read_json
from mta.log import log
from mta.methods import METHODS, Method, get
from mta.models.encoders import load_encoder
from mta.peft.adapter import Adapter, save_adapter
from mta.peft.export import export_adapter
from mta.run.pipeline import Run, check_config, load_bank, stage1_select, stage2_anchor_embeddings, stored_profile
from mta.run.rundir import RunDir
from mta.seeding import derive_seed
from mta.stages.engine import summarize
from mta.stages.matching import match_to_anchors
from mta.stages.personalize import method_prompts, method_setup, run_group, serve_procedure, split_outputs
from mta.stages.procedure import Baseline, load_population_loras


def answers(queries: Sequence[str], result: dict) -> list[dict]:
    """A stage-3 result's rows as a new user's answers: per query its output, prediction and prompt_cut."""
    return [{"query": q, "output": row["output"], "prediction": row["prediction"], "prompt_cut": row["prompt_cut"]}
            for q, row in zip(queries, result["queries"], strict=True)]


def argument_field(field: str) -> str:
    """A field of LaMP's row as the Personalizer's arguments name it: `profile[3].title` is `history[3].title`,
    `query[0].input` is `queries[0]`."""
    if field.startswith("profile"):
        return "history" + field.removeprefix("profile")
    if (m := re.fullmatch(r"query\[(\d+)\](\.input)?", field)) is not None:
        return f"queries[{m[1]}]"
    return "queries" + field.removeprefix("query") if field.startswith("query") else field


# LaMP's checks ask every query for a gold; a new user's queries have none, so they are checked with this one and
# hold an empty gold.
NO_GOLD = "(no gold)"


@dataclass
class Personalized:
    """One user personalised by one method: the anchors it fused (Eq. 5; none for methods without), the LoRAs it
    fused (the anchors' meta-LoRAs, or a population LoRA) at weights `alpha` (Eq. 6; [1.0] for a population LoRA),
    the LoRA it trained on the user's history (Eq. 7; None for methods without), and seconds per phase."""

    user_id: str
    method: str
    history: list[dict]
    anchors: list[str] = field(default_factory=list)
    alpha: list[float] = field(default_factory=list)
    fused: list[Adapter] = field(default_factory=list, repr=False)
    adapter: Adapter | None = field(default=None, repr=False)
    seconds: dict = field(default_factory=dict)
    train: dict | None = None


@dataclass
class Request:
    """One user's history and queries for one method: what `answer_many` takes."""

    history: list[dict]
    queries: list[str] | None  # None: no queries yet (`personalize`)
    method: str = "mta"
    user_id: str = "new-user"

    def key(self) -> str:
        """What a kept adapter is looked up by: the user, the method and a digest of the history."""
        text = json.dumps([self.user_id, self.method, self.history], sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Answered:
    """A request's answers (per query: output, prediction, prompt_cut), how its user was personalised, how many
    users were personalised and decoded together, and whether the adapter was a kept one (no training)."""

    personalized: Personalized
    answers: list[dict]
    group: int
    kept: bool = False


class Personalizer:
    """A finished run's shared parts, loaded once; one user's weights at a time on its engine, or a group's in
    one pass (`answer_many`). `keep` personalised adapters stay in memory, least recently used first out (0: none,
    nothing is kept per user)."""

    def __init__(self, run: Run, keep: int = 0):
        if keep < 0:
            raise ValueError(f"keep: {keep} adapters; 0 or more")
        self.run = run
        self.keep = keep
        self.kept: OrderedDict[str, Personalized] = OrderedDict()
        self.engine = run.engine
        self.bank, _ = load_bank(run)  # an anchor missing from it fails the users who match it, naming it
        self.encoder = load_encoder(run.profile.stage2_encoder, device=run.profile.device)
        self.anchor_ids = [a["user_id"] for a in stage1_select(run)["anchors"]]
        self.anchor_emb = stage2_anchor_embeddings(run, self.encoder, write=False)  # (V, D), stored by stage 2
        self.baselines: dict[str, Baseline] = {}  # Per-Pcs's and PROPER's artifacts, loaded on first use
        self.current: Personalized | None = None  # whose weights the engine holds

    @classmethod
    def from_run(cls, run_dir: str | Path, keep: int = 0) -> Personalizer:
        """The run in `run_dir` (its config.json: task, seed, profile, data), refused when its data files have
        changed since; the run's bank must be trained (stage 1b), the population LoRAs and baseline artifacts
        are loaded when a method first needs them."""
        config = Path(run_dir) / "config.json"
        if not config.exists():
            raise InputError(f"{config}: missing; from_run takes a run directory (runs/<task>/<profile>-seed<k>)")
        record = read_json(config)
        run = Run(record["task"], stored_profile(config), Path(record["lamp_dir"]), seed=record["seed"],
                  methods=("mta",), progress=False, run_dir=RunDir(Path(run_dir)))
        check_config(config, run.config_record(), run.profile)
        log(f"personalizer: {run.dir.root} ({run.task_spec.name}, {run.profile.name}, seed {run.seed})")
        return cls(run, keep)

    def user(self, history: list[dict], queries: Sequence[str] | None = None, user_id: str = "new-user") -> User:
        """A User of the run's task, checked as LaMP's rows are (`user_problems`; each problem named by the user
        and this method's own argument, `history[3].title`, `queries[0]`); the queries' ids are their positions
        and their gold is empty."""
        row = {"user_id": user_id, "profile": history}
        if queries is not None:
            row["query"] = [{"id": str(i), "input": q, "gold": NO_GOLD} for i, q in enumerate(queries)]
        problems = [f"{argument_field(f)}: {what}" for f, what in
                    user_problems(row, self.run.task_spec, with_query=queries is not None)]
        if problems:
            raise LampDataError(f"personalizer: user {user_id}: " + "; ".join(problems))
        user = validate_user(row, self.run.task_spec, with_query=queries is not None, source="personalizer")
        return dataclasses.replace(user, query=[dataclasses.replace(q, gold="") for q in user.query])

    def check(self, request: Request) -> tuple[User, Method]:
        """The request's user with its queries and its method, or an InputError naming the field, before any
        work: the history and queries as LaMP's rows are checked, the method one of the run's method table, at
        least 2 items for a method that trains on them."""
        if request.method not in METHODS:
            raise InputError(f"user {request.user_id}: method: unknown method {request.method!r}; choose from "
                             f"{', '.join(METHODS)}")
        m = get(request.method)
        user = self.user(request.history, request.queries, request.user_id)
        if m.trains_on_history and len(request.history) < MIN_TRAIN_HISTORY:
            raise LampDataError(f"personalizer: user {request.user_id}: history: fewer than {MIN_TRAIN_HISTORY} "
                                f"items; {m.name} trains on a user's items, each predicted from the others")
        return user, m

    def answer_many(self, requests: Sequence[Request]) -> list[Answered | InputError]:
        """Each request's answers, or the InputError that stopped it (the others go on). Requests of one method
        run together, `group_size` users at a time, through the pipeline's own `run_group` (one encoder pass
        matches them, one pass trains their LoRAs, one batch decodes them); a request whose adapter is kept skips
        the training and is decoded with the others kept."""
        out: list[Answered | InputError | None] = [None] * len(requests)
        todo: dict[str, list[tuple[int, User]]] = {}
        for i, r in enumerate(requests):
            try:
                user, m = self.check(r)
            except InputError as e:
                out[i] = e
                continue
            todo.setdefault(m.name, []).append((i, user))
        self.current = None
        for name, items in todo.items():
            m = get(name)
            kept = {i: self.kept[requests[i].key()] for i, _ in items if requests[i].key() in self.kept}
            for group in self.groups([(i, u) for i, u in items if i not in kept]):
                self.run_fresh(requests, group, m, out)
            for group in self.groups([(i, u) for i, u in items if i in kept]):
                self.run_kept(requests, group, m, [kept[i] for i, _ in group], out)
        return out

    def groups(self, items: list[tuple[int, User]]) -> list[list[tuple[int, User]]]:
        """`items` in order, in groups of at most `group_size` with one request per user id (a user's results
        are keyed by the id)."""
        groups: list[list[tuple[int, User]]] = []
        for item in items:
            group = next((g for g in groups if len(g) < self.run.profile.group_size
                          and all(u.user_id != item[1].user_id for _, u in g)), None)
            if group is None:
                groups.append(group := [])
            group.append(item)
        return groups

    def run_fresh(self, requests: Sequence[Request], items: Sequence[tuple[int, User]], m: Method,
                  out: list) -> None:
        users = [u for _, u in items]
        matches = self.matches(users) if m.anchors != "none" and not m.on_base_weights else {}
        held: dict = {}
        self.engine.reset()
        results = run_group(self.engine, users, [m], matches, self.population(m), self.run.seed,
                            self.procedures(m), kept=held)
        for i, u in items:
            result = results[u.user_id][m.name]
            if "error" in result:
                out[i] = InputError(result["error"])
                continue
            fused, alpha, adapter = held.get(u.user_id, ([], [], None))
            done = Personalized(u.user_id, m.name, requests[i].history, anchors=result.get("anchors", []),
                                alpha=alpha, fused=fused, adapter=adapter, seconds=result["seconds"],
                                train=result.get("train"))
            if adapter is not None and self.keep:
                self.kept[requests[i].key()] = done
                while len(self.kept) > self.keep:
                    self.kept.popitem(last=False)
            out[i] = Answered(done, answers(requests[i].queries, result), result.get("group", len(items)))

    def run_kept(self, requests: Sequence[Request], items: Sequence[tuple[int, User]], m: Method,
                 done: Sequence[Personalized], out: list) -> None:
        """Kept adapters (`done`, as they were when the requests came) back in slots, one batched decode of their
        queries."""
        for i, _ in items:
            if requests[i].key() in self.kept:
                self.kept.move_to_end(requests[i].key())
        prompts = [method_prompts(self.engine.task, u, m, self.run.profile.prompt_style) for _, u in items]
        self.engine.reset()
        try:
            self.engine.install_many([d.fused for d in done], [d.alpha for d in done], [d.adapter for d in done])
            tic = time.perf_counter()
            outputs = self.engine.generate([p for ps in prompts for p in ps],
                                           slots=[n for n, ps in enumerate(prompts) for _ in ps])
            generate = (time.perf_counter() - tic) / len(items)
        finally:
            self.engine.reset()
        pieces = split_outputs(outputs, [len(ps) for ps in prompts])
        for (i, _), d, ps, piece in zip(items, done, prompts, pieces, strict=True):
            out[i] = Answered(dataclasses.replace(d, seconds={"generate": generate}),
                              self.rows(requests[i].queries, ps, piece), len(items), kept=True)

    def personalize(self, history: list[dict], method: str = "mta", user_id: str = "new-user") -> Personalized:
        """Set the engine's weights up for this user as `method` does in the run (stage 2's match to the anchors,
        then stage 3's fuse and adapt, under the unit seed of (run seed, user id, method)); bad input raises an
        InputError naming the user and field before any work."""
        user, m = self.check(Request(history, None, method, user_id))
        self.engine.reset()
        self.current = None
        done = Personalized(user_id, m.name, history)
        if not m.on_base_weights:
            match = self.matches([user])[user.user_id] if m.anchors != "none" else None
            seed = derive_seed(self.run.seed, user_id, m.name)
            done = self.fuse_then_train(done, user, m, match, seed) if m.procedure == "fuse_then_train" else \
                self.procedure(done, user, m, seed)
        self.current = done
        return done

    def matches(self, users: Sequence[User]) -> dict[str, dict]:
        """Stage 2 for new users: one encoder pass over their histories, cosine to the stored anchor embeddings."""
        p = self.run.profile
        return match_to_anchors(users, self.anchor_ids, self.anchor_emb, self.run.task_spec, self.encoder,
                                p.encoder_batch_size, False, p.stage2_text)

    def population(self, m: Method) -> dict[str, Adapter]:
        if m.population != "none" and m.population not in self.bank:
            self.bank.update(load_population_loras(self.run, [m]))
        return self.bank

    def procedures(self, m: Method) -> dict[str, Baseline]:
        """The baselines loaded so far, with `m`'s procedure (Per-Pcs's or PROPER's artifacts) loaded on first use."""
        if m.procedure != "fuse_then_train" and m.procedure not in self.baselines:
            self.baselines[m.procedure] = Baseline(BASELINES[m.procedure], BASELINES[m.procedure].load(self.run))
        return self.baselines

    def rows(self, queries: Sequence[str], prompts: Sequence[str], outputs: Sequence[str]) -> list[dict]:
        """Per query: the query, the output, the task's parsed prediction and whether the test-time cap cut its
        prompt."""
        task, cut = self.engine.task, self.engine.prompt_cut
        return [{"query": q, "output": o, "prediction": task.parse(o), "prompt_cut": cut(p)}
                for q, p, o in zip(queries, prompts, outputs, strict=True)]

    def fuse_then_train(self, done: Personalized, user: User, m: Method, match: dict | None,
                        seed: int) -> Personalized:
        """Stage 3's set-up of one user, a group of one: slot 0 of per-row adapters (`Engine.personalize_many`)."""
        setup = method_setup(self.engine, user, m, match, self.population(m), seed)
        logs, phases = self.engine.personalize_many([setup.adapters], [setup.weights], setup.recipe,
                                                    [setup.examples], [seed])
        return dataclasses.replace(done, anchors=setup.extra.get("anchors", []), alpha=setup.weights,
                                   fused=setup.adapters, adapter=self.engine.slot_adapter(0) if setup.recipe else None,
                                   seconds={**setup.seconds, **phases},
                                   train=summarize(logs[0]) if logs else None)

    def procedure(self, done: Personalized, user: User, m: Method, seed: int) -> Personalized:
        """Per-Pcs or PROPER for one user, a group of one: its part in slot 0 (`serve_procedure`)."""
        setup, (made,) = serve_procedure(self.engine, [user], m, self.run.seed, self.procedures(m))
        if isinstance(made, InputError):
            raise made
        _, seconds, extra = made
        return dataclasses.replace(done, seconds={"setup": setup, **seconds}, train=extra.get("train"))

    def generate(self, queries: Sequence[str]) -> list[dict]:
        """The answers of the user `personalize` last set up: per query its output, the task's parsed prediction
        and whether the test-time cap cut its prompt."""
        if self.current is None:
            raise InputError("personalizer: no user personalised; call personalize(history, method) first")
        done, m = self.current, get(self.current.method)
        user = self.user(done.history, queries, done.user_id)
        prompts = method_prompts(self.engine.task, user, m, self.run.profile.prompt_style)
        tic = time.perf_counter()
        outputs = self.engine.generate(prompts, slots=None if m.on_base_weights else [0] * len(prompts))
        done.seconds["generate"] = time.perf_counter() - tic
        return self.rows(queries, prompts, outputs)

    def answer(self, history: list[dict], queries: Sequence[str], method: str = "mta",
               user_id: str = "new-user") -> list[dict]:
        """`personalize` then `generate`; the queries are checked before any work."""
        self.user(history, queries, user_id)
        self.personalize(history, method, user_id)
        return self.generate(queries)

    def export(self, done: Personalized, path: str | Path) -> Path:
        """`done`'s adapter as one PEFT LoRA folder (`mta.peft.export.export_adapter`): its fused LoRAs at `alpha`
        under its trained LoRA, for PEFT, vLLM or llama.cpp-style servers on the run's base model."""
        if done.adapter is None:
            raise InputError(f"export: user {done.user_id}, {done.method}: the method trains no LoRA to export")
        save_adapter(export_adapter(done.fused, done.alpha, done.adapter, self.run.profile.merge_space,
                                    self.run.profile.llm), path)
        return Path(path)
