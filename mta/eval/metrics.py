"""LaMP metrics as the official evaluation computes them, plus intervals and paired tests.

Every metric is pooled over the test queries (a user may have several), as LaMP's eval and the MTA
authors' aggregate_results.py do (their per-user ROUGE/MAE is sample-weighted, RMSE pooled).
Intervals resample users (all of a user's queries together), not queries.
Outputs go through the task's parser first (mta.data.lamp), which is more lenient than both
references for LaMP-1/2/3: those compare the stripped output with the label verbatim (LaMP-3:
float(output); the authors also round and clamp it to 1..5).

Beside these, the paper's own scoring (`paper_style`, the `*_paper` metrics): the authors' eval scripts
and aggregate_results.py read the raw stripped output. LaMP-1/2: pairs with an empty output (or gold) are
dropped, accuracy is exact match, macro-F1 is over the labels that occur in the kept golds or outputs
(sklearn's default labels, zero_division=0). LaMP-3: float(output) rounded (Python's round) and clamped
to 1..5, anything else the farthest rating. LaMP-4/5: the `_stem` ROUGE below.

LaMP-1/2: accuracy and macro-F1 over the task's whole label set (a label nobody predicts
    or holds scores F1 0 and still counts in the mean, as sklearn's f1_score(labels=...)
    does); an unparsable output is a wrong label.
LaMP-3: MAE and RMSE; an unparsable output counts as the rating farthest from the gold
    (1 or 5; 5 when the gold is 3, as LaMP's eval breaks that tie).
LaMP-4/5: ROUGE-1 and ROUGE-L F-measure with rouge-score, without a stemmer (LaMP's
    convention, `rouge-1`, `rouge-L`) and with the Porter stemmer (the MTA authors'
    evaluation, `rouge-1_stem`, `rouge-L_stem`); reported as the plain mean over examples.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mta.data.lamp import TaskSpec, get_task, parse_rating_authors


@dataclass
class TaskScores:
    """LaMP metrics of one method on one task.

    summary: metric name -> value. per_example: metric name -> (N,) array over queries whose mean is the
    summary value, for paired tests (for `rmse` it holds squared errors, rmse = sqrt(mean));
    macro-F1 has no per-example form, its interval comes from `label_rows` via `ci("f1")`, and the
    paper-style metrics from `rows` (metric -> (rows, statistic)). groups: (N,) the user of each query;
    intervals resample users.
    """

    task: str
    summary: dict[str, float]
    per_example: dict[str, np.ndarray]
    n: int
    n_unparsable: int
    label_rows: np.ndarray | None = None  # (N, 2) predicted / gold label index, -1 = unparsable
    n_labels: int = 0
    groups: np.ndarray | None = None  # (N,) user index of each query; None: each query its own user
    rows: dict[str, tuple[np.ndarray, Callable[[np.ndarray], float]]] = field(default_factory=dict)

    def ci(self, name: str, n: int = 1000, seed: int = 0) -> tuple[float, float]:
        """95% percentile-bootstrap interval of one summary metric, resampling users."""
        kw = dict(n=n, seed=seed, groups=self.groups)
        if name in self.rows:
            values, statistic = self.rows[name]
            return bootstrap_ci(values, statistic=statistic, **kw)
        if name == "f1":
            return bootstrap_ci(self.label_rows, statistic=macro_f1_statistic(self.n_labels), **kw)
        if name == "rmse":
            return bootstrap_ci(self.per_example[name], statistic=lambda v: math.sqrt(np.mean(v)), **kw)
        return bootstrap_ci(self.per_example[name], **kw)


# ----------------------------------------------------------------------------- LaMP metrics


def macro_f1(pred_idx: np.ndarray, gold_idx: np.ndarray, labels: int | Sequence[int]) -> float:
    """Macro-F1 over labels 0..labels-1 (or the given label indices); predictions of -1 (unparsable) are
    simply wrong."""
    f1s = []
    for c in (range(labels) if isinstance(labels, int) else labels):
        tp = np.sum((pred_idx == c) & (gold_idx == c))
        fp = np.sum((pred_idx == c) & (gold_idx != c))
        fn = np.sum((pred_idx != c) & (gold_idx == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def macro_f1_statistic(n_labels: int) -> Callable[[np.ndarray], float]:
    """Statistic for bootstrap_ci over rows of (pred_idx, gold_idx)."""
    return lambda rows: macro_f1(rows[:, 0], rows[:, 1], n_labels)


def classification_scores(preds: Sequence[str | None], golds: Sequence[str], labels: Sequence[str]
                          ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Accuracy and macro-F1; `preds` are parsed labels (None when unparsable)."""
    index = {lab: i for i, lab in enumerate(labels)}
    bad = [g for g in golds if g not in index]
    if bad:
        raise ValueError(f"gold label {bad[0]!r} is not one of the task's labels {list(labels)}")
    gold_idx = np.array([index[g] for g in golds], dtype=np.int64)
    pred_idx = np.array([index.get(p, -1) if p is not None else -1 for p in preds], dtype=np.int64)
    correct = (pred_idx == gold_idx).astype(np.float64)
    summary = {"accuracy": float(correct.mean()) if len(golds) else 0.0,
               "f1": macro_f1(pred_idx, gold_idx, len(labels))}
    return summary, {"accuracy": correct, "label_rows": np.stack([pred_idx, gold_idx], axis=1)}


