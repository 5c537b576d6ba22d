"""LoRA with PEFT's semantics: the LoRALinear wrapper and its injection into a model.

A LoRALinear computes base(x) + scaling · B(A(dropout(x))), scaling = alpha / r (alpha / √r with
rsLoRA). Parameter names follow PEFT, so the state-dict key of a wrapped layer,
`model.layers.0.self_attn.q_proj.lora_A.weight`, is PEFT's file key without `base_model.model.`.
Adapters detached from a model and their files are in `mta.peft.adapter`; merging them in `mta.peft.fusion`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mta.ops.merge import fold_
from mta.ops.quant import QuantLinear, linear_dtype_device

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """Rank, alpha, dropout and target modules: a list of module-name suffixes or "all" (every linear but lm_head)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = LLAMA_TARGETS
    use_rslora: bool = False
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be positive, got {self.r}")
        if isinstance(self.target_modules, str) and self.target_modules not in ("all", "all-linear"):
            self.target_modules = (self.target_modules,)
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(sorted(self.target_modules))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or a quantised mta.ops.quant.QuantLinear, kept unmerged) plus a trainable B @ A."""

    is_wrapper = True  # a module around a base linear (`self.base`) that `unload_lora` removes

    def __init__(self, base: nn.Linear | QuantLinear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        self.base = base.requires_grad_(False)
        base_dtype, device = linear_dtype_device(base)
        # Half-precision bases get fp32 adapters, as PEFT's autocast_adapter_dtype does.
        dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        kw = dict(bias=False, device=device, dtype=dtype)
        self.lora_A = nn.Linear(base.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.scaling = r, alpha / (math.sqrt(r) if use_rslora else r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (..., out)
        h = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))) * self.scaling  # (..., r): scale the narrow side
        return (y + self.lora_B(h)).to(y.dtype)

    @torch.no_grad()
    def merge(self, name: str = "") -> nn.Linear:
        """Fold B @ A into the base weight (fp32 accumulation) and return the base layer."""
        refuse_quantized_fold(name or f"LoRALinear({self.base.out_features}, {self.base.in_features})", self.base)
        fold_(self.base.weight, self.lora_B.weight * self.scaling, self.lora_A.weight)
        return self.base


def refuse_quantized_fold(name: str, base: nn.Module) -> None:
    """Folding ΔW into a quantised base is not done: say so, naming the module."""
    if isinstance(base, QuantLinear):
        raise ValueError(f"module {name!r}: the base weight is quantised ({base.kind}), and a LoRA is not folded "
                         "into quantised weights; on a quantised base the fused LoRA is applied unmerged (the "
                         "per-row adapter path), or load the base with quant='none'")


def is_target(name: str, module: nn.Module, targets: tuple[str, ...] | str) -> bool:
    if not isinstance(module, (nn.Linear, QuantLinear)) or name.split(".")[-1] == "lm_head":
        return False
    if isinstance(targets, str):
        return True
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: tuple[str, ...] | str) -> list[str]:
    """Paths of the nn.Linear modules a config targets (never lm_head), in model order."""
    names = [n for n, m in model.named_modules() if is_target(n, m, targets)]
    if not names:
        raise ValueError(f"no nn.Linear in the model matches target_modules={targets!r}")
    return names


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every targeted linear in a LoRALinear, freeze everything else; returns the wrapped paths."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers; merge_lora() or unload_lora() them first")
    names = find_targets(model, config.target_modules)
    model.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), config.r, config.alpha, config.dropout,
                                         config.use_rslora))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _unwrap(model: nn.Module, merge: bool) -> nn.Module:
    wrapped = {n: m for n, m in model.named_modules() if getattr(m, "is_wrapper", False)}
    layers = lora_layers(model) if merge else wrapped
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.merge(name) if merge else layer.base)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into its base weight and unwrap it (PEFT's merge_and_unload)."""
    return _unwrap(model, merge=True)


def unload_lora(model: nn.Module) -> nn.Module:
    """Drop every LoRALinear (and every other wrapper of a base linear: Per-Pcs's gates, PROPER's mixture),
    leaving the base weights untouched."""
    return _unwrap(model, merge=False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


