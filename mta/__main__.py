"""`python -m mta <command> [flags]`: the same as the `mta` console script."""
from mta.run.commands import entry

if __name__ == "__main__":
    entry()