def rating_scores(preds: Sequence[str | float | None], golds: Sequence[str | float]
                  ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """MAE and RMSE; an unparsable prediction becomes 1 or 5, whichever is farther from gold."""
    y = np.array([float(g) for g in golds], dtype=np.float64)
    p = np.array([float(x) if x is not None else (1.0 if abs(1 - g) > abs(5 - g) else 5.0)
                  for x, g in zip(preds, y, strict=True)], dtype=np.float64)
    abs_err, sq_err = np.abs(p - y), (p - y) ** 2
    summary = {"mae": float(abs_err.mean()) if len(y) else 0.0,
               "rmse": float(math.sqrt(sq_err.mean())) if len(y) else 0.0}
    return summary, {"mae": abs_err, "rmse": sq_err}


_SCORERS: dict[bool, object] = {}


def rouge_scores(preds: Sequence[str], golds: Sequence[str]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """ROUGE-1 / ROUGE-L F-measure per example, without and with the Porter stemmer."""
    from rouge_score import rouge_scorer

    per_example = {}
    for stem in (False, True):
        if stem not in _SCORERS:
            _SCORERS[stem] = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=stem)
        scorer, suffix = _SCORERS[stem], "_stem" if stem else ""
        # rouge-score's argument order is score(target, prediction)
        scores = [scorer.score(g.strip(), p.strip()) for p, g in zip(preds, golds, strict=True)]
        per_example["rouge-1" + suffix] = np.array([s["rouge1"].fmeasure for s in scores], dtype=np.float64)
        per_example["rouge-L" + suffix] = np.array([s["rougeL"].fmeasure for s in scores], dtype=np.float64)
    summary = {k: float(v.mean()) if len(v) else 0.0 for k, v in per_example.items()}
    return summary, per_example


def paper_label_rows(outputs: Sequence[str], golds: Sequence[str]) -> np.ndarray:
    """(N, 2) output / gold index into the sorted labels seen in the stripped outputs and golds; a pair with an
    empty output or gold is (-1, -1): aggregate_results.py drops it."""
    pairs = [(str(o).strip(), str(g).strip()) for o, g in zip(outputs, golds, strict=True)]
    index = {lab: i for i, lab in enumerate(sorted({x for p in pairs if all(p) for x in p}))}
    return np.array([[index[o], index[g]] if o and g else [-1, -1] for o, g in pairs], dtype=np.int64).reshape(-1, 2)


def paper_accuracy(rows: np.ndarray) -> float:
    kept = rows[rows[:, 0] >= 0]
    return float(np.mean(kept[:, 0] == kept[:, 1])) if len(kept) else 0.0


def paper_f1(rows: np.ndarray) -> float:
    """sklearn's f1_score(golds, outputs, average='macro', zero_division=0) on the kept pairs: the mean over
    the labels occurring in them."""
    kept = rows[rows[:, 0] >= 0]
    present = np.unique(kept)
    return macro_f1(kept[:, 0], kept[:, 1], present) if len(kept) else 0.0


def paper_style(spec: TaskSpec, outputs: Sequence[str], golds: Sequence[str]
                ) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, Callable[[np.ndarray], float]]]]:
    """The authors' scoring of raw outputs (module docstring): metric -> value, metric -> (rows, statistic)
    for its interval. LaMP-4/5 have none here: their `_stem` ROUGE is it."""
    if spec.metric == "classification":
        rows = paper_label_rows(outputs, golds)
        stats = {"accuracy_paper": (rows, paper_accuracy), "f1_paper": (rows, paper_f1)}
    elif spec.metric == "rating":
        _, per = rating_scores([parse_rating_authors(o) for o in outputs], golds)
        stats = {"mae_paper": (per["mae"], lambda v: float(np.mean(v))),
                 "rmse_paper": (per["rmse"], lambda v: math.sqrt(np.mean(v)))}
    else:
        return {}, {}
    return {k: (f(v) if len(v) else 0.0) for k, (v, f) in stats.items()}, stats


