"""The pipeline's log line: a timestamp, written above any progress bar and appended to the file `log_to`
names (a run's run.log). `status`: the one-line state of the work in progress (a training run's step, tokens/s
and ETA), which goes to whoever `on_status` names (a stage's progress bar). `report_steps`: a finished training
run's per-step series, to whoever `on_report` names (`--report-to tensorboard`)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

_file: Path | None = None
_status: Callable[[str], None] | None = None
_report: Callable[[str, dict[str, Sequence[float]]], None] | None = None


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


@contextmanager
def on_report(listen: Callable[[str, dict[str, Sequence[float]]], None]) -> Iterator[None]:
    """Within the block, `report_steps(tag, **series)` calls `listen(tag, series)`."""
    global _report
    outer, _report = _report, listen
    try:
        yield
    finally:
        _report = outer


def report_steps(tag: str, **series: Sequence[float]) -> None:
    """A finished training run's per-step series (loss=..., lr=..., grad_norm=...), named by what it trained
    (`bank/<anchor>`, `stage3/<method>/<user>`), for the `on_report` listener if any."""
    if _report is not None:
        _report(tag, series)
