"""The one strict check of a checkpoint's tensors against a model, for the LLM and the encoder loaders.

Every tensor is checked before any is loaded: keys the model has and the checkpoint lacks (missing),
keys the checkpoint has and the model lacks (unexpected), shapes, and the kind of dtype (a floating
tensor for an integer buffer, say; floating tensors may differ in precision, the loaders convert them).
The error names the checkpoint and the first few offending keys of each kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

SHOWN = 5  # offending keys named per kind of problem


class StateDictError(ValueError):
    """A checkpoint's tensors do not match the model they are loaded into."""


def check_state_dict(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    source: str | Path,
    ignore: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """The tensors of `tensors` to load into `model`: all but those under an `ignore` prefix.

    Raises StateDictError naming `source` unless they are exactly the model's state-dict keys (but the
    `optional` ones, which the checkpoint may omit, e.g. a tied `lm_head.weight`), with the same shapes
    and dtype kinds. `model` may live on the meta device.
    """
    ignore = tuple(ignore)
    kept = {k: v for k, v in tensors.items() if not k.startswith(ignore)} if ignore else dict(tensors)
    expected = model.state_dict()
    missing = sorted(expected.keys() - kept.keys() - set(optional))
    unexpected = sorted(kept.keys() - expected.keys())
    common = sorted(expected.keys() & kept.keys())
    shapes = [f"{k} {tuple(kept[k].shape)} != {tuple(expected[k].shape)}"
              for k in common if kept[k].shape != expected[k].shape]
    dtypes = [f"{k} {kept[k].dtype} for {expected[k].dtype}"
              for k in common if _kind(kept[k].dtype) != _kind(expected[k].dtype)]
    problems = [f"{label} {_first(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes), ("wrong dtype", dtypes))
                if keys]
    if problems:
        raise StateDictError(f"{source}: checkpoint does not match the model: " + "; ".join(problems))
    return kept


def header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as meta tensors (names, shapes, dtype kinds), from its header alone: no
    weight is read. A truncated or corrupt file fails naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            return {k: torch.empty(s.get_shape(), dtype=_header_dtype(s.get_dtype()), device="meta")
                    for k, s in slices.items()}
    except (SafetensorError, OSError) as e:
        raise StateDictError(f"{path}: corrupt safetensors file ({str(e).splitlines()[0]})") from None


def _header_dtype(name: str) -> torch.dtype:
    """A torch dtype of the kind of a safetensors dtype name (BOOL, I8..I64, U8..U64; F16, BF16, F8_*, ...)."""
    if name == "BOOL":
        return torch.bool
    return torch.int64 if name[0] in "IU" else torch.float32


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def _first(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")
