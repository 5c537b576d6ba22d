"""The plan before the spend (`mta plan`, `mta reproduce --plan`, `make plan`): what a run would do and about what
it would cost on this machine, without training anything. It counts each stage's work on the run's own data with
the stages' own example builders, times a few steps of the run's own models (`calibrate_encoders`,
`calibrate_llm`) or takes stated rates where they cannot run here (`ASSUMED_H100`), scales the one by the other
and writes `<run>/plan.json`, the only file it writes; results.md sets the estimate beside the measured stage
times."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mta.baselines import perpcs, proper
from mta.data.lamp import User
from mta.files import read_json, write_json
from mta.methods import get, units
from mta.models.checkpoint import MODELS, load_llm
from mta.models.encoders import REGISTRY, load_encoder, user_item_embeddings
from mta.profiles import CPU, LoRASpec, resolve_profile
from mta.run import cli, download
from mta.run.calibrate import split_gain
from mta.run.pipeline import Run, stage1c_parts
from mta.run.preflight import PreflightError, check_device
from mta.seeding import derive_seed, seeded_subset
from mta.stages.anchors import candidate_pool, embedded_items
from mta.stages.engine import Engine
from mta.stages.matching import match_anchors
from mta.stages.personalize import method_prompts

DOC = """Plan a reproduction before running it: the profile and device it would use and why, what each stage
would do (candidates, items to embed, anchors, training examples and tokens, stage-3 units) and about how long
each stage would take here, from a short calibration of the run's own models (under a minute or two on 2 cores).
For a GPU profile, also the GPU-hours. Trains nothing; writes only <run>/plan.json.

    mta plan --task lamp4 --lamp-dir ../shared/lamp --profile cpu      (also: mta reproduce --plan ...)"""

CALIBRATION_ITEMS = 256  # stage-1 items embedded to time the encoder
CALIBRATION_DOCUMENTS = 8  # test users matched to two anchors to time stage 2
# Optimizer steps of the bank's recipe timed for a group of LoRAs, and for one LoRA alone (a step of one example is
# too short to time alone)
CALIBRATION_STEPS = {"group": 2, "one": 8}
# Counting: a history of more items, or a population draw of more users, is counted on a seeded sample of this many
COUNT_ITEMS = 64
COUNT_USERS = 512
# What a plan counts with for a profile's "auto" settings where it cannot calibrate (a 2-core AVX512-BF16 EPYC's)
UNMEASURED = {"bf16": True, "group_size": 32, "rows_per_pass": 8}


@dataclass(frozen=True)
class Rates:
    """What the plan divides its counts by: measured here (`calibrate_encoders`, `calibrate_llm`) or stated
    (`ASSUMED_H100`)."""

    items_s: float  # stage-1 encoder: items a second
    documents_s: float  # stage-2 encoder: whole-history documents a second
    group_tokens_s: float  # training tokens a second of a group of `group_size` LoRAs in one pass (stages 1b, 3)
    tokens_s: float  # training tokens a second of one LoRA alone (stage 1c: a group of one, or a plain training loop)
    forward_tokens_s: float  # tokens a second of a forward without gradient (probes, Per-Pcs's assembly)
    query_s: float  # seconds a test query, decoded in a batch of up to group_size prompts
    load_s: dict  # seconds to load: "llm", "stage1_encoder", "stage2_encoder"
    peak_gib: dict  # peak memory, GiB, of the stages that run an encoder ("encoder") and the LLM ("llm")
    source: str


# Stated, not measured: nothing has been timed on a GPU yet. Training: 6 N FLOP a token for Llama-3-8B's 8 B weights
# at 160 TFLOP/s (40 % of an H100's dense bf16 peak, docs/scaling.md), about 3,300 tokens/s; a forward 2 N, three
# times that. A query: about 600 prompt tokens prefilled at that rate and up to 64 new tokens at 25 ms a step shared by
# a batch of 8. Encoders: deberta-v3-large (435 M) on items of up to 128 tokens and bge-small (33 M) on 512-token
# documents at the same fraction of peak. Memory: docs/scaling.md's model of the bf16 base (16.1 GB), 3 GB of
# activations a row for the 4 rows of a pass, 1.5 GB of CUDA context.
ASSUMED_H100 = Rates(items_s=1000.0, documents_s=500.0, group_tokens_s=3300.0, tokens_s=3300.0,
                     forward_tokens_s=10000.0, query_s=0.25,
                     load_s={"llm": 60.0, "stage1_encoder": 10.0, "stage2_encoder": 5.0},
                     peak_gib={"encoder": 4.0, "llm": 30.0},
                     source="stated, not measured: Llama-3-8B in bf16 on one H100 at 40 % of its bf16 peak "
                            "(mta/run/plan.py, ASSUMED_H100)")

RATE_OF = {"items": "items_s", "documents": "documents_s", "group_tokens": "group_tokens_s", "tokens": "tokens_s",
           "forward_tokens": "forward_tokens_s"}


def seconds(work: dict, rates: Rates) -> float:
    """A stage's (or method's) time: each count over its rate, queries at `query_s`, plus its model loads."""
    return (sum(work.get(k, 0) / getattr(rates, r) for k, r in RATE_OF.items())
            + work.get("queries", 0) * rates.query_s + sum(rates.load_s[m] for m in work.get("loads", ())))


@dataclass(frozen=True)
class Count:
    """Training examples and their tokens (prompt and response) in one epoch."""

    n: int
    tokens: int

    @classmethod
    def of(cls, examples: Sequence) -> Count:
        return cls(len(examples), sum(len(p) + len(r) for p, r in examples))

    def scaled(self, n: float) -> Count:
        """`n` examples at this count's mean length."""
        return Count(round(n), round(n * self.tokens / self.n)) if self.n else self

    def trained(self, spec: LoRASpec) -> int:
        """Tokens a LoRA trained under `spec` processes: every epoch, or `max_steps` batches at the mean length."""
        if spec.max_steps is None or not self.n:
            return self.tokens * spec.epochs
        return round(spec.max_steps * spec.batch_size * spec.grad_accum * self.tokens / self.n)

    def probe(self, spec: LoRASpec) -> int:
        """Tokens of the two probe forwards of the first step (`TrainConfig.probe`), at the mean length."""
        return 2 * self.scaled(min(self.n, spec.batch_size * spec.grad_accum)).tokens


