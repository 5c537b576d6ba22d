"""Greedy and sampled decoding for `LlamaForCausalLM` as free functions (as gpt-fast's generate.py): a prefill
over left-padded prompts that fills a KV cache, then one token per step until every row has stopped."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from mta.log import status
from mta.models.llama import KVCache, LlamaForCausalLM, position_ids_from_mask


@torch.inference_mode()
def generate(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | list[int] | torch.Tensor = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token_ids: list[int] | tuple[int, ...] = (),
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    prefill_rows: int | None = None,
    repetition_penalty: float = 1.0,
    prefill_select: Callable[[slice], None] | None = None,
) -> torch.Tensor:
    """New tokens (B, n <= max_new_tokens) for left-padded prompts input_ids (B, T).

    A row ends at its first stop token (kept in the output) or after its own max_new_tokens (an int, or
    one per row); later positions hold pad_token_id (default: the first stop token, else 0). Decoding
    stops early once every row has ended.
    compile=True runs each one-token step through torch.compile (compiled once per model, dynamic
    shapes; worth it for long or many generations, as in gpt-fast): same tokens, less overhead per step.
    prefill_rows: prompts per prefill forward (`prefill`); None: all at once. prefill_select(rows) is called before
    each such forward with its rows of the batch, and with slice(None) after the prefill (per-row adapters:
    `mta.peft.multi_lora.generate_many`).
    repetition_penalty: transformers' `RepetitionPenaltyLogitsProcessor` (CTRL's): the logit of every token
    already in the row, prompt included, divided by it where positive and multiplied where negative; a row's
    left padding does not count (transformers counts it in a padded batch; the authors decode one prompt at
    a time, unpadded).
    """
    B, T = input_ids.shape
    device = input_ids.device
    limits = torch.as_tensor(max_new_tokens, dtype=torch.long, device=device).expand(B)  # (B,) per row
    if bool((limits < 1).any()):
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {limits.tolist()}")
    max_new_tokens = int(limits.max())
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = stop_token_ids[0] if len(stop_token_ids) else 0
    stop = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
    padded = not bool(attention_mask.all())
    full_mask = torch.cat([attention_mask.long(), attention_mask.new_ones(B, max_new_tokens).long()], dim=1)
    positions = position_ids_from_mask(attention_mask)  # (B, T)
    next_pos = positions[:, -1:] + 1  # (B, 1)

    cache = KVCache(model.config, B, T + max_new_tokens, model.dtype, device)
    logits = prefill(model, input_ids, attention_mask if padded else None, cache, positions, prefill_rows,
                     prefill_select)
    step_logits = compiled_next_logits(model) if compile else functools.partial(next_logits, model)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, logits.shape[-1], dtype=torch.long, device=device)  # (B, vocab)
        seen.scatter_add_(1, input_ids, attention_mask.long())
    out, start = [], time.perf_counter()
    for step in range(max_new_tokens):
        status(f"decode x{B}: token {step + 1}/{max_new_tokens}, "
               f"{B * step / max(time.perf_counter() - start, 1e-9):.0f} tok/s")
        if seen is not None:
            logits = penalize_repetition(logits, seen > 0, repetition_penalty)
        token = sample_next_token(logits, temperature, top_k, top_p, generator) if do_sample else logits.argmax(-1)
        token = token.masked_fill(finished, pad_token_id)
        out.append(token)
        if seen is not None:
            seen.scatter_add_(1, token[:, None], (~finished).long()[:, None])
        finished |= torch.isin(token, stop) | (limits <= step + 1)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = full_mask[:, : T + step + 1] if padded else None
        logits = step_logits(token[:, None], mask, cache, next_pos + step)
    return torch.stack(out, dim=1)


def prefill(model: LlamaForCausalLM, input_ids, attention_mask, cache: KVCache, position_ids, rows: int | None,
            select: Callable[[slice], None] | None = None) -> torch.Tensor:
    """fp32 logits (B, vocab) after each left-padded prompt of input_ids (B, T), filling an empty cache.

    With `rows`, the prompts go through in chunks of that many rows, each without the leading columns that
    are padding in all of its rows (similar lengths side by side leave a chunk little padding): rows never
    interact, and padded keys are masked either way, so each row's logits and cache are what one forward
    over the whole batch computes, up to the rounding of GEMMs of other shapes. Activations stay those of
    `rows` prompts. `select(index)` is called before the forward of rows `index`, `select(slice(None))` after."""
    B, T = input_ids.shape
    if rows is None or rows >= B:
        return next_logits(model, input_ids, attention_mask, cache, position_ids)
    out = []
    for r in range(0, B, rows):
        index = slice(r, r + rows)
        mask = None if attention_mask is None else attention_mask[index]  # (b, T)
        start = 0 if mask is None else T - int(mask.sum(1).max())  # columns of padding in every row
        if select is not None:
            select(index)
        view = cache.rows(index)
        view.length = start  # positions [0, start) stay empty: masked, as padding is
        status(f"prefill x{B}: rows {r + 1}-{min(r + rows, B)}")
        out.append(next_logits(model, input_ids[index, start:], mask, view, position_ids[index, start:]))
    cache.length = T
    if select is not None:
        select(slice(None))
    return torch.cat(out)


def next_logits(model: LlamaForCausalLM, input_ids, attention_mask, cache: KVCache, position_ids) -> torch.Tensor:
    """fp32 logits (B, vocab) after the last of input_ids (B, T), extending the cache."""
    return model.lm_head(model.hidden_states(input_ids, attention_mask, cache, position_ids)[:, -1]).float()


def compiled_next_logits(model: LlamaForCausalLM):
    """`next_logits` of `model` through torch.compile, compiled once per model (kept on it)."""
    if getattr(model, "compiled_next_logits", None) is None:
        model.compiled_next_logits = torch.compile(functools.partial(next_logits, model), dynamic=True)
    return model.compiled_next_logits


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """(B, vocab) logits with those of the `seen` (B, vocab) tokens divided by `penalty` where positive and
    multiplied by it elsewhere, as transformers' `RepetitionPenaltyLogitsProcessor`."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Sample (B,) tokens from (B, vocab) logits after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
