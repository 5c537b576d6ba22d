"""Train U adapters at once, each exactly as `mta.training.train.train` would alone: the stacked LoRAs in the slots of
`mta.peft.multi_lora`, or any factor banks whose first dimension is the slot (PROPER's served user parts).

Per adapter u, with its own TrainConfig: the same examples and order (`step_batches` with its seed, its
batch size, accumulation and grouping), the same number of optimizer steps and lr schedule
(`schedule_length`, `lr_factor`), its loss normalised over its own response tokens of the step, its own
gradient clipping and its own AdamW state. An adapter whose steps are done drops out of later steps.

One optimizer step is one forward/backward over the rows of every still-active adapter's micro-batches
(or a few, `rows_per_pass` rows each, longest rows together so little of a pass is padding). The loss of
the pass is Σ_u loss_u / n_u over the adapters' rows. The adapters' parameters are disjoint slots of the
factor banks and rows never interact, so the gradient of slot u is exactly the gradient of loss_u / n_u,
what train() computes for adapter u alone; only the rounding of GEMMs of other shapes differs.

AdamW runs over whole banks (U, r, in) as elementwise tensor ops with per-slot step counts, learning
rates, weight decay (banks of matrices only: train() decays matrices, not vectors) and clipping factors;
a slot not active at a step keeps its parameters and moments untouched, as a separate optimizer would.
The formulas are torch.optim.AdamW's (decoupled decay, bias correction), which `tests/test_train_many.py`
checks against train().
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mta.peft.multi_lora import rows, stacked_layers
from mta.precision import autocast, bf16_weights
from mta.training.train import (
    Example,
    StepMeter,
    TrainConfig,
    TrainLog,
    cut_example,
    lr_factor,
    make_batch,
    response_logits,
    schedule_length,
    step_batches,
)


class BankAdamW:
    """torch.optim.AdamW over factor banks whose first dimension is the adapter slot, one state per slot."""

    def __init__(self, params: Sequence[nn.Parameter], n_slots: int, betas: tuple[float, float], eps: float):
        self.params, self.betas, self.eps = list(params), betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = [0] * n_slots

    @torch.no_grad()
    def step(self, active: Sequence[bool], lrs: Sequence[float], weight_decays: Sequence[float],
             grad_scale: Tensor) -> None:
        """One AdamW step of the active slots, their gradients first multiplied by grad_scale (U,)."""
        b1, b2 = self.betas
        decay, step_size, bc2_sqrt = [], [], []
        for u, on in enumerate(active):
            self.steps[u] += bool(on)
            t = max(self.steps[u], 1)  # Python floats, as torch's AdamW computes its scalars
            decay.append(1 - lrs[u] * weight_decays[u])
            step_size.append(lrs[u] / (1 - b1 ** t))
            bc2_sqrt.append((1 - b2 ** t) ** 0.5)
        per_slot = {}  # (device, dtype) -> (U,) tensors, moved once per step
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            key = (p.device, p.dtype)
            if key not in per_slot:
                opts = dict(dtype=p.dtype, device=p.device)
                per_slot[key] = (torch.tensor(list(active), device=p.device), grad_scale.to(**opts),
                                 torch.tensor(decay, **opts), torch.tensor(step_size, **opts),
                                 torch.tensor(bc2_sqrt, **opts))
            shape = (-1,) + (1,) * (p.ndim - 1)
            on, scale, dec, size, bc2 = (t.view(shape) for t in per_slot[key])
            g = p.grad * scale
            m_new = m.lerp(g, 1 - b1)
            v_new = v * b2 + (1 - b2) * g * g
            denom = v_new.sqrt() / bc2 + self.eps
            p_new = p * dec - size * (m_new / denom)
            p.copy_(torch.where(on, p_new, p))
            m.copy_(torch.where(on, m_new, m))
            v.copy_(torch.where(on, v_new, v))


def slot_grad_norms(params: Sequence[nn.Parameter]) -> Tensor:
    """(U,) fp32 norm of each slot's gradient over all banks."""
    sq = [p.grad.float().pow(2).flatten(1).sum(1) for p in params]  # each (U,)
    return torch.stack(sq).sum(0).sqrt()


