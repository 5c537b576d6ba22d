"""The command line shared by the tools/ scripts: which task, data, profile, seed and users."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from pathlib import Path

from mta.lamp import default_lamp_dir
from mta.pipeline import Run
from mta.profiles import Profile, resolve_profile
from mta.stages import CONTROLS, METHODS


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--task", default="lamp4", help="lamp1..lamp5 or a task directory name (default lamp4)")
    ap.add_argument("--lamp-dir", type=Path, default=None, help="processed LaMP data (default: $LAMP_DIR)")
    ap.add_argument("--profile", default="auto", help="cpu, paper, or auto (paper on a GPU, else cpu)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--users", default="all", help="'all' or the number of test users to run")
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="root of the run directories")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated subset of {','.join(METHODS + CONTROLS)}, or 'all' for every one of "
                         f"them (default: {','.join(METHODS)})")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a profile field, e.g. --set stack.lr=3e-4 --set n_anchors=8")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def override(profile: Profile, assignment: str) -> Profile:
    """Profile with one dotted field replaced: `n_anchors=8`, `stack.lr=3e-4`, `bank.targets=all`."""
    key, sep, text = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set {assignment!r}: expected FIELD=VALUE")
    head, _, leaf = key.partition(".")
    fields = {f.name for f in dataclasses.fields(profile)}
    if head not in fields:
        raise ValueError(f"--set {assignment!r}: profile has no field {head!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if leaf:
        inner = getattr(profile, head)
        if not dataclasses.is_dataclass(inner) or leaf not in {f.name for f in dataclasses.fields(inner)}:
            raise ValueError(f"--set {assignment!r}: {head} has no field {leaf!r}")
        value = dataclasses.replace(inner, **{leaf: value})
    return dataclasses.replace(profile, **{head: value})


def run_from_args(args: argparse.Namespace) -> Run:
    profile = resolve_profile(args.profile)
    for assignment in args.set:
        profile = override(profile, assignment)
    if args.set:  # an overridden profile gets its own run directory
        profile = profile.replace(name="+".join([profile.name, *args.set]))
    if args.methods == "all":
        methods = METHODS + CONTROLS
    else:
        methods = tuple(m for m in (args.methods or ",".join(METHODS)).split(",") if m)
    unknown = sorted(set(methods) - set(METHODS + CONTROLS))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS + CONTROLS)}")
    return Run(task=args.task, profile=profile, lamp_dir=args.lamp_dir or default_lamp_dir(), runs=args.runs,
               seed=args.seed, n_users=None if args.users == "all" else int(args.users), methods=methods,
               progress=not args.no_progress)


def main(description: str, stage, argv: list[str] | None = None, add_args=None):
    """Parse the shared arguments and return `stage(run)`, or `stage(run, args)` for a tool whose
    `add_args(parser)` adds its own; a bad input ends with one clear line."""
    ap = parser(description)
    if add_args:
        add_args(ap)
    args = ap.parse_args(argv)
    try:
        run = run_from_args(args)
        run.write_config()
        return stage(run, args) if add_args else stage(run)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
