"""PROPER (Zhang et al. 2025): a mixture of LoRA experts on every FFN linear, its routers, a per-user LoRA
and a LoRA-aware router, as the released code runs them (docs/baselines.md).

Every FFN linear (gate/up/down) becomes a MixtureLinear with E experts E_i(x) = s · B_i A_i x:

    group stage   r = softmax(softmax(W_x x) + softmax(W_e e_u))     y = W x + c · Σ_i r_i E_i(x)
    user stage    the same, frozen, plus the user's LoRA u = s_u · B_u A_u x:  y = W x + c · Σ_i r_i E_i(x) + u
    router stage  r = softmax(W_l u), only W_l trains                 y = W x + c · Σ_i r_i E_i(x) + u

with c = 0.2 (1/E for the release's 5 experts) and e_u the user's row of a learned embedding table. A stage's
dropout (`set_stage`) acts in training on each LoRA path's input, a mask per expert and one for u, never on the
routers' input (the release's lora.py 396-414 calls its dropout once per path). The
router stage's form is also the one inference uses; `serve_users` holds many users' trained u and W_l as
slots, so one batched decode serves them all (row n uses the slot `mta.peft.multi_lora.set_rows` gives it);
`add_user_slots` makes such slots fresh, so many users' user and router stages train in one pass.
`constraint_loss` is the release's Σ_{i≠j} |M_i M_j| averaged over modules (M the mean routing weights),
made differentiable.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from mta.data.lamp import User
from mta.errors import InputError
from mta.files import atomic_path, read_json, write_json
from mta.log import log
from mta.peft.adapter import Adapter, load_adapter
from mta.peft.lora import find_targets
from mta.seeding import derive_seed, seeded_subset
from mta.stages.engine import Engine, fold_population, summarize
from mta.stages.procedure import Procedure, RunContext, train_population_lora
from mta.stamps import current, load_tensors, seal_folder, stale
from mta.training.train import TrainLog, train
from mta.training.train_many import train_many

STAGES = ("group", "user", "router")


class UserExample(tuple):
    """A (prompt_ids, response_ids) training example that knows its user's row of the embedding tables."""

    row: int

    def __new__(cls, example, row: int):
        obj = super().__new__(cls, example)
        obj.row = row
        return obj


