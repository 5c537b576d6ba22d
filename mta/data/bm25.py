"""BM25 retrieval over a user's history, scored by `rank_bm25.BM25Okapi` as in the paper's code.

Texts are tokenised by whitespace split (no lower-casing), like the paper's retrieval code. Ties
in score are broken by history order (earlier item first), so rankings are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np
from rank_bm25 import BM25Okapi


def whitespace_tokenize(text: str) -> list[str]:
    return text.split()


class BM25:
    """BM25Okapi index over `docs` (k1=1.5, b=0.75, epsilon=0.25, rank_bm25's defaults)."""

    def __init__(self, docs: Sequence[str], tokenize: Callable[[str], list[str]] = whitespace_tokenize):
        docs = list(docs)
        if not docs:
            raise ValueError("BM25 needs at least one document, got an empty history")
        for i, d in enumerate(docs):
            if not isinstance(d, str):
                raise TypeError(f"docs[{i}] is {type(d).__name__}, expected str")
        self.tokenize = tokenize
        corpus = [tokenize(d) for d in docs]
        if not any(corpus):
            raise ValueError("BM25 documents are all empty after tokenisation")
        self.n_docs = len(docs)
        self.index = BM25Okapi(corpus)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query` -> float64 (n_docs,)."""
        return np.asarray(self.index.get_scores(self.tokenize(query)), dtype=np.float64)

    def rank(self, query: str, k: int | None = None, exclude: Collection[int] = ()) -> list[int]:
        """Indices of the `k` best documents (all if None), best first, ties by index, skipping `exclude`."""
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")
        if exclude:
            skip = set(exclude)
            order = np.array([i for i in order if i not in skip], dtype=np.int64)
        return order[:k].tolist() if k is not None else order.tolist()


def top_k(query: str, docs: Sequence[str], k: int, exclude: Collection[int] = ()) -> list[int]:
    """Indices into `docs` of the `k` items most relevant to `query` by BM25, best first."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return BM25(docs).rank(query, k, exclude)