def plan_passes(cut: Sequence[tuple[Example, int]], size: int | None, pad_id: int, U: int
                ) -> tuple[list[tuple[Tensor, Tensor, Tensor]], Tensor]:
    """(example, slot) rows, longest first, in passes of `size` rows (None: one pass), so similar lengths share
    a pass: [(ids (n, T), mask (n, T), slots (n,))] and each slot's number of response targets (U,)."""
    cut = sorted(cut, key=lambda row: -sum(map(len, row[0])))
    size = size or len(cut)
    passes, n_targets = [], torch.zeros(U)
    for i in range(0, len(cut), size):
        chunk = cut[i: i + size]
        ids, mask, _ = make_batch([ex for ex, _ in chunk], None, pad_id)
        slots = torch.tensor([u for _, u in chunk])
        n_targets.index_add_(0, slots, mask.sum(1).float())
        passes.append((ids, mask, slots))
    return passes, n_targets


def pass_loss(model: nn.Module, ids: Tensor, mask: Tensor, slots: Tensor, slot_weight: Tensor, bf16: bool,
              before_pass: Callable[[Tensor], None] | None) -> tuple[Tensor, Tensor]:
    """One pass's loss Σ_rows slot_weight[slot] · CE over the response tokens (with grad, if enabled) and its
    share per slot (U,) (detached, on the CPU)."""
    device = slot_weight.device
    ids, mask = ids.to(device), mask.to(device)
    if before_pass is not None:
        before_pass(slots)
    target_row = mask.nonzero()[:, 0]  # (N,) the row of each target, row-major
    token_slot = slots.to(device)[target_row]  # (N,)
    with rows(model, slots), autocast(device, bf16):
        logits, targets = response_logits(model, ids, mask)  # (N, V), (N,)
        weighted = F.cross_entropy(logits.float(), targets, reduction="none") * slot_weight[token_slot]  # (N,)
    per_slot = torch.zeros_like(slot_weight).index_add_(0, token_slot, weighted.detach()).cpu()
    return weighted.sum(), per_slot


@torch.no_grad()
def probe_many(model: nn.Module, steps: Sequence[Sequence[Sequence[Example]] | None], configs: Sequence[TrainConfig],
               pad_id: int, rows_per_pass: int | None, device: torch.device,
               before_pass: Callable[[Tensor], None] | None) -> Tensor:
    """`train.probe_loss` of every slot u with a step `steps[u]` (its micro-batches), in one eval-mode pass:
    (U,) mean response-token loss (0 where a slot has none)."""
    cut = [(cut_example(p, r, configs[u].max_len), u)
           for u, step in enumerate(steps) if step for batch in step for p, r in batch]
    passes, n_targets = plan_passes(cut, rows_per_pass, pad_id, len(steps))
    weight = (1.0 / n_targets.clamp(min=1)).to(device)
    was_training = model.training
    model.eval()
    means = sum(pass_loss(model, ids, mask, slots, weight, configs[0].bf16, before_pass)[1]
                for ids, mask, slots in passes)
    model.train(was_training)
    return means


