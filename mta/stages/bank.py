"""Stage 1b: LoRAs trained on W0 (plus any folded LoRA) and saved as PEFT adapters with their train logs: the
meta-LoRAs of the bank, and the population-level LoRAs of the baselines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mta.peft.adapter import Adapter, save_adapter
from mta.stages.engine import Engine, Examples, summarize


def train_adapter(engine: Engine, path: Path, examples: Examples, recipe, seed: int, on: Sequence[Adapter] = (),
                  probe: bool = False, made_from: dict | None = None) -> None:
    """One fresh LoRA on W0 (plus the folded `on`) trained on `examples`, saved as a PEFT adapter with its
    train_log.json and what it was `made_from` (`mta.stamps`): a meta-LoRA of the bank, a population LoRA, a
    Per-Pcs sharer (these two `probe`d)."""
    engine.reset()
    train_log, _ = engine.personalize(on, [1.0] * len(on), recipe, examples, seed, probe=probe)
    adapter = engine.trained_adapter()
    engine.reset()
    save_trained(adapter, path, examples, train_log, made_from)


def train_adapters(engine: Engine, paths: Sequence[Path], examples: Sequence[Examples], recipe,
                   seeds: Sequence[int], made_from: Sequence[dict | None]) -> None:
    """`train_adapter` for a group of LoRAs on W0 in one pass (the batched engine), each saved as it would be
    alone; a killed run loses the group in flight."""
    engine.reset()
    try:
        logs, _ = engine.personalize_many([[]] * len(paths), [[]] * len(paths), recipe, examples, seeds)
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
