"""Stage 3: per test user, fuse the top-K meta-LoRAs (Eq. 5), fold them into the base, train the
stacked rank-4 LoRA (Eq. 7) and generate; the same for every baseline; then results.json/.md.

Each (user, method) result is written to <run>/users/<user>/<method>.json and skipped on rerun."""
from mta.run.cli import main
from mta.run.pipeline import run_and_report

if __name__ == "__main__":
    main(__doc__, run_and_report)
