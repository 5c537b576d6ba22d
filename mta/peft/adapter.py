"""LoRA adapters detached from any model, and PEFT-format adapter directories.

An Adapter holds one LoRA's config and its factors per module path; `save_adapter` / `load_adapter`
write and read the directory PEFT writes (`adapter_config.json` + `adapter_model.safetensors`, keys
prefixed `base_model.model.`), so adapters move between this code, PEFT and LLaMA-Factory unchanged.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mta.files import atomic_path, read_json
from mta.peft.lora import LoRAConfig, lora_layers
from mta.stamps import FOLDER_STAMP, load_tensors, seal_folder

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def peft_config(config: LoRAConfig) -> dict:
    """The fields of PEFT's `adapter_config.json` (LoRA, causal LM, no bias)."""
    targets = "all-linear" if isinstance(config.target_modules, str) else list(config.target_modules)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": config.base_model_name_or_path,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False, "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
        "exclude_modules": None, "revision": None,
    }


def config_from_peft(cfg: dict, source: str = CONFIG_FILE) -> LoRAConfig:
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
    return LoRAConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
               target_modules=targets, use_rslora=bool(cfg.get("use_rslora", False)),
               base_model_name_or_path=cfg.get("base_model_name_or_path"))




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


def get_adapter(model: nn.Module, config: LoRAConfig) -> Adapter:
    """The current LoRA factors of a model as a detached Adapter (copies)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers")
    return Adapter(config, {n: layer.lora_A.weight.detach().clone() for n, layer in layers.items()},
                   {n: layer.lora_B.weight.detach().clone() for n, layer in layers.items()})


def check_modules(adapter: Adapter, modules: dict[str, nn.Linear]) -> None:
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
    check_modules(adapter, {n: layer.base for n, layer in layers.items()})
    for n, layer in layers.items():
        if adapter.A[n].shape != layer.lora_A.weight.shape:
            raise ValueError(f"{adapter.source}: module {n!r} has rank {adapter.A[n].shape[0]}, "
                             f"the model's LoRA has rank {layer.r}")
        layer.lora_A.weight.copy_(adapter.A[n])
        layer.lora_B.weight.copy_(adapter.B[n])
        layer.scaling = adapter.config.scaling


def save_adapter(adapter: Adapter, path: str | os.PathLike, extra: dict[str, str] | None = None,
                 made_from: dict | None = None) -> None:
    """Write a PEFT adapter directory (config + safetensors, plus `extra` text files by name, and with
    `made_from` the record of its inputs, `mta.stamps.seal_folder`) atomically: it appears complete or not at all."""
    for name in extra or {}:
        if Path(name).name != name or name in (CONFIG_FILE, WEIGHTS_FILE, FOLDER_STAMP):
            raise ValueError(f"save_adapter: bad extra file name {name!r}")
    with atomic_path(path, is_dir=True) as tmp:
        tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(adapter.config), indent=2, sort_keys=True) + "\n")
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        if made_from is not None:
            seal_folder(tmp, made_from)


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read a PEFT LoRA adapter directory (ours or one written by PEFT / LLaMA-Factory)."""
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"adapter file missing: {f}")
    config = config_from_peft(read_json(cfg_file), str(cfg_file))
    sd = {}
    for key, t in load_tensors(weights_file)[0].items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{weights_file}: tensor {key!r} lacks the PEFT prefix {PEFT_PREFIX!r}")
        key = key[len(PEFT_PREFIX):].replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        sd[key] = t
    return Adapter.from_state_dict(config, sd, str(weights_file))


