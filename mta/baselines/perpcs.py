"""Per-Pcs (Tan, Liu and Jiang 2024): sharer LoRAs cut into pieces, gates that score them, and the
training-free assembly of a target user's LoRA, as the released code runs them (docs/baselines.md).

A piece is one sharer's (A, B) of one (layer, module). Each sharer LoRA gets one gate vector g per module,
trained with the LoRA frozen while the LoRA's input is rescaled per token by sigmoid(x · g). For a target
user, every module scores each sharer's gate on the user's own history (no gradients):

    score_j = mean over the batch of [ mean over positions t predicting a response token of LN(x_t) · LN(g_j) / √d ]
    w = softmax(score_topk / τ),  A = Σ_j w_j A_j,  B = Σ_j w_j B_j        (top k sharers)

module by module inside one forward, so deeper layers see the pieces already chosen, and the final
factors are the uniform average over batches. LN is layer norm without affine parameters. The positions are the
release's `scores[:, :-1]` under `label[:, 1:] > 0` (llama/model.py 80-100): x_t whose next token is a response token.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mta.data.lamp import TaskSpec, User, training_pairs
from mta.errors import InputError
from mta.files import atomic_path, id_folder
from mta.log import log
from mta.peft.adapter import Adapter, load_adapter, set_adapter
from mta.peft.lora import LoRALinear, inject_lora, lora_layers
from mta.peft.multi_lora import stack_many
from mta.precision import autocast
from mta.seeding import derive_seed, seeded_subset
from mta.stages.bank import train_adapters
from mta.stages.engine import Engine, fold_population, summarize
from mta.stages.procedure import Procedure, RunContext, train_population_lora
from mta.stamps import current, load_tensors, save_sealed_tensors, stale
from mta.training.train import Example, TrainLog, make_batch, train


class GatedLoRALinear(nn.Module):
    """A frozen base and a frozen sharer LoRA whose input is rescaled per token: y = W x + s·B A (x sigmoid(x·g))."""

    is_wrapper = True

    def __init__(self, lora: LoRALinear):
        super().__init__()
        self.base, self.lora_A, self.lora_B, self.scaling = lora.base, lora.lora_A, lora.lora_B, lora.scaling
        self.lora_A.requires_grad_(False)
        self.lora_B.requires_grad_(False)
        self.gate = nn.Parameter(torch.zeros(lora.base.in_features, dtype=lora.lora_A.weight.dtype,
                                             device=lora.lora_A.weight.device))  # (in,), zero: sigmoid = 1/2 everywhere

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (..., out)
        x = x.to(self.gate.dtype)
        rescaled = x * torch.sigmoid(x @ self.gate)[..., None]  # (..., in): one factor per token
        return (y + self.lora_B(self.lora_A(rescaled)) * self.scaling).to(y.dtype)


def inject_gates(model: nn.Module) -> dict[str, GatedLoRALinear]:
    """Wrap every LoRALinear of `model` in a GatedLoRALinear: only the gates train."""
    model.requires_grad_(False)
    gated = {}
    for name, layer in lora_layers(model).items():
        parent, _, child = name.rpartition(".")
        gated[name] = GatedLoRALinear(layer)
        setattr(model.get_submodule(parent), child, gated[name])
    return gated


def gate_scores(x: Tensor, positions: Tensor, gates: Tensor) -> Tensor:
    """x (B, T, d) a module's input, positions (B, T) bool (those predicting a response token: make_batch's mask),
    gates (S, d) -> scores (S,)."""
    d = x.shape[-1]
    xn = F.layer_norm(x.float(), (d,))  # (B, T, d)
    gn = F.layer_norm(gates.float(), (d,))  # (S, d)
    per_token = xn @ gn.T / math.sqrt(d)  # (B, T, S)
    w = positions.float()[..., None]  # (B, T, 1)
    per_row = (per_token * w).sum(1) / w.sum(1).clamp(min=1)  # (B, S): mean over each row's scored positions
    return per_row.mean(0)  # (S,)


def assemble(scores: Tensor, A: Tensor, B: Tensor, k: int, tau: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scores (S,), A (S, r, in), B (S, out, r) -> (top-k indices (k,), weights (k,), A (r, in), B (out, r)):
    w = softmax(s_topk / τ), A = Σ w_j A_j and B = Σ w_j B_j (the factors are averaged separately)."""
    top = torch.topk(scores, k)
    w = torch.softmax(top.values / tau, dim=0)  # (k,)
    return top.indices, w, torch.einsum("k,kri->ri", w, A[top.indices]), torch.einsum("k,kor->or", w, B[top.indices])