def score_outputs(task: str | TaskSpec, outputs: Sequence[str], golds: Sequence[str],
                  groups: Sequence[int] | None = None) -> TaskScores:
    """Parse raw model outputs (one per query) with the task's parser and compute its LaMP metrics, and the
    paper's scoring of the raw outputs beside them. groups: the user of each query, for the intervals."""
    spec = get_task(task)
    if len(outputs) != len(golds):
        raise ValueError(f"{len(outputs)} outputs but {len(golds)} golds")
    groups = None if groups is None else np.asarray(groups, dtype=np.int64)
    if groups is not None and groups.shape != (len(golds),):
        raise ValueError(f"{len(groups)} groups for {len(golds)} outputs")
    parsed = [spec.parse(o) for o in outputs]
    n_bad = sum(p is None or p == "" for p in parsed)
    golds = [str(g).strip() for g in golds]
    paper, rows = paper_style(spec, outputs, golds)
    if spec.metric == "classification":
        summary, per = classification_scores(parsed, golds, spec.labels)
        labels = per.pop("label_rows")
        return TaskScores(spec.name, {**summary, **paper}, per, len(golds), n_bad, label_rows=labels,
                          n_labels=len(spec.labels), groups=groups, rows=rows)
    if spec.metric == "rating":
        summary, per = rating_scores(parsed, golds)
    else:
        summary, per = rouge_scores([p or "" for p in parsed], golds)
    return TaskScores(spec.name, {**summary, **paper}, per, len(golds), n_bad, groups=groups, rows=rows)


# ----------------------------------------------------------------------------- statistics


def bootstrap_ci(per_example: Sequence[float] | np.ndarray, n: int = 1000, seed: int = 0,
                 statistic: Callable[[np.ndarray], float] | None = None, confidence: float = 0.95,
                 groups: Sequence[int] | np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` (default: the mean) over resampled rows; with `groups`
    (the group of each row), over resampled groups, each drawn with all its rows (users with their queries)."""
    values = np.asarray(per_example)
    if len(values) == 0:
        raise ValueError("bootstrap_ci needs at least one example")
    statistic = statistic or (lambda v: float(np.mean(v)))
    rng = np.random.default_rng(seed)
    members = None if groups is None else [np.flatnonzero(np.asarray(groups) == g) for g in np.unique(groups)]

    def draw() -> np.ndarray:
        if members is None:
            return values[rng.integers(0, len(values), len(values))]
        return values[np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])]

    stats = np.array([statistic(draw()) for _ in range(n)])
    tail = (1 - confidence) / 2
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1 - tail))


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by the continued fraction (modified Lentz)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1.0 - betainc(b, a, 1.0 - x)
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return math.exp(log_front) * h / a


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sided paired t-test of mean(a - b) = 0; returns (t, p)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError("paired_t_test needs two equal-length sequences of at least 2 values")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(len(d)))
    return t, min(1.0, 2.0 * student_t_cdf(-abs(t), len(d) - 1))
