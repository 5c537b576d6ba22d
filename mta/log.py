"""The pipeline's log line: a timestamp, written above any progress bar and appended to the file `log_to`
names (a run's run.log). And `status`: the one-line state of the work in progress (a training run's step, tokens/s
and ETA), which goes to whoever `on_status` names (a stage's progress bar)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

_file: Path | None = None
_status: Callable[[str], None] | None = None


def log(msg: str) -> None:
    line = f"[mta {time.strftime('%H:%M:%S')}] {msg}"
    tqdm.write(line)
    if _file is not None:
        with open(_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")


@contextmanager
def log_to(path: Path | str) -> Iterator[None]:
    """Within the block, also append every log line to `path` (its folder created if missing)."""
    global _file
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    outer, _file = _file, Path(path)
    try:
        yield
    finally:
        _file = outer


@contextmanager
def on_status(show: Callable[[str], None]) -> Iterator[None]:
    """Within the block, `status(text)` calls `show(text)`."""
    global _status
    outer, _status = _status, show
    try:
        yield
    finally:
        _status = outer


def status(text: str) -> None:
    """The state of the work in progress, for the `on_status` listener if any."""
    if _status is not None:
        _status(text)