class PieceAssembly(nn.Module):
    """One module during assembly: picks its pieces from its own input, then computes W x + s·B A x with them."""

    is_wrapper = True

    def __init__(self, base: nn.Linear, A: Tensor, B: Tensor, gates: Tensor, scaling: float, k: int, tau: float):
        super().__init__()
        self.base, self.A, self.B, self.gates = base, A, B, gates  # (S, r, in), (S, out, r), (S, in)
        self.scaling, self.k, self.tau = scaling, k, tau
        self.positions: Tensor | None = None  # (B, T) the current batch's positions predicting a response token
        self.chosen: list[tuple[list[int], list[float]]] = []  # per batch: sharer indices and weights
        self.factors: list[tuple[Tensor, Tensor]] = []  # per batch: the assembled (A, B)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the pieces are chosen and averaged in fp32 always
            idx, w, A, B = assemble(gate_scores(x, self.positions, self.gates), self.A, self.B, self.k, self.tau)
        self.chosen.append((idx.tolist(), w.tolist()))
        self.factors.append((A, B))
        y = self.base(x)
        return (y + (x.to(A.dtype) @ A.T) @ B.T * self.scaling).to(y.dtype)


def assembly_pairs(task: TaskSpec, history: Sequence[dict], seed: int, limit: int | None = None,
                   style: str = "authors_code") -> list[tuple[str, str]]:
    """The (prompt, target) pairs a target user's assembly scores the gates on, as the release's
    `process_train_data` builds them (lora_composition.py 223-276): each item twice, first with the top BM25 item of
    the items before it (not for the first item, nor at all for LaMP-1, whose release prompt has no history), then
    plain (its instruction alone); all the history ones before all the plain ones. At most `limit` items (seeded);
    an item's history may be any item before it."""
    chosen = seeded_subset(range(len(history)), limit, derive_seed(seed, "assembly"))

    def pairs(i: int, **how) -> list[tuple[str, str]]:  # item i's pair (LaMP-1's options drawn per item)
        return training_pairs(task, history, seed=derive_seed(seed, "item", str(i)), style=style,
                              items=slice(i, i + 1), **how)

    with_history = [] if task.name == "citation" else [p for i in chosen if i > 0 for p in pairs(i, earlier_only=True)]
    return with_history + [p for i in chosen for p in pairs(i, k=0)]


@torch.no_grad()
def assemble_for_user(model: nn.Module, sharers: Sequence[Adapter], gates: Sequence[dict[str, Tensor]],
                      examples: Sequence[Example], k: int, tau: float, batch_size: int, pad_id: int = 0,
                      seed: int = 0) -> tuple[Adapter, dict]:
    """The target user's LoRA from the sharers' pieces, over its (shuffled) training-format examples in
    batches of `batch_size`, one epoch. Returns (the assembled adapter, module -> per batch the chosen
    sharer indices and weights: all that Per-Pcs keeps per user)."""
    if not sharers or len(sharers) != len(gates):
        raise ValueError(f"assemble_for_user: {len(sharers)} sharers and {len(gates)} gate sets")
    if any(isinstance(m, LoRALinear) or getattr(m, "is_wrapper", False) for m in model.modules()):
        raise ValueError("assemble_for_user: the model already has LoRA layers")
    config = sharers[0].config
    k = min(k, len(sharers))
    modules = {}
    for name in sharers[0].A:
        parent, _, child = name.rpartition(".")
        base = model.get_submodule(name)
        kw = dict(dtype=torch.float32, device=base.weight.device)
        modules[name] = PieceAssembly(base, torch.stack([s.A[name].to(**kw) for s in sharers]),
                                      torch.stack([s.B[name].to(**kw) for s in sharers]),
                                      torch.stack([g[name].to(**kw) for g in gates]), config.scaling, k, tau)
        setattr(model.get_submodule(parent), child, modules[name])
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
        for i in range(0, len(order), batch_size):
            ids, predicts, _ = make_batch([examples[j] for j in order[i: i + batch_size]], None, pad_id)
            for m in modules.values():
                m.positions = predicts.to(device)
            (model.hidden_states if hasattr(model, "hidden_states") else model)(ids.to(device))
    finally:
        for name, m in modules.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m.base)
        model.train(was_training)
    A = {n: torch.stack([a for a, _ in m.factors]).mean(0) for n, m in modules.items()}  # uniform over batches
    B = {n: torch.stack([b for _, b in m.factors]).mean(0) for n, m in modules.items()}
    pieces = {n: [{"sharers": idx, "weights": w} for idx, w in m.chosen] for n, m in modules.items()}
    return Adapter(config, A, B, source="<Per-Pcs assembly>"), pieces


