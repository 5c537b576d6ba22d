"""Run profiles: everything that differs between the paper's GPU setting and this CPU.

A profile is data, not code: the stage functions read every knob from here, and the
resolved profile is written beside the results as `config.json`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mta.data.lamp import AUTHORS_EVAL, PROMPT_STYLES, STAGE_TEXTS, TASKS, EvalConditions
from mta.files import read_json
from mta.ops.merge import MODES as MERGE_MODES
from mta.peft.lora import LLAMA_TARGETS, LoRAConfig
from mta.training.train import TrainConfig

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # Per-Pcs's LoRA and PROPER's population LoRA
OPPU_USER = ("q_proj", "v_proj")  # OPPU.py:96-103
# OPPU's task LoRA names q, v, k and "out_proj" (task_LoRA.py:96-103); no LLaMA module is called out_proj.
OPPU_TASK = ("q_proj", "k_proj", "v_proj")
FFN = ("gate_proj", "up_proj", "down_proj")  # PROPER's experts and user LoRA
DTYPES = ("float32", "bfloat16", "float16")
FUSIONS = ("paper", "authors_code")
BANK_DATA = ("adaptation", "authors_code")
EMPTY_CLUSTER = ("most_active", "none")
BASE_QUANTS = ("none", "q4", "q8")  # mta.models.checkpoint.QUANTS
TEST_CONDITIONS = ("ours", "authors_code")
# "auto": chosen per machine by measurement at the start of a run (`mta.run.calibrate`), for these fields only
AUTO = "auto"
MEASURED = ("bf16", "group_size", "rows_per_pass")


def choose(owner: str, field: str, value, allowed: tuple) -> None:
    """Fail at once, naming the allowed values, when a choice field holds something else."""
    if value not in allowed:
        raise ValueError(f"{owner}: {field} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_types(obj) -> None:
    """Every field of a dataclass against its annotation (int, float, bool, str, tuples, None and unions
    of these), so a `--set` typo such as `n_anchors=abc` fails when the profile is built."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _is_instance(value, hints[f.name]):
            owner = f"{type(obj).__name__} {getattr(obj, 'name', '')}".strip()
            raise ValueError(f"{owner}: {f.name} must be {_type_name(hints[f.name])}; got {value!r}")


