"""The three MTA stages and every compared method, as plain functions of (profile, inputs) -> artifact.

Stage 1a  select_anchors   per-item embeddings, user vector = mean (Eq. 2), K-Means into V clusters,
                           the most active eligible user of each cluster is its anchor (Eq. 3).
Stage 1b  Engine.personalize  one LoRA per anchor on its own history: the Meta-LoRA Bank.
Stage 1c  train_perpcs_gates, train_proper_group   the population-level parts of Per-Pcs and PROPER.
Stage 2   match_anchors    whole-history embeddings, cosine to every anchor (Eq. 4), kept for every
                           anchor; `fused_anchors` takes the top K and alpha_i = sim_i / sum(sim)
                           (Eq. 6) when a method uses them.
Stage 3   run_unit         per user, each method of `mta.methods`: fuse its meta-LoRAs (Eq. 5), fold
                           them into W0 and train a fresh LoRA on top (Eq. 7) as the method's row says,
                           then generate; Per-Pcs and PROPER through their own `PROCEDURES`.
          run_group        the same for a group of users at once (the batched engine): per-row adapters
                           hold each user's fused LoRA unmerged and its fresh LoRA; one pass trains and
                           one batch decodes them all (`mta.multi_lora`, `mta.train_many`).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mta.baselines import perpcs, proper
from mta.data.lamp import TaskSpec, User, instruction_only, query_prompt, training_pairs
from mta.errors import InputError
from mta.methods import Method
from mta.models.encoders import Encoder, history_document_embeddings, user_item_embeddings
from mta.models.tokenizer import Tokenizer
from mta.peft.adapter import Adapter, get_adapter, set_adapter
from mta.peft.fusion import BaseWeights, fold_adapters, stack_lora
from mta.peft.lora import inject_lora, unload_lora
from mta.peft.multi_lora import generate_many, get_row_adapter, stack_many, unload_row_lora
from mta.precision import autocast
from mta.profiles import LoRASpec, Profile
from mta.stages.kmeans import kmeans
from mta.training.train import TrainConfig, TrainLog, train
from mta.training.train_many import train_many


def derive_seed(seed: int, *parts: str) -> int:
    """A seed for one unit of work that does not depend on the order units run in."""
    digest = hashlib.sha256("/".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seeded_subset(items: Sequence, limit: int | None, seed: int) -> list:
    """At most `limit` of `items`, drawn at random under `seed`, in their original order."""
    if limit is None or len(items) <= limit:
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def item_texts(task: TaskSpec, user: User) -> list[str]:
    """How a user's history items are shown to the encoders."""
    return [task.render_history(item) for item in user.history]


# ----------------------------------------------------------------------------- stage 1a


def select_anchors(
    candidates: Sequence[User], task: TaskSpec, encoder: Encoder, n_anchors: int, min_items: int, seed: int,
    batch_size: int = 32, progress: bool = True, empty_cluster: str = "most_active",
) -> tuple[np.ndarray, dict]:
    """(user vectors (U, D), anchors document). The anchor of a cluster is its most active member with at
    least `min_items` items (the authors' code); in a cluster without one, its most active member (Eq. 3 as
    the paper states it), or none with `empty_cluster="none"`. Each anchor records the rule that chose it.
    Ties in activity go to the smallest user id."""
    vectors = user_item_embeddings(encoder, [item_texts(task, u) for u in candidates], batch_size, progress)
    result = kmeans(vectors, n_anchors, seed=seed)
    anchors, empty = [], []
    for c in range(n_anchors):
        members = [candidates[i] for i in np.flatnonzero(result.labels == c)]
        eligible = [u for u in members if len(u.history) >= min_items]
        rule = f"most active with at least {min_items} items"
        if not eligible and members and empty_cluster == "most_active":
            eligible, rule = members, f"most active (no member has {min_items} items)"
        if not eligible:
            empty.append({"cluster": c, "size": len(members), "members": [u.user_id for u in members],
                          "reason": f"no user with at least {min_items} history items"})
            continue
        anchor = min(eligible, key=lambda u: (-len(u.history), u.user_id))
        anchors.append({"cluster": c, "user_id": anchor.user_id, "n_items": len(anchor.history), "rule": rule,
                        "cluster_size": len(members), "members": [u.user_id for u in members]})
    doc = {"n_clusters": n_anchors, "min_items": min_items, "seed": seed, "inertia": result.inertia,
           "anchors": anchors, "clusters_without_anchor": empty}
    return vectors, doc


# ----------------------------------------------------------------------------- stage 2


