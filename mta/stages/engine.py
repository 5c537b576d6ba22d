"""The engine: the base model, its tokenizer and a pristine copy of W0, which sets up a method's weights for a group
of users as per-row adapters (one user is a group of one), trains the LoRAs on top and generates."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from mta.data.lamp import TaskSpec, User, query_prompt, training_pairs
from mta.models.generation import generate
from mta.models.tokenizer import Tokenizer
from mta.peft.adapter import Adapter
from mta.peft.fusion import BaseWeights, base_linears, fold_adapters, nf4_base
from mta.peft.lora import unload_lora
from mta.peft.multi_lora import generate_many, get_row_adapter, set_slot, stack_many, unload_row_lora
from mta.precision import autocast
from mta.profiles import AUTO, LoRASpec, Profile
from mta.seeding import derive_seed, seeded_subset
from mta.training.train import TrainConfig, TrainLog
from mta.training.train_many import train_many


def fit_text(tok: Tokenizer, text: str, max_tokens: int) -> str:
    """Drop tokens from the start of `text` (the oldest history) so it fits in `max_tokens`."""
    ids = tok.encode(text)
    return text if len(ids) <= max_tokens else tok.decode(ids[-max_tokens:])


def templated(tok: Tokenizer, chat_template: bool) -> Tokenizer:
    """`tok`, or without its chat template (the instruction as it is) a copy whose `chat_format` is "plain"."""
    if chat_template:
        return tok
    plain = copy.copy(tok)
    plain.chat_format = "plain"
    return plain


class Examples(list):
    """Tokenized (prompt, response) training examples, and how many prompts the cap cut (`cut`)."""

    def __init__(self, items: Sequence[tuple[list[int], list[int]]], cut: int):
        super().__init__(items)
        self.cut = cut


def summarize(log: TrainLog) -> dict:
    probe = {"probe_before": log.probe[0], "probe_after": log.probe[1], "probe_seconds": log.probe_seconds} \
        if log.probe else {}
    return {"steps": len(log.losses), "first_loss": log.losses[0], "last_loss": log.losses[-1], **probe,
            "tokens": log.tokens, "seconds": log.seconds, **log.steps()}


@dataclass
class Engine:
    """The base model, its tokenizer and a pristine copy of W0: everything that trains and generates.
    `profile.bf16` is the bool its Run resolved. `tok` is the model's own tokenizer: training prompts take its
    chat template when `profile.chat_template` says so (`tok` becomes that tokenizer), test prompts when the
    task's test conditions do (`test_tok`, `Profile.test_conditions_for`)."""

    profile: Profile
    task: TaskSpec
    model: torch.nn.Module
    tok: Tokenizer

    def __post_init__(self):
        if self.profile.unsettled:
            raise ValueError(f"profile {self.profile.name}: {', '.join(self.profile.unsettled)} still {AUTO!r}; a run "
                             f"settles them on its machine (`Run.settle`, mta.run.calibrate) before building an engine")
        self.base = BaseWeights(self.model, targets=self.profile.bank.targets, device="cpu")
        self.folded = False  # whether W differs from W0
        self.lora_config = None  # of the LoRAs `personalize_many` last trained
        self.conditions = self.profile.test_conditions_for(self.task.name)
        self.nf4_linears = base_linears(self.model) if self.conditions.nf4 else []  # the base's, not an adapter's
        if self.conditions.parse is not None:
            self.task = dataclasses.replace(self.task, parse=self.conditions.parse)
        self.test_tok = templated(self.tok, self.conditions.chat_template)
        self.tok = templated(self.tok, self.profile.chat_template)

    def train_cap(self, recipe: LoRASpec | None) -> int:
        """The most tokens one training example of `recipe` holds (None: the profile's cap), template included."""
        return recipe.max_tokens if recipe is not None and recipe.max_tokens is not None \
            else self.profile.max_prompt_tokens

    def train_budget(self, recipe: LoRASpec | None) -> int:
        """Tokens left to a training prompt under `recipe`'s cap after the template."""
        return self.train_cap(recipe) - len(self.tok.chat_prompt(""))

    def test_budget(self) -> int | None:
        """Tokens left to a test prompt under the test-time cap after the template; None: no cap."""
        cap = self.profile.max_test_tokens
        return None if cap is None else cap - len(self.test_tok.chat_prompt(""))

    def prompt_cut(self, prompt: str) -> bool:
        """Whether the test-time cap cuts this prompt (`generate` drops its oldest tokens)."""
        budget = self.test_budget()
        return budget is not None and len(self.test_tok.encode(prompt)) > budget

    def examples(self, history: list[dict], seed: int, limit: int | None = None, bank: bool = False,
                 earlier_only: bool = False, recipe: LoRASpec | None = None) -> Examples:
        """Tokenized (prompt, response) training examples; `bank` builds a meta-LoRA's in the format
        the profile's `bank_data` names; `earlier_only` retrieves each one's history from earlier items only;
        prompts are cut to the cap of `recipe` (the bank's with `bank`; `tokenize`)."""
        pairs = training_pairs(self.task, history, seed=seed, bank=bank and self.profile.bank_data == "authors_code",
                               style=self.profile.prompt_style, earlier_only=earlier_only)
        return self.tokenize(seeded_subset(pairs, limit, seed), self.profile.bank if bank else recipe)

    def population_examples(self, users: Sequence[User], seed: int, limit: int | None = None,
                            recipe: LoRASpec | None = None) -> Examples:
        """The population's training examples (the task LoRAs of Per-Pcs and OPPU, PROPER's population LoRA), one
        per user as the releases build them (task_LoRA.py:180-227 of Per-Pcs and OPPU): the user's LaMP query
        with its gold, prompted as a test query with one BM25 item of the history. A user whose row keeps no
        query holds out its last history item as one, retrieving from the items before it. At most `limit`
        users, drawn at random (seeded); prompts cut to `recipe`'s cap."""
        style = self.profile.prompt_style
        pairs = []
        for u in seeded_subset([u for u in users if u.query or len(u.history) >= 2], limit, seed):
            if u.query:
                pairs += [(query_prompt(self.task, u.history, q, style=style), q.gold) for q in u.query]
            else:
                pairs += training_pairs(self.task, u.history, seed=derive_seed(seed, u.user_id), style=style,
                                        items=slice(-1, None))
        return self.tokenize(pairs, recipe)

    def tokenize(self, pairs: Sequence[tuple[str, str]], recipe: LoRASpec | None = None) -> Examples:
        """Training examples with the training template, each prompt cut to `recipe`'s cap (`train_budget`). An
        example still over the cap (a long target) keeps at most half the cap of its target, its end dropped as the
        releases' truncation drops it, and its prompt is cut to the rest: no example exceeds the cap."""
        cap, budget, out, cut = self.train_cap(recipe), self.train_budget(recipe), [], 0
        for prompt, target in pairs:
            fitted = fit_text(self.tok, prompt, budget)
            ids, start = self.tok.chat_example(fitted, target)
            if len(ids) > cap:
                answer = ids[start:][: max(cap - start, cap // 2)]
                if start + len(answer) > cap:
                    fitted = fit_text(self.tok, prompt, budget - len(answer))
                    ids, start = self.tok.chat_example(fitted, target)
                ids = ids[:start] + answer
            cut += fitted != prompt
            out.append((ids[:start], ids[start:]))
        return Examples(out, cut)

    def train_config(self, recipe: LoRASpec, seed: int, probe: bool = False) -> TrainConfig:
        """`recipe`'s optimiser settings under this run's precision (the profile's resolved `bf16`)."""
        return recipe.train_config(seed, probe=probe, bf16=self.profile.bf16)

    def personalize_many(self, fused: Sequence[Sequence[Adapter]], weights: Sequence[Sequence[float]],
                         recipe: LoRASpec | None, examples: Sequence = (), seeds: Sequence[int] = (),
                         probe: bool = False) -> tuple[list[TrainLog] | None, dict]:
        """Set up the weights of U adapters (one user, or one LoRA, is U = 1) in one pass: slot u holds W0 plus
        the fused LoRA of `fused[u]` (Eq. 5) applied unmerged and, with a `recipe`, a fresh LoRA trained on
        `examples[u]` (Eq. 7), initialised as `torch.manual_seed(seeds[u])` + `mta.peft.fusion.stack_lora`
        would (`mta.peft.multi_lora.stack_many`, `mta.training.train_many.train_many`); `probe` measures each
        slot's loss on its examples before and after. Returns (one log per slot, seconds per phase for the whole
        group)."""
        p, seconds = self.profile, {}
        tic = time.perf_counter()
        self.lora_config = recipe.lora_config(p.llm) if recipe else None
        stack_many(self.model, fused, weights, self.lora_config, p.merge_space, seeds)
        if any(fused):
            seconds["fuse"] = time.perf_counter() - tic
        if recipe is None:
            return None, seconds
        logs = train_many(self.model, examples, [self.train_config(recipe, s, probe) for s in seeds],
                          self.tok.pad_token_id, p.rows_per_pass)
        self.model.eval()
        seconds["adapt"] = logs[0].seconds
        return logs, seconds

    def install_many(self, fused: Sequence[Sequence[Adapter]], weights: Sequence[Sequence[float]],
                     trained: Sequence[Adapter | None]) -> None:
        """Slots as `personalize_many` leaves them, with LoRAs it trained before: slot u holds the fused LoRA of
        `fused[u]` and the trained LoRA `trained[u]` on top (all None: none on top)."""
        config = next((a.config for a in trained if a is not None), None)
        if config is not None and None in trained:
            raise ValueError("install_many: every slot or none holds a trained LoRA")
        self.lora_config = config
        stack_many(self.model, fused, weights, config, self.profile.merge_space, [0] * len(fused))
        for slot, adapter in enumerate(trained):
            if adapter is not None:
                set_slot(self.model, slot, adapter)

    def slot_adapter(self, slot: int) -> Adapter:
        """The LoRA `personalize_many` trained in slot `slot`, detached from the model."""
        return get_row_adapter(self.model, slot, self.lora_config)

    def generate(self, prompts: Sequence[str], slots: Sequence[int] | None = None) -> list[str]:
        """Greedy outputs for left-padded prompts; with `slots`, prompt n uses slot `slots[n]`'s adapters. The
        prompts prefill `rows_per_pass` at a time, the longest together (little padding), then decode in one batch."""
        budget, tok = self.test_budget(), self.test_tok
        seqs = [tok.chat_prompt(p if budget is None else fit_text(tok, p, budget)) for p in prompts]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        ids, mask = tok.pad([seqs[i] for i in order], side="left")
        ids, mask = ids.to(self.profile.device), mask.to(self.profile.device)
        kw = dict(max_new_tokens=self.conditions.max_new_tokens or self.profile.max_new_tokens,
                  stop_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id,
                  repetition_penalty=self.conditions.repetition_penalty, prefill_rows=self.profile.rows_per_pass)
        with nf4_base(self.nf4_linears) if self.conditions.nf4 else nullcontext():
            if slots is None:
                with autocast(self.profile.device, self.profile.bf16, self.model):
                    new = generate(self.model, ids, mask, **kw)
            else:
                new = generate_many(self.model, ids, mask, [slots[i] for i in order], self.profile.bf16, **kw)
        outputs = [""] * len(seqs)
        for row, i in zip(new, order, strict=True):
            outputs[i] = self.tok.decode(row.tolist()).strip()
        return outputs

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
