"""What a run was made with: the code version, the package versions, the machine, and the sha256 of every
data file it read. Gathered once per command: the first kept in `config.json`, each in `provenance.json`
(`mta.run.pipeline.Run.write_config`)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

PACKAGE = "mta"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def provenance(device: str, data: dict[str, str], executor: dict) -> dict:
    """One command's record: when it started, the code, the packages, the machine it ran on (the GPU only
    when `device` is a CUDA device), where its groups ran (`mta.run.executor.Executor`: kind, workers, threads)
    and the data files it read, `{path: sha256}`."""
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "code": code_version(),
            "python": platform.python_version(), "packages": package_versions(),
            "machine": machine(device), "executor": executor, "data": data}


def code_version() -> dict:
    """`{"commit", "dirty"}` of the git checkout holding the `mta` package, or `{"version"}` of the
    installed distribution where there is no checkout (or no git)."""
    root = Path(__file__).resolve().parents[2]  # the folder holding mta/
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is not None and Path(top).resolve() == root:
        commit, status = _git(root, "rev-parse", "HEAD"), _git(root, "status", "--porcelain")
        if commit is not None and status is not None:
            return {"commit": commit, "dirty": bool(status)}
    try:
        return {"version": importlib.metadata.version(PACKAGE)}
    except importlib.metadata.PackageNotFoundError:
        return {"version": None}


def _git(cwd: Path, *args: str) -> str | None:
    """git's output, or None where git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})  # a status never writes the index
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    """torch and every runtime dependency the installed `mta` distribution names (its extras left out):
    `{name: version}`, None for one not installed."""
    try:
        requires = importlib.metadata.requires(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    names = ["torch", *(_NAME.match(r).group() for r in requires if "extra" not in r.partition(";")[2])]
    return {name: _version(name) for name in dict.fromkeys(names)}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(device: str) -> dict:
    """The CPU model, the GPU the run uses (None on a CPU run) and torch's intra-op thread count."""
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(torch.device(device)) if cuda else None
    return {"cpu": cpu_model(), "gpu": gpu, "threads": torch.get_num_threads()}


def cpu_model() -> str:
    """`model name` of /proc/cpuinfo on Linux, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
