"""Stage 1b: `mta train-bank` (`--help` lists its flags)."""
from mta.run.commands import run_command

if __name__ == "__main__":
    run_command("train-bank")
