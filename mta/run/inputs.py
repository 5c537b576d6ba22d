"""What each artifact of a run is made from (`mta.stamps` records it with the artifact and checks it on reuse).

Each `made_from` names the artifact's role (so two artifacts made from the same inputs are never taken for each
other) and the digests of exactly what it depends on: the task and seed, the data it reads (a user's record with
its gold, or a whole data file's sha256), and the profile fields it depends on. A sweep
point that keeps an artifact's fields computes the same `made_from` as the main run, so it shares the artifact.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from mta.data.lamp import User
from mta.methods import Method
from mta.profiles import Profile
from mta.stamps import digest

if TYPE_CHECKING:
    from mta.run.pipeline import Run

STAGE1_FIELDS = ("stage1_encoder", "stage1_text", "item_norm", "max_candidates", "max_items_embedded", "n_anchors",
                 "min_anchor_items", "kmeans_n_init", "empty_cluster")
# Stage 1a's item embeddings, chunk by chunk: the fields above that change a user vector.
VECTOR_FIELDS = ("stage1_encoder", "stage1_text", "item_norm", "max_candidates", "max_items_embedded")
# One meta-LoRA (besides its anchor's history and the seed): a point that keeps them reuses the main run's
# meta-LoRA of every anchor both runs have.
ADAPTER_FIELDS = ("llm", "dtype", "base_quant", "bank", "bank_data", "max_items_per_anchor", "max_prompt_tokens",
                  "chat_template", "prompt_style")
STAGE2_FIELDS = ("stage2_encoder", "stage2_text")
# Stage 1, the bank, stage 2 and the baselines' stage 1c: a point that keeps them shares all of these artifacts.
ARTIFACT_FIELDS = (*ADAPTER_FIELDS, *STAGE1_FIELDS, *STAGE2_FIELDS, "population_items", "oppu_task", "perpcs_task",
                   "perpcs_sharer", "perpcs_gate", "perpcs_sharer_items", "proper_population", "proper_group",
                   "proper_experts", "proper_group_items")
# What no result depends on: a profile's name and notes.
UNSCORED_FIELDS = ("name", "notes")


def settings(profile: Profile, fields: tuple[str, ...]) -> str:
    values = dataclasses.asdict(profile)
    return digest({f: values[f] for f in fields})


def user_digest(user: User) -> str:
    """A user's record as the run read it: id, history items, queries with their golds."""
    return digest(dataclasses.asdict(user))


def _base(run: Run, artifact: str) -> dict:
    return {"artifact": artifact, "task": run.task_spec.name, "seed": run.seed}


def stage1(run: Run) -> dict:
    return {**_base(run, "stage-1 anchors"), "candidates": run.data_sha256["candidates"],
            "settings": settings(run.profile, STAGE1_FIELDS)}


def vectors(run: Run, first: int, last: int) -> dict:
    """Stage 1a's user vectors of candidates [first, last) of the seeded pool."""
    return {**_base(run, "stage-1 user vectors"), "candidates": run.data_sha256["candidates"], "chunk": [first, last],
            "settings": settings(run.profile, VECTOR_FIELDS)}


def adapter(run: Run, anchor: User) -> dict:
    return {**_base(run, "meta-LoRA"), "anchor": user_digest(anchor), "settings": settings(run.profile, ADAPTER_FIELDS)}


def anchor_embeddings(run: Run) -> dict:
    """The anchors' whole-history embeddings of stage 2 (Eq. 4's anchor side)."""
    return {**_base(run, "stage-2 anchor embeddings"), "candidates": run.data_sha256["candidates"],
            "anchors": digest(stage1(run)), "settings": settings(run.profile, STAGE2_FIELDS)}


def match(run: Run, user: User) -> dict:
    return {"artifact": "stage-2 match", "task": run.task_spec.name, "user": user_digest(user),
            "anchors": digest(stage1(run)),
            "settings": settings(run.profile, STAGE2_FIELDS)}


def population(run: Run, artifact: str) -> dict:
    """A population-level artifact of stage 1c (a population LoRA, Per-Pcs's or PROPER's parts): they read the
    candidates, the anchors and (PROPER's group stage) every test user of the data file."""
    return {**_base(run, artifact), "candidates": run.data_sha256["candidates"],
            "test_users": run.data_sha256["test_users"], "anchors": digest(stage1(run)),
            "settings": settings(run.profile, ARTIFACT_FIELDS)}


def result(run: Run, user: User, method: Method, artifact: str = "result") -> dict:
    """A (user, method) unit's result (or its failure record): the user's record, the method's row, every field of
    the profile that can change a result, the bank candidates and, for a method with a population stage, every
    test user."""
    fields = tuple(f.name for f in dataclasses.fields(run.profile) if f.name not in UNSCORED_FIELDS)
    inputs = {**_base(run, artifact), "user": user_digest(user), "method": digest(dataclasses.asdict(method)),
              "settings": settings(run.profile, fields), "candidates": run.data_sha256["candidates"]}
    if method.procedure != "fuse_then_train" or method.population != "none":
        inputs["test_users"] = run.data_sha256["test_users"]
    return inputs
