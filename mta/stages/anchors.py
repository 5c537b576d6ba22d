"""Stage 1a: per-item embeddings, user vector = their mean (Eq. 2), K-Means into V clusters, and the most
active eligible user of each cluster as its anchor (Eq. 3). The user vectors are made in chunks of
consecutive candidates, each saved as it finishes, so no more than one chunk's item embeddings exist at once
and a killed stage 1a resumes at the first chunk it has not saved."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mta.data.lamp import TaskSpec, User, cluster_texts
from mta.files import atomic_path
from mta.models.encoders import Encoder, user_item_embeddings
from mta.seeding import derive_seed, seeded_subset
from mta.stages.kmeans import kmeans
from mta.stamps import current, load_tensors, save_sealed_tensors

# Items embedded per chunk: 18-26 s of all-MiniLM-L6-v2 on 2 cores, 6 MB of its item vectors (17 MB of
# deberta-v3-large's); the 3,475 items of the LaMP-4 dev candidates fit one chunk (docs/defaults/candidate-pool.md).
CHUNK_ITEMS = 4096
# (first, last) -> where chunk [first, last) of the user vectors is kept, and what it is made from
Chunks = Callable[[int, int], tuple[Path, dict]]


def candidate_pool(candidates: Sequence[User], limit: int | None, seed: int) -> list[User]:
    """The candidates stage 1a clusters: all, or a seeded sample of `limit` of them in their file order."""
    return seeded_subset(candidates, limit, derive_seed(seed, "stage1a", "candidates"))


def embedded_items(user: User, task: TaskSpec, text: str, limit: int | None, seed: int) -> list[str]:
    """The texts of `user`'s items that Eq. 2 averages: all, or a seeded sample of `limit` (drawn per user)."""
    return seeded_subset(cluster_texts(task, user.history, text), limit,
                         derive_seed(seed, "stage1a", "items", user.user_id))


def chunk_bounds(sizes: Sequence[int], chunk_items: int = CHUNK_ITEMS) -> list[tuple[int, int]]:
    """[first, last) ranges of consecutive candidates of at most `chunk_items` items each (a candidate with more
    alone), fixed by the candidates' order and sizes only."""
    bounds, first, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > first and total + n > chunk_items:
            bounds.append((first, i))
            first, total = i, 0
        total += n
    return bounds + [(first, len(sizes))] if sizes else bounds


def user_vectors(
    texts: Sequence[Sequence[str]], encoder: Encoder, chunks: Chunks | None = None, batch_size: int = 32,
    progress: bool = True, normalize: bool = False, chunk_items: int = CHUNK_ITEMS,
) -> np.ndarray:
    """Eq. 2 for every user (`mta.models.encoders.user_item_embeddings`) chunk by chunk (`chunk_bounds`) -> (U, D).
    With `chunks`, chunk [first, last) is saved to the path `chunks(first, last)` names, with what it was made
    from, when it finishes, and read from there when that file holds it (`mta.stamps.current`)."""
    parts = []
    with tqdm(total=sum(map(len, texts)), desc="stage 1a items", unit="item", disable=not progress) as bar:
        for first, last in chunk_bounds([len(t) for t in texts], chunk_items):
            path, made_from = chunks(first, last) if chunks else (None, None)
            if path is not None and current(path, made_from):
                part = load_tensors(path)[0]["vectors"].numpy()
            else:
                part = user_item_embeddings(encoder, texts[first:last], batch_size, False, normalize)
                if path is not None:
                    with atomic_path(path) as tmp:
                        save_sealed_tensors(tmp, {"vectors": torch.from_numpy(part)}, made_from)
            parts.append(part)
            bar.update(sum(len(t) for t in texts[first:last]))
    return np.concatenate(parts)


def select_anchors(
    candidates: Sequence[User], task: TaskSpec, encoder: Encoder, n_anchors: int, min_items: int, seed: int,
    batch_size: int = 32, progress: bool = True, empty_cluster: str = "most_active", text: str = "authors_code",
    item_norm: bool = False, kmeans_n_init: int = 1, max_candidates: int | None = None,
    max_items: int | None = None, chunks: Chunks | None = None,
    chunk_items: int = CHUNK_ITEMS,
) -> tuple[np.ndarray, dict]:
    """(user vectors (U, D), anchors document). The candidates are `candidate_pool`'s (at most `max_candidates`),
    in order. A user's vector is Eq. 2 over its items shown as `text` says (`mta.data.lamp.cluster_texts`; at
    most `max_items` of them, `embedded_items`), their embeddings L2-normalised first with `item_norm`, made and
    saved chunk by chunk (`user_vectors`: `chunks`, `chunk_items`). The anchor of a
    cluster is its most active member with at least `min_items` items (the authors' code); in a cluster
    without one, its most active member (Eq. 3 as the paper states it), or none with `empty_cluster="none"`.
    Each anchor records the rule that chose it. Ties in activity go to the smallest user id."""
    candidates = candidate_pool(candidates, max_candidates, seed)
    texts = [embedded_items(u, task, text, max_items, seed) for u in candidates]
    vectors = user_vectors(texts, encoder, chunks, batch_size, progress, item_norm, chunk_items)  # (U, D)
    result = kmeans(vectors, n_anchors, n_init=kmeans_n_init, max_iter=3000, seed=seed)  # select_anchor.py:105
    anchors, empty = [], []
    for c in range(n_anchors):
        members = [candidates[i] for i in np.flatnonzero(result.labels == c)]
        eligible = [u for u in members if len(u.history) >= min_items]
        rule = f"most active with at least {min_items} items"
        if not eligible and members and empty_cluster == "most_active":
            eligible, rule = members, f"most active (no member has {min_items} items)"
        if not eligible:
            empty.append({"cluster": c, "size": len(members), "members": [u.user_id for u in members],
                          "reason": f"no user with at least {min_items} history items"})
            continue
        anchor = min(eligible, key=lambda u: (-len(u.history), u.user_id))
        anchors.append({"cluster": c, "user_id": anchor.user_id, "n_items": len(anchor.history), "rule": rule,
                        "cluster_size": len(members), "members": [u.user_id for u in members]})
    doc = {"n_clusters": n_anchors, "min_items": min_items, "seed": seed, "n_candidates": len(candidates),
           "max_candidates": max_candidates, "max_items_embedded": max_items, "inertia": result.inertia,
           "anchors": anchors, "clusters_without_anchor": empty}
    return vectors, doc
