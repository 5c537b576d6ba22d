"""Stage 3: `mta run-experiment` (`--help` lists its flags)."""
from mta.run.commands import run_command

if __name__ == "__main__":
    run_command("run-experiment")
