"""PROPER (Zhang et al. 2025): a mixture of LoRA experts on every FFN linear, its routers, a per-user LoRA
and a LoRA-aware router, as the released code runs them (README, "Per-Pcs and PROPER").

Every FFN linear (gate/up/down) becomes a MixtureLinear with E experts E_i(x) = s · B_i A_i x:

    group stage   r = softmax(softmax(W_x x) + softmax(W_e e_u))     y = W x + c · Σ_i r_i E_i(x)
    user stage    the same, frozen, plus the user's LoRA u = s_u · B_u A_u x:  y = W x + c · Σ_i r_i E_i(x) + u
    router stage  r = softmax(W_l u), only W_l trains                 y = W x + c · Σ_i r_i E_i(x) + u

with c = 0.2 (1/E for the release's 5 experts) and e_u the user's row of a learned embedding table. The
router stage's form is also the one inference uses; `serve_users` holds many users' trained u and W_l as
slots, so one batched decode serves them all (row n uses the slot `mta.multi_lora.set_rows` gives it);
`add_user_slots` makes such slots fresh, so many users' user and router stages train in one pass.
`constraint_loss` is the release's Σ_{i≠j} |M_i M_j| averaged over modules (M the mean routing weights),
made differentiable.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mta.peft.lora import find_targets

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

    def __init__(self, base: nn.Linear, n_experts: int, r: int, alpha: float, n_users: int, mix: float = 0.2,
                 dropout: float = 0.0):
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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the experts' input
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
        """The served slot (B,) of each row of the next batches (`mta.multi_lora.set_rows` sets it)."""
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
        router stage's logits W_l u are (W_l B_u) s_u h_u: the same function, without a (B, T, out) tensor per term."""
        y = self.base(x)  # (B, T, out)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.experts_A.dtype)  # fp32 adapters on a half-precision base; autocast casts per GEMM
        E, r, d_in = self.experts_A.shape
        h = self.dropout(x) @ self.experts_A.reshape(E * r, d_in).T  # (B, T, E*r): every A_i x
        B_cat = self.experts_B.permute(1, 0, 2).reshape(-1, E * r)  # (out, E*r): [B_1 .. B_E]
        if self.stage != "group":
            A_u, B_u, W_l = self.user_factors()
            h_u = x @ A_u.transpose(-1, -2) * self.user_scaling  # (B, T, r_u)
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
                   n_users: int, dropout: float = 0.0) -> dict[str, MixtureLinear]:
    """Wrap every targeted linear (PROPER: gate/up/down) in a MixtureLinear; everything else frozen."""
    model.requires_grad_(False)
    modules = {}
    for name in find_targets(model, targets):
        parent, _, child = name.rpartition(".")
        modules[name] = MixtureLinear(model.get_submodule(name), n_experts, r, alpha, n_users, dropout=dropout)
        setattr(model.get_submodule(parent), child, modules[name])
    return modules


def mixtures(model: nn.Module) -> dict[str, MixtureLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MixtureLinear)}


def set_stage(model: nn.Module, stage: str) -> None:
    """Route as `stage` does and train only its parameters."""
    if stage not in STAGES:
        raise ValueError(f"PROPER stage must be one of {STAGES}, got {stage!r}")
    model.requires_grad_(False)
    for m in mixtures(model).values():
        m.stage = stage
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
    (`mta.multi_lora.set_rows`), so the user and router stages of many users train them in one pass
    (`mta.train_many.train_many` over `stage_parameters`)."""
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
    does, each batch row by its own slot (`mta.multi_lora.set_rows`)."""
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
