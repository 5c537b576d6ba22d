"""The paper's analyses: one sweep over the same stage functions, reusing every cached artifact.

    python tools/sweep.py --what alpha|k|rank|bank|efficiency|adapt_lr|adapt_epochs --task lamp4

Writes <run>/sweeps/<what>.json and .png (Figs. 3, 4, 5, 6 and 2; adapt_* choose the CPU profile's
adaptation recipe on dev users)."""
from mta.cli import main
from mta.sweeps import SWEEPS, run_sweep


def add_args(ap):
    ap.add_argument("--what", required=True, choices=[*SWEEPS, "efficiency"])
    ap.add_argument("--points", default=None, help="comma-separated values instead of the paper's grid")


def number(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def sweep(run, args):
    values = tuple(map(number, args.points.split(","))) if args.points else None
    return run_sweep(run, args.what, values)


if __name__ == "__main__":
    main(__doc__, sweep, add_args=add_args)