def fusion_weights(sims: Sequence[float], fusion: str) -> list[float]:
    """Eq. 6 (`paper`), or the released code's two-anchor rule (`authors_code`), which gives the
    *less* similar anchor the larger weight: (1 - a) * anchor_1 + a * anchor_2, a = s_1 / (s_1 + s_2)."""
    total = float(sum(sims))
    if total <= 0:
        raise InputError(f"fusion weights: similarities {list(sims)} do not sum to a positive number")
    if fusion == "paper":
        return [s / total for s in sims]
    if fusion == "authors_code":
        if len(sims) != 2:
            raise ValueError(f"fusion 'authors_code' merges exactly 2 anchors, got {len(sims)}")
        a = sims[0] / total
        return [1 - a, a]
    raise ValueError(f"unknown fusion {fusion!r}; choose 'paper' or 'authors_code'")


def match_anchors(
    users: Sequence[User], anchors: Sequence[User], task: TaskSpec, encoder: Encoder,
    batch_size: int = 32, progress: bool = True,
) -> dict[str, dict]:
    """Per user: cosine of whole-history embeddings to every anchor (Eq. 4), most similar first.
    Top-K and the fusion weights are taken at use time (`fused_anchors`), so one match serves every K."""
    start = time.perf_counter()
    anchor_emb = history_document_embeddings(encoder, [item_texts(task, a) for a in anchors], batch_size=batch_size)
    user_emb = history_document_embeddings(encoder, [item_texts(task, u) for u in users],
                                           batch_size=batch_size, progress=progress)
    sims = user_emb @ anchor_emb.T  # (U, V), embeddings are unit-norm
    seconds = (time.perf_counter() - start) / max(len(users), 1)
    out = {}
    for u, row in zip(users, sims, strict=True):
        order = np.argsort(-row, kind="stable")
        out[u.user_id] = {"similarities": {anchors[i].user_id: float(row[i]) for i in order}, "seconds": seconds}
    return out


def fused_anchors(match: dict, profile: Profile, kind: str = "top", seed: int = 0) -> tuple[list[str], list[float]]:
    """The anchors a user's fused LoRA merges, and their weights.

    top: the K most similar, weighted by Eq. 6 (or the authors' rule, or a fixed alpha for K = 2).
    random / least: controls, K random (seeded) or the K least similar anchors, equal weights
    (Eq. 6 is undefined when similarities are not positive)."""
    sims = match["similarities"]
    k = profile.top_k
    if not 1 <= k <= len(sims):
        raise InputError(f"top_k = {k} but the bank has {len(sims)} anchors")
    ranked = sorted(sims, key=lambda a: (-sims[a], a))
    if kind == "top":
        chosen = ranked[:k]
        if profile.fixed_alpha is not None:
            return chosen, [profile.fixed_alpha, 1 - profile.fixed_alpha]
        return chosen, fusion_weights([sims[a] for a in chosen], profile.fusion)
    if kind == "random":
        chosen = random.Random(seed).sample(sorted(sims), k)
    elif kind == "least":
        chosen = ranked[::-1][:k]
    else:
        raise ValueError(f"unknown anchor choice {kind!r}")
    return chosen, [1.0 / k] * k


# ----------------------------------------------------------------------------- the engine


def fit_text(tok: Tokenizer, text: str, max_tokens: int) -> str:
    """Drop tokens from the start of `text` (the oldest history) so it fits in `max_tokens`."""
    ids = tok.encode(text)
    return text if len(ids) <= max_tokens else tok.decode(ids[-max_tokens:])


def summarize(log: TrainLog) -> dict:
    probe = {"probe_before": log.probe[0], "probe_after": log.probe[1], "probe_seconds": log.probe_seconds} \
        if log.probe else {}
    return {"steps": len(log.losses), "first_loss": log.losses[0], "last_loss": log.losses[-1], **probe,
            "lrs": log.lrs, "tokens": log.tokens, "seconds": log.seconds}


