"""Supervised fine-tuning loop shared by every stage: loss on response tokens only.

Examples are (prompt_ids, response_ids) pairs, batched with right padding. With causal attention a
right-padded batch needs no attention mask: pad tokens come after every real token, so they are never
attended to, and their positions are left out of the loss.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mta.log import status
from mta.precision import autocast, bf16_weights

Example = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, response_ids)


@dataclass
class TrainConfig:
    """Optimisation settings. `batch_size` is per micro-batch; an optimizer step sees batch_size * grad_accum."""

    lr: float = 1e-4
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 4
    grad_accum: int = 1
    weight_decay: float = 0.01  # AdamW, matrices only (no decay on 1-d params)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"  # "cosine", "linear" or "constant", all after linear warmup
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    max_len: int | None = None  # prompt is cut from the left first, then the response from the right
    seed: int = 0
    shuffle: bool = True
    group_by_length: bool = False  # transformers' LengthGroupedSampler order (`length_grouped_order`)
    progress: bool = True
    probe: bool = False  # score the first step's batch before and after training (TrainLog.probe)
    bf16: bool = False  # bf16 autocast (mta.precision); parameters, AdamW state and loss stay fp32

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"TrainConfig.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise ValueError("TrainConfig.batch_size, grad_accum and epochs must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be finite and positive, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig.weight_decay must be finite and at least 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"TrainConfig.max_grad_norm must be finite and positive or None (no clipping), "
                             f"got {self.max_grad_norm}")
        if self.group_by_length and not self.shuffle:
            raise ValueError("TrainConfig.group_by_length draws a random order each epoch; it needs shuffle=True")


@dataclass
class TrainLog:
    """Per optimizer step: mean response-token loss, learning rate used, gradient norm before clipping."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    tokens: int = 0  # non-pad tokens processed
    target_tokens: int = 0  # response tokens the loss was computed on
    seconds: float = 0.0
    # With TrainConfig.probe: the first step's batch scored (no grad, eval mode) before and after training,
    # so a run of a few steps is judged on the same examples, not on two different batches. Its time is
    # instrumentation, kept out of `seconds`.
    probe: tuple[float, float] | None = None
    probe_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def steps(self) -> dict[str, list[float]]:
        """Every step's loss, lr and gradient norm, to 6 significant digits (a train_log.json's lists)."""
        return {name: [float(f"{x:.6g}") for x in values]
                for name, values in (("losses", self.losses), ("lrs", self.lrs), ("grad_norms", self.grad_norms))}