class MixtureLinear(nn.Module):
    """A frozen base linear plus PROPER's expert mixture, its three routers and (from the user stage) a user LoRA."""

    is_wrapper = True

    def __init__(self, base: nn.Linear, n_experts: int, r: int, alpha: float, n_users: int, mix: float = 0.2):
        super().__init__()
        self.base = base.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.experts_A = nn.Parameter(torch.empty(n_experts, r, d_in, **kw))  # (E, r, in)
        self.experts_B = nn.Parameter(torch.zeros(n_experts, d_out, r, **kw))  # (E, out, r)
        for a in self.experts_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # each expert as PEFT initialises a LoRA
        self.router_x = nn.Linear(d_in, n_experts, bias=False, **kw)  # W_x: input router
        self.router_e = nn.Linear(d_in, n_experts, bias=False, **kw)  # W_e: user-embedding router
        self.user_embedding = nn.Embedding(n_users, d_in, **kw)  # e_u
        self.router_l = nn.Linear(d_out, n_experts, bias=False, **kw)  # W_l: LoRA-aware router
        self.scaling, self.mix = alpha / r, mix
        self.dropout = 0.0  # p of the dropout on each LoRA path's input in training (`set_stage`)
        self.user_A: nn.Parameter | None = None  # (r_u, in)
        self.user_B: nn.Parameter | None = None  # (out, r_u)
        self.user_scaling = 0.0
        self.stage = "group"
        self.users: Tensor | None = None  # (B,) the batch's rows of the embedding table
        # many users' parts (`add_user_slots` to train, `serve_users` to serve): A (U, r_u, in), B (U, out, r_u),
        # W_l (U, E, out)
        self.served: tuple[Tensor, Tensor, Tensor] | None = None
        self.slots: Tensor | None = None  # (B,) the batch rows' slots of `served`
        self.mean_routing: Tensor | None = None  # (E,) the last forward's mean routing weights

    def add_user_lora(self, r: int, alpha: float) -> None:
        """A fresh user LoRA: A as PEFT initialises it, B = 0 (so the output starts unchanged)."""
        kw = dict(device=self.experts_A.device, dtype=torch.float32)
        self.user_A = nn.Parameter(torch.empty(r, self.base.in_features, **kw))
        nn.init.kaiming_uniform_(self.user_A, a=math.sqrt(5))
        self.user_B = nn.Parameter(torch.zeros(self.base.out_features, r, **kw))
        self.user_scaling = alpha / r

    def set_rows(self, index: Tensor | None) -> None:
        """The served slot (B,) of each row of the next batches (`mta.peft.multi_lora.set_rows` sets it)."""
        self.slots = None if index is None else index.to(device=self.experts_A.device, dtype=torch.long)

    def user_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """The user LoRA's A_u (r_u, in), B_u (out, r_u) and W_l (E, out); serving many users, each row's own,
        with a leading (B,)."""
        if self.served is not None:
            return tuple(t.index_select(0, self.slots) for t in self.served)
        if self.user_A is None:
            raise ValueError(f"MixtureLinear: the {self.stage} stage needs a user LoRA (add_user_lora)")
        return self.user_A, self.user_B, self.router_l.weight

    def input_routing(self, x: Tensor) -> Tensor:
        """The group and user stages' routing weights softmax(softmax(W_x x) + softmax(W_e e_u)) (B, T, E)."""
        if self.users is None:
            raise ValueError("MixtureLinear: set the batch's users (set_users) before a group- or user-stage forward")
        by_user = torch.softmax(self.router_e(self.user_embedding(self.users)), dim=-1)  # (B, E)
        return torch.softmax(torch.softmax(self.router_x(x), dim=-1) + by_user[:, None], dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, in). The experts and the user LoRA share one GEMM on their narrow sides,
        [c s r_1 h_1, .., c s r_E h_E, s_u h_u] @ [B_1, .., B_E, B_u]^T with h_i = A_i x, h_u = A_u x, and the
        router stage's logits W_l u are (W_l B_u) s_u h_u: the same function, without a (B, T, out) tensor per term.
        With dropout in training, A_i and A_u each see their own dropout of x."""
        y = self.base(x)  # (B, T, out)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.experts_A.dtype)  # fp32 adapters on a half-precision base; autocast casts per GEMM
        E, r, d_in = self.experts_A.shape
        drop = self.training and self.dropout > 0
        if drop:
            xs = F.dropout(x.unsqueeze(-2).expand(*x.shape[:-1], E, d_in), self.dropout)  # (B, T, E, in): a mask each
            h = torch.einsum("...ei,eri->...er", xs, self.experts_A).flatten(-2)  # (B, T, E*r)
        else:
            h = x @ self.experts_A.reshape(E * r, d_in).T  # (B, T, E*r): every A_i x
        B_cat = self.experts_B.permute(1, 0, 2).reshape(-1, E * r)  # (out, E*r): [B_1 .. B_E]
        if self.stage != "group":
            A_u, B_u, W_l = self.user_factors()
            h_u = (F.dropout(x, self.dropout) if drop else x) @ A_u.transpose(-1, -2) * self.user_scaling  # (B, T, r_u)
            B_cat = torch.cat([B_cat.expand(*B_u.shape[:-1], -1), B_u], dim=-1)  # ((B,) out, E*r + r_u)
        if self.stage == "router":
            routing = torch.softmax(h_u @ (W_l @ B_u).transpose(-1, -2), dim=-1)  # (B, T, E): softmax(W_l u)
        else:
            routing = self.input_routing(x)
        self.mean_routing = routing.reshape(-1, E).mean(0)  # (E,): every position of the batch
        g = (h.unflatten(-1, (E, r)) * (routing * (self.mix * self.scaling))[..., None]).flatten(-2)  # (B, T, E*r)
        if self.stage != "group":
            g = torch.cat([g, h_u], dim=-1)  # (B, T, E*r + r_u)
        return (y + g @ B_cat.transpose(-1, -2)).to(y.dtype)

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        """What each stage trains: the experts, W_x, W_e and the embeddings; the user LoRA; W_l (while many users
        are served, their banks)."""
        if stage == "group":
            return [self.experts_A, self.experts_B, *self.router_x.parameters(), *self.router_e.parameters(),
                    *self.user_embedding.parameters()]
        if self.served is not None:
            return list(self.served[:2]) if stage == "user" else [self.served[2]]
        if stage == "user":
            return [self.user_A, self.user_B]
        return list(self.router_l.parameters())


def inject_mixture(model: nn.Module, targets: tuple[str, ...], n_experts: int, r: int, alpha: float,
                   n_users: int) -> dict[str, MixtureLinear]:
    """Wrap every targeted linear (PROPER: gate/up/down) in a MixtureLinear; everything else frozen."""
    model.requires_grad_(False)
    modules = {}
    for name in find_targets(model, targets):
        parent, _, child = name.rpartition(".")
        modules[name] = MixtureLinear(model.get_submodule(name), n_experts, r, alpha, n_users)
        setattr(model.get_submodule(parent), child, modules[name])
    return modules


def mixtures(model: nn.Module) -> dict[str, MixtureLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MixtureLinear)}


def set_stage(model: nn.Module, stage: str, dropout: float = 0.0) -> None:
    """Route as `stage` does, train only its parameters, with `dropout` on the LoRA paths' input in training."""
    if stage not in STAGES:
        raise ValueError(f"PROPER stage must be one of {STAGES}, got {stage!r}")
    model.requires_grad_(False)
    for m in mixtures(model).values():
        m.stage, m.dropout = stage, dropout
        for p in m.stage_parameters(stage):
            p.requires_grad_(True)


