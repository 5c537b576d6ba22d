"""What `--executor ray` costs: the scheduling overhead per job, and a simulated fan-out.

  overhead   N no-op jobs through W workers (mta.run.executor, as the pipeline submits them): milliseconds per job
  fan-out    200 jobs that each sleep --unit-s (a stand-in for a unit whose time is spent elsewhere: a GPU,
             I/O) over 8 workers, against the ideal 200 * unit / 8

run: python tools/bench_ray.py [--jobs 200] [--unit-s 0.2]
The real unit it compares with: a stage-3 MTA unit, about 8 s per user on 2 CPU cores (docs/results.md).

With --stage3 RUN_DIR (a finished `make reproduce` directory), stage 3 of the pipeline itself instead: every
method for the first --users test users on that run's artifacts, serially with 2 torch threads against 2 Ray
workers with 1 thread each, each in a fresh process; the Ray time includes starting the local cluster and
each worker loading the model and the bank (the serial run loads its model outside the timed part).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_multi import stage3_in_fresh_process

from mta.profiles import CPU
from mta.run.executor import Executor, Job, run_jobs
from mta.run.pipeline import Run


def nothing(run, job, cache) -> None:
    pass


def sleeping(run, job, cache) -> None:
    time.sleep(float(job.ids[0]))


def timed_fanout(jobs: int, workers: int, work, unit_s: float) -> float:
    run = Run(task="lamp4", profile=CPU, lamp_dir=Path("."), progress=False,
              executor=Executor("ray", workers=workers))
    batch = [Job(f"job {i}", "bench", (str(unit_s),)) for i in range(jobs)]
    t = time.perf_counter()
    failed = run_jobs(run, batch, work, "bench")
    assert not failed, failed
    return time.perf_counter() - t


def stage3_serial_against_ray(run_dir: Path, users: int) -> None:
    ways = {"serial, 2 threads": None, "Ray, 2 workers x 1 thread": Executor("ray", workers=2, threads=1)}
    results = {}
    for name, executor in ways.items():
        seconds, _, outputs = stage3_in_fresh_process(run_dir, users, None, None, executor)
        results[name] = seconds, outputs
        print(f"  {name}: {seconds:.0f} s", flush=True)
    ref_s, ref = results["serial, 2 threads"]
    print(f"stage 3, {users} users, every method, on {run_dir}")
    print(f"{'':28}{'seconds':>9}{'users/min':>11}{'against serial':>16}   (user, method) outputs identical")
    for name, (sec, out) in results.items():
        same = sum(out.get(k) == v for k, v in ref.items())
        print(f"{name:28}{sec:9.0f}{60 * users / sec:11.2f}{ref_s / sec:15.2f}x   {same}/{len(ref)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--unit-s", type=float, default=0.2)
    ap.add_argument("--stage3", type=Path, default=None, help="a finished run directory: stage 3 timed (see above)")
    ap.add_argument("--users", type=int, default=20)
    args = ap.parse_args()
    if args.stage3:
        return stage3_serial_against_ray(args.stage3, args.users)
    import ray  # one cluster for every figure, so run_jobs neither starts nor stops one

    ray.init(num_cpus=8, include_dashboard=False, logging_level="warning", log_to_driver=False)
    # Each figure against the same call with one job per worker: the difference is the jobs, not the
    # workers' start-up (importing torch: seconds on 2 cores).
    few, many = timed_fanout(2, 2, nothing, 0.0), timed_fanout(args.jobs, 2, nothing, 0.0)
    per_job = (many - few) / (args.jobs - 2) * 1e3
    print(f"overhead: {args.jobs} no-op jobs on 2 workers in {many:.2f} s, 2 in {few:.2f} s (start-up): "
          f"{per_job:.1f} ms per job, {per_job / 8000:.3%} of an 8 s stage-3 unit")
    few, many = timed_fanout(8, 8, sleeping, args.unit_s), timed_fanout(args.jobs, 8, sleeping, args.unit_s)
    ideal = (args.jobs - 8) * args.unit_s / 8
    print(f"fan-out: {args.jobs} jobs of {args.unit_s} s on 8 workers in {many:.1f} s, 8 in {few:.1f} s: the other "
          f"{args.jobs - 8} took {many - few:.2f} s against the ideal {ideal:.2f} s "
          f"({(many - few) / ideal - 1:+.1%})")
    ray.shutdown()


if __name__ == "__main__":
    main()
