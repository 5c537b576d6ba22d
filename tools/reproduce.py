"""Reproduce the paper's Table 1 and Table 2 rows for one LaMP task: every stage, every method.

    python tools/reproduce.py --task lamp4 --lamp-dir ../shared/lamp --profile cpu [--seed "0 1 2"]

Every finished unit is kept in runs/<task>/<profile>-seed<k>/, so a rerun resumes. With several seeds,
each runs in its own directory and runs/<task>/<profile>-seeds<a>-<b>-.../summary.md gathers them."""
from mta.run.cli import main
from mta.run.pipeline import reproduce, reproduce_seeds

if __name__ == "__main__":
    main(__doc__, reproduce, across_seeds=reproduce_seeds)
