"""BM25 retrieval over a user's history, as the released scripts do it: `rank_bm25.BM25Okapi` over texts
split by `text.split(sep)`, ranked in the order of `BM25Okapi.get_top_n`.

sep " " is the releases' `split(" ")`: no lower-casing, newlines and tabs stay inside tokens, and every
extra space gives an empty token, which counts in a document's length and matches an empty query token.
sep None is `split()` on any whitespace (MTA's LaMP-2 scripts and its LaMP-1 hard negatives).
The order is get_top_n's `np.argsort(scores)[::-1]` with a stable sort, so among equal scores the later
item comes first. get_top_n's own default sort leaves ties in an order that depends on numpy's version and
the CPU's vector unit; the stable sort gives one order on every machine.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
from rank_bm25 import BM25Okapi


class BM25:
    """BM25Okapi index over `docs` (k1=1.5, b=0.75, epsilon=0.25, rank_bm25's defaults)."""

    def __init__(self, docs: Sequence[str], sep: str | None = " "):
        docs = list(docs)
        if not docs:
            raise ValueError("BM25 needs at least one document, got an empty history")
        for i, d in enumerate(docs):
            if not isinstance(d, str):
                raise TypeError(f"docs[{i}] is {type(d).__name__}, expected str")
        self.sep = sep
        corpus = [d.split(sep) for d in docs]
        if not any(corpus):
            raise ValueError("BM25 documents are all empty after tokenisation")
        self.n_docs = len(docs)
        self.index = BM25Okapi(corpus)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query` -> float64 (n_docs,)."""
        return np.asarray(self.index.get_scores(query.split(self.sep)), dtype=np.float64)

    def rank(self, query: str, k: int | None = None, exclude: Collection[int] = ()) -> list[int]:
        """Indices of the `k` best documents (all if None), best first (equal scores: the later), minus `exclude`."""
        order = np.argsort(self.scores(query), kind="stable")[::-1].tolist()
        if exclude:
            skip = set(exclude)
            order = [i for i in order if i not in skip]
        return order[:k] if k is not None else order


def top_k(query: str, docs: Sequence[str], k: int, exclude: Collection[int] = (), sep: str | None = " ") -> list[int]:
    """Indices into `docs` of the `k` items most relevant to `query` by BM25, best first."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return BM25(docs, sep).rank(query, k, exclude)
