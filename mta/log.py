"""The pipeline's log line: a timestamp, written above any progress bar."""
import time

from tqdm.auto import tqdm


def log(msg: str) -> None:
    tqdm.write(f"[mta {time.strftime('%H:%M:%S')}] {msg}")