def set_users(model: nn.Module, users: Tensor) -> None:
    """The embedding rows (B,) of the next batch's users."""
    for m in mixtures(model).values():
        m.users = users


def user_part(model: nn.Module, slot: int | None = None) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """What the user and router stages trained, per module: (A_u (r_u, in), B_u (out, r_u), W_l (E, out)), detached;
    with `slot`, that slot's of the served banks (`add_user_slots`)."""
    if slot is None:
        return {n: (m.user_A.detach().clone(), m.user_B.detach().clone(), m.router_l.weight.detach().clone())
                for n, m in mixtures(model).items()}
    return {n: tuple(t[slot].detach().clone() for t in m.served) for n, m in mixtures(model).items()}


@torch.no_grad()
def add_user_slots(model: nn.Module, r: int, alpha: float, seeds: Sequence[int]) -> None:
    """Slot u of every mixture: a fresh user LoRA drawn as `add_user_lora` draws it after torch.manual_seed(seeds[u])
    (the same draws, in the same module order), and W_l as it is now. These banks are served per row
    (`mta.peft.multi_lora.set_rows`), so the user and router stages of many users train them in one pass
    (`mta.training.train_many.train_many` over `stage_parameters`)."""
    modules, drawn = mixtures(model), {}
    for seed in seeds:
        torch.manual_seed(seed)
        for n, m in modules.items():
            m.add_user_lora(r, alpha)
            drawn.setdefault(n, []).append(m.user_A.detach())
    for n, m in modules.items():
        A = torch.stack(drawn[n])  # (U, r_u, in)
        B = torch.zeros(len(seeds), *m.user_B.shape, dtype=A.dtype, device=A.device)  # (U, out, r_u)
        W_l = m.router_l.weight.detach().expand(len(seeds), -1, -1).clone()  # (U, E, out)
        m.served = tuple(nn.Parameter(t, requires_grad=False) for t in (A, B, W_l))
        m.user_A = m.user_B = None


@torch.no_grad()
def serve_users(model: nn.Module, parts: Sequence[dict[str, tuple[Tensor, Tensor, Tensor]]]) -> None:
    """Slot i of every mixture gets user i's trained part (`user_part`); the model routes as the router stage
    does, each batch row by its own slot (`mta.peft.multi_lora.set_rows`)."""
    for name, m in mixtures(model).items():
        A, B, W_l = (torch.stack([part[name][j] for part in parts]) for j in range(3))
        m.served = (A, B, W_l)  # (U, r_u, in), (U, out, r_u), (U, E, out); s_u stays add_user_lora's
    set_stage(model, "router")


def constraint_loss(model: nn.Module) -> Tensor:
    """Σ_{i≠j} |M_i M_j| per module, averaged over modules (the release divides by its 96 = 32 layers * 3),
    M the last forward's mean routing weights. Differentiable, unlike the release's (built with .item())."""
    losses = []
    for m in mixtures(model).values():
        M = m.mean_routing  # (E,)
        pairs = (M[:, None] * M[None, :]).abs()  # (E, E)
        losses.append(pairs.sum() - pairs.diagonal().sum())
    return torch.stack(losses).mean()


GROUP_KEYS = ("experts_A", "experts_B", "router_x.weight", "router_e.weight", "user_embedding.weight",
              "router_l.weight")


