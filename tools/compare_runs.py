"""Cross-check two runs: `mta compare-runs` (`--help` lists its flags)."""
from mta.run.compare import main

if __name__ == "__main__":
    main()
