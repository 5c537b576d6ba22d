"""Stage 1a: `mta select-anchors` (`--help` lists its flags)."""
from mta.run.commands import run_command

if __name__ == "__main__":
    run_command("select-anchors")
