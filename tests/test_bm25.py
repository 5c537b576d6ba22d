import itertools

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from mta.data.bm25 import BM25, top_k

HISTORY = [
    "Stocks rally as markets rebound after losses",
    "New study links coffee to longer life",
    "Markets fall as oil prices climb",
    "Local team wins the championship final",
    "Coffee prices climb on weak harvest",
    "Senate passes budget bill",
    "Oil markets steady after OPEC meeting",
    "Team captain injured before the final",
]


@pytest.mark.parametrize("query", ["oil markets", "coffee prices", "the final match", "unrelated words", ""])
def test_scores_and_ranking_match_bm25okapi(query):
    ref = BM25Okapi([d.split() for d in HISTORY])
    ref_scores = np.asarray(ref.get_scores(query.split()))
    index = BM25(HISTORY)
    np.testing.assert_array_equal(index.scores(query), ref_scores)
    ranking = index.rank(query)
    assert ranking == np.argsort(-ref_scores, kind="stable").tolist()
    assert all(ref_scores[a] >= ref_scores[b] for a, b in itertools.pairwise(ranking))


def test_ties_broken_by_history_order():
    docs = ["same words here", "other text", "same words here", "a b", "c d", "e f", "same words here"]
    assert top_k("same words", docs, 4) == [0, 2, 6, 1]


def test_top_k_exclude_and_bounds():
    ranking = BM25(HISTORY).rank("oil markets")
    assert top_k("oil markets", HISTORY, 2) == ranking[:2]
    assert top_k("oil markets", HISTORY, 2, exclude={ranking[0]}) == ranking[1:3]
    assert top_k("oil markets", HISTORY, 100) == ranking
    assert top_k("oil markets", HISTORY, 0) == []


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty history"):
        top_k("q", [], 1)
    with pytest.raises(ValueError, match="empty after tokenisation"):
        BM25(["", "  "])
    with pytest.raises(TypeError, match=r"docs\[1\]"):
        BM25(["ok", None])
    with pytest.raises(ValueError, match="k must be"):
        top_k("q", HISTORY, -1)
