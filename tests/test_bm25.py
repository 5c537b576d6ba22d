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


def release_order(ref: BM25Okapi, tokens: list[str]) -> list[int]:
    """get_top_n's order, `np.argsort(scores)[::-1]`, with ties the later item first (a stable sort; numpy's
    default sort leaves ties machine by machine). Where no two scores tie, it is get_top_n's order itself."""
    scores = ref.get_scores(tokens)
    order = np.argsort(scores, kind="stable")[::-1].tolist()
    if len(set(scores.tolist())) == len(scores):
        assert order == ref.get_top_n(tokens, list(range(len(scores))), n=len(scores))
    return order


@pytest.mark.parametrize("query", ["oil markets", "coffee prices", "the final match", "unrelated words", ""])
def test_scores_and_ranking_match_bm25okapi(query):
    ref = BM25Okapi([d.split(" ") for d in HISTORY])
    index = BM25(HISTORY)
    np.testing.assert_array_equal(index.scores(query), ref.get_scores(query.split(" ")))
    assert index.rank(query) == release_order(ref, query.split(" "))


def messy_history(n, seed):
    """n items drawn from a few words, with double spaces, newlines, tabs, edge spaces and duplicates."""
    rng = np.random.default_rng(seed)
    words = ["oil", "markets", "coffee", "prices", "team", "final", "budget", "the"]
    seps = [" ", "  ", "\n", " \n", "\t", " "]
    items = []
    for _ in range(n):
        if items and rng.random() < 0.3:
            items.append(items[rng.integers(len(items))])  # a duplicate: equal scores
            continue
        picked = rng.choice(words, size=rng.integers(1, 6))
        text = "".join(w + seps[rng.integers(len(seps))] for w in picked).rstrip("\n\t")
        items.append((" " if rng.random() < 0.2 else "") + text)
    return items


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16, 17, 40, 120, 300])
def test_order_is_get_top_n_on_ties_newlines_and_double_spaces(n):
    """The releases: BM25Okapi([d.split(" ")]) and get_top_n(query.split(" "), ...), ties the later first."""
    docs = messy_history(n, seed=n)
    ref = BM25Okapi([d.split(" ") for d in docs])
    for query in ["oil  markets", "coffee\nprices team", "the final", "budget", "unknown", "", " oil"]:
        tokens = query.split(" ")
        want = release_order(ref, tokens)
        assert BM25(docs).rank(query) == want
        assert top_k(query, docs, 1) == want[:1] and top_k(query, docs, 3) == want[:3]
        skip = set(want[:2]) | {n - 1}
        assert top_k(query, docs, 4, exclude=skip) == [i for i in want if i not in skip][:4]


def test_split_on_single_spaces_unlike_split():
    docs = ["oil\nprices rise", "oil prices  fall", "markets"]
    np.testing.assert_array_equal(BM25(docs).scores("oil prices"), BM25Okapi(
        [d.split(" ") for d in docs]).get_scores(["oil", "prices"]))
    assert BM25(docs).scores("oil prices")[0] == 0  # "oil\nprices" is one token
    assert BM25(docs, sep=None).scores("oil prices")[0] > 0
    ref = BM25Okapi([d.split() for d in docs])
    assert BM25(docs, sep=None).rank("oil prices") == ref.get_top_n(["oil", "prices"], [0, 1, 2], n=3)


def test_ties_the_later_item_first():
    docs = ["same words here", "other text", "same words here", "a b", "c d", "e f", "same words here"]
    assert top_k("same words", docs, 3) == [6, 2, 0]  # the later of equal scores first
    many = ["x y"] * 40  # all tied, where numpy's vectorised sort may not keep ties in place
    assert top_k("x", many, 40) == list(range(39, -1, -1))


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
        BM25(["", "  "], sep=None)
    assert BM25(["", "  "]).n_docs == 2  # split(" ") never gives an empty token list
    with pytest.raises(TypeError, match=r"docs\[1\]"):
        BM25(["ok", None])
    with pytest.raises(ValueError, match="k must be"):
        top_k("q", HISTORY, -1)
