"""Stage 1c: `mta train-baselines` (`--help` lists its flags)."""
from mta.run.commands import run_command

if __name__ == "__main__":
    run_command("train-baselines")
