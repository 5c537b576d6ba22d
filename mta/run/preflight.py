"""Checks, in seconds and before any work, that a run can start: its device, its models and its Ray cluster.

`preflight(profile, executor)` opens the LLM and each encoder the profile names as their loaders would, reading
headers, configs and tokenizers but no weights (`mta.models.checkpoint.check_llm`,
`mta.models.encoders.check_encoder`), asks torch for the device, and knocks on the Ray cluster RAY_ADDRESS names
(`mta.run.executor.check_ray_address`). Every problem found goes into one line of one PreflightError.
"""
from __future__ import annotations

import os

import torch

from mta.log import log
from mta.models.checkpoint import check_llm
from mta.models.encoders import check_encoder
from mta.profiles import Profile
from mta.run.executor import Executor, check_ray_address


class PreflightError(ValueError):
    """What stops a run before it starts, in one line."""


def preflight(profile: Profile, executor: Executor) -> None:
    """Raise PreflightError naming every problem with the device, the LLM, the encoders and the Ray cluster;
    log what was checked when there is none."""
    problems, found = [], []
    checks = [("device", profile.device, lambda: check_device(profile.device, profile.dtype)),
              ("llm", profile.llm, lambda: check_llm(profile.llm, profile.base_quant))]
    encoders: dict[str, list[str]] = {}  # one check for an encoder both stages use
    for field in ("stage1_encoder", "stage2_encoder"):
        encoders.setdefault(getattr(profile, field), []).append(field)
    checks += [("/".join(fields), name, lambda name=name: check_encoder(name)) for name, fields in encoders.items()]
    if executor.kind == "ray":
        checks.append(("RAY_ADDRESS", os.environ.get("RAY_ADDRESS"), lambda: check_ray_address(
            os.environ.get("RAY_ADDRESS"))))
    for field, value, check in checks:
        try:
            found.append(f"{field} {check() or value}")
        except Exception as e:  # whatever would stop the load stops the run here, on one line
            written = isinstance(e, (OSError, ValueError, RuntimeError, ImportError))  # messages meant for users
            text = str(e) if written else f"{type(e).__name__}: {e}"
            problems.append(f"{field} {value!r}: {' '.join(text.split())}")
    if problems:
        raise PreflightError(f"profile {profile.name}: " + "; ".join(problems))
    log("preflight: " + "; ".join(found))


def check_device(device: str, dtype: str = "float32") -> str:
    """`device` (cpu, cuda, cuda:<index>, mps) is present here and computes in `dtype`; returns its name."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
            raise ValueError(f"no CUDA device is available here (torch {torch.__version__}, built with {build}); "
                             f"use --set device=cpu or --profile cpu")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1}")
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{torch.cuda.get_device_name(index)} does not compute in bfloat16; "
                             f"use --set dtype=float16 or float32")
        return f"{device} ({torch.cuda.get_device_name(index)})"
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("MPS is not available here; use --set device=cpu")
    return device
