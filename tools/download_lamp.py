"""Download and convert LaMP: `mta download-lamp` (`--help` lists its flags)."""
from mta.run.download import main

if __name__ == "__main__":
    main()
