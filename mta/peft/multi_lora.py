"""Many users in one model: per-row adapters (`mta.ops.rowlora.RowLoRALinear`) injected into an mta.models.llama model.

Slot u of every wrapped layer holds user u's fused bank LoRA (Eq. 5, unmerged, from
`mta.peft.fusion.merged_factors`) and a stacked LoRA trained on top (Eq. 7). A batch whose row n belongs to
user `slots[n]` computes, row by row, what `mta.peft.fusion.stack_lora` + that user's LoRA would (see the
module docstring of mta.ops.rowlora for why), so one forward serves or trains every user at once:

    names = stack_many(model, fused, weights, config, mode, seeds)   # inject U slots, fuse, PEFT init
    set_rows(model, slots)                                           # (N,) slot per batch row
    logits = model(ids)                                              # or train_many / generate_many
    adapter = get_row_adapter(model, u, config)                      # a PEFT-format mta.peft.adapter.Adapter
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mta.models.generation import generate
from mta.ops.rowlora import RowLoRALinear
from mta.peft.adapter import Adapter, check_modules
from mta.peft.fusion import merged_factors, target_linears
from mta.peft.lora import LoRAConfig, LoRALinear, find_targets, is_target
from mta.precision import autocast


def row_layers(model: nn.Module) -> dict[str, RowLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RowLoRALinear)}


def _target_linears(model: nn.Module, targets: tuple[str, ...] | str) -> dict[str, nn.Linear]:
    """The linears `targets` selects, in model order (inject_lora's order), a wrapped layer counting as its base."""
    out, wrapped = {}, set()
    for n, m in model.named_modules():
        if n.rpartition(".")[0] in wrapped:
            continue
        if isinstance(m, (RowLoRALinear, LoRALinear)):
            wrapped.add(n)
            m = m.base
        if is_target(n, m, targets):
            out[n] = m
    return out


def inject_row_lora(model: nn.Module, n_adapters: int, config: LoRAConfig | None = None,
                    fused_targets: tuple[str, ...] | str = ()) -> list[str]:
    """Wrap in a RowLoRALinear with `n_adapters` slots every linear that `config` targets (these get a
    stacked LoRA of its rank) or that `fused_targets` names (a fused term only); freezes the rest."""
    if any(isinstance(m, (LoRALinear, RowLoRALinear)) for m in model.modules()):
        raise ValueError("model already has LoRA layers; unload them first")
    stacked = set(find_targets(model, config.target_modules)) if config is not None else set()
    fused = set(find_targets(model, fused_targets)) if fused_targets else set()
    names = [n for n in _target_linears(model, "all") if n in stacked | fused]
    if not names:
        raise ValueError("inject_row_lora: neither a stacked LoRA config nor fused targets")
    model.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        kw = dict(r=config.r, alpha=config.alpha, dropout=config.dropout, use_rslora=config.use_rslora) \
            if name in stacked else {}
        setattr(owner, child, RowLoRALinear(getattr(owner, child), n_adapters, **kw))
    return names


def unload_row_lora(model: nn.Module) -> nn.Module:
    """Drop every RowLoRALinear, leaving the base weights untouched."""
    for name, layer in row_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    return model


@runtime_checkable
class PerRow(Protocol):
    """A layer that serves each row of a batch from its own slot (RowLoRALinear, PROPER's MixtureLinear)."""

    def set_rows(self, index: Tensor | None) -> None: ...


def set_rows(model: nn.Module, slots: Tensor | Sequence[int] | None) -> None:
    """The adapter slot of every row of the next batches, in every per-row layer of the model."""
    index = None if slots is None else torch.as_tensor(slots, dtype=torch.long)
    for m in model.modules():
        if isinstance(m, PerRow):
            m.set_rows(index)


@contextlib.contextmanager
def rows(model: nn.Module, slots: Tensor | Sequence[int]):
    """`set_rows` for the duration of a block, cleared afterwards."""
    set_rows(model, slots)
    try:
        yield
    finally:
        set_rows(model, None)


@torch.no_grad()
def set_fused(model: nn.Module, fused: Sequence[Sequence[Adapter]], weights: Sequence[Sequence[float]],
              mode: str) -> None:
    """Slot u's fused LoRA: the Eq. 5 merge of `fused[u]` with `weights[u]` (`mta.peft.fusion.merged_factors`),
    applied unmerged; an empty `fused[u]` gives slot u none (W0 only). Ranks are zero-padded to the largest."""
    layers = row_layers(model)
    if not layers:
        raise ValueError("set_fused: the model has no RowLoRALinear layers (inject_row_lora first)")
    U = next(iter(layers.values())).n_adapters
    if len(fused) != U or len(weights) != U:
        raise ValueError(f"set_fused: {U} slots but {len(fused)} adapter lists and {len(weights)} weight lists")
    factors: dict[str, list[tuple[Tensor, Tensor] | None]] = {n: [None] * U for n in layers}
    for u, (adapters, w) in enumerate(zip(fused, weights, strict=True)):
        if not adapters:
            continue
        for m in target_linears(model, adapters, w):  # validates the adapters against each other and the model
            if m not in layers:
                raise ValueError(f"{adapters[0].source}: module {m!r} is not a RowLoRALinear "
                                 f"(inject_row_lora with fused_targets covering it)")
            factors[m][u] = merged_factors(adapters, w, m, mode)  # (B (out, r'), A (r', in))
    for m, layer in layers.items():
        rf = max((f[1].shape[0] for f in factors[m] if f is not None), default=0)
        A = torch.zeros(U, rf, layer.in_features)  # (U, rf, in)
        B = torch.zeros(U, layer.out_features, rf)  # (U, out, rf)
        for u, f in enumerate(factors[m]):
            if f is not None:
                B[u, :, : f[0].shape[1]], A[u, : f[1].shape[0]] = f
        layer.set_fused(A, B)


def stacked_layers(model: nn.Module) -> dict[str, RowLoRALinear]:
    """The RowLoRALinear layers that carry a stacked (trainable) LoRA."""
    return {n: layer for n, layer in row_layers(model).items() if layer.r}


def fresh_adapter(model: nn.Module, config: LoRAConfig, seed: int) -> Adapter:
    """The factors `torch.manual_seed(seed); inject_lora(model, config)` would initialise (the same
    random draws, in the same order), without changing the model: a slot then starts as that adapter would."""
    torch.manual_seed(seed)
    linears = _target_linears(model, config.target_modules)
    layers = {n: LoRALinear(lin, config.r, config.alpha, config.dropout, config.use_rslora)
              for n, lin in linears.items()}
    return Adapter(config, {n: layer.lora_A.weight.detach() for n, layer in layers.items()},
                   {n: layer.lora_B.weight.detach() for n, layer in layers.items()})


@torch.no_grad()
def set_slot(model: nn.Module, slot: int, adapter: Adapter) -> None:
    """Copy an adapter's factors into slot `slot` of the stacked LoRA (same modules, rank and scaling)."""
    layers = stacked_layers(model)
    check_modules(adapter, {n: layer.base for n, layer in layers.items()})
    for n, layer in layers.items():
        if adapter.A[n].shape[0] != layer.r or adapter.config.scaling != layer.scaling:
            raise ValueError(f"{adapter.source}: module {n!r} has rank {adapter.A[n].shape[0]} and scaling "
                             f"{adapter.config.scaling}, the slots have rank {layer.r} and scaling {layer.scaling}")
        layer.lora_A[slot].copy_(adapter.A[n])
        layer.lora_B[slot].copy_(adapter.B[n])


def get_row_adapter(model: nn.Module, slot: int, config: LoRAConfig) -> Adapter:
    """Slot `slot`'s stacked LoRA as a detached Adapter (copies), ready for `mta.peft.adapter.save_adapter`."""
    layers = stacked_layers(model)
    if not layers:
        raise ValueError("model has no stacked RowLoRALinear layers")
    return Adapter(config, {n: layer.lora_A[slot].detach().clone() for n, layer in layers.items()},
                   {n: layer.lora_B[slot].detach().clone() for n, layer in layers.items()})


def stack_many(model: nn.Module, fused: Sequence[Sequence[Adapter]], weights: Sequence[Sequence[float]],
               config: LoRAConfig | None, mode: str, seeds: Sequence[int] = ()) -> list[str]:
    """Eq. 7 for U users at once, unmerged: slot u gets the fused LoRA of `fused[u]` (Eq. 5) and, with a
    config, a fresh stacked LoRA initialised as `torch.manual_seed(seeds[u])` + `stack_lora` would."""
    U = len(fused)
    if config is not None and len(seeds) != U:
        raise ValueError(f"stack_many: {U} users but {len(seeds)} seeds")
    modules = sorted({m for adapters in fused for a in adapters for m in a.A})
    names = inject_row_lora(model, U, config, tuple(modules))
    set_fused(model, fused, weights, mode)
    if config is not None:
        for u, seed in enumerate(seeds):
            set_slot(model, u, fresh_adapter(model, config, seed))
    return names


# ----------------------------------------------------------------------------- generation


def generate_many(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, slots: Sequence[int] | Tensor,
                  bf16: bool = False, **kwargs) -> Tensor:
    """One batched decode for many users: row n of the left-padded prompts uses slot `slots[n]`'s adapters.

    Every row has its own KV cache rows and ends at its own stop token (then holds the pad id), as in
    `LlamaForCausalLM.generate`, which takes the other arguments (with `prefill_rows`, each prefill forward serves
    its rows' slots). `bf16`: bf16 autocast (`mta.precision`).
    """
    slots = torch.as_tensor(slots, dtype=torch.long)
    if slots.shape != (input_ids.shape[0],):
        raise ValueError(f"generate_many: {slots.numel()} slots for {input_ids.shape[0]} prompts")
    with rows(model, slots), autocast(input_ids.device, bf16, model):
        return generate(model, input_ids, attention_mask, prefill_select=lambda index: set_rows(model, slots[index]),
                        **kwargs)