def mixture_state(model: nn.Module) -> dict[str, Tensor]:
    """The group stage's tensors ("<module>.<key>"), W_l's initialisation included, to save."""
    sd = {}
    for name, m in mixtures(model).items():
        own = m.state_dict()
        sd.update({f"{name}.{k}": own[k].detach().clone() for k in GROUP_KEYS})
    return sd


@torch.no_grad()
def load_mixture_state(model: nn.Module, sd: dict[str, Tensor], source: str = "<memory>") -> None:
    modules = mixtures(model)
    expected = {f"{n}.{k}" for n in modules for k in GROUP_KEYS}
    if set(sd) != expected:
        extra = sorted(set(sd) ^ expected)[0]
        raise ValueError(f"{source}: mixture tensors do not match the model, e.g. {extra!r}")
    for name, m in modules.items():
        own = m.state_dict()
        for k in GROUP_KEYS:
            if own[k].shape != sd[f"{name}.{k}"].shape:
                raise ValueError(f"{source}: {name}.{k} has shape {tuple(sd[f'{name}.{k}'].shape)}, "
                                 f"the model's is {tuple(own[k].shape)}")
            own[k].copy_(sd[f"{name}.{k}"])


# ----------------------------------------------------------------------------- PROPER in the pipeline


@dataclass
class Artifacts:
    """PROPER's population-level artifacts, as its stage-3 units read them."""

    population: Adapter  # the population LoRA, folded into W0
    group: dict[str, Tensor]  # the group stage's mixture (`mixture_state`)
    users: list[str]  # the rows of its user-embedding tables


# The roles of PROPER's artifacts in what they are made from (`RunContext.population_inputs`)
POPULATION_LORA, GROUP = "PROPER population LoRA", "PROPER group stage"


def population_path(run: RunContext) -> Path:
    return run.artifacts / "proper" / "population_lora"


def group_path(run: RunContext) -> Path:
    return run.artifacts / "proper" / "group"


def train_group(engine: Engine, population: Adapter, users: Sequence[User], seed: int
                ) -> tuple[dict[str, torch.Tensor], TrainLog]:
    """PROPER's group stage: W0 + population LoRA, the expert mixture on every FFN linear trained with its input
    and user-embedding routers on the target users' history items (never their queries), LM loss plus the
    constraint loss. Returns the mixture's tensors (`mixture_state`) and the log."""
    p, model = engine.profile, engine.model
    engine.reset()
    fold_population(engine, population)
    torch.manual_seed(seed)  # the experts' and routers' initialisation
    inject_mixture(model, tuple(p.proper_group.targets), p.proper_experts, p.proper_group.rank,
                   p.proper_group.alpha, len(users))
    examples = [UserExample(ex, row) for row, u in enumerate(users)
                for ex in engine.examples(u.history, derive_seed(seed, u.user_id), limit=p.proper_group_items)]
    set_stage(model, "group", p.proper_group.dropout)

    def rows(batch):
        set_users(model, torch.tensor([ex.row for ex in batch], device=model.device))

    log = train(model, examples, engine.train_config(p.proper_group, seed, probe=True), engine.tok.pad_token_id,
                before_forward=rows, aux_loss=lambda: constraint_loss(model))
    state = mixture_state(model)
    engine.reset()
    return state, log


def build(run: RunContext) -> None:
    """PROPER's population-level artifacts: the population LoRA, then the group stage on every target user of the
    data file (their history items, never their queries), so the artifact does not depend on --users; those
    made from the run's inputs are kept."""
    p = run.profile
    train_population_lora(run, population_path(run), p.proper_population, derive_seed(run.seed, POPULATION_LORA),
                          POPULATION_LORA)
    if current(group_path(run), run.population_inputs(GROUP)):
        return
    users = run.target_users
    log(f"stage 1c: PROPER group stage, {p.proper_experts} experts on every FFN linear, {len(users)} target users")
    state, train_log = train_group(run.engine, load_adapter(population_path(run)), users,
                                   derive_seed(run.seed, "proper", "group"))
    with atomic_path(group_path(run), is_dir=True) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, tmp / "mixture.safetensors",
                  metadata={"format": "pt"})
        write_json(tmp / "users.json", [u.user_id for u in users])
        write_json(tmp / "train_log.json", summarize(train_log))
        seal_folder(tmp, run.population_inputs(GROUP))


