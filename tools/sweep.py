"""The paper's analyses: one sweep over the same stage functions, reusing every cached artifact.

    python tools/sweep.py --what alpha|k|rank|bank|adapt|efficiency --task lamp4 [--points ...] [--methods ...]

Writes <run>/sweeps/<what>.json and .png (Figs. 3, 4, 5, 6 and 2; `adapt` chooses the CPU profile's
adaptation recipe on dev users, its points written lr:epochs:batch)."""
from mta.run.cli import main
from mta.run.sweeps import SWEEPS, run_sweep


def add_args(ap):
    ap.add_argument("--what", required=True, choices=[*SWEEPS, "efficiency"])
    ap.add_argument("--points", default=None, help="comma-separated values instead of the paper's grid")


def sweep(run, args):
    parse = SWEEPS[args.what].parse if args.what in SWEEPS else None
    values = tuple(map(parse, args.points.split(","))) if args.points and parse else None
    methods = run.methods if args.methods else None
    return run_sweep(run, args.what, values, methods)


if __name__ == "__main__":
    main(__doc__, sweep, add_args=add_args)
