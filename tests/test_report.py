"""Results from hand-made per-user rows: every query scored, the paper's numbers beside the metric scored as
the paper did, LaMP's output format, and the cross-check of two runs (tools/compare_runs.py)."""
import json

import numpy as np
import pytest

from mta.eval import multiseed
from mta.eval.report import build_results, cross_check, lamp_files, paper_numbers, render_markdown


def _row(queries: list[tuple[str, str]], uid: str = "u", cut: int = 0) -> dict:
    """One (user, method) result as stage 3 writes it: (output, gold) per query."""
    return {"user_id": uid, "queries": [{"query_id": f"{uid}-q{j}", "output": o, "prediction": o, "gold": g,
                                         "prompt_cut": j < cut} for j, (o, g) in enumerate(queries)],
            "seconds": {}}


def _results(outputs: dict[str, list[str]]) -> dict:
    golds = ["the cat sat on the mat", "rain falls in spain", "stocks rise again", "a new law passes"]
    rows = {m: {f"u{i}": _row([(o, g)], f"u{i}") for i, (o, g) in enumerate(zip(outs, golds, strict=True))}
            for m, outs in outputs.items()}
    return build_results("news_headline", rows, meta={}, n_boot=200)


def _citation_rows() -> dict:
    """u0 with 3 queries, u1 with 1; MTA right on all but one query, RAG k=1 on one."""
    q = {"u0": ["[1]", "[2]", "[2]"], "u1": ["[1]"]}
    answers = {"mta": {"u0": ["[1]", "[2]", "[1]"], "u1": ["[1]"]}, "rag1": {"u0": ["[2]", "", "[1]"], "u1": ["[1]"]}}
    return {m: {u: _row(list(zip(outs, q[u], strict=True)), u, cut=1 if m == "rag1" else 0)
                for u, outs in by_user.items()} for m, by_user in answers.items()}


def test_every_query_is_scored_and_counted():
    result = build_results("citation", _citation_rows(), meta={}, n_boot=100)
    assert result["n_users"] == 2 and result["n_queries"] == 4 and result["users"] == ["u0", "u1"]
    mta, rag = result["methods"]["mta"], result["methods"]["rag1"]
    assert mta["n"] == 4 and mta["n_users"] == 2 and mta["metrics"]["accuracy"] == pytest.approx(3 / 4)
    assert rag["metrics"]["accuracy"] == pytest.approx(1 / 4)
    assert rag["metrics"]["accuracy_paper"] == pytest.approx(1 / 3)  # the empty output is dropped
    assert mta["prompts_cut"] == 0 and rag["prompts_cut"] == 2
    assert result["mta_vs"]["rag1"]["outputs_differ"] == 2
    assert len(result["per_user"]["u0"]["mta"]["queries"]) == 3
    md = render_markdown(result)
    assert "4 queries of 2 test users" in md and "| RAG (BM25, k=1) | 2 of 4 |" in md


def test_paper_number_stands_beside_the_paper_style_metric():
    result = build_results("citation", _citation_rows(), meta={}, n_boot=100)
    table = next(line for line in render_markdown(result).splitlines() if line.startswith("| Method |"))
    assert table == ("| Method | accuracy (ours, 95% CI) | f1 (ours, 95% CI) | accuracy_paper (ours, 95% CI) | "
                     "accuracy_paper (paper) | f1_paper (ours, 95% CI) | f1_paper (paper) |")
    mta = next(line for line in render_markdown(result).splitlines() if line.startswith("| MTA |"))
    assert mta.split(" | ")[4] == f"{paper_numbers('citation')['mta']['accuracy']:.4f}"


def test_an_old_single_query_result_is_refused():
    rows = _citation_rows()
    rows["mta"]["u1"] = {"user_id": "u1", "method": "mta", "output": "[1]", "gold": "[1]", "seconds": {}}
    with pytest.raises(ValueError, match="u1, mta: a result without 'queries'"):
        build_results("citation", rows, meta={})
    rows = _citation_rows()
    rows["mta"]["u0"]["queries"][2]["query_id"] = "other"
    with pytest.raises(ValueError, match="user u0: the methods answered different queries"):
        build_results("citation", rows, meta={})


def test_lamp_official_format():
    """{"task": "LaMP_1", "golds": [{"id", "output"}]} as LaMP-Benchmark/LaMP eval/evaluation.py reads it."""
    rows = _citation_rows()
    rows["mta"]["u0"]["queries"][1]["prediction"] = None
    files = lamp_files(build_results("citation", rows, meta={}, n_boot=10))
    assert set(files) == {"mta.json", "rag1.json", "golds.json"}
    assert files["golds.json"] == {"task": "LaMP_1", "golds": [{"id": "u0-q0", "output": "[1]"},
                                                               {"id": "u0-q1", "output": "[2]"},
                                                               {"id": "u0-q2", "output": "[2]"},
                                                               {"id": "u1-q0", "output": "[1]"}]}
    assert [g["output"] for g in files["mta.json"]["golds"]] == ["[1]", "", "[1]", "[1]"]
    assert json.loads(json.dumps(files)) == files


def test_multiseed_pools_queries_and_resamples_seed_users():
    results = [build_results("citation", _citation_rows(), meta={}, n_boot=10) for _ in range(2)]
    summary = multiseed.summarize(results, [0, 1])
    r = summary["mta_vs_pooled"]["rag1"]
    assert r["diff"] == pytest.approx(np.mean([1, 1, 0, 0] * 2))  # MTA right on queries 1, 2, 4; RAG on 4
    assert summary["methods"]["mta"]["accuracy"]["per_seed"] == [0.75, 0.75]
    drawn = []
    real = multiseed.report.bootstrap_ci
    multiseed.report.bootstrap_ci = lambda *a, **k: drawn.append(k["groups"]) or real(*a, **k)
    try:
        multiseed.summarize(results, [0, 1])
    finally:
        multiseed.report.bootstrap_ci = real
    assert drawn[0].tolist() == [0, 0, 0, 1, 2, 2, 2, 3]  # (seed, user): seed 1's users after seed 0's


def test_cross_check_counts_identical_outputs_and_tests_each_score_against_the_others_interval():
    a = _results({"base": ["the cat sat", "rain in spain", "stocks", "law"],
                  "mta": ["the cat sat on the mat", "rain falls in spain", "stocks rise again", "a new law passes"]})
    b = _results({"base": ["the cat sat", "rain in spain", "bonds fall", "law"],
                  "mta": ["dogs", "snow", "bonds", "old rule"]})
    check = cross_check(a, b)
    rows = check["methods"]
    assert rows["base"]["identical"] == 3 and rows["mta"]["identical"] == 0 and check["users"] == 4
    assert rows["base"]["a_inside_b"] and rows["base"]["b_inside_a"]
    assert rows["mta"]["a"] == 1.0 and rows["mta"]["b"] == 0.0
    assert not rows["mta"]["a_inside_b"] and not rows["mta"]["b_inside_a"]
    assert check["queries"] == 4
    old = json.loads(json.dumps(b))  # a results.json from before every query was scored: per-user `output`
    for by_method in old["per_user"].values():
        for row in by_method.values():
            row["output"] = row.pop("queries")[0]["output"]
    assert cross_check(a, old) == check
    a["per_user"]["u0"]["mta"]["queries"] *= 2
    with pytest.raises(ValueError, match="user u0, mta: 2 and 1 scored queries"):
        cross_check(a, old)
