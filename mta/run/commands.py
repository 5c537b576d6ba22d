"""MTA, the paper's pipeline for one LaMP task: `mta <command> [flags]` (or `python -m mta <command> ...`).
`mta <command> --help` lists that command's flags; the tools/ script of the same name runs the same command."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

from mta.run import cli, compare, download, plan, serve
from mta.run.pipeline import (
    Run,
    reproduce,
    reproduce_seeds,
    run_and_report,
    stage1_bank,
    stage1_select,
    stage1c_baselines,
    stage2_match_anchors,
)
from mta.run.sweeps import SWEEPS, run_sweep

REPRODUCE = """Reproduce the paper's Table 1 and Table 2 rows for one LaMP task: every stage, every method.

    mta reproduce --task lamp4 --lamp-dir ../shared/lamp --profile cpu [--seed "0 1 2"]

Without --lamp-dir or $LAMP_DIR the data is data/lamp in the repository; when the task is not there yet, it is
downloaded and converted first (mta download-lamp --authors-test-users).

Every finished unit is kept in runs/<task>/<profile>-seed<k>/, so a rerun resumes. With several seeds,
each runs in its own directory and runs/<task>/<profile>-seeds<a>-<b>-.../summary.md gathers them.

--plan: print what the run would do and cost here, and write <run>/plan.json, instead of running (mta plan)."""

SELECT_ANCHORS = """Stage 1a: embed every bank candidate (mean of per-item embeddings, Eq. 2), K-Means them into V
clusters and take the most active eligible user of each cluster as its anchor (Eq. 3).

Writes <run>/stage1/user_vectors.npy and anchors.json."""

TRAIN_BANK = """Stage 1b: train one meta-LoRA per anchor on the anchor's own history (the Meta-LoRA Bank).

Writes <run>/bank/<anchor>/ in PEFT's format, a group of anchors trained in one pass (the profile's group_size);
finished adapters are skipped."""

MATCH_ANCHORS = """Stage 2: embed each test user's whole history and its cosine similarity to every anchor (Eq. 4).
Writes <run>/stage2/matches.json; stage 3 takes the top K and alpha_i = sim_i / sum(sim) (Eq. 6) from it."""

TRAIN_BASELINES = """Stage 1c: the population-level parts of OPPU, Per-Pcs and PROPER, for those the run's methods
include.

OPPU: its task LoRA, <run>/population/oppu_task/ (one query with its gold per bank candidate).

Per-Pcs: <run>/perpcs/task_lora/, then per sharer (the stage-1 anchors) perpcs/sharers/<anchor>/ and
perpcs/gates/<anchor>.safetensors. PROPER: <run>/proper/population_lora/, then proper/group/ (the expert
mixture and its routers, trained on every target user's history items). Finished artifacts are skipped."""

RUN_EXPERIMENT = """Stage 3: per test user, fuse the top-K meta-LoRAs (Eq. 5), train the stacked rank-4 LoRA on top
(Eq. 7) and generate, a group of users in one pass (the fused LoRA applied unmerged); the same for every
baseline; then results.json/.md.

Each (user, method) result is written to <run>/users/<user>/<method>.json and skipped on rerun."""

SWEEP = """The paper's analyses: one sweep over the same stage functions, reusing every cached artifact.

    mta sweep --what alpha|k|rank|bank|adapt|efficiency --task lamp4 [--points ...] [--methods ...]

Writes <run>/sweeps/<what>.json and .png (Figs. 3, 4, 5, 6 and 2; `adapt` chooses the CPU profile's
adaptation recipe on dev users, its points written lr:epochs:batch)."""


def add_sweep_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--what", required=True, choices=[*SWEEPS, "efficiency"])
    ap.add_argument("--points", default=None, help="comma-separated values instead of the paper's grid")


def sweep(run: Run, args: argparse.Namespace) -> dict:
    parse = SWEEPS[args.what].parse if args.what in SWEEPS else None
    values = tuple(map(parse, args.points.split(","))) if args.points and parse else None
    methods = run.methods if args.methods else None
    return run_sweep(run, args.what, values, methods)


@dataclass(frozen=True)
class Command:
    """One subcommand: its line in `mta --help`, and `main(argv, prog=...)`, which parses its flags and runs it."""

    summary: str
    main: Callable[..., object]


def reproduce_or_plan(argv: list[str] | None = None, prog: str | None = None) -> object:
    """`mta reproduce`, or with --plan `mta plan` on the same flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--plan" in argv:
        return plan.main([a for a in argv if a != "--plan"], prog=prog)
    return cli.main(REPRODUCE, reproduce, argv, across_seeds=reproduce_seeds, first_use=download.first_use, prog=prog)


def stage_command(summary: str, doc: str, stage, **kwargs) -> Command:
    """A command over the flags every stage shares (task, data, profile, seeds, users: mta.run.cli)."""
    return Command(summary, functools.partial(cli.main, doc, stage, **kwargs))


COMMANDS = {
    "reproduce": Command("every stage and method for one task: the paper's Tables 1 and 2", reproduce_or_plan),
    "plan": Command("what reproduce would do and cost here, from a short calibration; trains nothing", plan.main),
    "select-anchors": stage_command("stage 1a: cluster the bank candidates, one anchor per cluster",
                                    SELECT_ANCHORS, stage1_select),
    "train-bank": stage_command("stage 1b: one meta-LoRA per anchor (the Meta-LoRA bank)", TRAIN_BANK,
                                stage1_bank),
    "match-anchors": stage_command("stage 2: each test user's similarity to every anchor", MATCH_ANCHORS,
                                   stage2_match_anchors),
    "train-baselines": stage_command("stage 1c: the population-level parts of OPPU, Per-Pcs and PROPER",
                                     TRAIN_BASELINES, stage1c_baselines),
    "run-experiment": stage_command("stage 3: every test user and method, then results.json/.md",
                                    RUN_EXPERIMENT, run_and_report),
    "sweep": stage_command("one analysis: alpha, k, rank, bank, adapt or efficiency", SWEEP, sweep,
                           add_args=add_sweep_args),
    "download-lamp": Command("download the official LaMP files, build the stages' layout", download.main),
    "compare-runs": Command("cross-check two runs of one task, method by method", compare.main),
    "serve": Command("an HTTP JSON service on a finished run: a new user's history in, answers out", serve.main),
}


def run_command(name: str, argv: list[str] | None = None) -> object:
    """`mta <name> <argv>` (argv: the process's own when None), returning what the command returns."""
    return COMMANDS[name].main(argv, prog=f"mta {name}")


def entry(argv: list[str] | None = None) -> None:
    """The `mta` console script and `python -m mta`; the flags after the command go to it unparsed."""
    listing = "\n".join(f"  {name:17}{command.summary}" for name, command in COMMANDS.items())
    ap = argparse.ArgumentParser(prog="mta", description=__doc__, epilog=f"commands:\n{listing}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=COMMANDS, metavar="command", help="one of the commands below")
    ap.add_argument("flags", nargs=argparse.REMAINDER, help="its flags (mta <command> --help lists them)")
    args = ap.parse_args(argv)
    run_command(args.command, args.flags)
