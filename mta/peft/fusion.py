"""Merging LoRAs into the base weights: Eq. 5 (the fused bank LoRA) and Eq. 7 (a fresh LoRA on top).

The merge modes themselves are `mta.ops.merge.combine_factors`; the profile's `merge_space` is the one
default (Eq. 5 literally, `param`), so every function here takes the mode as an argument.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mta.ops.merge import check_weights, combine_factors, default_chunk, fold_, uses_workspace
from mta.ops.quant import QuantLinear, nf4_roundtrip
from mta.ops.rowlora import RowLoRALinear
from mta.peft.adapter import Adapter, check_modules
from mta.peft.lora import LLAMA_TARGETS, LoRAConfig, LoRALinear, inject_lora, is_target, refuse_quantized_fold


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear that can carry LoRA, keyed by its PEFT path (a wrapped layer's base counts as itself)."""
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, RowLoRALinear))}
    out = {n: layer.base for n, layer in wrapped.items()}
    for n, m in model.named_modules():
        if n.rpartition(".")[0] not in wrapped and is_target(n, m, "all"):
            out.setdefault(n, m)
    return out


def target_linears(model: nn.Module, adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, nn.Linear]:
    """Validate adapters against each other and the model; returns the linears they target."""
    check_weights(weights, len(adapters))
    bases = {a.config.base_model_name_or_path for a in adapters} - {None, ""}
    if len(bases) > 1:
        raise ValueError(f"adapters were trained on different base models: {sorted(bases)}")
    linears = _linears(model)
    first = adapters[0]
    for a in adapters:
        if set(a.A) != set(first.A):
            m = sorted(set(a.A) ^ set(first.A))[0]
            raise ValueError(f"{a.source} and {first.source} target different modules, e.g. {m!r}")
        for m in a.A:
            if m not in linears:
                raise ValueError(f"{a.source}: module {m!r} is not a linear layer of this model; wrong base model?")
        check_modules(a, {m: linears[m] for m in a.A})
    return {m: linears[m] for m in first.A}


def merged_factors(adapters: Sequence[Adapter], weights: Sequence[float], module: str,
                   mode: str, svd_rank: int | None = None) -> tuple[Tensor, Tensor]:
    """fp32 (B, A) of one module's merged update ΔW = B @ A (see mta.ops.merge for the modes)."""
    try:
        return combine_factors([a.A[module] for a in adapters], [a.B[module] for a in adapters],
                               [a.config.scaling for a in adapters], weights, mode, svd_rank)
    except ValueError as e:
        raise ValueError(f"module {module!r}: {e}") from None


@torch.no_grad()
def fold_adapters(model: nn.Module, adapters: Sequence[Adapter], weights: Sequence[float],
                  mode: str, base: BaseWeights | None = None) -> None:
    """W = W0 + ΔW_merged for every module the adapters target, one GEMM per module.

    With `base`, W0 is read from its pristine copy and every other saved module is reset to W0, so
    successive users never accumulate drift; without it the fold is in place on the current weights.
    """
    plan = target_linears(model, adapters, weights)
    for m, lin in plan.items():
        refuse_quantized_fold(m, lin)
    if base is not None:
        for m in plan:
            if m not in base.weights:
                raise ValueError(f"{adapters[0].source}: module {m!r} has no pristine copy in BaseWeights "
                                 f"(create it with targets covering the adapters' target_modules)")
        base.restore(skip=set(plan))
    folds = {m: (lin.weight if base is None else base.weights[m], None if base is None else lin.weight)
             for m, lin in plan.items()}  # module -> (W0, out)
    workspace = None
    if any(uses_workspace(w0, out) for w0, out in folds.values()):
        # One fp32 chunk shared by all chunked folds, a third of the largest weight: with the factors and the
        # GEMM's own buffers (0.5-0.8 MiB measured on CPU), the extra memory stays below the largest weight.
        largest = max(lin.weight.numel() * lin.weight.element_size() // 4 for lin in plan.values())
        widest = max(lin.in_features for lin in plan.values())
        device = next(iter(plan.values())).weight.device
        workspace = torch.empty(max(min(default_chunk(), largest // 3), widest), device=device)
    for m, (w0, out) in folds.items():
        B, A = merged_factors(adapters, weights, m, mode)
        fold_(w0, B, A, out=out, workspace=workspace)


class BaseWeights:
    """A pristine copy of the base weights LoRA folds touch, so every user starts again from W0.
    Quantised layers (QuantLinear) are never folded into, so they need no copy and get none."""

    def __init__(self, model: nn.Module, targets: tuple[str, ...] | str = LLAMA_TARGETS,
                 device: torch.device | str | None = None):
        self.model = model
        self.linears = {m: lin for m, lin in _linears(model).items()
                        if is_target(m, lin, targets) and not isinstance(lin, QuantLinear)}
        self.weights = {m: lin.weight.detach().to(device=device or lin.weight.device, copy=True)
                        for m, lin in self.linears.items()}

    @torch.no_grad()
    def restore(self, skip: set[str] = frozenset()) -> None:
        """Copy W0 back into every saved module (except `skip`)."""
        for m, lin in self.linears.items():
            if m not in skip:
                lin.weight.copy_(self.weights[m])


def base_linears(model: nn.Module) -> list[nn.Linear]:
    """The model's own linears but lm_head, a wrapped layer's base counted as itself (taken before any
    adapter adds linears of its own, these are what a quantised checkpoint holds in 4 bits)."""
    return [lin for lin in _linears(model).values() if not isinstance(lin, QuantLinear)]


@contextmanager
def nf4_base(linears: Sequence[nn.Linear]) -> Iterator[None]:
    """Inside the block `linears` (`base_linears`) compute on a 4-bit NF4 base as transformers loads one through
    bitsandbytes (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`, lm_head left
    unquantised): each multiplies by the NF4 round-trip of the weight it holds now (`mta.ops.quant.nf4_roundtrip`,
    what bitsandbytes dequantises to the compute dtype before its matmul), with whatever is folded into W
    quantised with it and the LoRA layers unmerged on top. W comes back after."""
    saved = [lin.weight.detach().clone() for lin in linears]
    try:
        with torch.no_grad():
            for lin in linears:
                lin.weight.copy_(nf4_roundtrip(lin.weight))
        yield
    finally:
        with torch.no_grad():
            for lin, weight in zip(linears, saved, strict=True):
                lin.weight.copy_(weight)


def stack_lora(model: nn.Module, adapters: Sequence[Adapter], weights: Sequence[float], config: LoRAConfig,
               mode: str, base: BaseWeights | None = None) -> list[str]:
    """Paper Eq. 7: fold the weighted merge of `adapters` into the base, then inject a fresh LoRA on top.
    With no adapters the fresh LoRA sits on the weights as they are (W0 for Adapt-only, OPPU and the bank)."""
    if adapters:
        fold_adapters(model, adapters, weights, mode, base)
    return inject_lora(model, config)