class StepMeter:
    """Progress of a training run of `total` optimizer steps, told each step with `step`: its own bar when `show`,
    and the steps done, tokens per second and an ETA as `mta.log.status` (which a stage's bar shows); `finish`
    reports the run's steps per second and its first and last loss the same way. A context manager: its bar
    closes on exit."""

    def __init__(self, desc: str, total: int, show: bool):
        self.desc, self.total, self.done, self.tokens = desc, total, 0, 0
        self.bar = tqdm(total=total, desc=desc, disable=not show, leave=False)
        self.start = time.perf_counter()

    def __enter__(self) -> StepMeter:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def step(self, tokens: int, **postfix: str) -> None:
        self.done += 1
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(postfix)
        eta = tqdm.format_interval(elapsed / self.done * (self.total - self.done))
        status(f"{self.desc} step {self.done}/{self.total}, {self.tokens / elapsed:.0f} tok/s, ETA {eta}")

    def finish(self, first_loss: float, last_loss: float) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        status(f"{self.desc}: {self.done} steps, {self.done / elapsed:.2f} steps/s, {self.tokens / elapsed:.0f} tok/s, "
               f"loss {first_loss:.4g} -> {last_loss:.4g}")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based), as transformers' schedulers define it.

    With warmup the first step uses lr 0, rising linearly to the peak at step `warmup`; then cosine
    decays to 0 at `total` (half a period) and linear decays straight to 0.
    """
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def cut_example(prompt: Sequence[int], response: Sequence[int], max_len: int | None) -> tuple[list[int], list[int]]:
    """An example within `max_len` tokens: the prompt is cut from the left first, then the response from the right."""
    prompt, response = list(prompt), list(response)
    if not response:
        raise ValueError("training example with an empty response")
    if max_len is not None and len(prompt) + len(response) > max_len:
        keep = max(0, max_len - len(response))
        prompt, response = prompt[len(prompt) - keep:], response[: max_len - keep]
    return prompt, response


def make_batch(examples: Sequence[Example], max_len: int | None, pad_id: int) -> tuple[Tensor, Tensor, int]:
    """Right-padded input_ids (B, T), a bool mask (B, T) of positions whose next token is a response
    token, and the number of real (non-pad) tokens."""
    rows = [cut_example(prompt, response, max_len) for prompt, response in examples]
    T = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    predicts_response = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        predicts_response[i, max(0, len(p) - 1): len(p) + len(r) - 1] = True
    return ids, predicts_response, sum(len(p) + len(r) for p, r in rows)


def response_logits(model: nn.Module, ids: Tensor, predicts_response: Tensor) -> tuple[Tensor, Tensor]:
    """(logits (N, V), targets (N,)) of the response tokens, row-major; lm_head runs on those positions only
    when the model exposes `hidden_states` (mta.models.llama), else on full logits."""
    targets = ids[:, 1:][predicts_response[:, :-1]]  # (N,)
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        logits = model.lm_head(model.hidden_states(ids)[predicts_response])  # (N, V)
    else:
        out = model(input_ids=ids)
        logits = (out if torch.is_tensor(out) else out.logits)[predicts_response]  # (N, V)
    return logits, targets


def response_loss_sum(model: nn.Module, ids: Tensor, predicts_response: Tensor) -> Tensor:
    """Summed cross-entropy of the response tokens."""
    logits, targets = response_logits(model, ids, predicts_response)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def schedule_length(config: TrainConfig, n_examples: int) -> tuple[int, int]:
    """(optimizer steps, warmup steps) of a run over `n_examples`."""
    micro_per_epoch = math.ceil(n_examples / config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    total = config.max_steps or config.epochs * steps_per_epoch
    return total, math.ceil(config.warmup_ratio * total)


def length_grouped_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """transformers' `get_length_grouped_indices`: a random permutation cut into mega-batches of
    max(1, min(n // (4 * batch_size), 50)) batches, each sorted longest first (stable), then the first item of
    the mega-batch with the longest first item swapped to the front. Small sets are a random order."""
    n = len(lengths)
    size = max(1, min(n // (4 * batch_size), 50)) * batch_size
    perm = torch.randperm(n, generator=generator).tolist()
    megas = [sorted(perm[i: i + size], key=lambda j: lengths[j], reverse=True) for i in range(0, n, size)]
    longest = int(torch.argmax(torch.tensor([lengths[m[0]] for m in megas])))
    megas[0][0], megas[longest][0] = megas[longest][0], megas[0][0]
    return [j for m in megas for j in m]


def step_batches(examples: Sequence[Example], config: TrainConfig) -> Iterator[list[list[Example]]]:
    """Yield, per optimizer step, the micro-batches it accumulates over. Each epoch draws a new order from a
    generator seeded with config.seed: a permutation or, with group_by_length, the Trainer's length-grouped
    order over optimizer-step batches (`length_grouped_order`, lengths as cut to max_len); without shuffle
    the data order."""
    order_gen = torch.Generator().manual_seed(config.seed)
    lengths = [sum(map(len, cut_example(p, r, config.max_len))) for p, r in examples] \
        if config.group_by_length else None
    while True:
        if config.group_by_length:
            perm = length_grouped_order(lengths, config.batch_size * config.grad_accum, order_gen)
        elif config.shuffle:
            perm = torch.randperm(len(examples), generator=order_gen).tolist()
        else:
            perm = list(range(len(examples)))
        micro = [[examples[j] for j in perm[i: i + config.batch_size]]
                 for i in range(0, len(examples), config.batch_size)]
        for i in range(0, len(micro), config.grad_accum):
            yield micro[i: i + config.grad_accum]


def adamw(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas, eps=config.eps)


def train(model: nn.Module, examples: Sequence[Example], config: TrainConfig, pad_id: int | None = 0,
          before_forward: Callable[[Sequence[Example]], None] | None = None,
          aux_loss: Callable[[], Tensor] | None = None) -> TrainLog:
    """Fine-tune the trainable parameters of `model` on `examples`; returns the step log.

    Pad ids are never attended to nor scored, so any valid id works (None means 0).
    `before_forward(examples)` is called with each micro-batch's examples before its forward (PROPER
    sets the batch's user ids there); `aux_loss()`, read after each forward, is added to that
    micro-batch's loss with weight 1 / micro-batches per step (PROPER's constraint loss).

    Raises FloatingPointError on a NaN/inf loss or gradient norm, naming the step.
    """
    if not examples:
        raise ValueError("train: no examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameters (inject LoRA first?)")
    device = params[0].device
    torch.manual_seed(config.seed)
    total, warmup = schedule_length(config, len(examples))
    opt = adamw(params, config)

    log, was_training = TrainLog(), model.training
    batches = step_batches(examples, config)
    if config.probe:
        tic = time.perf_counter()
        first = next(batches)
        batches = itertools.chain([first], batches)
        before = probe_loss(model, first, config.max_len, pad_id or 0, device, before_forward, config.bf16)
        log.probe_seconds = time.perf_counter() - tic
    model.train()
    start = time.perf_counter()
    with StepMeter("train", total, config.progress) as meter, bf16_weights(model, config.bf16):
        for step in range(total):
            lr = config.lr * lr_factor(step, total, warmup, config.schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            raw = next(batches)
            micro = [make_batch(b, config.max_len, pad_id or 0) for b in raw]
            n_targets = sum(int(mask.sum()) for _, mask, _ in micro)
            loss_sum = 0.0
            for batch, (ids, mask, n_tokens) in zip(raw, micro, strict=True):
                ids, mask = ids.to(device), mask.to(device)
                if before_forward is not None:
                    before_forward(batch)
                with autocast(device, config.bf16):
                    loss = response_loss_sum(model, ids, mask) / n_targets
                    if aux_loss is not None:
                        loss = loss + aux_loss() / len(micro)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"train: non-finite loss {loss.item()} at step {step + 1}/{total} "
                                             f"(lr {lr:.3g}); lower the lr or check the data")
                loss.backward()
                loss_sum += loss.item()
                log.tokens += n_tokens
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
            if not torch.isfinite(norm):
                raise FloatingPointError(f"train: non-finite gradient norm at step {step + 1}/{total}")
            opt.step()
            opt.zero_grad(set_to_none=True)
            log.losses.append(loss_sum)
            log.lrs.append(lr)
            log.grad_norms.append(float(norm))
            log.target_tokens += n_targets
            meter.step(sum(n for _, _, n in micro), loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
    log.seconds = time.perf_counter() - start
    meter.finish(log.losses[0], log.losses[-1])
    if config.probe:
        tic = time.perf_counter()
        log.probe = (before, probe_loss(model, first, config.max_len, pad_id or 0, device, before_forward,
                                        config.bf16))
        log.probe_seconds += time.perf_counter() - tic
    model.train(was_training)
    return log


@torch.no_grad()
def probe_loss(model: nn.Module, step: Sequence[Sequence[Example]], max_len: int | None, pad_id: int,
               device: torch.device, before_forward: Callable[[Sequence[Example]], None] | None,
               bf16: bool = False) -> float:
    """Mean response-token loss of one optimizer step's micro-batches in eval mode (no dropout, no aux loss),
    in the precision the step trains in."""
    model.eval()
    total, n_targets = 0.0, 0
    with autocast(device, bf16, model):
        for batch in step:
            ids, mask, _ = make_batch(batch, max_len, pad_id)
            if before_forward is not None:
                before_forward(batch)
            total += response_loss_sum(model, ids.to(device), mask.to(device)).item()
            n_targets += int(mask.sum())
    return total / n_targets
