"""Stage 2: whole-history embeddings, cosine to every anchor (Eq. 4), kept for every anchor; `fused_anchors`
takes the top K and alpha_i = sim_i / sum(sim) (Eq. 6) when a method uses them."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import numpy as np

from mta.data.lamp import TaskSpec, User, first_words, match_document
from mta.errors import InputError
from mta.models.encoders import Encoder, history_document_embeddings
from mta.profiles import Profile


def fusion_weights(sims: Sequence[float], fusion: str) -> list[float]:
    """Eq. 6 (`paper`), or the released code's two-anchor rule (`authors_code`), which gives the
    *less* similar anchor the larger weight: (1 - a) * anchor_1 + a * anchor_2, a = s_1 / (s_1 + s_2)."""
    total = float(sum(sims))
    if total <= 0:
        raise InputError(f"fusion weights: similarities {list(sims)} do not sum to a positive number")
    if fusion == "paper":
        return [s / total for s in sims]
    if fusion == "authors_code":
        if len(sims) != 2:
            raise ValueError(f"fusion 'authors_code' merges exactly 2 anchors, got {len(sims)}")
        a = sims[0] / total
        return [1 - a, a]
    raise ValueError(f"unknown fusion {fusion!r}; choose 'paper' or 'authors_code'")


def anchor_embeddings(anchors: Sequence[User], task: TaskSpec, encoder: Encoder, batch_size: int = 32,
                      text: str = "authors_code") -> np.ndarray:
    """Eq. 4's anchor side: each anchor's whole-history document embedded, float32 (V, D), unit norm; the
    documents as `text` says (`mta.data.lamp.match_document`). With "authors_code" an anchor's items are cut to
    their first 368 words first, as select_anchor.py stores the anchors the matcher reads."""
    items = [[first_words(it) for it in a.history] if text == "authors_code" else a.history for a in anchors]
    return history_document_embeddings(encoder, [match_document(task, h, text) for h in items], batch_size=batch_size)


def match_to_anchors(users: Sequence[User], anchor_ids: Sequence[str], anchor_emb: np.ndarray, task: TaskSpec,
                     encoder: Encoder, batch_size: int = 32, progress: bool = True, text: str = "authors_code",
                     start: float | None = None) -> dict[str, dict]:
    """Per user: cosine of the whole-history embedding to every anchor's row of `anchor_emb` (Eq. 4), most similar
    first, and the seconds per user since `start` (default: now)."""
    start = time.perf_counter() if start is None else start
    user_emb = history_document_embeddings(encoder, [match_document(task, u.history, text) for u in users],
                                           batch_size=batch_size, progress=progress)  # (U, D)
    sims = user_emb @ anchor_emb.T  # (U, V), embeddings are unit-norm
    seconds = (time.perf_counter() - start) / max(len(users), 1)
    out = {}
    for u, row in zip(users, sims, strict=True):
        order = np.argsort(-row, kind="stable")
        out[u.user_id] = {"similarities": {anchor_ids[i]: float(row[i]) for i in order}, "seconds": seconds}
    return out


def match_anchors(
    users: Sequence[User], anchors: Sequence[User], task: TaskSpec, encoder: Encoder,
    batch_size: int = 32, progress: bool = True, text: str = "authors_code",
) -> dict[str, dict]:
    """Per user: cosine of whole-history embeddings to every anchor (Eq. 4, `anchor_embeddings`,
    `match_to_anchors`). Top-K and the fusion weights are taken at use time (`fused_anchors`), so one match
    serves every K."""
    start = time.perf_counter()
    anchor_emb = anchor_embeddings(anchors, task, encoder, batch_size, text)  # (V, D)
    return match_to_anchors(users, [a.user_id for a in anchors], anchor_emb, task, encoder, batch_size, progress,
                            text, start)


def fused_anchors(match: dict, profile: Profile, kind: str = "top", seed: int = 0) -> tuple[list[str], list[float]]:
    """The anchors a user's fused LoRA merges, and their weights.

    top: the K most similar, weighted by Eq. 6 (or the authors' rule, or a fixed alpha for K = 2).
    random / least: controls, K random (seeded) or the K least similar anchors, equal weights
    (Eq. 6 is undefined when similarities are not positive)."""
    sims = match["similarities"]
    k = profile.top_k
    if not 1 <= k <= len(sims):
        raise InputError(f"top_k = {k} but the bank has {len(sims)} anchors")
    ranked = sorted(sims, key=lambda a: (-sims[a], a))
    if kind == "top":
        chosen = ranked[:k]
        if profile.fixed_alpha is not None:
            return chosen, [profile.fixed_alpha, 1 - profile.fixed_alpha]
        return chosen, fusion_weights([sims[a] for a in chosen], profile.fusion)
    if kind == "random":
        chosen = random.Random(seed).sample(sorted(sims), k)
    elif kind == "least":
        chosen = ranked[::-1][:k]
    else:
        raise ValueError(f"unknown anchor choice {kind!r}")
    return chosen, [1.0 / k] * k
