import math

import numpy as np
import pytest

from mta.data.lamp import parse_rating_authors
from mta.eval.metrics import (
    betainc,
    bootstrap_ci,
    classification_scores,
    macro_f1_statistic,
    paired_t_test,
    rating_scores,
    rouge_scores,
    score_outputs,
    student_t_cdf,
)

# ----------------------------------------------------------------------------- classification


def test_accuracy_and_macro_f1_by_hand():
    summary, per = classification_scores(["a", "b", "b", None], ["a", "a", "b", "c"], ["a", "b", "c"])
    # a: tp1 fp0 fn1 -> 2/3; b: tp1 fp1 fn0 -> 2/3; c: tp0 -> 0
    assert summary["accuracy"] == 0.5
    assert summary["f1"] == pytest.approx(4 / 9)
    assert per["accuracy"].tolist() == [1, 0, 1, 0]


def test_macro_f1_counts_labels_nobody_uses():
    summary, _ = classification_scores(["a", "b"], ["a", "b"], ["a", "b", "c"])
    assert summary == {"accuracy": 1.0, "f1": pytest.approx(2 / 3)}


def test_all_unparsable_and_unknown_labels_are_wrong():
    summary, _ = classification_scores([None, "zzz"], ["a", "b"], ["a", "b"])
    assert summary == {"accuracy": 0.0, "f1": 0.0}


def test_gold_outside_label_set_is_an_error():
    with pytest.raises(ValueError, match="'d'"):
        classification_scores(["a"], ["d"], ["a", "b"])


def test_macro_f1_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = [str(i) for i in range(6)]
    golds = [labels[i] for i in rng.integers(0, 5, 200)]
    preds = [labels[i] if i < 6 else None for i in rng.integers(0, 7, 200)]
    ours, _ = classification_scores(preds, golds, labels)
    to_idx = lambda xs: [int(x) if x is not None else -1 for x in xs]  # noqa: E731
    ref = metrics.f1_score(to_idx(golds), to_idx(preds), labels=list(range(6)), average="macro", zero_division=0)
    assert ours["f1"] == pytest.approx(ref)
    assert ours["accuracy"] == pytest.approx(metrics.accuracy_score(to_idx(golds), to_idx(preds)))


# ----------------------------------------------------------------------------- rating


def test_mae_rmse_with_unparsable_as_farthest_rating():
    # None with gold 3 -> 5 (LaMP's tie-break), None with gold 5 -> 1
    summary, per = rating_scores(["1", None, None, "2"], ["1", "3", "5", "4"])
    assert per["mae"].tolist() == [0, 2, 4, 2]
    assert summary["mae"] == 2.0
    assert summary["rmse"] == pytest.approx(math.sqrt(6))


def test_unparsable_with_gold_1_and_2_becomes_5():
    summary, _ = rating_scores([None, None], ["1", "2"])
    assert summary["mae"] == pytest.approx(3.5)


# ----------------------------------------------------------------------------- rouge


def test_rouge_unstemmed_and_stemmed_by_hand():
    summary, per = rouge_scores(["the cats sat", ""], ["the cat sat", "a title"])
    assert per["rouge-1"].tolist() == pytest.approx([2 / 3, 0.0])  # 'cats' != 'cat' without stemming
    assert per["rouge-L"].tolist() == pytest.approx([2 / 3, 0.0])
    assert per["rouge-1_stem"].tolist() == pytest.approx([1.0, 0.0])
    assert per["rouge-L_stem"].tolist() == pytest.approx([1.0, 0.0])
    assert summary["rouge-1"] == pytest.approx(1 / 3)
    assert set(summary) == {"rouge-1", "rouge-L", "rouge-1_stem", "rouge-L_stem"}


