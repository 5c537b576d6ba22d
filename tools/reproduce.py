"""Reproduce the paper's Table 1 and Table 2 rows for one LaMP task: every stage, every method.

    python tools/reproduce.py --task lamp4 --lamp-dir ../shared/lamp --profile cpu

Every finished unit is kept in runs/<task>/<profile>-seed<k>/, so a rerun resumes."""
from mta.cli import main
from mta.pipeline import reproduce

if __name__ == "__main__":
    main(__doc__, reproduce)
