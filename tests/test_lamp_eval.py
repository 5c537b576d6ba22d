"""LaMP's own evaluation script (LaMP-Benchmark/LaMP eval/eval_task.py and eval/evaluation.py, unmodified, in
tests/lamp_eval/) run on the LaMP-format files that `mta.eval.report.lamp_files` writes, against our official
metrics. LaMP's code loads Hugging Face `evaluate` metrics, which fetch their scripts at run time; here a stand-in
`evaluate` module does what those scripts' `_compute` do (huggingface/evaluate metrics/{f1,accuracy,mse,mae,rouge}),
over scikit-learn and rouge-score."""

import hashlib
import json
import runpy
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from mta.eval.report import build_results, lamp_files

metrics = pytest.importorskip("sklearn.metrics")
pytestmark = pytest.mark.filterwarnings("ignore:F-score is ill-defined")  # LaMP's f1 over labels nobody uses
LAMP_EVAL = Path(__file__).with_name("lamp_eval")
BLOBS = {"evaluation.py.txt": "cf47c31714ded27ec97cc0121cf1c1cb55e7e986",
         "eval_task.py.txt": "8ace7664a08e6eb811e764e0469b91ff789cea91"}


class Metric:
    """evaluate.load(name): `compute` as each metric script's `_compute` (huggingface/evaluate, commit a7dd338)."""

    def __init__(self, name: str):
        self.name = name

    def compute(self, predictions, references, **kw):
        if self.name == "f1":
            score = metrics.f1_score(references, predictions, labels=kw.get("labels"), pos_label=1,
                                     average=kw.get("average", "binary"))
            return {"f1": score if getattr(score, "size", 1) > 1 else float(score)}
        if self.name == "accuracy":
            return {"accuracy": float(metrics.accuracy_score(references, predictions))}
        if self.name == "mse":
            fn = metrics.mean_squared_error if kw.get("squared", True) else metrics.root_mean_squared_error
            return {"mse": fn(references, predictions)}
        if self.name == "mae":
            return {"mae": metrics.mean_absolute_error(references, predictions)}
        if self.name == "rouge":
            from rouge_score import rouge_scorer, scoring

            scorer = rouge_scorer.RougeScorer(rouge_types=["rouge1", "rouge2", "rougeL", "rougeLsum"],
                                              use_stemmer=False, tokenizer=None)
            aggregator = scoring.BootstrapAggregator()
            for ref, pred in zip(references, predictions, strict=True):
                aggregator.add_scores(scorer.score_multi(ref, pred) if isinstance(references[0], list)
                                      else scorer.score(ref, pred))
            return {k: v.mid.fmeasure for k, v in aggregator.aggregate().items()}
        raise ValueError(f"no stand-in for evaluate metric {self.name!r}")


def git_blob(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def run_lamp_eval_task(golds: Path, preds: Path, task: str, tmp_path: Path) -> dict:
    """`python eval_task.py --golds_json ... --preds_json ... --task_name ... --output_file ...`, LaMP's code as
    released, with the stand-in `evaluate` and its `evaluation` module importable."""
    evaluate = types.ModuleType("evaluate")
    evaluate.load = Metric
    evaluation = types.ModuleType("evaluation")
    evaluation.__file__ = str(LAMP_EVAL / "evaluation.py.txt")
    saved = {k: sys.modules.get(k) for k in ("evaluate", "evaluation")}
    argv = sys.argv
    out = tmp_path / "lamp_scores.json"
    try:
        sys.modules["evaluate"] = evaluate
        exec(compile((LAMP_EVAL / "evaluation.py.txt").read_text(), evaluation.__file__, "exec"), evaluation.__dict__)
        sys.modules["evaluation"] = evaluation
        sys.argv = ["eval_task.py", "--golds_json", str(golds), "--preds_json", str(preds), "--task_name", task,
                    "--output_file", str(out)]
        runpy.run_path(str(LAMP_EVAL / "eval_task.py.txt"), run_name="__main__")
    finally:
        sys.argv = argv
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return json.loads(out.read_text())


def test_the_lamp_code_is_the_released_one():
    assert {name: git_blob(LAMP_EVAL / name) for name in BLOBS} == BLOBS


def _rows(task: str) -> dict:
    """Two methods on three users, one of them with three queries; outputs the parsers read, miss or reject."""
    golds = {"citation": ["[1]", "[2]", "[2]", "[1]", "[2]"],
             "movie_tagging": ["comedy", "sci-fi", "action", "comedy", "true story"],
             "product_rating": ["5", "3", "1", "4", "2"],
             "news_headline": ["the cat sat on the mat", "rain falls in spain", "stocks rise again",
                               "a new law passes", "cats and dogs"]}[task]
    outputs = {"citation": [["[1]", "[1]", "I pick [2]", "", "[2]"], ["[2]", "[2]", "no", "[1]", "[1]"]],
               "movie_tagging": [["Comedy.", "sci-fi", "horror", "comedy", ""], ["action", "sci-fi", "action",
                                                                                  "drama", "true story"]],
               "product_rating": [["5", "Score: 2", "great", "4.0", "1"], ["4", "3", "1", "", "5"]],
               "news_headline": [["the cat sat", "rain in spain", "stocks", "law passes", "dogs and cats"],
                                 ["a cat on a mat", "rain", "", "a new law", "cats and dogs"]]}[task]
    users = [("u0", [0, 1, 2]), ("u1", [3]), ("u2", [4])]
    from mta.data.lamp import get_task

    spec = get_task(task)
    return {m: {u: {"queries": [{"query_id": f"q{i}", "output": outs[i], "prediction": spec.parse(outs[i]),
                                 "gold": golds[i], "prompt_cut": False} for i in idx], "seconds": {}}
                for u, idx in users}
            for m, outs in zip(("mta", "rag1"), outputs, strict=True)}


@pytest.mark.parametrize("task", ["citation", "movie_tagging", "product_rating", "news_headline"])
def test_lamp_own_evaluation_agrees_with_our_official_metrics(task, tmp_path):
    result = build_results(task, _rows(task), meta={}, n_boot=10)
    files = lamp_files(result)
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    lamp_task = files["golds.json"]["task"]
    for m, r in result["methods"].items():
        theirs = run_lamp_eval_task(tmp_path / "golds.json", tmp_path / f"{m}.json", lamp_task, tmp_path)
        ours = r["metrics"]
        if task in ("citation", "movie_tagging"):
            assert theirs == {"accuracy": pytest.approx(ours["accuracy"]), "f1": pytest.approx(ours["f1"])}
        elif task == "product_rating":
            assert theirs == {"MAE": pytest.approx(ours["mae"]), "RMSE": pytest.approx(ours["rmse"])}
        else:  # evaluate's rouge reports the median of 1000 bootstrap means (rouge-score's BootstrapAggregator)
            assert theirs == {"rouge-1": pytest.approx(ours["rouge-1"], abs=0.03),
                              "rouge-L": pytest.approx(ours["rouge-L"], abs=0.03)}
    assert np.isfinite(list(theirs.values())).all()
