"""Where the independent groups of a stage run: in this process (`local`), or on Ray (`ray`).

A job is one group of stage 1b (anchors trained together) or of stage 3 (users of one unit of methods),
and `work(run, job, cache)` runs it and writes its artifacts atomically into the run directory, as a
local run does. On Ray each worker is an actor that holds one copy of the run (so the base model, the
bank and the baselines load once per worker, in `cache`) and runs the jobs the driver hands it, one at a
time. Workers write into the run directory themselves, which must therefore be on storage every worker
sees (a local disk on one node, a shared file system on a cluster): an adapter is tens of MiB, and the
atomic rename makes a half-written artifact impossible from any writer. The driver keeps the progress
bar, retries a job whose worker died on a fresh worker up to `retries` times, and then records the job
as failed while the rest of the run goes on. A local run also shows, as the bar's postfix, the training step in
progress within a job (`mta.log.status`), and logs one line per finished job with its last status (its training's
steps per second and first and last loss).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from mta.log import log, on_status

EXECUTORS = ("local", "ray")
# Fault injection for the tests: a worker exits abruptly on the first attempt at the job with this name.
CRASH_ENV = "MTA_TEST_CRASH_WORKER_ON"
IN_FLIGHT = 2  # jobs handed to one worker at a time
CONNECT_TIMEOUT_S = 5.0  # for the head of the cluster RAY_ADDRESS names to accept a TCP connection
IDS = {"bank": "anchor", "stage3": "user"}  # what a job's ids are, by its kind


@dataclass(frozen=True)
class Executor:
    kind: str = "local"
    workers: int = 2  # Ray actors
    threads: int = 1  # torch threads per worker on a CPU (each asks Ray for this many CPUs)
    retries: int = 2  # fresh workers a job gets after its worker died

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}; got {self.kind!r}")
        if self.workers < 1 or self.threads < 1 or self.retries < 0:
            raise ValueError(f"executor: workers and threads must be at least 1 and retries at least 0; "
                             f"got {self.workers}, {self.threads}, {self.retries}")


@dataclass(frozen=True)
class Job:
    name: str  # names the job in logs: "bank: a1, a2" or "stage 3, mta: u1, u2"
    kind: str  # "bank" or "stage3"
    ids: tuple[str, ...]  # anchor ids or user ids
    methods: tuple[str, ...] = ()  # stage 3: the unit of methods
    size: int = 1  # progress units (anchors, or (user, method) pairs)


Work = Callable[[object, Job, dict], None]


def run_jobs(run, jobs: Sequence[Job], work: Work, desc: str) -> dict[Job, str]:
    """Run every job with `run.executor`; returns the jobs that failed -> their error."""
    with tqdm(total=sum(j.size for j in jobs), desc=desc, disable=not run.progress) as bar:
        if run.executor.kind == "local":
            cache: dict = {}
            for k, job in enumerate(jobs, 1):
                done = watched(run, job, work, cache, bar.set_postfix_str)
                bar.update(job.size)
                what = f"{len(job.ids)} {IDS[job.kind]}{'s' * (len(job.ids) > 1)}" \
                    + (f": {'+'.join(job.methods)}" if job.methods else "")
                log(f"{desc}: group {k}/{len(jobs)} ({what}) {done}")
            return {}
        return _on_ray(run, jobs, work, bar)


def watched(run, job: Job, work: Work, cache: dict, show: Callable[[str], None]) -> str:
    """Run `job`, passing each `mta.log.status` of its work to `show`; returns "done in <seconds>" and the last
    status of each kind (its first word: a training's summary, a decode's last token), in the order they came."""
    last: dict[str, str] = {}
    tic = time.perf_counter()

    def keep(text: str) -> None:
        last[text.split(" ", 1)[0]] = text
        show(text)

    with on_status(keep):
        work(run, job, cache)
    return "; ".join([f"done in {time.perf_counter() - tic:.0f} s", *last.values()])


class Worker:
    """One Ray actor: a copy of the run, loaded once, running jobs one at a time."""

    def __init__(self, run, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.run, self.cache = run, {}

    def do(self, job: Job, work: Work, attempt: int) -> None:
        if attempt == 0 and os.environ.get(CRASH_ENV) == job.name:
            os._exit(1)
        log(f"worker {os.getpid()}: {job.name}")
        log(f"worker {os.getpid()}: {job.name} {watched(self.run, job, work, self.cache, lambda _: None)}")


def check_ray_address(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, with one line, when `address` (RAY_ADDRESS: "host:port" or "ray://host:port") names a
    cluster whose head does not accept a TCP connection; unset, "auto" and "local" need no cluster to answer."""
    if address in (None, "", "auto", "local"):
        return
    url = urllib.parse.urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        host, port = url.hostname, url.port
    except ValueError:
        host = port = None
    if not host or port is None:
        raise ValueError(f"RAY_ADDRESS {address!r}: expected host:port, ray://host:port, 'auto' or 'local'")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"RAY_ADDRESS {address!r}: no Ray cluster answers at {host}:{port} within {timeout:g} s "
                         f"({e.strerror or type(e).__name__}); start it (`ray start --head`) or unset "
                         f"RAY_ADDRESS") from None


def _on_ray(run, jobs: Sequence[Job], work: Work, bar) -> dict[Job, str]:
    check_ray_address(os.environ.get("RAY_ADDRESS"))
    ray = importlib.import_module("ray")
    ex = run.executor
    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else ex.workers * ex.threads,
                 include_dashboard=False, logging_level="warning", runtime_env={"env_vars": _passed_env()})
    gpus = 1 if run.profile.device.startswith("cuda") else 0
    actor = ray.remote(num_cpus=ex.threads, num_gpus=gpus, max_restarts=0)(Worker)
    spec = dataclasses.replace(run)  # a fresh copy: no loaded model travels to the workers
    try:
        # Two jobs in flight per worker: it starts the next as soon as one ends, without waiting for the
        # driver's round trip (a worker still runs its jobs one at a time).
        slots = {actor.remote(spec, ex.threads): 0 for _ in range(min(ex.workers, len(jobs)))}
        queue = [(job, 0) for job in jobs]
        running, failed = {}, {}
        while queue or running:
            for w in list(slots):
                while queue and slots[w] < IN_FLIGHT:
                    job, attempt = queue.pop(0)
                    running[w.do.remote(job, work, attempt)] = (job, attempt, w)
                    slots[w] += 1
            done, _ = ray.wait(list(running), num_returns=1)
            job, attempt, w = running.pop(done[0])
            if w in slots:
                slots[w] -= 1
            try:
                ray.get(done[0])
                bar.update(job.size)
            except ray.exceptions.RayActorError as e:
                if slots.pop(w, None) is not None:  # the first of its jobs to report the death replaces it
                    ray.kill(w)
                    slots[actor.remote(spec, ex.threads)] = 0
                if attempt < ex.retries:
                    log(f"{job.name}: its worker died; retry {attempt + 1} of {ex.retries}")
                    queue.append((job, attempt + 1))
                else:
                    failed[job] = f"worker died {attempt + 1} times: {type(e).__name__}"
                    bar.update(job.size)
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None
        return failed
    finally:
        if started:
            ray.shutdown()


def _passed_env() -> dict[str, str]:
    """What the workers must see as the driver does: the test fault hook and the package search path."""
    names = (CRASH_ENV, "PYTHONPATH", "LAMP_DIR", "HF_HOME", "OMP_NUM_THREADS")
    return {k: os.environ[k] for k in names if k in os.environ}
