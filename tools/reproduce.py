"""Every stage, every method for one task: `mta reproduce` (`--help` lists its flags)."""
from mta.run.commands import run_command

if __name__ == "__main__":
    run_command("reproduce")
