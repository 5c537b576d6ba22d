"""The engine: the base model, its tokenizer and a pristine copy of W0, which sets up a method's weights (one
user's, or a group's as per-row adapters), trains the LoRA on top and generates."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mta.data.lamp import TaskSpec, User, training_pairs
from mta.models.generation import generate
from mta.models.tokenizer import Tokenizer
from mta.peft.adapter import Adapter, get_adapter
from mta.peft.fusion import BaseWeights, fold_adapters, stack_lora
from mta.peft.lora import unload_lora
from mta.peft.multi_lora import generate_many, get_row_adapter, stack_many, unload_row_lora
from mta.precision import autocast
from mta.profiles import LoRASpec, Profile
from mta.seeding import derive_seed, seeded_subset
from mta.training.train import TrainConfig, TrainLog, train
from mta.training.train_many import train_many


def fit_text(tok: Tokenizer, text: str, max_tokens: int) -> str:
    """Drop tokens from the start of `text` (the oldest history) so it fits in `max_tokens`."""
    ids = tok.encode(text)
    return text if len(ids) <= max_tokens else tok.decode(ids[-max_tokens:])


def summarize(log: TrainLog) -> dict:
    probe = {"probe_before": log.probe[0], "probe_after": log.probe[1], "probe_seconds": log.probe_seconds} \
        if log.probe else {}
    return {"steps": len(log.losses), "first_loss": log.losses[0], "last_loss": log.losses[-1], **probe,
            "lrs": log.lrs, "tokens": log.tokens, "seconds": log.seconds}


@dataclass
class Engine:
    """The base model, its tokenizer and a pristine copy of W0: everything that trains and generates.
    `profile.bf16` is the bool its Run resolved."""

    profile: Profile
    task: TaskSpec
    model: torch.nn.Module
    tok: Tokenizer

    def __post_init__(self):
        self.base = BaseWeights(self.model, targets=self.profile.bank.targets, device="cpu")
        self.folded = False  # whether W differs from W0
        self.lora_config = None  # of the LoRA `personalize` last trained
        self.prompt_budget = self.profile.max_prompt_tokens - len(self.tok.chat_prompt(""))

    def examples(self, history: list[dict], seed: int, limit: int | None = None, bank: bool = False
                 ) -> list[tuple[list[int], list[int]]]:
        """Tokenized (prompt, response) training examples; `bank` builds a meta-LoRA's in the format
        the profile's `bank_data` names."""
        pairs = training_pairs(self.task, history, seed=seed, bank=bank and self.profile.bank_data == "authors_code",
                               style=self.profile.prompt_style)
        return self.tokenize(seeded_subset(pairs, limit, seed))

    def population_examples(self, users: Sequence[User], seed: int, limit: int | None = None
                            ) -> list[tuple[list[int], list[int]]]:
        """The population's training examples (Per-Pcs's task LoRA, PROPER's population LoRA): every user's
        history items in the adaptation format, at most `limit` of them drawn at random (seeded)."""
        slots = [(i, j) for i, u in enumerate(users) for j in range(len(u.history)) if len(u.history) >= 2]
        slots = seeded_subset(slots, limit, seed)
        pairs = []
        for i in sorted({i for i, _ in slots}):
            mine = training_pairs(self.task, users[i].history, seed=derive_seed(seed, users[i].user_id),
                                  style=self.profile.prompt_style)
            pairs += [mine[j] for ii, j in slots if ii == i and j < len(mine)]
        return self.tokenize(pairs)

    def tokenize(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        out = []
        for prompt, target in pairs:
            ids, start = self.tok.chat_example(fit_text(self.tok, prompt, self.prompt_budget), target)
            out.append((ids[:start], ids[start:]))
        return out

    def personalize(self, adapters: Sequence[Adapter], weights: Sequence[float], recipe: LoRASpec | None,
                    examples=(), seed: int = 0, probe: bool = False) -> tuple[TrainLog | None, dict]:
        """Set up the weights a method generates with: W0 plus the fused LoRA of `adapters` (Eq. 5), and,
        with a `recipe`, a fresh LoRA on top trained on `examples` (Eq. 7, `mta.peft.fusion.stack_lora`); the
        trained LoRA stays injected (`trained_adapter`). Returns (training log, seconds per phase)."""
        mode, seconds = self.profile.merge_space, {}
        tic = time.perf_counter()
        if recipe is None:
            if adapters:
                fold_adapters(self.model, adapters, weights, mode, self.base)
        else:
            torch.manual_seed(seed)  # the fresh LoRA's initialisation
            self.lora_config = recipe.lora_config(self.profile.llm)
            stack_lora(self.model, adapters, weights, self.lora_config, mode, self.base)
        self.folded = bool(adapters)
        if adapters:
            seconds["fuse"] = time.perf_counter() - tic
        if recipe is None:
            return None, seconds
        log = train(self.model, examples, self.train_config(recipe, seed, probe), pad_id=self.tok.pad_token_id)
        self.model.eval()
        seconds["adapt"] = log.seconds
        return log, seconds

    def train_config(self, recipe: LoRASpec, seed: int, probe: bool = False) -> TrainConfig:
        """`recipe`'s optimiser settings under this run's precision (the profile's resolved `bf16`)."""
        return recipe.train_config(seed, probe=probe, bf16=self.profile.bf16)

    def trained_adapter(self) -> Adapter:
        """The LoRA `personalize` trained, detached from the model."""
        return get_adapter(self.model, self.lora_config)

    def personalize_many(self, fused: Sequence[Sequence[Adapter]], weights: Sequence[Sequence[float]],
                         recipe: LoRASpec | None, examples: Sequence = (), seeds: Sequence[int] = ()
                         ) -> tuple[list[TrainLog] | None, dict]:
        """`personalize` for U adapters in one pass (the batched engine): slot u holds W0 plus the fused LoRA
        of `fused[u]` (Eq. 5) applied unmerged and, with a `recipe`, a fresh LoRA trained on `examples[u]`
        (Eq. 7), initialised as `personalize` would under `seeds[u]` (`mta.peft.multi_lora.stack_many`,
        `mta.training.train_many.train_many`). Returns (one log per slot, seconds per phase for the whole group)."""
        p, seconds = self.profile, {}
        tic = time.perf_counter()
        self.lora_config = recipe.lora_config(p.llm) if recipe else None
        stack_many(self.model, fused, weights, self.lora_config, p.merge_space, seeds)
        if any(fused):
            seconds["fuse"] = time.perf_counter() - tic
        if recipe is None:
            return None, seconds
        logs = train_many(self.model, examples, [self.train_config(recipe, s) for s in seeds], self.tok.pad_token_id,
                          p.rows_per_pass)
        self.model.eval()
        seconds["adapt"] = logs[0].seconds
        return logs, seconds

    def slot_adapter(self, slot: int) -> Adapter:
        """The LoRA `personalize_many` trained in slot `slot`, detached from the model."""
        return get_row_adapter(self.model, slot, self.lora_config)

    def generate(self, prompts: Sequence[str], slots: Sequence[int] | None = None) -> list[str]:
        """Greedy outputs for left-padded prompts; with `slots`, prompt n uses slot `slots[n]`'s adapters."""
        seqs = [self.tok.chat_prompt(fit_text(self.tok, p, self.prompt_budget)) for p in prompts]
        ids, mask = self.tok.pad(seqs, side="left")
        ids, mask = ids.to(self.profile.device), mask.to(self.profile.device)
        kw = dict(max_new_tokens=self.profile.max_new_tokens, stop_token_ids=self.tok.eos_token_ids,
                  pad_token_id=self.tok.pad_token_id)
        if slots is None:  # on shared weights the prompts (sorted by length) prefill a pass of rows at a time
            with autocast(self.profile.device, self.profile.bf16, self.model):
                new = generate(self.model, ids, mask, prefill_rows=self.profile.rows_per_pass, **kw)
        else:
            new = generate_many(self.model, ids, mask, slots, self.profile.bf16, **kw)
        return [self.tok.decode(row.tolist()).strip() for row in new]

    def reset(self) -> None:
        """Back to the plain base model: no LoRA layers, W = W0."""
        unload_lora(self.model)
        unload_row_lora(self.model)
        if self.folded:
            self.base.restore()
            self.folded = False


def fold_population(engine: Engine, adapter: Adapter) -> None:
    """W = W0 + ΔW of a population LoRA (Per-Pcs's task LoRA, PROPER's population LoRA)."""
    fold_adapters(engine.model, [adapter], [1.0], engine.profile.merge_space, engine.base)
    engine.folded = True