def test_rouge_l_uses_longest_common_subsequence():
    summary, _ = rouge_scores(["b a c"], ["a b c"])
    assert summary["rouge-1"] == pytest.approx(1.0)
    assert summary["rouge-L"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- from raw outputs


def test_score_outputs_parses_per_task():
    s = score_outputs("lamp1", ["[1]", "answer: [1]", "no idea"], ["[1]", "[2]", "[2]"])
    assert s.summary["accuracy"] == pytest.approx(1 / 3) and s.n_unparsable == 1
    s = score_outputs("movie_tagging", ["Comedy.", "dark comedy", ""], ["comedy", "comedy", "action"])
    assert s.summary["accuracy"] == pytest.approx(1 / 3) and s.n_unparsable == 1
    s = score_outputs("lamp3", ["Score: 4", "5 stars", "great"], ["4", "3", "1"])
    assert s.summary["mae"] == pytest.approx((0 + 2 + 4) / 3)
    s = score_outputs("lamp4", ["\n  the cat sat \nsecond line", ""], ["the cat sat", "x"])
    assert s.summary["rouge-1"] == pytest.approx(0.5) and s.n_unparsable == 1
    s = score_outputs("lamp5", ["Graph nets. We propose a model"], ["Graph nets"])  # cut at the first '.'
    assert s.summary["rouge-1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 outputs but 1 golds"):
        score_outputs("lamp5", ["a", "b"], ["a"])


# ----------------------------------------------------------------------------- the paper's scoring


def _aggregate_results(outputs, golds):
    """The authors' aggregate_results.py (zyj1214566/MTA, lines 140-178) on one pooled set of predictions, as
    their eval scripts write them: prediction = the stripped raw output; pairs with an empty side are dropped."""
    metrics = pytest.importorskip("sklearn.metrics")
    kept = [(str(o).strip(), str(g).strip()) for o, g in zip(outputs, golds, strict=True)]
    kept = [(o, g) for o, g in kept if o and g]
    truth, preds = [g for _, g in kept], [o for o, _ in kept]
    return {"accuracy_paper": metrics.accuracy_score(truth, preds),
            "f1_paper": metrics.f1_score(truth, preds, average="macro", zero_division=0)}


@pytest.mark.parametrize("task", ["citation", "movie_tagging"])
def test_paper_style_classification_is_aggregate_results(task):
    """Exact match of the raw output, empty outputs dropped, macro-F1 over the labels seen in the kept golds and
    outputs (sklearn's default labels), unlike the official scoring of the parsed output over the task's labels."""
    rng = np.random.default_rng(5)
    labels = ["[1]", "[2]"] if task == "citation" else ["comedy", "action", "sci-fi", "romance", "classic"]
    junk = ["", "  ", "[1].", "Comedy", "answer: [2]", "sci-fi\n"]
    golds = [labels[i] for i in rng.integers(0, len(labels), 60)]
    outputs = [labels[i] if i < len(labels) else junk[i - len(labels)]
               for i in rng.integers(0, len(labels) + len(junk), 60)]
    s = score_outputs(task, outputs, golds)
    ref = _aggregate_results(outputs, golds)
    assert s.summary["accuracy_paper"] == pytest.approx(ref["accuracy_paper"])
    assert s.summary["f1_paper"] == pytest.approx(ref["f1_paper"])
    assert s.summary["accuracy_paper"] != pytest.approx(s.summary["accuracy"])  # the two scorings do differ here
    # by hand: the empty output is dropped, "[1]." is a label of its own with F1 0
    s = score_outputs("citation", ["[1]", "", "[1].", "[2]"], ["[1]", "[2]", "[1]", "[2]"])
    assert s.summary["accuracy_paper"] == pytest.approx(2 / 3)
    assert s.summary["f1_paper"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert s.summary["accuracy"] == pytest.approx(3 / 4)  # the official parser reads "[1]." as [1]
    lo, hi = s.ci("f1_paper", n=100)
    assert 0 <= lo <= hi <= 1


def test_paper_style_rating_is_evaluate_product_rating():
    """float(stripped output), Python's round, clamped to 1..5; anything else the farthest rating."""
    assert [parse_rating_authors(x) for x in ["4", " 4.6 ", "2.5", "3.5", "7", "-1", "0.4", "four", "", "nan", "inf"]] \
        == ["4", "5", "2", "4", "5", "1", "1", None, None, None, None]
    s = score_outputs("product_rating", ["4.6", "Score: 4", "2.5", "9"], ["5", "4", "3", "1"])
    # paper: 5 (0), unreadable -> 1 (3), 2 (1), 5 (4); official: unreadable 4.6 -> 1 (4), 4 (0), 2.5 (0.5), 9 (8)
    assert s.summary["mae_paper"] == pytest.approx(8 / 4)
    assert s.summary["rmse_paper"] == pytest.approx(math.sqrt((0 + 9 + 1 + 16) / 4))
    assert s.summary["mae"] != pytest.approx(s.summary["mae_paper"])


# ----------------------------------------------------------------------------- statistics


def test_bootstrap_resamples_users_with_all_their_queries():
    """User 0 has four correct queries, user 1 one wrong: every replicate holds whole users (the count of
    ones a multiple of 4, as many rows as its users' queries); without groups it resamples single queries."""
    values, groups = np.array([1.0, 1, 1, 1, 0]), np.array([0, 0, 0, 0, 1])
    drawn = []
    bootstrap_ci(values, n=100, seed=0, groups=groups, statistic=lambda v: drawn.append(v) or 0.0)
    assert all(np.sum(v == 1) % 4 == 0 and len(v) == 2 * 4 - 3 * np.sum(v == 0) for v in drawn)
    assert {len(v) for v in drawn} == {2, 5, 8}
    single = []
    bootstrap_ci(values, n=100, seed=0, statistic=lambda v: single.append(v) or 0.0)
    assert {len(v) for v in single} == {5} and any(np.sum(v == 1) % 4 for v in single)
    s = score_outputs("citation", ["[1]"] * 4 + ["[2]"], ["[1]"] * 5, groups=groups)
    assert s.ci("accuracy", n=200) == bootstrap_ci(s.per_example["accuracy"], n=200, groups=groups)
    assert s.ci("accuracy", n=200) != bootstrap_ci(s.per_example["accuracy"], n=200)
    with pytest.raises(ValueError, match="2 groups for 5"):
        score_outputs("citation", ["[1]"] * 5, ["[1]"] * 5, groups=[0, 1])


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    x = np.random.default_rng(1).normal(size=100)
    lo, hi = bootstrap_ci(x, n=500, seed=3)
    assert (lo, hi) == bootstrap_ci(x, n=500, seed=3)
    assert lo < x.mean() < hi
    assert bootstrap_ci(np.full(10, 0.25), n=50) == (0.25, 0.25)


def test_bootstrap_ci_with_macro_f1_statistic():
    _, per = classification_scores(["a", "b", "a", "b"], ["a", "b", "b", "b"], ["a", "b"])
    lo, hi = bootstrap_ci(per["label_rows"], n=200, seed=0, statistic=macro_f1_statistic(2))
    assert 0.0 <= lo <= hi <= 1.0


def test_task_scores_intervals_for_every_metric():
    outputs = ["comedy", "action", "sci-fi", "comedy", "?"] * 8
    golds = ["comedy", "comedy", "sci-fi", "action", "violence"] * 8
    s = score_outputs("lamp2", outputs, golds)
    assert set(s.per_example) == {"accuracy"} and s.label_rows.shape == (40, 2) and s.n_labels == 15
    for name in ("accuracy", "f1"):
        lo, hi = s.ci(name, n=200, seed=1)
        assert lo <= s.summary[name] <= hi
    r = score_outputs("lamp3", ["1", "2", "5", "4", "x"] * 8, ["1", "3", "4", "4", "2"] * 8)
    for name in ("mae", "rmse"):
        lo, hi = r.ci(name, n=200, seed=1)
        assert lo <= r.summary[name] <= hi
    assert r.summary["rmse"] == pytest.approx(math.sqrt(r.per_example["rmse"].mean()))
    g = score_outputs("lamp5", ["a b", "c d"] * 5, ["a b", "c e"] * 5)
    assert g.ci("rouge-L_stem", n=100) == pytest.approx(g.ci("rouge-L_stem", n=100))


def test_betainc_against_binomial_sums():
    # I_x(k, n-k+1) = P(Binomial(n, x) >= k)
    for n, k, x in [(4, 2, 0.4), (10, 3, 0.25), (30, 20, 0.7)]:
        tail = sum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(k, n + 1))
        assert betainc(k, n - k + 1, x) == pytest.approx(tail, rel=1e-12)
    assert betainc(2.0, 3.0, 0.0) == 0.0 and betainc(2.0, 3.0, 1.0) == 1.0


def test_student_t_cdf_known_values():
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy
    for t in (-3.0, -0.5, 0.0, 1.5, 4.0):
        assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)))
        s = t / math.sqrt(4 + t * t)
        assert student_t_cdf(t, 4) == pytest.approx(0.5 + 0.75 * s * (1 - s * s / 3))
    assert 2 * student_t_cdf(-2.0, 10) == pytest.approx(0.0733880348, abs=1e-9)
    assert 2 * student_t_cdf(-2.228138852, 10) == pytest.approx(0.05, abs=1e-9)  # t table
    assert 2 * student_t_cdf(-1.959963985, 1e7) == pytest.approx(0.05, abs=1e-6)  # normal limit


def test_paired_t_test_by_hand():
    t, p = paired_t_test([1, 2, 3, 4, 5], [1.1, 1.9, 3.5, 3.9, 5.6])
    # d = [-.1, .1, -.5, .1, -.6]: mean -.2, sd sqrt(.11), t = -.2 / (sqrt(.11)/sqrt(5))
    assert t == pytest.approx(-0.2 / math.sqrt(0.11 / 5))
    s = t / math.sqrt(4 + t * t)
    assert p == pytest.approx(2 * (0.5 + 0.75 * s * (1 - s * s / 3)))
    assert paired_t_test([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)
    assert paired_t_test([2, 3, 4], [1, 2, 3]) == (math.inf, 0.0)
    with pytest.raises(ValueError):
        paired_t_test([1.0], [2.0])
