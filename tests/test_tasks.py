"""LaMP-1, 3 and 5 end to end: tiny files in the official release layout, converted by mta.data.lamp_release,
then every stage and method through `make reproduce`'s entry point, scored with each task's metrics."""

import json

import pytest

from mta.methods import DEFAULT
from mta.run import pipeline
from mta.run.cli import main
from tests.fixtures import make_profile
from tests.test_lamp_release import build_lamp

METRICS = {"lamp1": ("accuracy", "f1"), "lamp3": ("mae", "rmse"), "lamp5": ("rouge-1", "rouge-L")}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(METRICS))
def test_every_method_runs_end_to_end_on_the_official_layout(task, tiny_run_inputs, tmp_path):
    _, llm, bert = tiny_run_inputs
    lamp = build_lamp(tmp_path, task, n_users=12, n_items=12, n_test=2, test_items=10)
    profile = make_profile(tmp_path / "tiny.json", llm, bert, max_new_tokens=4)
    argv = ["--task", task, "--profile", str(profile), "--lamp-dir", str(lamp), "--runs", str(tmp_path / "runs"),
            "--no-progress"]
    result = main("test", pipeline.reproduce, argv)
    assert set(result["methods"]) == set(DEFAULT) and len(result["users"]) == 2
    for name in METRICS[task]:
        for m in DEFAULT:
            assert name in result["methods"][m]["metrics"]
    if task == "lamp3":  # a rating or None, which scores as the farthest rating (tests/test_metrics.py)
        rows = result["per_user"]
        for by_method in rows.values():
            for r in by_method.values():
                assert all(q["prediction"] is None or q["prediction"] in "12345" for q in r["queries"])
    md = (tmp_path / "runs" / result["task"] / "tiny-seed0" / "results.md").read_text()
    assert "Table 1" in md and "Table 2" in md and "(paper)" in md
    assert json.loads((tmp_path / "runs" / result["task"] / "tiny-seed0" / "results.json").read_text())["users"]
