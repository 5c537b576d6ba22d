"""Where the independent groups of a stage run: in this process (`local`), in worker processes on this machine
(`processes`), or on Ray (`ray`).

A job is one group of stage 1b (anchors trained together), one part of stage 1c, or one group of stage 3 (users of
one unit of methods), and `work(run, job, cache)` runs it and writes its artifacts atomically into the run
directory, as a local run does. A `processes` worker is a spawned process with `threads` torch threads that loads
the run once and runs the jobs the driver sends it, one at a time; on a small CPU, two one-thread workers keep both
cores busier than one two-thread process (`mta.run.calibrate` measures which is faster). On Ray each worker is an
actor that holds one copy of the run (so the base model, the bank and the baselines load once per worker, in
`cache`) and runs the jobs the driver hands it, one at a time. Workers write into the run directory themselves,
which must therefore be on storage every worker sees (a local disk on one node, a shared file system on a cluster):
an adapter is tens of MiB, and the atomic rename makes a half-written artifact impossible from any writer. The
driver keeps the progress bar, retries a job whose worker died on a fresh worker up to `retries` times, and then
records the job as failed while the rest of the run goes on. A local or `processes` run also shows, as the bar's
postfix, the training step in progress within each running job (`mta.log.status`), and logs one line per finished
job with its last status (its training's steps per second and first and last loss). Where jobs run side by side,
`reproduce` hands stage 1c's parts to stage 1b's workers too (`mta.run.pipeline.stage1_bank`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import multiprocessing
import os
import pickle
import socket
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from tqdm.auto import tqdm

from mta.log import log, log_to, on_report, on_status, report_steps

EXECUTORS = ("auto", "local", "processes", "ray")
# Fault injection for the tests: a worker exits abruptly on the first attempt at the job with this name.
CRASH_ENV = "MTA_TEST_CRASH_WORKER_ON"
IN_FLIGHT = 2  # jobs handed to one worker at a time
CONNECT_TIMEOUT_S = 5.0  # for the head of the cluster RAY_ADDRESS names to accept a TCP connection
IDS = {"bank": "anchor", "stage3": "user"}  # what a job's ids are, by its kind


@dataclass(frozen=True)
class Executor:
    kind: str = "local"  # "auto": `local` or `processes`, as the run's calibration measured (mta.run.calibrate)
    workers: int = 2  # worker processes or Ray actors
    threads: int = 1  # torch threads per worker on a CPU (each asks Ray for this many CPUs)
    retries: int = 2  # fresh workers a job gets after its worker died

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}; got {self.kind!r}")
        if self.workers < 1 or self.threads < 1 or self.retries < 0:
            raise ValueError(f"executor: workers and threads must be at least 1 and retries at least 0; "
                             f"got {self.workers}, {self.threads}, {self.retries}")

    @property
    def side_by_side(self) -> bool:
        """Whether jobs run at the same time, in workers, rather than one after another in this process."""
        return self.kind in ("processes", "ray")

    def group_size(self, n: int, size: int) -> int:
        """Items per job for `n` items in groups of at most `size`: smaller where that gives every worker a job."""
        return max(1, min(size, math.ceil(n / self.workers))) if self.side_by_side else size


@dataclass(frozen=True)
class Job:
    name: str  # names the job in logs: "bank: a1, a2", "stage 1c: perpcs" or "stage 3, mta: u1, u2"
    kind: str  # "bank", "stage1c" or "stage3"
    ids: tuple[str, ...]  # anchor ids, the stage-1c part, or user ids
    methods: tuple[str, ...] = ()  # stage 3: the unit of methods
    size: int = 1  # progress units (anchors, a stage-1c part, or (user, method) pairs)


Work = Callable[[object, Job, dict], None]


def run_jobs(run, jobs: Sequence[Job], work: Work, desc: str) -> dict[Job, str]:
    """Run every job with `run.executor`; returns the jobs that failed -> their error."""
    with tqdm(total=sum(j.size for j in jobs), desc=desc, disable=not run.progress) as bar:
        if run.executor.kind == "local":
            cache: dict = {}
            for k, job in enumerate(jobs, 1):
                done = watched(run, job, work, cache, bar.set_postfix_str)
                bar.update(job.size)
                log(f"{desc}: group {k}/{len(jobs)} ({described(job)}) {done}")
            return {}
        if run.executor.kind == "processes":
            return _in_processes(run, jobs, work, bar, desc)
        if run.executor.kind == "ray":
            return _on_ray(run, jobs, work, bar)
        raise RuntimeError(f"executor {run.executor.kind!r}: settle it first (Run.settle)")


def described(job: Job) -> str:
    if job.kind == "stage1c":
        return job.ids[0]
    return f"{len(job.ids)} {IDS[job.kind]}{'s' * (len(job.ids) > 1)}" + (f": {'+'.join(job.methods)}" if job.methods
                                                                          else "")


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


def _serve(run, threads: int, work: Work, jobs: Sequence[Job], conn: Connection) -> None:
    """A `processes` worker: run the jobs whose index the driver sends (None: stop), sending back each job's
    statuses and training series (`mta.log`), then ("done", summary) or ("error", exception)."""
    import torch

    torch.set_num_threads(threads)
    cache: dict = {}
    with log_to(run.dir.root / "run.log"), on_report(lambda tag, series: conn.send(("report", None, (tag, series)))):
        while (task := conn.recv()) is not None:
            i, attempt = task
            if attempt == 0 and os.environ.get(CRASH_ENV) == jobs[i].name:
                os._exit(1)
            try:
                summary = watched(run, jobs[i], work, cache, lambda text, i=i: conn.send(("status", i, text)))
            except Exception as e:
                conn.send(("error", i, e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}")))
                return
            conn.send(("done", i, summary))


def _picklable(e: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(e))
        return True
    except Exception:
        return False


def _in_processes(run, jobs: Sequence[Job], work: Work, bar, desc: str) -> dict[Job, str]:
    """`jobs` over `run.executor.workers` spawned worker processes, each fed one job at a time; a job whose worker
    died goes to a fresh one, up to `retries` times."""
    ex, ctx = run.executor, multiprocessing.get_context("spawn")
    spec = dataclasses.replace(run, progress=False)  # a fresh copy, no model loaded; the driver keeps the bar
    queue = deque((i, 0) for i in range(len(jobs)))  # (job index, attempt)
    workers: dict[Connection, list] = {}  # the driver's end -> [process, (job index, attempt) running or None]
    statuses: dict[int, str] = {}  # job index -> its latest status
    failed: dict[Job, str] = {}
    finished = 0

    def feed(conn: Connection) -> None:  # the next job, or stop (a job retried later gets a fresh worker)
        workers[conn][1] = queue.popleft() if queue else None
        conn.send(workers[conn][1])

    def start() -> None:
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(spec, ex.threads, work, jobs, theirs), daemon=True)
        process.start()
        theirs.close()
        workers[ours] = [process, None]
        feed(ours)

    for _ in range(min(ex.workers, len(jobs))):
        start()
    try:
        while any(task is not None for _, task in workers.values()):
            for conn in wait([c for c, (_, task) in workers.items() if task is not None]):
                try:
                    kind, i, payload = conn.recv()
                except EOFError:  # the worker died
                    process, (i, attempt) = workers.pop(conn)
                    process.join()
                    statuses.pop(i, None)
                    if attempt < ex.retries:
                        log(f"{jobs[i].name}: its worker died (exit code {process.exitcode}); retry {attempt + 1} "
                            f"of {ex.retries}")
                        queue.append((i, attempt + 1))
                        start()
                    else:
                        failed[jobs[i]] = f"worker died {attempt + 1} times (exit code {process.exitcode})"
                        bar.update(jobs[i].size)
                    continue
                if kind == "status":
                    statuses[i] = payload
                    bar.set_postfix_str(" | ".join(statuses.values()))
                    continue
                if kind == "report":
                    report_steps(payload[0], **payload[1])
                    continue
                if kind == "error":
                    raise payload
                statuses.pop(i, None)
                finished += 1
                bar.update(jobs[i].size)
                log(f"{desc}: group {finished}/{len(jobs)} ({described(jobs[i])}) {payload}")
                feed(conn)
        return failed
    finally:
        for conn, (process, task) in workers.items():
            if task is not None and process.is_alive():
                with contextlib.suppress(OSError):
                    conn.send(None)
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()


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
    spec = dataclasses.replace(run, progress=False)  # a fresh copy, no model loaded; the driver keeps the bar
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