def history_examples(engine: Engine, history: list[dict], seed: int, limit: int | None = None, **kw) -> Count:
    """`Engine.examples` counted: exactly for a history of at most `COUNT_ITEMS` items; a longer one (each of its
    examples retrieves from all the others, so building them grows with the square of its length) at the mean of
    the examples of a seeded sample of `COUNT_ITEMS` of its items, retrieving from one another."""
    if len(history) <= COUNT_ITEMS:
        return Count.of(engine.examples(history, seed, limit, **kw))
    sample = Count.of(engine.examples(seeded_subset(history, COUNT_ITEMS, derive_seed(seed, "plan")), seed, **kw))
    n = sample.n * len(history) / COUNT_ITEMS
    return sample.scaled(n if limit is None else min(limit, n))


def population_count(engine: Engine, users: Sequence[User], seed: int, limit: int | None, spec: LoRASpec) -> Count:
    """`Engine.population_examples` counted: exactly for a draw of at most `COUNT_USERS` users; a larger one at the
    mean of the examples of a seeded sample of `COUNT_USERS` users."""
    draw = min(limit or len(users), len(users))
    if draw <= COUNT_USERS:
        return Count.of(engine.population_examples(users, seed, limit, spec))
    sample = Count.of(engine.population_examples(seeded_subset(users, COUNT_USERS, derive_seed(seed, "plan")), seed,
                                                 None, spec))
    return sample.scaled(sample.n * draw / COUNT_USERS)


def add(work: dict, **counts) -> dict:
    for k, v in counts.items():
        work[k] = work.get(k, 0) + v
    return work


def lora(work: dict, count: Count, spec: LoRASpec, kind: str = "tokens", probe: bool = True) -> dict:
    """Count one trained LoRA into `work`: its examples, tokens (of `kind`) and probe forwards."""
    return add(work, loras=1, examples=count.n, **{kind: count.trained(spec)},
               forward_tokens=count.probe(spec) if probe else 0)