def gate_vectors(model: nn.Module) -> dict[str, Tensor]:
    """module path -> its trained gate (in,), detached."""
    return {n: m.gate.detach().clone() for n, m in model.named_modules() if isinstance(m, GatedLoRALinear)}


# ----------------------------------------------------------------------------- Per-Pcs in the pipeline


@dataclass
class Artifacts:
    """Per-Pcs's population-level artifacts, as its stage-3 units read them."""

    task: Adapter  # the task LoRA, folded into W0 before everything else
    sharers: dict[str, Adapter] = field(default_factory=dict)  # anchor id -> sharer LoRA
    gates: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # anchor id -> module -> g


# The roles of Per-Pcs's artifacts in what they are made from (`RunContext.population_inputs`)
TASK_LORA, SHARER, GATES = "Per-Pcs task LoRA", "Per-Pcs sharer LoRA of", "Per-Pcs gates of"


def task_path(run: RunContext) -> Path:
    return run.artifacts / "perpcs" / "task_lora"


def sharers_dir(run: RunContext) -> Path:
    return run.artifacts / "perpcs" / "sharers"


def gates_dir(run: RunContext) -> Path:
    return run.artifacts / "perpcs" / "gates"


def sharer_path(run: RunContext, anchor_id: str) -> Path:
    return sharers_dir(run) / id_folder(anchor_id)


def gates_path(run: RunContext, anchor_id: str) -> Path:
    return gates_dir(run) / f"{id_folder(anchor_id)}.safetensors"


def train_gates(engine: Engine, task: Adapter, sharer: Adapter, examples, seed: int) -> tuple[dict, TrainLog]:
    """Per-Pcs's gates of one sharer: W0 + task LoRA, the sharer's LoRA frozen on top, only the gates train."""
    engine.reset()
    fold_population(engine, task)
    inject_lora(engine.model, sharer.config)
    set_adapter(engine.model, sharer)
    inject_gates(engine.model)
    train_log = train(engine.model, examples, engine.train_config(engine.profile.perpcs_gate, seed, probe=True),
                      pad_id=engine.tok.pad_token_id)
    gates = gate_vectors(engine.model)
    engine.reset()
    return gates, train_log


def build(run: RunContext) -> None:
    """Per-Pcs's population-level artifacts: the task LoRA, then per sharer (the stage-1 anchors) its LoRA and its
    gates, each an artifact of its own (so a killed run loses at most the one in flight); those made from the
    run's inputs are kept."""
    p, anchors, made_from = run.profile, run.anchor_ids, run.population_inputs
    todo = [a for a in anchors if not all([current(sharer_path(run, a), made_from(f"{SHARER} {a}")),
                                           current(gates_path(run, a), made_from(f"{GATES} {a}"))])]
    if current(task_path(run), made_from(TASK_LORA)) and not todo:
        return
    train_population_lora(run, task_path(run), p.perpcs_task, derive_seed(run.seed, TASK_LORA), TASK_LORA)
    task = load_adapter(task_path(run))
    by_id = {u.user_id: u for u in run.candidates}
    engine = run.engine
    log(f"stage 1c: Per-Pcs sharer LoRAs and gates for {len(todo)} of {len(anchors)} sharers")
    seeds = {a: derive_seed(run.seed, "perpcs", a) for a in todo}
    examples = {a: engine.examples(by_id[a].history, seeds[a], limit=p.perpcs_sharer_items) for a in todo}
    fresh = [a for a in todo if stale(sharer_path(run, a), made_from(f"{SHARER} {a}")) is not None]
    for group in (fresh[i: i + p.group_size] for i in range(0, len(fresh), p.group_size)):  # together, as the bank
        train_adapters(engine, [sharer_path(run, a) for a in group], [examples[a] for a in group], p.perpcs_sharer,
                       [seeds[a] for a in group], [made_from(f"{SHARER} {a}") for a in group], on=[task], probe=True)
    for a in tqdm(todo, desc="gates", disable=not run.progress):
        gates, gate_log = train_gates(engine, task, load_adapter(sharer_path(run, a)), examples[a], seeds[a])
        with atomic_path(gates_path(run, a)) as tmp:
            save_sealed_tensors(tmp, gates, made_from(f"{GATES} {a}"), metadata={
                "train_log": json.dumps({"examples": len(examples[a]), **summarize(gate_log)})})


