"""The cross-check of two runs (tools/compare_runs.py) on hand-made results."""
from mta.eval.report import build_results, cross_check


def _results(outputs: dict[str, list[str]]) -> dict:
    golds = ["the cat sat on the mat", "rain falls in spain", "stocks rise again", "a new law passes"]
    rows = {m: {f"u{i}": {"output": o, "gold": g, "seconds": {}}
                for i, (o, g) in enumerate(zip(outs, golds, strict=True))}
            for m, outs in outputs.items()}
    return build_results("news_headline", rows, meta={}, n_boot=200)


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
