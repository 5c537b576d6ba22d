"""The flags every stage command shares (`mta <command>`, mta.run.commands): which task, data, profile, seed and
users."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from pathlib import Path

from mta import methods
from mta.data.lamp import default_lamp_dir
from mta.log import log_to
from mta.profiles import Profile, refuse_removed, resolve_profile
from mta.run.executor import EXECUTORS, Executor
from mta.run.pipeline import Run
from mta.run.tensorboard import REPORT_TO, reporting


def parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="lamp4", help="lamp1..lamp5 or a task directory name (default lamp4)")
    ap.add_argument("--lamp-dir", type=Path, default=None,
                    help="processed LaMP data (default: $LAMP_DIR, else data/lamp)")
    ap.add_argument("--profile", default="auto", help="cpu, paper, or auto (paper on a GPU, else cpu)")
    ap.add_argument("--seed", default="0", help="a seed, or several ('0,1,2' or '0 1 2'): one run each")
    ap.add_argument("--users", default="all", help="'all' or the number of test users to run")
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="root of the run directories")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated subset of {','.join(methods.ALL)}, or 'all' for every one of "
                         f"them (default: {','.join(methods.DEFAULT)})")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a profile field, e.g. --set stack.lr=3e-4 --set n_anchors=8")
    ap.add_argument("--executor", default="auto", choices=EXECUTORS,
                    help="where stage 1b's and stage 3's groups run: in this process, in worker processes here, or on "
                         "Ray ($RAY_ADDRESS joins a cluster; without it a local one is started and stopped); auto: "
                         "this process or worker processes, whichever the machine's calibration measured faster")
    ap.add_argument("--workers", type=int, default=2, help="worker processes or Ray workers (each loads the model "
                                                           "once)")
    ap.add_argument("--worker-threads", type=int, default=1, help="torch threads (and Ray CPUs) per CPU worker")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report-to", default="none", choices=REPORT_TO,
                    help="tensorboard: every training step's loss, lr and gradient norm in <run>/tensorboard/ "
                         "(the tensorboard extra)")
    return ap


def override(profile: Profile, assignment: str) -> Profile:
    """Profile with one dotted field replaced: `n_anchors=8`, `stack.lr=3e-4`, `bank.targets=all`."""
    key, sep, text = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set {assignment!r}: expected FIELD=VALUE")
    head, _, leaf = key.partition(".")
    refuse_removed(f"--set {assignment!r}", head)
    fields = {f.name for f in dataclasses.fields(profile)}
    if head not in fields:
        raise ValueError(f"--set {assignment!r}: profile has no field {head!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False, "null": None}.get(text, text)  # JSON's spellings too
    if isinstance(value, list):
        value = tuple(value)
    try:
        if leaf:
            inner = getattr(profile, head)
            if not dataclasses.is_dataclass(inner) or leaf not in {f.name for f in dataclasses.fields(inner)}:
                raise ValueError(f"{head} has no field {leaf!r}")
            value = dataclasses.replace(inner, **{leaf: value})
        return dataclasses.replace(profile, **{head: value})
    except ValueError as e:  # the profile's own check, naming the allowed values
        raise ValueError(f"--set {assignment}: {e}") from None


def seeds_from_args(args: argparse.Namespace) -> list[int]:
    try:
        seeds = [int(s) for s in str(args.seed).replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--seed {args.seed!r}: expected integers, e.g. 0 or '0 1 2'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seed {args.seed!r}: give one or more distinct seeds")
    return seeds


def run_from_args(args: argparse.Namespace, seed: int | None = None) -> Run:
    profile = resolve_profile(args.profile)
    for assignment in args.set:
        profile = override(profile, assignment)
    if args.set:  # an overridden profile gets its own run directory
        profile = profile.replace(name="+".join([profile.name, *args.set]))
    return Run(task=args.task, profile=profile, lamp_dir=args.lamp_dir or default_lamp_dir(), runs=args.runs,
               seed=seeds_from_args(args)[0] if seed is None else seed,
               n_users=users_from_args(args.users),
               methods=methods.parse(args.methods), progress=not args.no_progress,
               executor=Executor(args.executor, workers=args.workers, threads=args.worker_threads))


def users_from_args(text: str) -> int | None:
    """`--users`: 'all' (None) or a positive number of test users."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--users must be 'all' or a positive integer; got {text!r}")
    return int(text)


def main(description: str, stage, argv: list[str] | None = None, add_args=None, across_seeds=None,
         prog: str | None = None, first_use=None):
    """Parse the shared arguments and return `stage(run)`, or `stage(run, args)` for a tool whose
    `add_args(parser)` adds its own; a bad input ends with one clear line. With several seeds, every
    seed's run is checked before the first starts, and `across_seeds(runs, outputs)` gets them all.
    `first_use(run)`, where given, makes the run's data before it is checked (mta.run.download)."""
    ap = parser(description, prog)
    if add_args:
        add_args(ap)
    args = ap.parse_args(argv)
    try:
        runs = [run_from_args(args, seed) for seed in seeds_from_args(args)]
        if len(runs) > 1 and across_seeds is None:
            raise ValueError("this tool runs one seed at a time")
        if first_use:
            first_use(runs[0])
        for run in runs:
            run.check_inputs()
        outputs = []
        for run in runs:
            with run.dir.lock(), log_to(run.dir.root / "run.log"), \
                    reporting(args.report_to, run.dir.root / "tensorboard"):
                run.write_config()
                outputs.append(stage(run, args) if add_args else stage(run))
        return across_seeds(runs, outputs) if len(runs) > 1 else outputs[0]
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
