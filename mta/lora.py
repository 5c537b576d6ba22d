"""LoRA with PEFT's semantics: wrapper, injection, stacking, merging and PEFT-format adapter files.

A LoRALinear computes base(x) + scaling · B(A(dropout(x))), scaling = alpha / r (alpha / √r with
rsLoRA). Parameter names follow PEFT, so the state-dict key of a wrapped layer,
`model.layers.0.self_attn.q_proj.lora_A.weight`, is PEFT's file key without `base_model.model.`.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kernels.merge import check_weights, combine_factors, default_chunk, fold_, uses_workspace
from mta.rundir import atomic_path

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


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

    def to_peft(self) -> dict:
        """The fields of PEFT's `adapter_config.json` (LoRA, causal LM, no bias)."""
        targets = "all-linear" if isinstance(self.target_modules, str) else list(self.target_modules)
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout, "use_rslora": self.use_rslora,
            "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
            "use_dora": False, "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
            "exclude_modules": None, "revision": None,
        }

    @classmethod
    def from_peft(cls, cfg: dict, source: str = CONFIG_FILE) -> LoRAConfig:
        """Read a PEFT LoRA config, refusing features this implementation does not reproduce."""
        def need(key, ok):
            if key in cfg and not ok(cfg[key]):
                raise ValueError(f"{source}: unsupported {key}={cfg[key]!r}")
        need("peft_type", lambda v: v == "LORA")
        need("bias", lambda v: v == "none")
        need("fan_in_fan_out", lambda v: not v)
        need("use_dora", lambda v: not v)
        need("lora_bias", lambda v: not v)
        need("rank_pattern", lambda v: not v)
        need("alpha_pattern", lambda v: not v)
        need("modules_to_save", lambda v: not v)
        need("layers_to_transform", lambda v: v is None)
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in cfg:
                raise ValueError(f"{source}: missing field {key!r}")
        targets = cfg["target_modules"]
        if isinstance(targets, str) and targets != "all-linear":
            raise ValueError(f"{source}: regex target_modules={targets!r} is not supported; give a list of names")
        return cls(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                   target_modules=targets, use_rslora=bool(cfg.get("use_rslora", False)),
                   base_model_name_or_path=cfg.get("base_model_name_or_path"))


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update B @ A."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base = base.requires_grad_(False)
        # Half-precision bases get fp32 adapters, as PEFT's autocast_adapter_dtype does.
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
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

    def delta_weight(self) -> Tensor:
        """scaling · B @ A in fp32, shape (out, in)."""
        return self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold B @ A into the base weight (fp32 accumulation) and return the base layer."""
        fold_(self.base.weight, self.lora_B.weight * self.scaling, self.lora_A.weight)
        return self.base


@dataclass
class Adapter:
    """A LoRA adapter detached from any model: its config and factors per module path."""

    config: LoRAConfig
    A: dict[str, Tensor] = field(default_factory=dict)  # module path -> (r, in)
    B: dict[str, Tensor] = field(default_factory=dict)  # module path -> (out, r)
    source: str = "<memory>"

    def state_dict(self) -> dict[str, Tensor]:
        sd = {f"{m}.lora_A.weight": a for m, a in self.A.items()}
        sd.update({f"{m}.lora_B.weight": b for m, b in self.B.items()})
        return sd

    @classmethod
    def from_state_dict(cls, config: LoRAConfig, sd: dict[str, Tensor], source: str = "<memory>") -> Adapter:
        adapter = cls(config, source=source)
        for key, t in sd.items():
            module, sep, name = key.rpartition(".lora_")
            if not sep or name not in ("A.weight", "B.weight"):
                raise ValueError(f"{source}: unexpected tensor {key!r}")
            (adapter.A if name[0] == "A" else adapter.B)[module] = t
        for m in sorted(set(adapter.A) ^ set(adapter.B)):
            raise ValueError(f"{source}: module {m!r} has only one of lora_A/lora_B")
        for m, a in adapter.A.items():
            if a.shape[0] != config.r or adapter.B[m].shape[1] != config.r:
                raise ValueError(f"{source}: module {m!r} has rank {a.shape[0]}/{adapter.B[m].shape[1]}, "
                                 f"config says r={config.r}")
        return adapter


def _is_target(name: str, module: nn.Module, targets: tuple[str, ...] | str) -> bool:
    if not isinstance(module, nn.Linear) or name.split(".")[-1] == "lm_head":
        return False
    if isinstance(targets, str):
        return True
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: tuple[str, ...] | str) -> list[str]:
    """Paths of the nn.Linear modules a config targets (never lm_head), in model order."""
    names = [n for n, m in model.named_modules() if _is_target(n, m, targets)]
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
    for name, layer in lora_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.merge() if merge else layer.base)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into its base weight and unwrap it (PEFT's merge_and_unload)."""
    return _unwrap(model, merge=True)