@dataclass
class Engine:
    """The base model, its tokenizer and a pristine copy of W0: everything that trains and generates.
    `profile.bf16` is the bool its Run resolved."""

    profile: Profile
    task: TaskSpec
    model: torch.nn.Module
    tok: Tokenizer

    def __post_init__(self):
        self.base = BaseWeights(self.model, targets=self.profile.bank.targets, device="cpu")
        self.folded = False  # whether W differs from W0
        self.lora_config = None  # of the LoRA `personalize` last trained
        self.prompt_budget = self.profile.max_prompt_tokens - len(self.tok.chat_prompt(""))

    def examples(self, history: list[dict], seed: int, limit: int | None = None, bank: bool = False
                 ) -> list[tuple[list[int], list[int]]]:
        """Tokenized (prompt, response) training examples; `bank` builds a meta-LoRA's in the format
        the profile's `bank_data` names."""
        pairs = training_pairs(self.task, history, seed=seed, bank=bank and self.profile.bank_data == "authors_code",
                               style=self.profile.prompt_style)
        return self.tokenize(seeded_subset(pairs, limit, seed))

    def population_examples(self, users: Sequence[User], seed: int, limit: int | None = None
                            ) -> list[tuple[list[int], list[int]]]:
        """The population's training examples (Per-Pcs's task LoRA, PROPER's population LoRA): every user's
        history items in the adaptation format, at most `limit` of them drawn at random (seeded)."""
        slots = [(i, j) for i, u in enumerate(users) for j in range(len(u.history)) if len(u.history) >= 2]
        slots = seeded_subset(slots, limit, seed)
        pairs = []
        for i in sorted({i for i, _ in slots}):
            mine = training_pairs(self.task, users[i].history, seed=derive_seed(seed, users[i].user_id),
                                  style=self.profile.prompt_style)
            pairs += [mine[j] for ii, j in slots if ii == i and j < len(mine)]
        return self.tokenize(pairs)

    def tokenize(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        out = []
        for prompt, target in pairs:
            ids, start = self.tok.chat_example(fit_text(self.tok, prompt, self.prompt_budget), target)
            out.append((ids[:start], ids[start:]))
        return out

    def personalize(self, adapters: Sequence[Adapter], weights: Sequence[float], recipe: LoRASpec | None,
                    examples=(), seed: int = 0, probe: bool = False) -> tuple[TrainLog | None, dict]:
        """Set up the weights a method generates with: W0 plus the fused LoRA of `adapters` (Eq. 5), and,
        with a `recipe`, a fresh LoRA on top trained on `examples` (Eq. 7, `mta.fusion.stack_lora`); the
        trained LoRA stays injected (`trained_adapter`). Returns (training log, seconds per phase)."""
        mode, seconds = self.profile.merge_space, {}
        tic = time.perf_counter()
        if recipe is None:
            if adapters:
                fold_adapters(self.model, adapters, weights, mode, self.base)
        else:
            torch.manual_seed(seed)  # the fresh LoRA's initialisation
            self.lora_config = recipe.lora_config(self.profile.llm)
            stack_lora(self.model, adapters, weights, self.lora_config, mode, self.base)
        self.folded = bool(adapters)
        if adapters:
            seconds["fuse"] = time.perf_counter() - tic
        if recipe is None:
            return None, seconds
        log = train(self.model, examples, self.train_config(recipe, seed, probe), pad_id=self.tok.pad_token_id)
        self.model.eval()
        seconds["adapt"] = log.seconds
        return log, seconds

    def train_config(self, recipe: LoRASpec, seed: int, probe: bool = False) -> TrainConfig:
        """`recipe`'s optimiser settings under this run's precision (the profile's resolved `bf16`)."""
        return recipe.train_config(seed, probe=probe, bf16=self.profile.bf16)

    def trained_adapter(self) -> Adapter:
        """The LoRA `personalize` trained, detached from the model."""
        return get_adapter(self.model, self.lora_config)

    def personalize_many(self, fused: Sequence[Sequence[Adapter]], weights: Sequence[Sequence[float]],
                         recipe: LoRASpec | None, examples: Sequence = (), seeds: Sequence[int] = ()
                         ) -> tuple[list[TrainLog] | None, dict]:
        """`personalize` for U adapters in one pass (the batched engine): slot u holds W0 plus the fused LoRA
        of `fused[u]` (Eq. 5) applied unmerged and, with a `recipe`, a fresh LoRA trained on `examples[u]`
        (Eq. 7), initialised as `personalize` would under `seeds[u]` (`mta.multi_lora.stack_many`,
        `mta.train_many.train_many`). Returns (one log per slot, seconds per phase for the whole group)."""
        p, seconds = self.profile, {}
        tic = time.perf_counter()
        self.lora_config = recipe.lora_config(p.llm) if recipe else None
        stack_many(self.model, fused, weights, self.lora_config, p.merge_space, seeds)
        if any(fused):
            seconds["fuse"] = time.perf_counter() - tic
        if recipe is None:
            return None, seconds
        logs = train_many(self.model, examples, [self.train_config(recipe, s) for s in seeds], self.tok.pad_token_id,
                          p.rows_per_pass)
        self.model.eval()
        seconds["adapt"] = logs[0].seconds
        return logs, seconds

    def slot_adapter(self, slot: int) -> Adapter:
        """The LoRA `personalize_many` trained in slot `slot`, detached from the model."""
        return get_row_adapter(self.model, slot, self.lora_config)

    def generate(self, prompts: Sequence[str], slots: Sequence[int] | None = None) -> list[str]:
        """Greedy outputs for left-padded prompts; with `slots`, prompt n uses slot `slots[n]`'s adapters."""
        seqs = [self.tok.chat_prompt(fit_text(self.tok, p, self.prompt_budget)) for p in prompts]
        ids, mask = self.tok.pad(seqs, side="left")
        ids, mask = ids.to(self.profile.device), mask.to(self.profile.device)
        kw = dict(max_new_tokens=self.profile.max_new_tokens, stop_token_ids=self.tok.eos_token_ids,
                  pad_token_id=self.tok.pad_token_id)
        if slots is None:  # on shared weights the prompts (sorted by length) prefill a pass of rows at a time
            with autocast(self.profile.device, self.profile.bf16, self.model):
                new = self.model.generate(ids, mask, prefill_rows=self.profile.rows_per_pass, **kw)
        else:
            new = generate_many(self.model, ids, mask, slots, self.profile.bf16, **kw)
        return [self.tok.decode(row.tolist()).strip() for row in new]

    def reset(self) -> None:
        """Back to the plain base model: no LoRA layers, W = W0."""
        unload_lora(self.model)
        unload_row_lora(self.model)
        if self.folded:
            self.base.restore()
            self.folded = False


# ----------------------------------------------------------------------------- stage 3


def method_prompt(task: TaskSpec, user: User, method: Method, style: str) -> str:
    """The query prompt with the method's number of BM25-retrieved history items (none: the instruction)."""
    query = user.query[0]
    if method.history_items == 0:
        return instruction_only(task, query, style)
    return query_prompt(task, user.history, query, k=method.history_items, style=style)


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
            raise InputError(f"user {user.user_id}: no stage-2 match (rerun tools/match_anchors.py)")
        anchors, weights = fused_anchors(match, p, method.anchors, unit_seed)
        missing = [a for a in anchors if a not in bank]
        if missing:
            raise InputError(f"bank has no adapter for anchor(s) {missing} (rerun tools/train_bank.py)")
        adapters = [bank[a] for a in anchors]
        seconds["match"] = match["seconds"]
        extra.update(anchors=anchors, weights=weights)
    recipe = None if method.recipe == "none" else getattr(p, method.recipe)
    examples = engine.examples(user.history, unit_seed) if recipe else []
    return Setup(adapters, weights, recipe, examples, seconds, extra)


def prepare_weights(engine: Engine, user: User, method: Method, match: dict | None, bank: dict[str, Adapter],
                    unit_seed: int, baselines: Baselines | None = None) -> tuple[dict, dict]:
    """Set the model up as the method's row says. Returns (seconds per phase, details for the result)."""
    if method.procedure != "fuse_then_train":
        return prepare_procedure(engine, user, method, baselines, unit_seed)
    setup = method_setup(engine, user, method, match, bank, unit_seed)
    log, phases = engine.personalize(setup.adapters, setup.weights, setup.recipe, setup.examples, unit_seed)
    extra = {**setup.extra, **({"train": summarize(log)} if log is not None else {})}
    return {**setup.seconds, **phases}, extra


def unit_results(task: TaskSpec, user: User, unit: Sequence[Method], outputs: Sequence[str], seconds: dict,
                 extra: dict) -> dict[str, dict]:
    """Method name -> the result row of one user (its first query)."""
    query = user.query[0]
    return {m.name: {"user_id": user.user_id, "method": m.name, "query_id": query.id, "output": output,
                     "prediction": task.parse(output), "gold": query.gold, "seconds": seconds, **extra}
            for m, output in zip(unit, outputs, strict=True)}


def error_results(user: User, unit: Sequence[Method], error: Exception) -> dict[str, dict]:
    return {m.name: {"user_id": user.user_id, "method": m.name, "error": str(error)} for m in unit}


def run_unit(engine: Engine, user: User, unit: Sequence[Method], match: dict | None,
             bank: dict[str, Adapter], seed: int, baselines: Baselines | None = None) -> dict[str, dict]:
    """One unit of stage 3 (`mta.methods.units`) for one user's first query -> method name: {output,
    prediction, gold, seconds, ...}. A unit's methods share its weights and one batched generation.
    Bad input (InputError) gives the unit's error rows."""
    engine.reset()
    try:
        seconds, extra = ({}, {}) if unit[0].on_base_weights else prepare_weights(
            engine, user, unit[0], match, bank, derive_seed(seed, user.user_id, unit[0].name), baselines)
        tic = time.perf_counter()
        outputs = engine.generate([method_prompt(engine.task, user, m, engine.profile.prompt_style) for m in unit])
        generate = (time.perf_counter() - tic) / len(unit)
    except InputError as e:
        return error_results(user, unit, e)
    finally:
        engine.reset()
    return unit_results(engine.task, user, unit, outputs, {**seconds, "generate": generate}, extra)


def run_group(engine: Engine, users: Sequence[User], unit: Sequence[Method], matches: dict,
              bank: dict[str, Adapter], seed: int, baselines: Baselines | None = None) -> dict[str, dict[str, dict]]:
    """`run_unit` for many users at once (the batched engine): user id -> method name -> result.

    Methods on W0 decode every user's prompts in batches of similar length. A fuse-then-train method gives
    each user a slot of per-row adapters (its fused LoRA unmerged, its fresh LoRA on top), trains all the
    slots in one pass and decodes them in one batch; each result's seconds are the group's divided by its
    size. Per-Pcs and PROPER make each user's part in turn and decode all of them in one batch
    (`run_procedure_group`). A user with bad input gets its error rows; the rest go on."""
    task, style, size = engine.task, engine.profile.prompt_style, engine.profile.group_size
    method = unit[0]
    if method.on_base_weights:
        prompts = [(u, m, method_prompt(task, u, m, style)) for u in users for m in unit]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][2]))
        outputs = [""] * len(prompts)
        tic = time.perf_counter()
        for i in range(0, len(order), size * len(unit)):
            chunk = order[i: i + size * len(unit)]
            for j, out in zip(chunk, engine.generate([prompts[j][2] for j in chunk]), strict=True):
                outputs[j] = out
        generate = (time.perf_counter() - tic) / len(prompts)
        return {u.user_id: unit_results(task, u, unit, outputs[n * len(unit): (n + 1) * len(unit)],
                                        {"generate": generate}, {"group": len(users)})
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
        tic = time.perf_counter()
        outputs = engine.generate([method_prompt(task, u, method, style) for u in ok], slots=range(len(ok)))
        phases["generate"] = time.perf_counter() - tic
    finally:
        engine.reset()
    for n, (u, s) in enumerate(zip(ok, chosen, strict=True)):
        seconds = {**s.seconds, **{k: v / len(ok) for k, v in phases.items()}}
        extra = {**s.extra, "group": len(ok), **({"train": summarize(logs[n])} if logs else {})}
        out[u.user_id] = unit_results(task, u, unit, [outputs[n]], seconds, extra)
    return out


# ----------------------------------------------------------------------------- Per-Pcs and PROPER (Table 1)


@dataclass
class Baselines:
    """The population-level artifacts of Per-Pcs and PROPER that their stage-3 units read."""

    perpcs_task: Adapter | None = None  # task LoRA, folded into W0 before everything else
    perpcs_sharers: dict[str, Adapter] = field(default_factory=dict)  # anchor id -> sharer LoRA
    perpcs_gates: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # anchor id -> module -> g
    proper_population: Adapter | None = None  # population LoRA, folded into W0
    proper_group: dict[str, torch.Tensor] | None = None  # the group stage's mixture (`mta.proper.mixture_state`)
    proper_users: list[str] = field(default_factory=list)  # the rows of its user-embedding tables


def refuse_on_quantised_base(profile: Profile, methods: Sequence[Method]) -> None:
    """Nothing is folded into a quantised base (`mta.lora.refuse_quantized_fold`): name, before any work, a
    chosen method that would need a fold."""
    if profile.base_quant == "none":
        return
    for m in methods:
        if m.procedure != "fuse_then_train":
            raise ValueError(f"method {m.name}: its {m.procedure!r} procedure folds a population LoRA into W0, "
                             f"which a quantised base (base_quant={profile.base_quant!r}) cannot take; leave it "
                             f"out (--methods) or set base_quant='none'")
        if m.anchors != "none" and profile.engine == "sequential":
            raise ValueError(f"method {m.name}: the sequential engine folds the fused LoRA into W, which a "
                             f"quantised base (base_quant={profile.base_quant!r}) cannot take; engine='batched' "
                             f"applies it unmerged")


def fold_population(engine: Engine, adapter: Adapter) -> None:
    """W = W0 + ΔW of a population LoRA (Per-Pcs's task LoRA, PROPER's population LoRA)."""
    fold_adapters(engine.model, [adapter], [1.0], engine.profile.merge_space, engine.base)
    engine.folded = True


def train_perpcs_gates(engine: Engine, task: Adapter, sharer: Adapter, examples, seed: int) -> tuple[dict, TrainLog]:
    """Per-Pcs's gates of one sharer: W0 + task LoRA, the sharer's LoRA frozen on top, only the gates train."""
    engine.reset()
    fold_population(engine, task)
    inject_lora(engine.model, sharer.config)
    set_adapter(engine.model, sharer)
    perpcs.inject_gates(engine.model)
    log = train(engine.model, examples, engine.train_config(engine.profile.perpcs_gate, seed, probe=True),
                pad_id=engine.tok.pad_token_id)
    gates = perpcs.gate_vectors(engine.model)
    engine.reset()
    return gates, log


def train_proper_group(engine: Engine, population: Adapter, users: Sequence[User], seed: int
                       ) -> tuple[dict[str, torch.Tensor], TrainLog]:
    """PROPER's group stage: W0 + population LoRA, the expert mixture on every FFN linear trained with its input
    and user-embedding routers on the target users' history items (never their queries), LM loss plus the
    constraint loss. Returns the mixture's tensors (`mta.proper.mixture_state`) and the log."""
    p, model = engine.profile, engine.model
    engine.reset()
    fold_population(engine, population)
    torch.manual_seed(seed)  # the experts' and routers' initialisation
    proper.inject_mixture(model, tuple(p.proper_group.targets), p.proper_experts, p.proper_group.rank,
                          p.proper_group.alpha, len(users), p.proper_group.dropout)
    examples = [proper.UserExample(ex, row) for row, u in enumerate(users)
                for ex in engine.examples(u.history, derive_seed(seed, u.user_id), limit=p.proper_group_items)]
    proper.set_stage(model, "group")

    def rows(batch):
        proper.set_users(model, torch.tensor([ex.row for ex in batch], device=model.device))

    log = train(model, examples, engine.train_config(p.proper_group, seed, probe=True), engine.tok.pad_token_id,
                before_forward=rows, aux_loss=lambda: proper.constraint_loss(model))
    state = proper.mixture_state(model)
    engine.reset()
    return state, log


def begin_perpcs(engine: Engine, baselines: Baselines | None) -> None:
    """Per-Pcs's weights before any user: W0 + task LoRA."""
    if baselines is None or baselines.perpcs_task is None or not baselines.perpcs_sharers:
        raise InputError("Per-Pcs has no task LoRA or sharers (rerun tools/reproduce.py)")
    missing = [a for a in sorted(baselines.perpcs_sharers) if a not in baselines.perpcs_gates]
    if missing:
        raise InputError(f"Per-Pcs: sharer(s) {missing} have no gates (rerun tools/reproduce.py)")
    fold_population(engine, baselines.perpcs_task)


def perpcs_part(engine: Engine, user: User, baselines: Baselines, unit_seed: int) -> tuple[Adapter, dict, dict]:
    """Per-Pcs for one target user, on W0 + task LoRA: the LoRA assembled from the sharers' pieces by their
    gates on the user's history (`mta.perpcs.assemble_for_user`), training-free. (adapter, seconds, details)"""
    p = engine.profile
    tic = time.perf_counter()
    sharer_ids = sorted(baselines.perpcs_sharers)
    examples = seeded_subset(engine.examples(user.history, unit_seed), p.perpcs_user_items,
                             derive_seed(unit_seed, "assembly"))
    sharers, gates = [baselines.perpcs_sharers[a] for a in sharer_ids], [baselines.perpcs_gates[a] for a in sharer_ids]
    with autocast(p.device, p.bf16, engine.model):  # its forward in the run's precision
        adapter, pieces = perpcs.assemble_for_user(
            engine.model, sharers, gates, examples, p.perpcs_top_k, p.perpcs_tau, p.perpcs_assembly_batch,
            engine.tok.pad_token_id or 0, unit_seed)
    named = {m: [{"sharers": [sharer_ids[i] for i in b["sharers"]], "weights": b["weights"]} for b in batches]
             for m, batches in pieces.items()}
    return adapter, {"assemble": time.perf_counter() - tic}, {"sharers": sharer_ids, "items": len(examples),
                                                              "pieces": named}


def install_perpcs(engine: Engine, adapter: Adapter) -> None:
    inject_lora(engine.model, adapter.config)
    set_adapter(engine.model, adapter)
    engine.model.eval()  # the new LoRA layers' dropout off


def serve_perpcs(engine: Engine, adapters: Sequence[Adapter]) -> None:
    """Slot i holds user i's assembled LoRA, unmerged (a one-adapter merge with weight 1 is that adapter)."""
    stack_many(engine.model, [[a] for a in adapters], [[1.0]] * len(adapters), None, "param")


def begin_proper(engine: Engine, baselines: Baselines | None) -> None:
    """PROPER's weights before any user: W0 + population LoRA and the group stage's mixture (frozen)."""
    if baselines is None or baselines.proper_population is None or baselines.proper_group is None:
        raise InputError("PROPER has no population LoRA or group stage (rerun tools/reproduce.py)")
    p = engine.profile
    fold_population(engine, baselines.proper_population)
    proper.inject_mixture(engine.model, tuple(p.proper_group.targets), p.proper_experts, p.proper_group.rank,
                          p.proper_group.alpha, len(baselines.proper_users))


def proper_row(baselines: Baselines, user: User) -> int:
    """The user's row of PROPER's user-embedding tables."""
    if user.user_id not in baselines.proper_users:
        raise InputError(f"user {user.user_id}: not among the {len(baselines.proper_users)} users of PROPER's group "
                         f"stage (delete proper/group and rerun)")
    return baselines.proper_users.index(user.user_id)


def proper_examples(engine: Engine, user: User, unit_seed: int) -> tuple[list, list]:
    """The user's training examples of PROPER's user stage and of its router stage."""
    p, examples = engine.profile, engine.examples(user.history, unit_seed)
    return (seeded_subset(examples, p.proper_user_items, derive_seed(unit_seed, "user")),
            seeded_subset(examples, p.proper_router_items, derive_seed(unit_seed, "router")))


def proper_details(user_examples: Sequence, router_examples: Sequence, user_log: TrainLog, router_log: TrainLog
                   ) -> dict:
    return {"train": {"examples": len(user_examples), **summarize(user_log)},
            "train_router": {"examples": len(router_examples), **summarize(router_log)}}


def proper_part(engine: Engine, user: User, baselines: Baselines, unit_seed: int) -> tuple[dict, dict, dict]:
    """PROPER for one target user, on the mixture as the group stage left it (W_l included): a user LoRA trained
    on the user's history, then the LoRA-aware router W_l alone; generation routes by W_l. The model is left as
    the router stage set it. (the trained part `mta.proper.user_part`, seconds, details)"""
    row = torch.tensor([proper_row(baselines, user)], device=engine.model.device)
    p = engine.profile
    proper.load_mixture_state(engine.model, baselines.proper_group, "proper/group")  # W_l back to its start
    torch.manual_seed(unit_seed)  # the user LoRA's initialisation
    for m in proper.mixtures(engine.model).values():
        m.add_user_lora(p.proper_user.rank, p.proper_user.alpha)
    user_examples, router_examples = proper_examples(engine, user, unit_seed)
    pad = engine.tok.pad_token_id

    def same_user(batch):
        proper.set_users(engine.model, row.expand(len(batch)))

    proper.set_stage(engine.model, "user")
    user_log = train(engine.model, user_examples, engine.train_config(p.proper_user, unit_seed, probe=True), pad,
                     before_forward=same_user)
    proper.set_stage(engine.model, "router")
    router_log = train(engine.model, router_examples, engine.train_config(p.proper_router, unit_seed, probe=True), pad)
    engine.model.eval()
    return (proper.user_part(engine.model), {"adapt": user_log.seconds + router_log.seconds},
            proper_details(user_examples, router_examples, user_log, router_log))


def proper_parts(engine: Engine, users: Sequence[User], baselines: Baselines, unit_seeds: Sequence[int]
                 ) -> list[tuple[dict, dict, dict] | InputError]:
    """`proper_part` for many users in one pass each of the user and the router stage (the batched engine): slot u
    of every mixture holds user u's LoRA, initialised as `proper_part` would under `unit_seeds[u]`, and W_l as the
    group stage left it (`mta.proper.add_user_slots`); `mta.train_many.train_many` trains every slot as `train`
    would alone. One entry per user: its part, seconds and details, or the InputError that stopped it."""
    out: list = [None] * len(users)
    slots = []  # one per user with a part to make: (its index in users, its embedding row, user / router examples)
    for i, u in enumerate(users):
        try:
            slots.append((i, proper_row(baselines, u), *proper_examples(engine, u, unit_seeds[i])))
        except InputError as e:
            out[i] = e
    if not slots:
        return out
    p, model, pad = engine.profile, engine.model, engine.tok.pad_token_id
    seeds = [unit_seeds[i] for i, _, _, _ in slots]
    proper.load_mixture_state(model, baselines.proper_group, "proper/group")
    proper.add_user_slots(model, p.proper_user.rank, p.proper_user.alpha, seeds)
    rows = torch.tensor([row for _, row, _, _ in slots], device=model.device)  # slot -> embedding row

    def slot_users(index):
        proper.set_users(model, rows[index.to(rows.device)])

    logs = {}
    for stage, spec, examples in (("user", p.proper_user, [ex for _, _, ex, _ in slots]),
                                  ("router", p.proper_router, [ex for _, _, _, ex in slots])):
        proper.set_stage(model, stage)
        params = [t for m in proper.mixtures(model).values() for t in m.stage_parameters(stage)]
        logs[stage] = train_many(model, examples, [engine.train_config(spec, s, probe=True) for s in seeds], pad,
                                 p.rows_per_pass, params, slot_users)
    model.eval()
    adapt = (logs["user"][0].seconds + logs["router"][0].seconds) / len(slots)
    for slot, (i, _, user_examples, router_examples) in enumerate(slots):
        out[i] = (proper.user_part(model, slot), {"adapt": adapt},
                  proper_details(user_examples, router_examples, logs["user"][slot], logs["router"][slot]))
    return out


@dataclass(frozen=True)
class Procedure:
    """A Table-1 baseline's own set-up of a user's weights (`Method.procedure`). `begin` sets up what every user
    shares (W0 + its population LoRA, ...); `part` makes one user's own part on it; `install` puts that part in
    the model for a one-user decode (the sequential engine), `serve` puts many users' parts in slots of one
    batched decode (the batched engine)."""

    begin: Callable[[Engine, Baselines | None], None]
    part: Callable[[Engine, User, Baselines, int], tuple[object, dict, dict]]
    install: Callable[[Engine, object], None]
    serve: Callable[[Engine, Sequence], None]
    # many users' parts at once, each as `part` makes it, or the InputError that stopped it; None: `part` in turn
    parts: Callable[[Engine, Sequence[User], Baselines, Sequence[int]], list] | None = None


PROCEDURES = {
    "perpcs": Procedure(begin_perpcs, perpcs_part, install_perpcs, serve_perpcs),
    "proper": Procedure(begin_proper, proper_part, lambda engine, part: None,  # part stays in place
                        lambda engine, parts: proper.serve_users(engine.model, parts), proper_parts),
}


def prepare_procedure(engine: Engine, user: User, method: Method, baselines: Baselines | None,
                      unit_seed: int) -> tuple[dict, dict]:
    """One user's weights by the method's procedure, for a one-user decode. (seconds per phase, details)"""
    procedure = PROCEDURES[method.procedure]
    tic = time.perf_counter()
    procedure.begin(engine, baselines)
    setup = time.perf_counter() - tic
    part, seconds, extra = procedure.part(engine, user, baselines, unit_seed)
    procedure.install(engine, part)
    return {"setup": setup, **seconds}, extra


def part_or_error(procedure: Procedure, engine: Engine, user: User, baselines: Baselines, unit_seed: int
                  ) -> tuple[object, dict, dict] | InputError:
    try:
        return procedure.part(engine, user, baselines, unit_seed)
    except InputError as e:
        return e


def run_procedure_group(engine: Engine, users: Sequence[User], unit: Sequence[Method], seed: int,
                        baselines: Baselines | None) -> dict[str, dict[str, dict]]:
    """Per-Pcs or PROPER for many users (the batched engine): `begin` once, each user's part as `run_unit` makes
    it, then all the parts in slots of one batched decode. user id -> method name -> result."""
    method, task, style = unit[0], engine.task, engine.profile.prompt_style
    procedure = PROCEDURES[method.procedure]
    out, parts, done = {}, [], []
    engine.reset()
    try:
        tic = time.perf_counter()
        procedure.begin(engine, baselines)
        setup = time.perf_counter() - tic
        seeds = [derive_seed(seed, u.user_id, method.name) for u in users]
        made = procedure.parts(engine, users, baselines, seeds) if procedure.parts else \
            [part_or_error(procedure, engine, u, baselines, s) for u, s in zip(users, seeds, strict=True)]
        for u, m in zip(users, made, strict=True):
            if isinstance(m, InputError):
                out[u.user_id] = error_results(u, unit, m)
                continue
            part, seconds, extra = m
            parts.append(part)
            done.append((u, seconds, extra))
        if not done:
            return out
        procedure.serve(engine, parts)
        engine.model.eval()
        tic = time.perf_counter()
        outputs = engine.generate([method_prompt(task, u, method, style) for u, _, _ in done], slots=range(len(done)))
        generate = time.perf_counter() - tic
    except InputError as e:
        return {u.user_id: error_results(u, unit, e) for u in users}
    finally:
        engine.reset()
    for (u, seconds, extra), output in zip(done, outputs, strict=True):
        shared = {"setup": setup / len(done), "generate": generate / len(done)}
        out[u.user_id] = unit_results(task, u, unit, [output], {**seconds, **shared}, {**extra, "group": len(done)})
    return out
