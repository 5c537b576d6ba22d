"""Per-machine settings by measurement: a profile's `bf16`, `group_size` and `rows_per_pass` set to "auto" are
chosen at the start of a run from a short calibration of the run's own LLM on this machine (about 50 s for
SmolLM2 on 2 cores), cached per machine, torch build and model, and recorded in the run's config.json (so a
resumed run, a Ray worker or a sweep point keeps the choice its run made, whatever the cache holds later).

What is timed, each workload the same for every candidate (synthetic token ids, seeded):

  bf16           one training step of 4 users' stacked LoRAs (8 rows of `TOKENS` tokens), fp32 against bf16
                 autocast; bf16 only where the device computes it natively, and only if at least `BF16_GAIN`
                 faster (fp32 is the more exact)
  rows_per_pass  one training step of 8 users (16 rows) in the chosen precision, `ROWS` rows per forward
  group_size     a greedy decode of `DECODE_TOKENS` tokens for `GROUPS` users with per-row adapters, seconds per user
  executor       the rows_per_pass step with every thread in one process, against the same step run at the same
                 time in `WORKERS` spawned processes with the threads divided among them; worker processes (the
                 `processes` executor) only if their joint throughput is at least `SPLIT_GAIN` higher

Rows per pass and group size take the smallest candidate within `TIE` of the fastest (less memory). On a device
other than the CPU, `bf16 = "auto"` follows the device's native support and the other two are numbers (`Profile`),
and an "auto" executor is `local`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import queue
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mta.data.lamp import TaskSpec
from mta.files import read_json, write_json
from mta.log import log
from mta.models.checkpoint import load_llm
from mta.peft.multi_lora import generate_many, stack_many
from mta.precision import bf16_supported
from mta.profiles import MEASURED, Profile
from mta.run.executor import Executor
from mta.stages.engine import Engine, Examples

TOKENS = 96  # tokens per training row: 80 of prompt, 16 of target
ROWS = (4, 8, 16)
GROUPS = (4, 8, 16, 32)
DECODE_TOKENS = 8
REPEATS = 2  # timed runs of each workload after its warm-up; the least counts
BF16_GAIN = 0.10
TIE = 0.10
WORKERS = 2  # the split candidate: this many worker processes, the threads divided among them
SPLIT_GAIN = 0.10
SPLIT_TIMEOUT_S = 600
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine() -> dict:
    """What a calibration is valid for: the CPU, the kernels torch and oneDNN may use on it, its threads, the
    torch build."""
    name, flags = platform.machine(), set()
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {"cpu": name, "flags": [f for f in CPU_FLAGS if f in flags], "threads": torch.get_num_threads(),
            "kernels": torch.backends.cpu.get_cpu_capability(),
            "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "all"),
            "torch": torch.__version__, "torch_git": torch.version.git_version}


def cache_path(key: dict) -> Path:
    root = Path(os.environ.get("MTA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mta")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / "calibration" / f"{digest}.json"


def settle(profile: Profile, task: TaskSpec, llm: Callable[[], tuple]) -> tuple[Profile, dict | None]:
    """`profile` with every "auto" field chosen, and the record of how (None when none was "auto"). `llm()` gives
    the run's (model, tokenizer), loaded only when the cache has no calibration for this machine."""
    fields = profile.unsettled
    if not fields:
        return profile, None
    if profile.device != "cpu":  # bf16 alone (`Profile`): where the device has it
        return profile.replace(bf16=bf16_supported(profile.device)), {"source": f"native bf16 on {profile.device}"}
    key = {"machine": machine(), "llm": profile.llm, "base_quant": profile.base_quant, "dtype": profile.dtype}
    path, record = cache_path(key), None
    if path.exists():
        try:
            record = read_json(path)
        except (OSError, ValueError) as e:
            log(f"calibration cache {path} unreadable ({e}); measuring again")
        if record is not None and (record.get("key") != key
                                   or not {*MEASURED, "executor"} <= set(record.get("chosen", {}))):
            record = None
    if record is None:
        tic, busy = time.perf_counter(), os.getloadavg()[0]
        log(f"calibrating {', '.join(fields)} and the executor on this machine (once; cached in {path})")
        model, tok = llm()
        with torch.random.fork_rng(devices=[]):  # the run's own random state is left as it was
            times = measure(timing_engine(profile, task, model, tok))
            settings = choose(times)
            times["executor"] = {"one process": times["rows_per_pass"][settings["rows_per_pass"]],
                                 **split_step(profile, task, settings["bf16"], settings["rows_per_pass"])}
        record = {"key": key, "measured": times, "chosen": {**settings, "executor": chosen_split(times["executor"])},
                  "load_average": busy,
                  "seconds": round(time.perf_counter() - tic, 1)}
        write_json(path, record)
        log(f"calibration: {record['chosen']} in {record['seconds']} s")
        if busy > (os.cpu_count() or 1):
            log(f"calibration: load average {busy:.1f} on {os.cpu_count()} cores as it began; other work shared the "
                f"cores, so the choice may not hold on a machine of its own (delete {path} to measure again)")
    chosen = {f: record["chosen"][f] for f in fields}
    return profile.replace(**chosen), {**record, "cache": str(path), "fields": fields}


def timing_engine(profile: Profile, task: TaskSpec, model, tok) -> Engine:
    """An engine for the workloads: each sets its own precision and rows per pass (`train_step`, `decode`)."""
    return Engine(profile.replace(bf16=False, group_size=1, rows_per_pass=None), task, model, tok)


def llm_of(profile: Profile) -> tuple:
    """(model, tokenizer) of the profile's LLM."""
    return load_llm(profile.llm, dtype=profile.torch_dtype, device=profile.device, quant=profile.base_quant)