def unload_lora(model: nn.Module) -> nn.Module:
    """Drop every LoRALinear, leaving the base weights untouched."""
    return _unwrap(model, merge=False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def get_adapter(model: nn.Module, config: LoRAConfig) -> Adapter:
    """The current LoRA factors of a model as a detached Adapter (copies)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers")
    return Adapter(config, {n: l.lora_A.weight.detach().clone() for n, l in layers.items()},
                   {n: l.lora_B.weight.detach().clone() for n, l in layers.items()})


def _check_modules(adapter: Adapter, modules: dict[str, nn.Linear]) -> None:
    """Exact module set and shapes of an adapter against a model's linears, naming the first mismatch."""
    for m in sorted(set(modules) - set(adapter.A)):
        raise ValueError(f"{adapter.source}: no tensors for module {m!r} (lora_A/lora_B missing)")
    for m in sorted(set(adapter.A) - set(modules)):
        raise ValueError(f"{adapter.source}: module {m!r} is not a target linear of this model")
    for m, lin in modules.items():
        a, b = adapter.A[m], adapter.B[m]
        if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features:
            raise ValueError(f"{adapter.source}: module {m!r} has A {tuple(a.shape)}, B {tuple(b.shape)} but the "
                             f"model's layer is ({lin.out_features}, {lin.in_features}); wrong base model?")


@torch.no_grad()
def set_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Copy an adapter's factors into the model's LoRA layers (same module set, ranks and shapes)."""
    layers = lora_layers(model)
    _check_modules(adapter, {n: l.base for n, l in layers.items()})
    for n, layer in layers.items():
        if adapter.A[n].shape != layer.lora_A.weight.shape:
            raise ValueError(f"{adapter.source}: module {n!r} has rank {adapter.A[n].shape[0]}, "
                             f"the model's LoRA has rank {layer.r}")
        layer.lora_A.weight.copy_(adapter.A[n])
        layer.lora_B.weight.copy_(adapter.B[n])
        layer.scaling = adapter.config.scaling


def save_adapter(adapter: Adapter, path: str | os.PathLike, extra: dict[str, str] | None = None) -> None:
    """Write a PEFT adapter directory (config + safetensors, plus `extra` text files by name)
    atomically: it appears complete or not at all."""
    for name in extra or {}:
        if Path(name).name != name or name in (CONFIG_FILE, WEIGHTS_FILE):
            raise ValueError(f"save_adapter: bad extra file name {name!r}")
    with atomic_path(path, is_dir=True) as tmp:
        tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter.config.to_peft(), indent=2, sort_keys=True) + "\n")
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read a PEFT LoRA adapter directory (ours or one written by PEFT / LLaMA-Factory)."""
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"adapter file missing: {f}")
    config = LoRAConfig.from_peft(json.loads(cfg_file.read_text()), str(cfg_file))
    sd = {}
    for key, t in load_file(weights_file).items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{weights_file}: tensor {key!r} lacks the PEFT prefix {PEFT_PREFIX!r}")
        key = key[len(PEFT_PREFIX):].replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        sd[key] = t
    return Adapter.from_state_dict(config, sd, str(weights_file))


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear that can carry LoRA, keyed by its PEFT path (a wrapped layer's base counts as itself)."""
    wrapped = lora_layers(model)
    out = {n: layer.base for n, layer in wrapped.items()}
    for n, m in model.named_modules():
        if n.rpartition(".")[0] not in wrapped and _is_target(n, m, "all"):
            out.setdefault(n, m)
    return out


def _plan(model: nn.Module, adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, nn.Linear]:
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
        _check_modules(a, {m: linears[m] for m in a.A})
    return {m: linears[m] for m in first.A}


def merged_factors(adapters: Sequence[Adapter], weights: Sequence[float], module: str,
                   mode: str = "delta", svd_rank: int | None = None) -> tuple[Tensor, Tensor]:
    """fp32 (B, A) of one module's merged update ΔW = B @ A (see kernels.merge for the modes)."""
    try:
        return combine_factors([a.A[module] for a in adapters], [a.B[module] for a in adapters],
                               [a.config.scaling for a in adapters], weights, mode, svd_rank)
    except ValueError as e:
        raise ValueError(f"module {module!r}: {e}") from None


@torch.no_grad()
def fold_adapters(model: nn.Module, adapters: Sequence[Adapter], weights: Sequence[float],
                  mode: str = "delta", base: BaseWeights | None = None) -> None:
    """W = W0 + ΔW_merged for every module the adapters target, one GEMM per module.

    With `base`, W0 is read from its pristine copy and every other saved module is reset to W0, so
    successive users never accumulate drift; without it the fold is in place on the current weights.
    """
    plan = _plan(model, adapters, weights)
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
    """A pristine copy of the base weights LoRA folds touch, so every user starts again from W0."""

    def __init__(self, model: nn.Module, targets: tuple[str, ...] | str = LLAMA_TARGETS,
                 device: torch.device | str | None = None):
        self.model = model
        self.linears = {m: lin for m, lin in _linears(model).items() if _is_target(m, lin, targets)}
        self.weights = {m: lin.weight.detach().to(device=device or lin.weight.device, copy=True)
                        for m, lin in self.linears.items()}

    @torch.no_grad()
    def restore(self, skip: set[str] = frozenset()) -> None:
        """Copy W0 back into every saved module (except `skip`)."""
        for m, lin in self.linears.items():
            if m not in skip:
                lin.weight.copy_(self.weights[m])


def stack_lora(model: nn.Module, adapters: Sequence[Adapter], weights: Sequence[float], config: LoRAConfig,
               mode: str = "delta", base: BaseWeights | None = None) -> list[str]:
    """Paper Eq. 7: fold the weighted merge of `adapters` into the base, then inject a fresh LoRA on top."""
    fold_adapters(model, adapters, weights, mode, base)
    return inject_lora(model, config)