def load(run: RunContext) -> Artifacts | None:
    """The population LoRA and the group stage's mixture; None unless both were made from the run's inputs."""
    if any(stale(path, run.population_inputs(what)) is not None
           for path, what in ((population_path(run), POPULATION_LORA), (group_path(run), GROUP))):
        return None
    return Artifacts(load_adapter(population_path(run)), load_tensors(group_path(run) / "mixture.safetensors")[0],
                     read_json(group_path(run) / "users.json"))


def begin(engine: Engine, artifacts: Artifacts | None) -> None:
    """PROPER's weights before any user: W0 + population LoRA and the group stage's mixture (frozen)."""
    if artifacts is None:
        raise InputError("PROPER has no population LoRA or group stage (rerun tools/reproduce.py)")
    p = engine.profile
    fold_population(engine, artifacts.population)
    inject_mixture(engine.model, tuple(p.proper_group.targets), p.proper_experts, p.proper_group.rank,
                   p.proper_group.alpha, len(artifacts.users))


def user_row(artifacts: Artifacts, user: User) -> int:
    """The user's row of PROPER's user-embedding tables."""
    if user.user_id not in artifacts.users:
        raise InputError(f"user {user.user_id}: not among the {len(artifacts.users)} users of PROPER's group "
                         f"stage (delete proper/group and rerun)")
    return artifacts.users.index(user.user_id)


def stage_examples(engine: Engine, user: User, unit_seed: int) -> tuple[list, list]:
    """The user's training examples of PROPER's user stage and of its router stage."""
    p, examples = engine.profile, engine.examples(user.history, unit_seed)
    return (seeded_subset(examples, p.proper_user_items, derive_seed(unit_seed, "user")),
            seeded_subset(examples, p.proper_router_items, derive_seed(unit_seed, "router")))


def details(user_examples: Sequence, router_examples: Sequence, user_log: TrainLog, router_log: TrainLog
            ) -> dict:
    return {"train": {"examples": len(user_examples), **summarize(user_log)},
            "train_router": {"examples": len(router_examples), **summarize(router_log)}}


def parts(engine: Engine, users: Sequence[User], artifacts: Artifacts, unit_seeds: Sequence[int]
          ) -> list[tuple[dict, dict, dict] | InputError]:
    """PROPER for a group of target users (one user is a group of one), on the mixture as the group stage left it
    (W_l included): slot u of every mixture holds user u's LoRA, initialised under `unit_seeds[u]`, and W_l
    (`add_user_slots`); one pass of `mta.training.train_many.train_many` trains every slot's user LoRA on its
    history, then one its LoRA-aware router W_l alone; generation routes by W_l. One entry per user: its part
    (`user_part`), seconds and details, or the InputError that stopped it."""
    out: list = [None] * len(users)
    slots = []  # one per user with a part to make: (its index in users, its embedding row, user / router examples)
    for i, u in enumerate(users):
        try:
            slots.append((i, user_row(artifacts, u), *stage_examples(engine, u, unit_seeds[i])))
        except InputError as e:
            out[i] = e
    if not slots:
        return out
    p, model, pad = engine.profile, engine.model, engine.tok.pad_token_id
    seeds = [unit_seeds[i] for i, _, _, _ in slots]
    load_mixture_state(model, artifacts.group, "proper/group")
    add_user_slots(model, p.proper_user.rank, p.proper_user.alpha, seeds)
    rows = torch.tensor([row for _, row, _, _ in slots], device=model.device)  # slot -> embedding row

    def slot_users(index):
        set_users(model, rows[index.to(rows.device)])

    logs = {}
    for stage, spec, examples in (("user", p.proper_user, [ex for _, _, ex, _ in slots]),
                                  ("router", p.proper_router, [ex for _, _, _, ex in slots])):
        set_stage(model, stage, spec.dropout)
        params = [t for m in mixtures(model).values() for t in m.stage_parameters(stage)]
        logs[stage] = train_many(model, examples, [engine.train_config(spec, s, probe=True) for s in seeds], pad,
                                 p.rows_per_pass, params, slot_users)
    model.eval()
    adapt = (logs["user"][0].seconds + logs["router"][0].seconds) / len(slots)
    for slot, (i, _, user_examples, router_examples) in enumerate(slots):
        out[i] = (user_part(model, slot), {"adapt": adapt},
                  details(user_examples, router_examples, logs["user"][slot], logs["router"][slot]))
    return out


PROCEDURE = Procedure(build, load, begin, parts, lambda engine, parts: serve_users(engine.model, parts))