def _is_instance(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_is_instance(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:  # a finite number: NaN and infinities are no setting
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return f"a tuple of {_type_name(args[0])}"
    if hint is float:
        return "a finite float"
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


@dataclass(frozen=True)
class LoRASpec:
    """One LoRA training recipe (rank, targets and the optimiser schedule)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # the paper gives none: PEFT's and LLaMA-Factory's default
    targets: tuple[str, ...] | str = "all"  # module names, or every linear layer but lm_head
    lr: float = 1e-4
    epochs: int = 3
    batch_size: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    # transformers' LengthGroupedSampler order (`mta.training.train.length_grouped_order`); off in every release
    group_by_length: bool = False  # transformers' LengthGroupedSampler order; no release sets it
    max_steps: int | None = None  # optimizer steps; when set, overrides epochs (Per-Pcs's sharer and gate stages)
    # The examples' BM25 history from the items before each one only (OPPU.py:224-245), not leave-one-out.
    earlier_only: bool = False
    max_tokens: int | None = None  # training prompts' cap in tokens, template included; None: the profile's

    def __post_init__(self):
        check_types(self)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"LoRASpec: max_tokens must be at least 1 or None; got {self.max_tokens}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"LoRASpec: max_steps must be at least 1 or None; got {self.max_steps}")
        if self.lr <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRASpec: lr and alpha must be positive and dropout in [0, 1); got {self.lr}, "
                             f"{self.alpha}, {self.dropout}")
        if self.targets != "all" and (not self.targets or not set(self.targets) <= set(LLAMA_TARGETS)):
            raise ValueError(f"LoRASpec: targets must be 'all' or some of {', '.join(LLAMA_TARGETS)}; "
                             f"got {self.targets!r}")
        self.lora_config()  # LoRAConfig and TrainConfig check the rest, each in its one place
        self.train_config(seed=0)

    def lora_config(self, base_model: str | None = None) -> LoRAConfig:
        return LoRAConfig(r=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=self.targets,
                          base_model_name_or_path=base_model)

    def train_config(self, seed: int, progress: bool = False, probe: bool = False, bf16: bool = False
                     ) -> TrainConfig:
        return TrainConfig(lr=self.lr, epochs=self.epochs, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           weight_decay=self.weight_decay, schedule=self.schedule, warmup_ratio=self.warmup_ratio,
                           max_grad_norm=self.max_grad_norm, group_by_length=self.group_by_length, seed=seed,
                           max_steps=self.max_steps, progress=progress, probe=probe, bf16=bf16)


@dataclass(frozen=True)
class Profile:
    name: str
    llm: str  # model registry name or path (mta.models.checkpoint.load_llm)
    stage1_encoder: str  # per-item embeddings for clustering (paper: deberta-v3-large)
    stage2_encoder: str  # whole-history embeddings for matching (paper: bge-small-en-v1.5)
    dtype: str = "float32"
    device: str = "cpu"
    # The base LLM's linear layers: "none" dequantised to `dtype`; "q4" / "q8" kept quantised (a GGUF's own
    # Q4_0 / Q4_1 / Q8_0 blocks as shipped; other weights as Q4_1 blocks or int8 per channel), LoRAs unmerged.
    base_quant: str = "none"
    n_anchors: int = 50  # V
    top_k: int = 2  # K
    min_anchor_items: int = 11  # the authors' code only takes users with more than 10 items
    # A cluster where no member has min_anchor_items: "most_active" takes its most active member anyway
    # (Eq. 3 as the paper states it); "none" leaves it without an anchor (the authors' code).
    empty_cluster: str = "most_active"
    # K-Means restarts (best inertia wins). The paper is silent; the authors' KMeans(random_state=0, max_iter=3000)
    # under scikit-learn 1.6 runs n_init="auto", one k-means++ run (select_anchor.py:105).
    kmeans_n_init: int = 1
    # How stage 1 (Eq. 2) and stage 2 (Eq. 4) show history items to their encoders (`mta.data.lamp.cluster_texts`,
    # `match_document`): "authors_code" as select_anchor.py and dense_retrieval_matcher.py; "ours" as prompts do.
    stage1_text: str = "authors_code"
    stage2_text: str = "authors_code"
    item_norm: bool = False  # L2-normalise the item embeddings before Eq. 2's mean (select_anchor.py does not)
    # Stage 1a's pool: a seeded sample of at most `max_candidates` bank candidates, each embedded for Eq. 2 on a seeded
    # sample of at most `max_items_embedded` of its items (the bank still trains on all of an anchor's); None: all.
    max_candidates: int | None = None
    max_items_embedded: int | None = None
    # Batch 1 for the bank: the paper gives no batch size, and with 8 the meta-LoRAs barely move in
    # 3 epochs; 1 reproduces the independent cross-check of Merged-only (docs/defaults/bank-batch.md).
    bank: LoRASpec = LoRASpec(batch_size=1)
    # OPPU as released: a per-user LoRA (OPPU.py:96-123) on W0 + its task LoRA, trained once in stage 1c on one
    # query with gold per bank candidate (task_LoRA.py:96-125,180-227) and folded in at weight 1 (OPPU.py:206-208).
    oppu: LoRASpec = LoRASpec(rank=8, alpha=8.0, dropout=0.05, targets=OPPU_USER, lr=1e-4, epochs=2, batch_size=16,
                              weight_decay=0.01, warmup_ratio=0.1, schedule="linear", max_grad_norm=0.3,
                              earlier_only=True, max_tokens=2048)  # --cut_off 2048 of both scripts
    oppu_task: LoRASpec = LoRASpec(rank=8, alpha=8.0, dropout=0.05, targets=OPPU_TASK, lr=1e-4, epochs=3,
                                   batch_size=16, weight_decay=0.01, warmup_ratio=0.1, schedule="linear",
                                   max_grad_norm=0.3, max_tokens=2048)
    # Stacked rank-4 LoRA (paper Table 4). The same recipe serves Adapt-only.
    stack: LoRASpec = LoRASpec(rank=4, alpha=8.0)
    # "paper": alpha_i = s_i / sum(s) (Eq. 6). "authors_code": the released code's
    # (1 - a) * anchor_1 + a * anchor_2 with a = s_1 / (s_1 + s_2), K = 2 only.
    fusion: str = "paper"
    fixed_alpha: float | None = None  # Fig. 3: alpha * anchor_1 + (1 - alpha) * anchor_2 instead of Eq. 6
    # The one default of the merge space: "param" is Eq. 5 literally, "delta" merges sum_i a_i B_i A_i
    # exactly; PEFT's "linear", "cat" and "svd" are there for comparison (mta.ops.merge).
    merge_space: str = "param"
    max_items_per_anchor: int | None = None  # cap on bank training examples per anchor
    # "adaptation": bank examples are built like a user's adaptation data (one BM25 history item over the
    # other items). "authors_code": as the released prepare_meta_lora.py builds them (mta.data.lamp.bank_history).
    bank_data: str = "adaptation"
    # Prompts are left-truncated (the oldest history goes) to a cap in tokens, template included (`Engine`):
    # training prompts to their recipe's `max_tokens`, else to `max_prompt_tokens`; test prompts to
    # `max_test_tokens` (None: no cap).
    max_prompt_tokens: int = 512
    max_test_tokens: int | None = 512
    max_new_tokens: int = 32
    chat_template: bool = True  # training prompts in the model's chat template
    test_chat_template: bool | None = None  # test prompts in it; None: as `chat_template`
    # "ours": test queries decoded on the weights as trained, with the template above, the task's parser and
    # `max_new_tokens`. "authors_code": as the released eval/<task>/evaluate_<task>.py (`mta.data.lamp.AUTHORS_EVAL`:
    # a 4-bit NF4 base for LaMP-1/2/3/5, no template for LaMP-4/5, LaMP-3 with repetition penalty 1.1 and float
    # ratings, each script's max_new_tokens).
    test_conditions: str = "ours"
    # "authors_code": prompts as the released scripts build them; "paper": Appendix E's templates.
    prompt_style: str = "authors_code"
    encoder_batch_size: int = 32
    # Stage 1b and stage 3 train and decode `group_size` adapters (anchors, or users of one method) in one pass
    # through per-row adapters (docs/defaults/group-size.md); 1: one at a time.
    group_size: int | str = 8  # adapter factors and activations grow with it, never a copy of W
    rows_per_pass: int | str | None = 8  # rows a forward of a batched training step, or of a prefill on W0; None: all
    # bf16 autocast for every training and decoding step (`mta.precision`); "auto": measured on a CPU, where the
    # device computes bf16 natively elsewhere (docs/defaults/precision.md).
    # Each of these three may be "auto": chosen at the start of a run by a short calibration on the machine
    # (`mta.run.calibrate`), cached per machine and torch build; the run's config.json records the choice.
    bf16: bool | str = AUTO
    # ---- the two trained baselines of Table 1 (docs/baselines.md); defaults: their releases.
    # Bank candidates whose one population example (their LaMP query with gold, else their last history item
    # over the rest; `Engine.population_examples`) each population LoRA trains on, drawn seeded; None: all.
    population_items: int | None = None
    # Per-Pcs: task LoRA on the population, folded into W0; one sharer LoRA per stage-1 anchor on top of it;
    # per-module gates (only the optimiser fields of `perpcs_gate` are used); training-free assembly.
    # Clip 0.3 in every Per-Pcs stage. The sharer's and the gates' step loops stop after max_step - 1 steps and run
    # one more epoch of one step (engine_finetuning.py 80-84): 100 and 200 steps.
    perpcs_task: LoRASpec = LoRASpec(rank=8, alpha=8.0, dropout=0.05, targets=ATTENTION, lr=1e-4, epochs=3,
                                     batch_size=6, weight_decay=0.01, warmup_ratio=0.0, max_grad_norm=0.3)
    perpcs_sharer: LoRASpec = LoRASpec(rank=8, alpha=8.0, dropout=0.05, targets=ATTENTION, lr=2e-5, epochs=1,
                                       batch_size=6, weight_decay=0.01, warmup_ratio=0.0, max_grad_norm=0.3,
                                       max_steps=100)
    perpcs_gate: LoRASpec = LoRASpec(rank=8, alpha=8.0, targets=ATTENTION, lr=2e-5, epochs=1, batch_size=6,
                                     weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=0.3, max_steps=200)
    perpcs_sharer_items: int | None = None  # a sharer's items its LoRA and its gates train on; None: all
    perpcs_top_k: int = 3
    perpcs_tau: float = 1.0
    perpcs_assembly_batch: int = 16  # sequences per assembly batch (of both kinds, `perpcs.assembly_pairs`)
    # The target user's items the assembly scores the gates on, each twice (with an earlier BM25 item, and plain);
    # None: all.
    perpcs_user_items: int | None = None
    # PROPER: population LoRA folded into W0; group stage (a mixture of LoRA experts on every FFN linear,
    # trained on the target users' history items); per-user LoRA; LoRA-aware router (`mta.baselines.proper`).
    # run_loramoe_stage1.sh under TRL's defaults: dropout 0.05 (ModelConfig), a linear schedule (TrainingArguments).
    proper_population: LoRASpec = LoRASpec(rank=8, alpha=16.0, dropout=0.05, targets=ATTENTION, lr=3e-4, epochs=3,
                                           batch_size=2, grad_accum=4, weight_decay=0.1, warmup_ratio=0.03,
                                           schedule="linear")
    # run_loramoe_stage2.sh, stage3.1.sh, stage3.2.sh: lr 2e-4, cosine, warm-up 0.03, wd 0, dropout 0.05 each.
    proper_group: LoRASpec = LoRASpec(rank=4, alpha=8.0, dropout=0.05, targets=FFN, lr=2e-4, epochs=2, batch_size=1,
                                      weight_decay=0.0, warmup_ratio=0.03)
    proper_experts: int = 5
    proper_group_items: int | None = None  # history items per target user in the group stage; None: all
    proper_user: LoRASpec = LoRASpec(rank=4, alpha=8.0, dropout=0.05, targets=FFN, lr=2e-4, epochs=1, batch_size=1,
                                     weight_decay=0.0, warmup_ratio=0.03)
    proper_router: LoRASpec = LoRASpec(rank=4, alpha=8.0, dropout=0.05, targets=FFN, lr=2e-4, epochs=1, batch_size=1,
                                       weight_decay=0.0, warmup_ratio=0.03)
    proper_user_items: int | None = None  # the user's items the user LoRA trains on; None: all
    proper_router_items: int | None = None  # the user's items the LoRA-aware router trains on; None: all
    # Task directory name -> the fields that differ for that task, in `profile_from_dict`'s form, e.g.
    # {"citation": {"stack": {"epochs": 2, "lr": 5e-5}}}; a run applies its task's row (`for_task`).
    per_task: dict = field(default_factory=dict)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        check_types(self)
        owner = f"profile {self.name}"
        choose(owner, "dtype", self.dtype, DTYPES)
        choose(owner, "base_quant", self.base_quant, BASE_QUANTS)
        choose(owner, "fusion", self.fusion, FUSIONS)
        choose(owner, "merge_space", self.merge_space, MERGE_MODES)
        choose(owner, "bank_data", self.bank_data, BANK_DATA)
        choose(owner, "prompt_style", self.prompt_style, PROMPT_STYLES)
        choose(owner, "empty_cluster", self.empty_cluster, EMPTY_CLUSTER)
        choose(owner, "stage1_text", self.stage1_text, STAGE_TEXTS)
        choose(owner, "stage2_text", self.stage2_text, STAGE_TEXTS)
        choose(owner, "test_conditions", self.test_conditions, TEST_CONDITIONS)
        if self.test_conditions == "authors_code" and self.test_chat_template is not None:
            raise ValueError(f"{owner}: test_conditions 'authors_code' sets the test template per task; "
                             f"leave test_chat_template None")
        if self.test_conditions == "authors_code" and self.base_quant != "none":
            raise ValueError(f"{owner}: test_conditions 'authors_code' decodes on an NF4 round-trip of W, which a "
                             f"quantised base (base_quant={self.base_quant!r}) does not hold; set base_quant='none'")
        if self.max_test_tokens is not None and self.max_test_tokens < 1:
            raise ValueError(f"{owner}: max_test_tokens must be at least 1 or None; got {self.max_test_tokens}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"{owner}: device must be 'cpu', 'cuda', 'cuda:<index>' or 'mps'; got {self.device!r}")
        if not 1 <= self.top_k <= 8:
            raise ValueError(f"{owner}: top_k must be in 1..8 (the paper merges 2..8); got {self.top_k}")
        if self.top_k > self.n_anchors:
            raise ValueError(f"{owner}: top_k = {self.top_k} exceeds n_anchors = {self.n_anchors}")
        if self.fixed_alpha is not None and (self.top_k != 2 or not 0 <= self.fixed_alpha <= 1):
            raise ValueError(f"{owner}: fixed_alpha must be in [0, 1] with top_k = 2; got {self.fixed_alpha} "
                             f"with top_k = {self.top_k}")
        if self.fusion == "authors_code" and self.top_k != 2:
            raise ValueError(f"{owner}: fusion 'authors_code' merges exactly 2 anchors; top_k is {self.top_k}")
        for name in MEASURED:
            if isinstance(getattr(self, name), str) and getattr(self, name) != AUTO:
                raise ValueError(f"{owner}: {name} must be {AUTO!r} or a setting; got {getattr(self, name)!r}")
        measured_off_cpu = [f for f in self.unsettled if f != "bf16"]
        if self.device != "cpu" and measured_off_cpu:
            raise ValueError(f"{owner}: {', '.join(measured_off_cpu)} = {AUTO!r} is measured on the CPU only; set a "
                             f"number for device {self.device}")
        for name in ("n_anchors", "min_anchor_items", "kmeans_n_init", "max_prompt_tokens", "max_new_tokens",
                     "encoder_batch_size", "perpcs_top_k", "perpcs_assembly_batch", "proper_experts", "group_size"):
            if getattr(self, name) != AUTO and getattr(self, name) < 1:
                raise ValueError(f"{owner}: {name} must be at least 1; got {getattr(self, name)}")
        for name in ("rows_per_pass", "max_candidates", "max_items_embedded", "max_items_per_anchor",
                     "population_items", "perpcs_sharer_items", "perpcs_user_items", "proper_group_items",
                     "proper_user_items", "proper_router_items"):
            if getattr(self, name) not in (None, AUTO) and getattr(self, name) < 1:
                raise ValueError(f"{owner}: {name} must be at least 1 or None")
        if self.max_candidates is not None and self.max_candidates < self.n_anchors:
            raise ValueError(f"{owner}: max_candidates = {self.max_candidates} is below n_anchors = {self.n_anchors}")
        if self.perpcs_tau <= 0:
            raise ValueError(f"{owner}: perpcs_tau must be positive; got {self.perpcs_tau}")
        for task in self.per_task:
            self.for_task(task)

    def test_conditions_for(self, task: str) -> EvalConditions:
        """How `task`'s test queries are decoded and parsed under `test_conditions`."""
        if self.test_conditions == "authors_code":
            return AUTHORS_EVAL[task]
        return EvalConditions(chat_template=self.chat_template if self.test_chat_template is None
                              else self.test_chat_template)

    def for_task(self, task: str) -> Profile:
        """This profile with `task`'s row of `per_task` applied (and no rows left: the settings a run uses)."""
        unknown = sorted(set(self.per_task) - set(TASKS))
        if unknown:
            raise ValueError(f"profile {self.name}: per_task has unknown task {unknown[0]!r}; "
                             f"choose from {', '.join(TASKS)}")
        changes = self.per_task.get(task, {})
        if "per_task" in changes:
            raise ValueError(f"profile {self.name}: per_task[{task!r}] cannot itself hold per_task")
        return apply_changes(self.replace(per_task={}), changes, f"profile {self.name}, per_task[{task!r}]")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        """The settings a reader of the results needs, caps included."""
        caps = f"at most {self.max_items_per_anchor} items per anchor" if self.max_items_per_anchor else "every item"

        def recipe(name: str, spec: LoRASpec) -> str:
            epochs = f"{spec.epochs} epoch" + ("s" if spec.epochs != 1 else "")
            return f"{name} rank {spec.rank}, lr {spec.lr:g}, {epochs}, batch {spec.batch_size}"

        return (f"V = {self.n_anchors}, K = {self.top_k}, fusion {self.fusion}, merge in {self.merge_space} space; "
                f"{recipe('bank', self.bank)}, {caps}; {recipe('stacked', self.stack)}; {recipe('OPPU', self.oppu)} "
                f"on {recipe('its task LoRA', self.oppu_task)}; "
                f"Per-Pcs top {self.perpcs_top_k} sharers (τ = {self.perpcs_tau:g}), "
                f"PROPER {self.proper_experts} experts, "
                f"the population LoRAs of OPPU, Per-Pcs and PROPER on {self.population_items or 'every'} "
                f"bank candidates' queries; "
                f"training prompts capped at {self.max_prompt_tokens} tokens (bank {self.bank.max_tokens or 'same'}, "
                f"stacked {self.stack.max_tokens or 'same'}), test prompts at {self.max_test_tokens or 'no cap'}; "
                f"greedy decoding of at most {self.max_new_tokens} tokens; test conditions {self.test_conditions}; "
                f"arithmetic {({True: 'bf16 autocast', False: 'fp32', AUTO: 'measured per machine'})[self.bf16]}")

    @property
    def unsettled(self) -> list[str]:
        """The fields still "auto" (`MEASURED`), which a run settles on its machine (`mta.run.calibrate`)."""
        return [f for f in MEASURED if getattr(self, f) == AUTO]

    def replace(self, **changes) -> Profile:
        return dataclasses.replace(self, **changes)



# Fields a profile no longer has -> what to do instead; a profile or run config that names one is refused.
REMOVED = {"engine": "the engine is always the batched one (per-row adapters, one user being a group of one); "
                     "drop the field, and set group_size=1 to train and decode one adapter at a time"}


def refuse_removed(source: str, key: str) -> None:
    if key in REMOVED:
        raise ValueError(f"{source}: profile field {key!r} was removed: {REMOVED[key]}")


def profile_from_dict(data: dict, source: str = "<profile>", files: tuple[str, ...] = ()) -> Profile:
    """A profile from JSON-like data: `base` names the profile it starts from (default `cpu`),
    every other key replaces a field; the LoRA recipes (`bank`, `oppu`, `stack`, ...) take partial dicts.
    `files`: the profile files already on the way to this one (a file that is its own base is refused)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a profile is a JSON object of settings, not {type(data).__name__}")
    data = dict(data)
    return apply_changes(resolve_profile(data.pop("base", "cpu"), files), data, source)


def apply_changes(base: Profile, data: dict, source: str) -> Profile:
    """`base` with the fields of `data` replaced; a LoRA recipe takes a partial dict of its settings."""
    fields = {f.name: f for f in dataclasses.fields(Profile)}
    changes = {}
    for key, value in data.items():
        refuse_removed(source, key)
        if key not in fields:
            raise ValueError(f"{source}: unknown profile field {key!r}")
        current = getattr(base, key)
        if isinstance(current, LoRASpec):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: field {key!r} must be an object of LoRA settings")
            unknown = set(value) - {f.name for f in dataclasses.fields(LoRASpec)}
            if unknown:
                raise ValueError(f"{source}: field {key!r} has unknown settings {sorted(unknown)}")
            value = dataclasses.replace(current, **{k: tuple(v) if isinstance(v, list) else v
                                                    for k, v in value.items()})
        elif isinstance(value, list):
            value = tuple(value)
        changes[key] = value
    return dataclasses.replace(base, **changes)


PAPER = Profile(
    name="paper",
    llm="llama3-8b-instruct",
    stage1_encoder="deberta-v3-large",
    stage2_encoder="bge-small-en-v1.5",
    dtype="bfloat16",
    device="cuda",
    n_anchors=50,
    rows_per_pass=4,  # about 5 GB of bf16 activations per 1,024-token row of Llama-3-8B without checkpointing
    # Table 4: rank 4, batch 2 with 4 accumulation steps; lr 1e-4 and 3 epochs for LaMP-2 and LaMP-4,
    # lr 5e-5 with 2 epochs for LaMP-1 and LaMP-5 and 1 epoch for LaMP-3. No warm-up and no length grouping:
    # the authors' stacked-LoRA runs set neither (run_experiment.sh:242-262, transformers' defaults).
    # Sequence caps as the authors': LLaMA-Factory's cutoff_len of 8192 for the bank (prepare_meta_lora.py:210)
    # and its default 2048 for the stacked LoRA (run_experiment.sh:242-262 sets none); at test no cap for
    # LaMP-1/2/3 (apply_chat_template) and 4096 for LaMP-4/5 (tokenizer(..., max_length=4096)).
    stack=LoRASpec(rank=4, alpha=8.0, lr=1e-4, epochs=3, batch_size=2, grad_accum=4, warmup_ratio=0.0,
                   max_tokens=2048),
    bank=LoRASpec(batch_size=1, max_tokens=8192),
    max_test_tokens=None,
    # Table 1 comes from the authors' evaluation scripts.
    test_conditions="authors_code",
    per_task={
        "citation": {"stack": {"lr": 5e-5, "epochs": 2}},
        "product_rating": {"stack": {"lr": 5e-5, "epochs": 1}},
        "news_headline": {"max_test_tokens": 4096},
        "scholarly_title": {"stack": {"lr": 5e-5, "epochs": 2}, "max_test_tokens": 4096},
    },
    notes=("Llama-3-8B-Instruct, Table 4 settings for the stacked LoRA, bf16 on a GPU",),
)

CPU = PAPER.replace(
    name="cpu",
    llm="smollm2-135m",
    stage1_encoder="minilm-l6",
    stage2_encoder="minilm-l6",
    dtype="float32",
    device="cpu",
    n_anchors=16,
    # Users (or anchors) a group and rows a training pass: measured per machine (docs/defaults/group-size.md).
    group_size=AUTO,
    rows_per_pass=AUTO,
    max_items_per_anchor=48,
    # Stage 1a within 5 minutes on 2 cores on the official LaMP-4 pool; the 263 dev candidates (at most 206 items)
    # stay whole (docs/defaults/candidate-pool.md).
    max_candidates=1500,
    max_items_embedded=256,
    # One cap of 384 tokens for every prompt, training and test (results count the prompts it cut).
    max_prompt_tokens=384,
    max_test_tokens=384,
    bank=LoRASpec(batch_size=1),
    test_conditions="ours",
    # Chosen on 20 dev users by `make sweep WHAT=adapt` (docs/defaults/adaptation-recipe.md): with Table 4's 6 steps
    # at lr 1e-4 the stacked LoRA changed 4 of 20 outputs; this recipe changes most of them in a third of the compute.
    # Grouped by length: less padding in its batches of 2.
    stack=LoRASpec(rank=4, alpha=8.0, lr=1e-3, epochs=1, batch_size=2, group_by_length=True),
    # OPPU keeps the release's recipes under the rule below: the user LoRA takes 2 steps (10 items, batch 16, 2
    # epochs), so lr 1e-3; the task LoRA, like Per-Pcs's, 1 epoch at batch 1 over the capped population (58
    # steps), so the release's lr.
    oppu=LoRASpec(rank=8, alpha=8.0, targets=OPPU_USER, lr=1e-3, epochs=2, batch_size=16, weight_decay=0.01,
                  warmup_ratio=0.1, schedule="linear", max_grad_norm=0.3, earlier_only=True),
    oppu_task=LoRASpec(rank=8, alpha=8.0, targets=OPPU_TASK, lr=1e-4, epochs=1, batch_size=1, weight_decay=0.01,
                       warmup_ratio=0.1, schedule="linear", max_grad_norm=0.3),
    # Per-Pcs and PROPER: caps by a time rule fixed before any score was seen (docs/defaults/baseline-caps.md):
    # both together at most 40 % of the cold 50-user run. Parts with at least 40 optimizer
    # steps keep the release's lr; parts with fewer take the CPU adaptation recipe's 1e-3. No dropout, as in
    # every CPU recipe; schedules, warm-ups and clipping as released, except that PROPER's user and router parts
    # run without the release's 0.03 warm-up: it rounds up to a whole step at lr 0, all of a one-step part.
    population_items=58,
    perpcs_task=LoRASpec(rank=8, alpha=8.0, targets=ATTENTION, lr=1e-4, epochs=1, batch_size=1, weight_decay=0.01,
                         warmup_ratio=0.0, max_grad_norm=0.3),
    perpcs_sharer=LoRASpec(rank=8, alpha=8.0, targets=ATTENTION, lr=1e-3, epochs=1, batch_size=2, weight_decay=0.01,
                           warmup_ratio=0.0, max_grad_norm=0.3),
    perpcs_gate=LoRASpec(rank=8, alpha=8.0, targets=ATTENTION, lr=1e-3, epochs=1, batch_size=2, warmup_ratio=0.0,
                         max_grad_norm=0.3),
    perpcs_sharer_items=6,
    perpcs_user_items=6,
    proper_population=LoRASpec(rank=8, alpha=16.0, targets=ATTENTION, lr=3e-4, epochs=1, batch_size=1,
                               weight_decay=0.1, warmup_ratio=0.03, schedule="linear"),
    proper_group=LoRASpec(rank=4, alpha=8.0, targets=FFN, lr=2e-4, epochs=1, batch_size=1, warmup_ratio=0.03),
    proper_group_items=1,
    proper_user=LoRASpec(rank=4, alpha=8.0, targets=FFN, lr=1e-3, epochs=1, batch_size=2, warmup_ratio=0.0),
    proper_router=LoRASpec(rank=4, alpha=8.0, targets=FFN, lr=1e-3, epochs=1, batch_size=2, warmup_ratio=0.0),
    # The measured per-user PROPER stage cut to fit the rule, every item cap then scaled by 0.6 to the other
    # methods' time under group training and bf16 (docs/defaults/baseline-caps.md).
    proper_user_items=2,
    proper_router_items=1,
    per_task={},
    notes=(
        "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised) stands in for Llama-3-8B-Instruct",
        "all-MiniLM-L6-v2 stands in for deberta-v3-large (stage 1) and bge-small (stage 2)",
    ),
)

PROFILES = {p.name: p for p in (PAPER, CPU)}


def resolve_profile(name: str = "auto", files: tuple[str, ...] = ()) -> Profile:
    """A profile by name (`auto` picks `paper` on a CUDA machine and `cpu` elsewhere) or a JSON file (`files`:
    those whose `base` led here)."""
    if name == "auto":
        name = "paper" if torch.cuda.is_available() else "cpu"
    if name in PROFILES:
        return PROFILES[name]
    if name.endswith(".json"):  # without a `name`, the file's: its runs get a directory of their own
        path = str(Path(name).resolve())
        if path in files:
            raise ValueError(f"{name}: a profile whose base leads back to itself ({' -> '.join([*files, path])})")
        data = read_json(name)
        return profile_from_dict({"name": Path(name).stem, **data} if isinstance(data, dict) else data, name,
                                 (*files, path))
    raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}, 'auto' or a .json file")
