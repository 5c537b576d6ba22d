"""Stage 1a: per-item embeddings, user vector = their mean (Eq. 2), K-Means into V clusters, and the most
active eligible user of each cluster as its anchor (Eq. 3)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mta.data.lamp import TaskSpec, User, cluster_texts
from mta.models.encoders import Encoder, user_item_embeddings
from mta.stages.kmeans import kmeans


def select_anchors(
    candidates: Sequence[User], task: TaskSpec, encoder: Encoder, n_anchors: int, min_items: int, seed: int,
    batch_size: int = 32, progress: bool = True, empty_cluster: str = "most_active", text: str = "authors_code",
    item_norm: bool = False, kmeans_n_init: int = 1,
) -> tuple[np.ndarray, dict]:
    """(user vectors (U, D), anchors document). A user's vector is Eq. 2 over its items shown as `text` says
    (`mta.data.lamp.cluster_texts`), their embeddings L2-normalised first with `item_norm`. The anchor of a
    cluster is its most active member with at least `min_items` items (the authors' code); in a cluster
    without one, its most active member (Eq. 3 as the paper states it), or none with `empty_cluster="none"`.
    Each anchor records the rule that chose it. Ties in activity go to the smallest user id."""
    texts = [cluster_texts(task, u.history, text) for u in candidates]
    vectors = user_item_embeddings(encoder, texts, batch_size, progress, normalize=item_norm)  # (U, D)
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
    doc = {"n_clusters": n_anchors, "min_items": min_items, "seed": seed, "inertia": result.inertia,
           "anchors": anchors, "clusters_without_anchor": empty}
    return vectors, doc