def train_many(model: nn.Module, examples: Sequence[Sequence[Example]], configs: TrainConfig | Sequence[TrainConfig],
               pad_id: int | None = 0, rows_per_pass: int | None = None, params: Sequence[nn.Parameter] | None = None,
               before_pass: Callable[[Tensor], None] | None = None) -> list[TrainLog]:
    """Train slot u of the factor banks on `examples[u]` with `configs[u]` (one config for all, or one each);
    returns one TrainLog per slot, whose `seconds` is the joint run's wall time.

    `params`: the banks, slot first (default: the stacked LoRA of every RowLoRALinear). `before_pass(slots)`
    is called with each pass's row -> slot index (n,) before its forward (PROPER sets its rows' users there).
    A config with `probe` gets its slot's first step scored before and after training, as train() does.
    The adapters share AdamW's betas and eps and the precision (`bf16`). Dropout in the LoRA layers draws
    other random numbers than train() would. Raises FloatingPointError on a NaN/inf loss or gradient norm,
    naming the adapter and its step.
    """
    if params is None:
        layers = stacked_layers(model)
        if not layers:
            raise ValueError("train_many: the model has no stacked RowLoRALinear layers (stack_many first)")
        params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    params = list(params)
    U = params[0].shape[0]
    if any(p.ndim < 3 for p in params):
        raise ValueError("train_many: every bank must hold one matrix per slot (U, rows, cols)")
    if any(p.shape[0] != U for p in params):
        raise ValueError(f"train_many: banks of different numbers of slots {sorted({p.shape[0] for p in params})}")
    configs = [configs] * U if isinstance(configs, TrainConfig) else list(configs)
    if len(examples) != U or len(configs) != U:
        raise ValueError(f"train_many: {U} slots but {len(examples)} example lists and {len(configs)} configs")
    for u, ex in enumerate(examples):
        if not ex:
            raise ValueError(f"train_many: no examples for adapter {u}")
    if len({(c.betas, c.eps, c.bf16) for c in configs}) != 1:
        raise ValueError("train_many: adapters must share AdamW betas and eps, and bf16")
    device, bf16, pad_id = params[0].device, configs[0].bf16, pad_id or 0
    opt = BankAdamW(params, U, configs[0].betas, configs[0].eps)
    plans = [schedule_length(c, len(ex)) for c, ex in zip(configs, examples, strict=True)]  # (total, warmup)
    batches = [step_batches(ex, c) for ex, c in zip(examples, configs, strict=True)]
    first = [next(b) if c.probe else None for b, c in zip(batches, configs, strict=True)]
    batches = [b if f is None else itertools.chain([f], b) for b, f in zip(batches, first, strict=True)]
    max_norm = torch.tensor([c.max_grad_norm or float("inf") for c in configs])
    logs, was_training = [TrainLog() for _ in range(U)], model.training
    n_steps = max(total for total, _ in plans)
    with bf16_weights(model, bf16):
        tic = time.perf_counter()
        probing = any(f is not None for f in first)
        before = probe_many(model, first, configs, pad_id, rows_per_pass, device, before_pass) if probing else None
        probe_seconds = time.perf_counter() - tic
        model.train()
        start = time.perf_counter()
        with StepMeter(f"train x{U}", n_steps, configs[0].progress) as meter:
            for step in range(n_steps):
                active = [step < total for total, _ in plans]
                lrs = [c.lr * lr_factor(step, total, warmup, c.schedule) if on else 0.0
                       for c, (total, warmup), on in zip(configs, plans, active, strict=True)]
                cut = [(cut_example(p, r, configs[u].max_len), u)
                       for u in range(U) if active[u] for b in next(batches[u]) for p, r in b]
                passes, n_targets = plan_passes(cut, rows_per_pass, pad_id, U)
                for (p, r), u in cut:
                    logs[u].tokens += len(p) + len(r)
                weight = (1.0 / n_targets).to(device)  # (U,) 1 / n_u: each adapter's loss over its own targets
                loss_sums = torch.zeros(U, dtype=torch.float64)
                for ids, mask, slots in passes:
                    loss, per_slot = pass_loss(model, ids, mask, slots, weight, bf16, before_pass)
                    if not torch.isfinite(per_slot).all():
                        u = int((~torch.isfinite(per_slot)).nonzero()[0])
                        raise FloatingPointError(f"train_many: non-finite loss for adapter {u} at its step "
                                                 f"{step + 1}/{plans[u][0]} (lr {lrs[u]:.3g}); lower the lr "
                                                 f"or check the data")
                    loss.backward()
                    loss_sums += per_slot.double()
                norms = slot_grad_norms(params).cpu()  # (U,)
                for u in range(U):
                    if active[u] and not math.isfinite(norms[u]):
                        raise FloatingPointError(f"train_many: non-finite gradient norm for adapter {u} at its step "
                                                 f"{step + 1}/{plans[u][0]}")
                scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s factor, per slot
                opt.step(active, lrs, [c.weight_decay for c in configs], scale)
                for p in params:
                    p.grad = None
                for u in range(U):
                    if active[u]:
                        logs[u].losses.append(float(loss_sums[u]))
                        logs[u].lrs.append(lrs[u])
                        logs[u].grad_norms.append(float(norms[u]))
                        logs[u].target_tokens += int(n_targets[u])
                meter.step(sum(len(p) + len(r) for (p, r), _ in cut))
        seconds = time.perf_counter() - start
        meter.finish(sum(log.losses[0] for log in logs) / U, sum(log.losses[-1] for log in logs) / U)
        tic = time.perf_counter()
        after = probe_many(model, first, configs, pad_id, rows_per_pass, device, before_pass) if probing else None
        probe_seconds += time.perf_counter() - tic
    for u, log in enumerate(logs):
        log.seconds = seconds
        if first[u] is not None:
            log.probe, log.probe_seconds = (float(before[u]), float(after[u])), probe_seconds
    model.train(was_training)
    return logs
