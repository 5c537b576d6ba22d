"""Stage 1b: LoRAs trained on W0 (plus LoRAs applied unmerged) and saved as PEFT adapters with their train logs: the
meta-LoRAs of the bank, and the population-level LoRAs of the baselines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mta.log import report_steps
from mta.peft.adapter import Adapter, save_adapter
from mta.stages.engine import Engine, Examples, summarize


def train_adapter(engine: Engine, path: Path, examples: Examples, recipe, seed: int, on: Sequence[Adapter] = (),
                  probe: bool = False, made_from: dict | None = None) -> None:
    """One fresh LoRA on W0 (plus `on`, applied unmerged) trained on `examples`: `train_adapters` with a group of
    one. A population LoRA and a Per-Pcs sharer are `probe`d."""
    train_adapters(engine, [path], [examples], recipe, [seed], [made_from], on, probe)


def train_adapters(engine: Engine, paths: Sequence[Path], examples: Sequence[Examples], recipe,
                   seeds: Sequence[int], made_from: Sequence[dict | None], on: Sequence[Adapter] = (),
                   probe: bool = False) -> None:
    """A group of fresh LoRAs, each on W0 plus the same `on` LoRAs (weight 1, applied unmerged; Per-Pcs's task
    LoRA under a sharer), trained on its `examples` in one pass; each is saved as a PEFT adapter with its
    train_log.json and what it was `made_from` (`mta.stamps`): the meta-LoRAs of the bank, a population LoRA, a
    Per-Pcs sharer. A killed run loses the group in flight."""
    engine.reset()
    try:
        logs, _ = engine.personalize_many([list(on)] * len(paths), [[1.0] * len(on)] * len(paths), recipe, examples,
                                          seeds, probe)
        adapters = [engine.slot_adapter(u) for u in range(len(paths))]
    finally:
        engine.reset()
    for path, adapter, ex, train_log, inputs in zip(paths, adapters, examples, logs, made_from, strict=True):
        save_trained(adapter, path, ex, train_log, inputs, group=len(paths))


def save_trained(adapter: Adapter, path: Path, examples: Examples, log, made_from: dict | None,
                 group: int = 1) -> None:
    train_log = {"examples": len(examples), "prompts_cut": examples.cut, **summarize(log),
                 **({"group": group} if group > 1 else {})}
    save_adapter(adapter, path, extra={"train_log.json": json.dumps(train_log, indent=2)}, made_from=made_from)
    report_steps(f"{path.parent.name}/{path.name}", loss=log.losses, lr=log.lrs, grad_norm=log.grad_norms)
