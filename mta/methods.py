"""Every compared method as one row of data: its prompt, the bank anchors it fuses and the LoRA it trains.

Table 1 of the paper compares MTA with the baselines, Table 2 ablates its two stages, and the controls
ask whether *which* anchors are merged matters. Nothing else in the package knows a method by its name:
stage 3, the reports, the sweeps and the command line all read this table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

TABLES = ("table1", "table2", "controls")
ANCHORS = ("none", "top", "random", "least")  # which meta-LoRAs the fused LoRA merges (Eq. 5)
RECIPES = ("none", "oppu", "stack")  # which profile recipe trains a fresh LoRA on top (Eq. 7)
# Which population LoRA (its profile recipe; trained once in stage 1c on the non-target users' queries,
# `mta.stages.procedure.build_population_loras`) is folded into W0 at weight 1 in place of the anchors.
POPULATION = ("none", "oppu_task")
# How the method sets up its weights: fuse the anchors, then train the recipe (`mta.stages.personalize`), or a
# procedure of its own (`mta.baselines.BASELINES`: Per-Pcs's assembly, PROPER's group and user stages).
PROCEDURES = ("fuse_then_train", "perpcs", "proper")


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    tables: tuple[str, ...]
    history_items: int  # BM25-retrieved history items in the query prompt (0: the instruction alone)
    anchors: str = "none"  # top: the K most similar (Eq. 4, 6); random / least: controls with equal weights
    recipe: str = "none"  # the LoRASpec field of the profile it trains on the user's history, if any
    changed_versus: str | None = None  # the method with the same prompt on the weights it starts from
    procedure: str = "fuse_then_train"
    population: str = "none"  # the population LoRA it fuses instead of anchors (OPPU's task LoRA)

    def __post_init__(self):
        for field, value, allowed in (("anchors", self.anchors, ANCHORS), ("recipe", self.recipe, RECIPES),
                                      ("procedure", self.procedure, PROCEDURES),
                                      ("population", self.population, POPULATION)):
            if value not in allowed:
                raise ValueError(f"method {self.name}: {field} must be one of {allowed}, got {value!r}")
        if self.procedure != "fuse_then_train" and (self.anchors, self.recipe) != ("none", "none"):
            raise ValueError(f"method {self.name}: procedure {self.procedure!r} takes no anchors and no recipe")
        if self.population != "none" and (self.anchors, self.procedure) != ("none", "fuse_then_train"):
            raise ValueError(f"method {self.name}: a population LoRA is fused alone, by fuse-then-train")
        if not set(self.tables) <= set(TABLES):
            raise ValueError(f"method {self.name}: tables must be among {TABLES}, got {self.tables}")

    @property
    def trains_on_history(self) -> bool:
        """Trains on the user's own items, each predicted from the others (a recipe, or a baseline's user stage)."""
        return self.recipe != "none" or self.procedure != "fuse_then_train"

    @property
    def on_base_weights(self) -> bool:
        """Generates with W0 as it is: such methods share one batched generation."""
        return (self.anchors, self.recipe, self.procedure, self.population) == ("none", "none", "fuse_then_train",
                                                                                 "none")


METHODS: dict[str, Method] = {m.name: m for m in (
    #      name             label                                 tables               items  anchors   recipe   changed vs
    Method("base",          "Non-personalized",                   ("table1",),           0),
    Method("rag1",          "RAG (BM25, k=1)",                    ("table1",),           1),
    Method("rag3",          "RAG (BM25, k=3)",                    ("table1",),           3),
    Method("rag5",          "RAG (BM25, k=5)",                    ("table1",),           5),
    # OPPU: W0 + its task LoRA (stage 1c), a fresh per-user LoRA on top; "changed" compares with rag1 on W0.
    Method("oppu",          "OPPU",                               ("table1",),           1, "none",   "oppu",  "rag1",
           population="oppu_task"),
    # Per-Pcs and PROPER start from W0 plus their population LoRA; "changed" compares with rag1 on W0.
    Method("perpcs",        "Per-Pcs",                            ("table1",),           1, "none",   "none",  "rag1",
           procedure="perpcs"),
    Method("proper",        "PROPER",                             ("table1",),           1, "none",   "none",  "rag1",
           procedure="proper"),
    Method("adapt_only",    "Adapt-only",                         ("table2",),           1, "none",   "stack", "rag1"),
    Method("merged_only",   "Merged-only",                        ("table2",),           1, "top"),
    Method("mta",           "MTA",                                ("table1", "table2"),  1, "top",    "stack", "merged_only"),
    Method("merged_random", "Merged-only, random anchors",        ("controls",),         1, "random"),
    Method("mta_random",    "MTA, random anchors",                ("controls",),         1, "random", "stack", "merged_random"),
    Method("merged_least",  "Merged-only, least similar anchors", ("controls",),         1, "least"),
    Method("mta_least",     "MTA, least similar anchors",         ("controls",),         1, "least",  "stack", "merged_least"),
)}  # fmt: skip

DEFAULT = tuple(name for name, m in METHODS.items() if "controls" not in m.tables)
ALL = tuple(METHODS)


def table(name: str) -> tuple[str, ...]:
    """The methods of one table, in the paper's column order."""
    return tuple(m for m, method in METHODS.items() if name in method.tables)


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def parse(text: str | None) -> tuple[str, ...]:
    """`--methods`: a comma-separated subset, `all` (controls included), or None for the default set."""
    if text is None:
        return DEFAULT
    if text == "all":
        return ALL
    names = tuple(dict.fromkeys(m for m in text.split(",") if m))
    for name in names:
        get(name)
    if not names:
        raise ValueError("--methods: empty list")
    return names


def label(name: str) -> str:
    return METHODS[name].label if name in METHODS else name


def units(names: Sequence[str]) -> list[list[Method]]:
    """Stage 3's units of work for one user: the methods on the base weights together (one batched
    generation), every other method alone (its own weights)."""
    methods = [get(n) for n in names]
    shared = [m for m in methods if m.on_base_weights]
    return ([shared] if shared else []) + [[m] for m in methods if not m.on_base_weights]