def planned_anchors(run: Run, pool: Sequence[User]) -> tuple[list[User], str]:
    """Stage 1a's anchors when it has run. Before, a stand-in: the pool dealt at random (seeded) into `n_anchors`
    groups, each group's most active member as Eq. 3 takes a cluster's. K-Means groups by topic, not at random, so
    this is an estimate (on the LaMP-4 dev pool its bank has about 1.2 times the examples of the real anchors')."""
    by_id = {u.user_id: u for u in run.candidates}
    if run.dir.anchors.exists():
        return [by_id[a["user_id"]] for a in read_json(run.dir.anchors)["anchors"]], str(run.dir.anchors)
    order = list(pool)
    random.Random(derive_seed(run.seed, "plan", "anchors")).shuffle(order)
    groups = [order[i:: run.profile.n_anchors] for i in range(min(run.profile.n_anchors, len(order)))]
    return [min(g, key=lambda u: (-len(u.history), u.user_id)) for g in groups], \
        (f"not chosen yet: the most active member of each of {len(groups)} random groups of the pool stands in "
         f"for its cluster's")


def count(run: Run, engine: Engine) -> tuple[dict, dict, dict]:
    """(counts, per-stage work, per-method stage-3 work) of a cold run, from the stages' own example builders."""
    p, task = run.profile, run.task_spec
    pool = candidate_pool(run.candidates, p.max_candidates, run.seed)
    items = sum(len(embedded_items(u, task, p.stage1_text, p.max_items_embedded, run.seed)) for u in pool)
    anchors, anchors_from = planned_anchors(run, pool)
    stages = {"stage1a_select": {"items": items, "loads": ["stage1_encoder"]},
              "stage1b_bank": {"loads": ["llm"]}}
    for a in anchors:
        lora(stages["stage1b_bank"], history_examples(engine, a.history, derive_seed(run.seed, "bank", a.user_id),
                                                      p.max_items_per_anchor, bank=True), p.bank, "group_tokens", False)
    population = stages["stage1c_population"] = {}
    for name in dict.fromkeys(get(m).population for m in run.methods if get(m).population != "none"):
        spec = getattr(p, name)
        lora(population, population_count(engine, run.candidates, derive_seed(run.seed, name), p.population_items,
                                          spec), spec)
    if "perpcs" in run.procedures:
        work = stages["stage1c_perpcs"] = lora({}, population_count(
            engine, run.candidates, derive_seed(run.seed, perpcs.TASK_LORA), p.population_items, p.perpcs_task),
            p.perpcs_task)
        for a in anchors:
            examples = history_examples(engine, a.history, derive_seed(run.seed, "perpcs", a.user_id),
                                        p.perpcs_sharer_items)
            lora(lora(work, examples, p.perpcs_sharer), examples, p.perpcs_gate)
    if "proper" in run.procedures:
        work = stages["stage1c_proper"] = lora({}, population_count(
            engine, run.candidates, derive_seed(run.seed, proper.POPULATION_LORA), p.population_items,
            p.proper_population), p.proper_population)
        seed = derive_seed(run.seed, "proper", "group")
        group = [history_examples(engine, u.history, derive_seed(seed, u.user_id), p.proper_group_items)
                 for u in run.target_users]
        lora(work, Count(sum(c.n for c in group), sum(c.tokens for c in group)), p.proper_group)
    stages["stage2_match_anchors"] = {"documents": len(run.test_users) + len(anchors), "loads": ["stage2_encoder"]}
    methods = {m: {} for m in run.methods}
    for u in run.test_users:
        for m in map(get, run.methods):
            unit_seed, work = derive_seed(run.seed, u.user_id, m.name), methods[m.name]
            add(work, units=1, queries=len(u.query))
            if m.procedure == "perpcs":
                pairs = perpcs.assembly_pairs(task, u.history, unit_seed, p.perpcs_user_items, p.prompt_style)
                add(work, forward_tokens=Count.of(engine.tokenize(pairs)).tokens)
            elif m.procedure == "proper":  # its user and router stages on subsets of the user's examples
                every = history_examples(engine, u.history, unit_seed)
                for spec, limit in ((p.proper_user, p.proper_user_items), (p.proper_router, p.proper_router_items)):
                    lora(work, every.scaled(min(limit or every.n, every.n)), spec, "group_tokens")
            elif m.recipe != "none":
                recipe = getattr(p, m.recipe)
                lora(work, history_examples(engine, u.history, unit_seed, earlier_only=recipe.earlier_only,
                                            recipe=recipe), recipe, "group_tokens", False)
    stages["stage3"] = {}
    for work in methods.values():
        add(stages["stage3"], **work)
    size = p.group_size
    counts = {"candidates_in_file": len(run.candidates), "candidates": len(pool), "items_embedded": items,
              "anchors": len(anchors), "anchors_from": anchors_from, "test_users": len(run.test_users),
              "queries": sum(len(u.query) for u in run.test_users),
              "units": len(run.test_users) * len(run.methods),
              "groups": len(units(run.methods)) * math.ceil(len(run.test_users) / size)}
    return counts, stages, methods


