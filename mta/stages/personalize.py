"""Stage 3: per user, each method of `mta.methods`: fuse its meta-LoRAs (Eq. 5), add a fresh LoRA trained on
the user's history on top (Eq. 7) as the method's row says, then generate; Per-Pcs and PROPER through their
own `Procedure`. `run_group` does this for a group of users at once, one user being a group of one: per-row
adapters hold each user's fused LoRA unmerged and its fresh LoRA, one pass trains and one batch decodes them
all."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mta.data.lamp import TaskSpec, User, instruction_only, query_prompt
from mta.errors import InputError
from mta.methods import Method
from mta.peft.adapter import Adapter
from mta.profiles import LoRASpec, Profile
from mta.seeding import derive_seed
from mta.stages.engine import Engine, summarize
from mta.stages.matching import fused_anchors
from mta.stages.procedure import Baseline


def method_prompts(task: TaskSpec, user: User, method: Method, style: str) -> list[str]:
    """Each query's prompt, in order, with the method's number of BM25-retrieved history items (none: the
    instruction)."""
    if method.history_items == 0:
        return [instruction_only(task, q, style) for q in user.query]
    return [query_prompt(task, user.history, q, k=method.history_items, style=style) for q in user.query]


@dataclass
class Setup:
    """What a fuse-then-train method needs for one user: the meta-LoRAs to fuse and their weights (Eq. 5-6), the
    recipe of the LoRA trained on top and its examples (Eq. 7)."""

    adapters: list[Adapter]
    weights: list[float]
    recipe: LoRASpec | None
    examples: list
    seconds: dict
    extra: dict


def method_setup(engine: Engine, user: User, method: Method, match: dict | None, bank: dict[str, Adapter],
                 unit_seed: int) -> Setup:
    p = engine.profile
    seconds, extra = {}, {}
    adapters, weights = [], []
    if method.anchors != "none":
        if match is None:
            raise InputError(f"user {user.user_id}: no stage-2 match (stage2/matches.json); rerun the same "
                             f"`make reproduce` (`mta reproduce`) command, whose stage 2 adds the users it lacks")
        anchors, weights = fused_anchors(match, p, method.anchors, unit_seed)
        missing = [a for a in anchors if a not in bank]
        if missing:
            raise InputError(f"bank has no adapter for anchor(s) {missing} (rerun tools/train_bank.py)")
        adapters = [bank[a] for a in anchors]
        seconds["match"] = match["seconds"]
        extra.update(anchors=anchors, weights=weights)
    if method.population != "none":  # `bank` holds the run's population LoRAs under their recipe's name too
        if method.population not in bank:
            raise InputError(f"no {method.population} LoRA (stage 1c; rerun tools/reproduce.py)")
        adapters, weights = [bank[method.population]], [1.0]
    recipe = None if method.recipe == "none" else getattr(p, method.recipe)
    examples = engine.examples(user.history, unit_seed, earlier_only=recipe.earlier_only, recipe=recipe) \
        if recipe else []
    if recipe:
        extra["train_prompts_cut"] = examples.cut  # training prompts the recipe's cap cut
    return Setup(adapters, weights, recipe, examples, seconds, extra)


def unit_results(engine: Engine, user: User, unit: Sequence[Method], prompts: Sequence[Sequence[str]],
                 outputs: Sequence[Sequence[str]], seconds: dict, extra: dict) -> dict[str, dict]:
    """Method name -> the result of one user: a row per query (`queries`, in the user's order), each with its
    output, the parsed prediction, the gold, and whether the test-time cap cut its prompt."""
    task = engine.task
    return {m.name: {"user_id": user.user_id, "method": m.name,
                     "queries": [{"query_id": q.id, "output": o, "prediction": task.parse(o), "gold": q.gold,
                                  "prompt_cut": engine.prompt_cut(p)}
                                 for q, p, o in zip(user.query, ps, outs, strict=True)],
                     "seconds": seconds, **extra}
            for m, ps, outs in zip(unit, prompts, outputs, strict=True)}


def split_outputs(outputs: Sequence[str], sizes: Sequence[int]) -> list[list[str]]:
    """A flat list of outputs back into consecutive pieces of `sizes` items."""
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    return [list(outputs[end - n: end]) for n, end in zip(sizes, ends, strict=True)]


def error_results(user: User, unit: Sequence[Method], error: Exception) -> dict[str, dict]:
    return {m.name: {"user_id": user.user_id, "method": m.name, "error": str(error)} for m in unit}


def run_group(engine: Engine, users: Sequence[User], unit: Sequence[Method], matches: dict,
              bank: dict[str, Adapter], seed: int, baselines: Mapping[str, Baseline] | None = None,
              kept: dict | None = None) -> dict[str, dict[str, dict]]:
    """One unit of stage 3 (`mta.methods.units`) for a group of users (one user is a group of one): user id ->
    method name -> {queries: [{output, prediction, gold, ...}], seconds, ...}. A unit's methods share its weights.

    Methods on W0 decode every user's prompts in batches of similar length. A fuse-then-train method gives
    each user a slot of per-row adapters (its fused LoRA unmerged, its fresh LoRA on top), trains all the
    slots in one pass and decodes them in one batch; each result's seconds are the group's divided by its
    size. Per-Pcs and PROPER make their users' parts and decode all of them in one batch
    (`run_procedure_group`). A user with bad input gets its error rows; the rest go on. With `kept`, a
    fuse-then-train method leaves there, by user id, the LoRAs each user's slot held: (fused LoRAs, their
    weights, the trained LoRA or None)."""
    task, style, size = engine.task, engine.profile.prompt_style, engine.profile.group_size
    method = unit[0]
    if method.on_base_weights:
        prompts = [method_prompts(task, u, m, style) for u in users for m in unit]  # user-major, then method
        flat = [p for ps in prompts for p in ps]
        order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
        outputs = [""] * len(flat)
        tic = time.perf_counter()
        for i in range(0, len(order), size * len(unit)):
            chunk = order[i: i + size * len(unit)]
            for j, out in zip(chunk, engine.generate([flat[j] for j in chunk]), strict=True):
                outputs[j] = out
        generate = (time.perf_counter() - tic) / len(prompts)
        pieces = split_outputs(outputs, [len(ps) for ps in prompts])
        return {u.user_id: unit_results(engine, u, unit, prompts[n * len(unit): (n + 1) * len(unit)],
                                        pieces[n * len(unit): (n + 1) * len(unit)], {"generate": generate},
                                        {"group": len(users)})
                for n, u in enumerate(users)}
    if method.procedure != "fuse_then_train":
        return run_procedure_group(engine, users, unit, seed, baselines)
    out, setups = {}, {}
    for u in users:
        try:
            setups[u.user_id] = method_setup(engine, u, method, matches.get(u.user_id), bank,
                                             derive_seed(seed, u.user_id, method.name))
        except InputError as e:
            out[u.user_id] = error_results(u, unit, e)
    ok = [u for u in users if u.user_id in setups]
    if not ok:
        return out
    chosen = [setups[u.user_id] for u in ok]
    engine.reset()
    try:
        logs, phases = engine.personalize_many([s.adapters for s in chosen], [s.weights for s in chosen],
                                               chosen[0].recipe, [s.examples for s in chosen],
                                               [derive_seed(seed, u.user_id, method.name) for u in ok])
        prompts = [method_prompts(task, u, method, style) for u in ok]
        tic = time.perf_counter()
        outputs = engine.generate([p for ps in prompts for p in ps],
                                  slots=[n for n, ps in enumerate(prompts) for _ in ps])
        phases["generate"] = time.perf_counter() - tic
        if kept is not None:
            for n, (u, s) in enumerate(zip(ok, chosen, strict=True)):
                kept[u.user_id] = (s.adapters, s.weights, engine.slot_adapter(n) if s.recipe else None)
    finally:
        engine.reset()
    pieces = split_outputs(outputs, [len(ps) for ps in prompts])
    for n, (u, s) in enumerate(zip(ok, chosen, strict=True)):
        seconds = {**s.seconds, **{k: v / len(ok) for k, v in phases.items()}}
        extra = {**s.extra, "group": len(ok), **({"train": summarize(logs[n])} if logs else {})}
        out[u.user_id] = unit_results(engine, u, unit, [prompts[n]], [pieces[n]], seconds, extra)
    return out


def refuse_on_quantised_base(profile: Profile, methods: Sequence[Method]) -> None:
    """Nothing is folded into a quantised base (`mta.peft.lora.refuse_quantized_fold`): name, before any work, a
    chosen method that would need a fold."""
    if profile.base_quant == "none":
        return
    for m in methods:
        if m.procedure != "fuse_then_train":
            raise ValueError(f"method {m.name}: its {m.procedure!r} procedure folds a population LoRA into W0, "
                             f"which a quantised base (base_quant={profile.base_quant!r}) cannot take; leave it "
                             f"out (--methods) or set base_quant='none'")


def baseline(baselines: Mapping[str, Baseline] | None, method: Method) -> Baseline:
    """The procedure of `method` with its artifacts, as the run loaded them."""
    if baselines is None or method.procedure not in baselines:
        raise ValueError(f"method {method.name}: procedure {method.procedure!r} was not loaded for this run")
    return baselines[method.procedure]


def serve_procedure(engine: Engine, users: Sequence[User], method: Method, seed: int,
                    baselines: Mapping[str, Baseline] | None
                    ) -> tuple[float, list[tuple[object, dict, dict] | InputError]]:
    """Per-Pcs or PROPER set up for a group of users (one user is a group of one): `begin` once, every user's part
    (`Procedure.parts`), then the parts in slots 0, 1, ... of the users that have one, ready to decode. Returns
    (seconds of `begin`, one entry per user: (part, seconds, details) or the InputError that stopped it)."""
    procedure, artifacts = baseline(baselines, method)
    tic = time.perf_counter()
    procedure.begin(engine, artifacts)
    setup = time.perf_counter() - tic
    made = procedure.parts(engine, users, artifacts, [derive_seed(seed, u.user_id, method.name) for u in users])
    served = [m[0] for m in made if not isinstance(m, InputError)]
    if served:
        procedure.serve(engine, served)
        engine.model.eval()
    return setup, made


def run_procedure_group(engine: Engine, users: Sequence[User], unit: Sequence[Method], seed: int,
                        baselines: Mapping[str, Baseline] | None) -> dict[str, dict[str, dict]]:
    """Per-Pcs or PROPER for a group of users (`serve_procedure`), all the parts decoded in one batch. user id ->
    method name -> result."""
    method, task, style = unit[0], engine.task, engine.profile.prompt_style
    out, done = {}, []
    engine.reset()
    try:
        setup, made = serve_procedure(engine, users, method, seed, baselines)
        for u, m in zip(users, made, strict=True):
            if isinstance(m, InputError):
                out[u.user_id] = error_results(u, unit, m)
            else:
                done.append((u, m[1], m[2]))
        if not done:
            return out
        prompts = [method_prompts(task, u, method, style) for u, _, _ in done]
        tic = time.perf_counter()
        outputs = engine.generate([p for ps in prompts for p in ps],
                                  slots=[n for n, ps in enumerate(prompts) for _ in ps])
        generate = time.perf_counter() - tic
    except InputError as e:
        return {u.user_id: error_results(u, unit, e) for u in users}
    finally:
        engine.reset()
    for (u, seconds, extra), ps, piece in zip(done, prompts, split_outputs(outputs, [len(ps) for ps in prompts]),
                                              strict=True):
        shared = {"setup": setup / len(done), "generate": generate / len(done)}
        out[u.user_id] = unit_results(engine, u, unit, [ps], [piece], {**seconds, **shared},
                                      {**extra, "group": len(done)})
    return out
