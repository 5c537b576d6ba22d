"""`--report-to tensorboard`: every training run a command finishes (a meta-LoRA, a population LoRA, a user's
stacked LoRA) as TensorBoard scalars in <run>/tensorboard/, `<what it trained>/loss`, `/lr` and `/grad_norm` per
optimizer step, written as each group finishes (`mta.log.report_steps`). Jobs that run on Ray workers report nothing;
their train logs keep the same series. TensorBoard is the `tensorboard` extra: `tensorboard --logdir runs`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from mta.log import on_report

REPORT_TO = ("none", "tensorboard")
INSTALL = '--report-to tensorboard needs TensorBoard: pip install -e ".[tensorboard]"'


@contextmanager
def tensorboard(folder: Path) -> Iterator[None]:
    """Within the block, every `report_steps(tag, **series)` is written to an event file in `folder`."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(INSTALL) from None
    writer = SummaryWriter(str(folder))

    def write(tag: str, series: dict[str, Sequence[float]]) -> None:
        for name, values in series.items():
            for step, value in enumerate(values, 1):
                writer.add_scalar(f"{tag}/{name}", value, step)
        writer.flush()

    try:
        with on_report(write):
            yield
    finally:
        writer.close()


def reporting(report_to: str, folder: Path):
    """The context `--report-to` asks for: `tensorboard(folder)`, or nothing."""
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to {report_to!r}; one of {', '.join(REPORT_TO)}")
    return tensorboard(folder) if report_to == "tensorboard" else nullcontext()