def executor_of(record: dict | None, given: Executor) -> Executor:
    """`given`, its kind "auto" settled by a calibration `record` (None: `local`)."""
    if given.kind != "auto":
        return given
    split = (record or {}).get("chosen", {}).get("executor")
    if not split:
        return dataclasses.replace(given, kind="local")
    return dataclasses.replace(given, kind="processes", workers=split["workers"], threads=split["threads"])


def split_gain(seconds: dict) -> float | None:
    """Steps per second of `WORKERS` processes timed on the same step at the same time, over one process with every
    thread (None: not measured)."""
    return seconds["workers"] * seconds["one process"] / seconds["split"] if "workers" in seconds else None


def chosen_split(seconds: dict) -> dict | None:
    """{"workers", "threads"} when the split's throughput was at least `SPLIT_GAIN` higher; else None (`local`)."""
    gain = split_gain(seconds)
    return {"workers": seconds["workers"], "threads": seconds["threads"]} if gain and gain >= 1 + SPLIT_GAIN else None


def split_step(profile: Profile, task: TaskSpec, bf16: bool, rows_per_pass: int) -> dict:
    """The rows_per_pass workload's seconds in `WORKERS` spawned processes at once, the threads divided among them:
    {"workers", "threads", "split": the slowest process's seconds}; {} with fewer threads than workers."""
    threads = torch.get_num_threads() // WORKERS
    if threads < 1:
        return {}
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_split_worker, args=(profile, task, bf16, rows_per_pass, threads, start, results),
                         daemon=True) for _ in range(WORKERS)]
    for proc in procs:
        proc.start()
    try:
        seconds = [results.get(timeout=SPLIT_TIMEOUT_S) for _ in procs]
    except queue.Empty:
        raise RuntimeError(f"calibration: the {WORKERS} timing processes gave no result in {SPLIT_TIMEOUT_S} s "
                           f"(exit codes {[p.exitcode for p in procs]})") from None
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    return {"workers": WORKERS, "threads": threads, "split": max(seconds)}


def _split_worker(profile: Profile, task: TaskSpec, bf16: bool, rows_per_pass: int, threads: int, start, results
                  ) -> None:
    torch.set_num_threads(threads)
    engine = timing_engine(profile, task, *llm_of(profile))
    start.wait()
    results.put(train_step(engine, bf16, 8, rows_per_pass))


def choose(times: dict) -> dict:
    """The settings the measurements favour (module docstring): seconds per workload, by candidate."""
    return {"bf16": prefers_bf16(times["precision"]), "rows_per_pass": least_within(times["rows_per_pass"]),
            "group_size": least_within({g: s / int(g) for g, s in times["group_size"].items()})}


def prefers_bf16(seconds: dict) -> bool:
    """bf16 where it was measured and took at most 1 - `BF16_GAIN` of fp32's time."""
    return "bf16" in seconds and seconds["bf16"] <= (1 - BF16_GAIN) * seconds["fp32"]


def least_within(seconds: dict) -> int:
    """The smallest candidate whose seconds are within `TIE` of the least."""
    best = min(seconds.values())
    return min(int(c) for c, s in seconds.items() if s <= (1 + TIE) * best)


def measure(engine: Engine) -> dict:
    """Seconds of each workload (module docstring), the least of `REPEATS` after a warm-up, on `engine`'s model (its
    profile's bf16 and rows per pass are set for each workload)."""
    native = bf16_supported(engine.profile.device)
    precision = {"fp32": train_step(engine, False, 4, 8)}
    if native:
        precision["bf16"] = train_step(engine, True, 4, 8)
    bf16 = prefers_bf16(precision)
    rows = {r: train_step(engine, bf16, 8, r) for r in ROWS}
    groups = {g: decode(engine, bf16, g) for g in GROUPS}
    return {"precision": precision, "rows_per_pass": rows, "group_size": groups}


def synthetic(engine: Engine, rows: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size
    return torch.randint(vocab // 4, vocab // 2, (rows, length), generator=generator)  # (rows, length)


def train_step(engine: Engine, bf16: bool, users: int, rows_per_pass: int) -> float:
    """Seconds of one optimizer step of `users` stacked LoRAs, two rows each, `rows_per_pass` rows a forward."""
    ids = synthetic(engine, 2 * users, TOKENS, seed=users)
    data = [Examples([(row[:-16].tolist(), row[-16:].tolist()) for row in ids[2 * u: 2 * u + 2]], 0)
            for u in range(users)]
    recipe = dataclasses.replace(engine.profile.stack, epochs=1, batch_size=2, grad_accum=1, max_steps=1)
    engine.profile = engine.profile.replace(bf16=bf16, rows_per_pass=rows_per_pass)
    seconds = []
    for _ in range(1 + REPEATS):
        tic = time.perf_counter()
        engine.personalize_many([[]] * users, [[]] * users, recipe, data, list(range(users)))
        seconds.append(time.perf_counter() - tic)
        engine.reset()
    return round(min(seconds[1:]), 4)


def decode(engine: Engine, bf16: bool, users: int) -> float:
    """Seconds of a greedy decode of `DECODE_TOKENS` tokens for `users` prompts, each with its own adapters."""
    ids = synthetic(engine, users, TOKENS // 2, seed=users)
    config = engine.profile.stack.lora_config(engine.profile.llm)
    stack_many(engine.model, [[]] * users, [[]] * users, config, engine.profile.merge_space, list(range(users)))
    seconds = []
    try:
        for _ in range(1 + REPEATS):
            tic = time.perf_counter()
            generate_many(engine.model, ids, None, list(range(users)), bf16, max_new_tokens=DECODE_TOKENS)
            seconds.append(time.perf_counter() - tic)
    finally:
        engine.reset()
    return round(min(seconds[1:]), 4)
