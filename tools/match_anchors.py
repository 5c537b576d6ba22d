"""Stage 2: `mta match-anchors` (`--help` lists its flags)."""
from mta.run.commands import run_command

if __name__ == "__main__":
    run_command("match-anchors")