def load(run: RunContext) -> Artifacts | None:
    """The task LoRA and every sharer whose LoRA and gates were made from the run's inputs; None without a task
    LoRA."""
    made_from = run.population_inputs
    if stale(task_path(run), made_from(TASK_LORA)) is not None:
        return None
    out = Artifacts(load_adapter(task_path(run)))
    for a in run.anchor_ids:
        if stale(sharer_path(run, a), made_from(f"{SHARER} {a}")) is None and \
                stale(gates_path(run, a), made_from(f"{GATES} {a}")) is None:
            out.sharers[a] = load_adapter(sharer_path(run, a))
            out.gates[a] = load_tensors(gates_path(run, a))[0]
    return out


def begin(engine: Engine, artifacts: Artifacts | None) -> None:
    """Per-Pcs's weights before any user: W0 + task LoRA."""
    if artifacts is None or not artifacts.sharers:
        raise InputError("Per-Pcs has no task LoRA or sharers (rerun tools/reproduce.py)")
    missing = [a for a in sorted(artifacts.sharers) if a not in artifacts.gates]
    if missing:
        raise InputError(f"Per-Pcs: sharer(s) {missing} have no gates (rerun tools/reproduce.py)")
    fold_population(engine, artifacts.task)


def part(engine: Engine, user: User, artifacts: Artifacts, unit_seed: int) -> tuple[Adapter, dict, dict]:
    """Per-Pcs for one target user, on W0 + task LoRA: the LoRA assembled from the sharers' pieces by their
    gates on the user's history (`assemble_for_user`), training-free. (adapter, seconds, details)"""
    p = engine.profile
    tic = time.perf_counter()
    sharer_ids = sorted(artifacts.sharers)
    examples = engine.tokenize(assembly_pairs(engine.task, user.history, unit_seed, p.perpcs_user_items,
                                              p.prompt_style))
    sharers, gates = [artifacts.sharers[a] for a in sharer_ids], [artifacts.gates[a] for a in sharer_ids]
    with autocast(p.device, p.bf16, engine.model):  # its forward in the run's precision
        adapter, pieces = assemble_for_user(
            engine.model, sharers, gates, examples, p.perpcs_top_k, p.perpcs_tau, p.perpcs_assembly_batch,
            engine.tok.pad_token_id or 0, unit_seed)
    named = {m: [{"sharers": [sharer_ids[i] for i in b["sharers"]], "weights": b["weights"]} for b in batches]
             for m, batches in pieces.items()}
    items = min(len(user.history), p.perpcs_user_items or len(user.history))
    return adapter, {"assemble": time.perf_counter() - tic}, {"sharers": sharer_ids, "items": items,
                                                              "sequences": len(examples), "pieces": named}


def parts(engine: Engine, users: Sequence[User], artifacts: Artifacts, unit_seeds: Sequence[int]
          ) -> list[tuple[Adapter, dict, dict] | InputError]:
    """`part` of each user in turn (each assembly is its own forward over the user's history), or the InputError
    that stopped it."""
    out: list = []
    for user, seed in zip(users, unit_seeds, strict=True):
        try:
            out.append(part(engine, user, artifacts, seed))
        except InputError as e:
            out.append(e)
    return out


def serve(engine: Engine, adapters: Sequence[Adapter]) -> None:
    """Slot i holds user i's assembled LoRA, unmerged (a one-adapter merge with weight 1 is that adapter)."""
    stack_many(engine.model, [[a] for a in adapters], [[1.0]] * len(adapters), None, "param")


PROCEDURE = Procedure(build, load, begin, parts, serve)