def model_here(name: str, llm: bool) -> bool:
    """Whether a model loads without a download: shipped in a package, a local path, or in the Hub cache."""
    if llm:
        source = MODELS.get(name)
        package, repo = (source.package, source.repo_id) if source else (None, None)
    else:
        spec = REGISTRY.get(name)
        package = spec.source.removeprefix("package:") if spec and spec.source.startswith("package:") else None
        repo = spec.source if spec and not package else None
    if package:
        return importlib.util.find_spec(package) is not None
    if repo is None and Path(name).expanduser().exists():
        return True
    repo = repo or name
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        return False
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "config.json"), str) and any(
        isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "model.safetensors.index.json"))


def device_here(device: str) -> bool:
    try:
        check_device(device)
    except ValueError:
        return False
    return True


def peak_gib(device: str) -> float:
    """This process's peak memory so far: GPU memory allocated on CUDA, else resident set size."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def calibrate_encoders(run: Run, anchors: Sequence[User]) -> dict:
    """The encoders' rates here: stage 1's on a seeded sample of the pool's items, stage 2's matching a few test
    users to two anchors, each load timed; and the peak memory so far (before any LLM is loaded)."""
    p, task = run.profile, run.task_spec
    pool = candidate_pool(run.candidates, p.max_candidates, run.seed)
    items = [t for u in pool for t in embedded_items(u, task, p.stage1_text, p.max_items_embedded, run.seed)]
    sample = seeded_subset(items, CALIBRATION_ITEMS, derive_seed(run.seed, "plan"))
    tic = time.perf_counter()
    encoder = load_encoder(p.stage1_encoder, device=p.device)
    load1 = time.perf_counter() - tic
    user_item_embeddings(encoder, [sample[: p.encoder_batch_size]], p.encoder_batch_size)  # warm-up, untimed
    tic = time.perf_counter()
    user_item_embeddings(encoder, [sample], p.encoder_batch_size, False, p.item_norm)
    items_s, tic = len(sample) / (time.perf_counter() - tic), time.perf_counter()
    encoder = load_encoder(p.stage2_encoder, device=p.device)
    load2, tic = time.perf_counter() - tic, time.perf_counter()
    users = run.test_users[:CALIBRATION_DOCUMENTS]
    match_anchors(users, anchors[:2], task, encoder, p.encoder_batch_size, False, p.stage2_text)
    return {"items_s": items_s, "documents_s": (len(users) + len(anchors[:2])) / (time.perf_counter() - tic),
            "load_s": {"stage1_encoder": load1, "stage2_encoder": load2}, "peak_gib": {"encoder": peak_gib(p.device)},
            "source": f"{len(sample)} items, {len(users) + len(anchors[:2])} documents"}


def calibrate_llm(run: Run, engine: Engine, anchors: Sequence[User]) -> dict:
    """The LLM's rates here: a few optimizer steps (`CALIBRATION_STEPS`) of the bank's recipe on a real anchor's
    examples, for a group of LoRAs in one pass and for one alone (whose probe forwards time a forward), and one
    batched decode of real test prompts (RAG k=1's). Nothing is saved."""
    p, seed = run.profile, derive_seed(run.seed, "plan")
    examples = engine.examples(anchors[0].history, seed, limit=p.max_items_per_anchor, bank=True)
    group, alone = (dataclasses.replace(p.bank, max_steps=CALIBRATION_STEPS[k]) for k in ("group", "one"))
    size = min(p.group_size, len(anchors))
    engine.reset()
    try:
        logs, _ = engine.personalize_many([[]] * size, [[]] * size, group, [examples] * size, [seed] * size)
        engine.reset()
        (one,), _ = engine.personalize_many([[]], [[]], alone, [examples], [seed], probe=True)
    finally:
        engine.reset()
    prompts = [q for u in run.test_users[: p.group_size]
               for q in method_prompts(run.task_spec, u, get("rag1"), p.prompt_style)]
    tic = time.perf_counter()
    engine.generate(prompts)
    return {"group_tokens_s": sum(lg.tokens for lg in logs) / logs[0].seconds, "tokens_s": one.tokens / one.seconds,
            "forward_tokens_s": 2 * one.tokens / len(one.losses) / one.probe_seconds,
            "query_s": (time.perf_counter() - tic) / max(len(prompts), 1), "peak_gib": {"llm": peak_gib(p.device)},
            "source": f"{CALIBRATION_STEPS['group']} training steps of a group of {size} LoRAs, "
                      f"{CALIBRATION_STEPS['one']} of one LoRA, one decode of {len(prompts)} prompts"}


def in_workers(run: Run, notes: list[str]) -> float:
    """How much faster stages 1b and 3 run than the rates measured in this process: the calibration's measured gain
    when they run in worker processes (`mta.run.calibrate.split_gain`), else 1."""
    ex = run.executor
    if ex.kind != "processes":
        return 1.0
    gain = split_gain(((run.calibration_record or {}).get("measured") or {}).get("executor", {}))
    if gain is None:
        notes.append(f"stages 1b and 3 run in {ex.workers} worker processes; no calibration measured their gain, so "
                     f"their times are counted as in one process")
        return 1.0
    notes.append(f"stages 1b and 3 run in {ex.workers} worker processes of {ex.threads} thread(s), measured "
                 f"{gain:.2f}x the steps per second of one process; peak memory is per worker")
    return gain


def why_profile(asked: str) -> str:
    if asked == "auto":
        cuda = torch.cuda.is_available()
        return (f"--profile auto: {'CUDA is available' if cuda else 'no CUDA device'}, so "
                f"{resolve_profile('auto').name} (mta.profiles.resolve_profile)")
    return f"--profile {asked}, as asked"


def make_plan(run: Run, asked: str = "auto", notes: Sequence[str] = ()) -> dict:
    """Count, calibrate, estimate; print the plan and write it to `<run>/plan.json`."""
    p, start, notes = run.profile, time.perf_counter(), list(notes)
    anchors, _ = planned_anchors(run, candidate_pool(run.candidates, p.max_candidates, run.seed))
    here = device_here(p.device)
    missing = [m for m, llm in ((p.llm, True), (p.stage1_encoder, False), (p.stage2_encoder, False))
               if not model_here(m, llm)]
    calibrated = here and not missing
    if calibrated:
        busy = os.getloadavg()[0]
        if busy > (os.cpu_count() or 1):
            notes.append(f"load average {busy:.1f} on {os.cpu_count()} cores as the calibration began: other work "
                         f"shared the cores, so these times are too long for a machine of its own")
        encoders = calibrate_encoders(run, anchors)  # before the LLM is loaded, as in the run
        tic = time.perf_counter()
        run.llm  # noqa: B018 (loaded here, to time the load)
        load_llm_s = time.perf_counter() - tic
        run.settle()  # the "auto" settings this machine gets (mta.run.calibrate)
        p, engine = run.profile, run.engine
    else:
        why = f"{p.device} is not available here" if not here else f"not on this machine: {', '.join(missing)}"
        notes.append(f"no calibration ({why}); the plan downloads nothing, so its rates are stated")
        if p.unsettled:
            assumed = {f: UNMEASURED[f] for f in p.unsettled}
            p = run.profile = p.replace(**assumed)
            notes.append(f"settings not measured here, counted as {assumed}")
        if CPU.llm != p.llm:  # a small model, never the profile's own (8 B weights on a CPU to count tokens)
            notes.append(f"tokens counted with {CPU.llm}'s tokenizer in place of {p.llm}'s")
        engine = Engine(p, run.task_spec, *load_llm(CPU.llm))
    counts, stages, methods = count(run, engine)
    if calibrated:
        llm = calibrate_llm(run, engine, anchors)
        rates = Rates(encoders["items_s"], encoders["documents_s"], llm["group_tokens_s"], llm["tokens_s"],
                      llm["forward_tokens_s"], llm["query_s"], load_s={**encoders["load_s"], "llm": load_llm_s},
                      peak_gib={**encoders["peak_gib"], **llm["peak_gib"]},
                      source=f"measured here on {p.device} ({torch.get_num_threads()} threads): "
                             f"{encoders['source']}, {llm['source']}")
    else:
        rates = ASSUMED_H100
    peak = {"stage1a_select": "encoder", "stage2_match_anchors": "encoder"}
    gain = in_workers(run, notes)
    for name, work in stages.items():
        work["seconds"] = round(seconds(work, rates) / (gain if name in ("stage1b_bank", "stage3") else 1), 1)
        work["peak_gib"] = round(rates.peak_gib[peak.get(name, "llm")], 2)
    pooled = stage1c_parts(run) if run.executor.side_by_side else []  # run in stage 1b's workers (`stage1_bank`)
    for name in (f"stage1c_{part}" for part in pooled):
        stages["stage1b_bank"]["seconds"] = round(stages["stage1b_bank"]["seconds"] + stages[name]["seconds"] / gain, 1)
        stages[name].update(seconds=0.0, counted_in="stage1b_bank")
    if pooled:
        notes.append("stage 1c's parts run beside the bank's groups in its workers: their time is in stage1b_bank's, "
                     "as the run's timings.json counts it")
    for work in methods.values():
        work["seconds"] = round(seconds(work, rates) / gain, 1)
    total = sum(w["seconds"] for w in stages.values())
    plan = {"task": run.task_spec.name, "profile": p.name, "device": p.device, "why": why_profile(asked),
            "seed": run.seed, "methods": list(run.methods), "counts": counts, "stages": stages,
            "stage3_methods": methods, "total_seconds": round(total, 1), "rates": dataclasses.asdict(rates),
            "notes": notes, "plan_seconds": round(time.perf_counter() - start, 1)}
    if torch.device(p.device).type == "cuda":
        plan["gpu_hours"] = round(total / 3600, 2)
    path = run.dir.plan
    write_json(path, plan)
    print(render(plan) + f"\nwritten to {path}")
    return plan


def render(plan: dict) -> str:
    c = plan["counts"]
    out = [f"plan: {plan['task']}, profile {plan['profile']} on {plan['device']} ({plan['why']}), seed {plan['seed']}",
           f"  stage 1a: {c['candidates']} of {c['candidates_in_file']} candidates, {c['items_embedded']} items to "
           f"embed; anchors: {c['anchors']} ({c['anchors_from']})",
           f"  stage 3: {c['test_users']} test users, {c['queries']} queries, {c['units']} (user, method) units in "
           f"{c['groups']} groups",
           f"  {'stage':22} {'LoRAs':>6} {'examples':>9} {'train tokens':>13} {'est. s':>8} {'peak GiB':>9}"]
    for name, w in plan["stages"].items():
        tokens = w.get("group_tokens", 0) + w.get("tokens", 0)
        out.append(f"  {name:22} {w.get('loras', 0):>6} {w.get('examples', 0):>9} {tokens:>13} {w['seconds']:>8.0f} "
                   f"{w['peak_gib']:>9.1f}")
    out.append("  stage 3 by method: " + ", ".join(f"{m} {w['seconds']:.0f} s"
                                                   for m, w in plan["stage3_methods"].items()))
    out.append(f"  total: about {plan['total_seconds'] / 60:.0f} min"
               + (f", {plan['gpu_hours']} GPU-hours" if "gpu_hours" in plan else "")
               + f"; rates {plan['rates']['source']}")
    out += [f"  note: {n}" for n in plan["notes"]]
    return "\n".join(out)


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """`mta plan`: the shared flags of `mta reproduce`; the plan of its first seed (each seed costs the same)."""
    args = cli.parser(DOC, prog).parse_args(argv)
    try:
        run = cli.run_from_args(args)
        download.first_use(run)
        try:
            run.check_inputs()
            stops = []
        except PreflightError as e:  # a run here would stop; the plan still counts and states its rates
            stops = [f"a run would not start here: {e}"]
        return make_plan(run, args.profile, stops)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
