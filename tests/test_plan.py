"""`mta plan` and `mta reproduce --plan`: the counts the tiny run then met, nothing written but plan.json, stated
rates where the profile's device is not here, the estimate beside the measured times in results.md, and `make plan`
on the variables of `make reproduce`."""

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mta.eval.report import render_markdown
from mta.run import pipeline
from mta.run.cli import main
from mta.run.commands import run_command
from tests.conftest import RESULTS_MD
from tests.fixtures import make_profile, smollm_dir

ROOT = Path(__file__).resolve().parents[1]


def elsewhere(argv: list[str], runs: Path) -> list[str]:
    """The tiny run's argv with another --runs folder."""
    return [str(runs) if argv[i - 1] == "--runs" else a for i, a in enumerate(argv)]


def files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def tiny_plan(tiny_run, tmp_path_factory):
    """The plan of the tiny run's argv, made in a runs folder of its own: (runs folder, plan)."""
    runs = tmp_path_factory.mktemp("plan") / "runs"
    return runs, run_command("plan", elsewhere(tiny_run[1], runs))


def test_the_plan_counts_what_the_run_then_does(tiny_run, tiny_plan):
    run_dir, _, result = tiny_run
    _, plan = tiny_plan
    counts, stages = plan["counts"], plan["stages"]
    anchors = json.loads((run_dir / "stage1" / "anchors.json").read_text())
    assert (counts["candidates"], counts["anchors"]) == (anchors["n_candidates"], len(anchors["anchors"]))
    bank = [json.loads(p.read_text()) for p in sorted(run_dir.glob("bank/*/train_log.json"))]
    assert (stages["stage1b_bank"]["loras"], stages["stage1b_bank"]["examples"]) == (
        len(bank), sum(log["examples"] for log in bank))
    # the same example builders under the same seeds: OPPU's task LoRA and every trained stage-3 unit to the token
    oppu_task = json.loads((run_dir / "population" / "oppu_task" / "train_log.json").read_text())
    assert stages["stage1c_population"]["tokens"] == oppu_task["tokens"]
    units = [p for p in run_dir.glob("users/*/*.json") if not p.name.endswith(".error.json")]
    assert counts["units"] == len(units) == len(result["users"]) * len(result["methods"])
    for method in ("oppu", "adapt_only", "mta"):
        trained = sum(json.loads(p.read_text())["train"]["tokens"] for p in run_dir.glob(f"users/*/{method}.json"))
        assert plan["stage3_methods"][method]["group_tokens"] == trained, method
    assert set(stages) == set(json.loads((run_dir / "timings.json").read_text()))
    assert all(w["seconds"] >= 0 for w in stages.values()) and plan["total_seconds"] > 0
    assert plan["rates"]["source"].startswith("measured here") and "gpu_hours" not in plan


def test_with_workers_the_plan_counts_stage_1c_in_the_bank_s_pool(tiny_run, tiny_plan, tmp_path):
    """Worker processes take stage 1c's parts beside the bank's groups (`stage1_bank`): the plan says so, as
    timings.json will."""
    plan = run_command("plan", [*elsewhere(tiny_run[1], tmp_path / "runs"), "--executor", "processes"])
    parts = [k for k in plan["stages"] if k.startswith("stage1c_")]
    assert parts == [k for k in tiny_plan[1]["stages"] if k.startswith("stage1c_")] and parts
    assert all(plan["stages"][k]["seconds"] == 0 and plan["stages"][k]["counted_in"] == "stage1b_bank" for k in parts)
    assert any("stage 1c's parts run beside the bank's groups" in n for n in plan["notes"])
    assert plan["total_seconds"] == pytest.approx(sum(w["seconds"] for w in plan["stages"].values()), abs=0.5)


def test_reproduce_plan_writes_plan_json_only(tiny_run, tmp_path, capsys):
    runs = tmp_path / "runs"
    run_command("reproduce", [*elsewhere(tiny_run[1], runs), "--plan"])
    assert files(runs) == [Path("news_headline/tiny-seed0/plan.json")]  # no config, lock, bank, users or results
    out = capsys.readouterr().out
    assert "stage1b_bank" in out and "plan.json" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the profile's device is here: the plan calibrates on it")
def test_a_gpu_profile_here_gets_the_stated_rates_and_gpu_hours(tiny_run_inputs, tiny_plan, tmp_path):
    smollm_dir()  # its tokens are counted with the `cpu` profile's tokenizer
    lamp, llm, bert = tiny_run_inputs
    profile = make_profile(tmp_path / "gpu.json", llm, bert, device="cuda")
    argv = ["--profile", str(profile), "--lamp-dir", str(lamp), "--runs", str(tmp_path / "runs"), "--users", "2",
            "--no-progress"]
    plan = run_command("plan", argv)
    assert plan["rates"]["source"].startswith("stated") and plan["gpu_hours"] > 0
    assert any("cuda is not available here" in n for n in plan["notes"])
    assert plan["counts"] == tiny_plan[1]["counts"]  # the same counts, whatever the tokenizer
    assert {k: w.get("examples") for k, w in plan["stages"].items()} == \
        {k: w.get("examples") for k, w in tiny_plan[1]["stages"].items()}


def test_results_md_sets_the_plan_beside_the_measured_times(tiny_run, tiny_plan):
    result, plan = copy.deepcopy(tiny_run[2]), copy.deepcopy(tiny_plan[1])
    measured = result["meta"]["stage_seconds"]
    assert "| stage | seconds |" in render_markdown(result)
    plan["stages"]["stage1b_bank"]["seconds"], plan["total_seconds"] = 0.4, 3.0  # the tiny run's stages take ~0 s
    result["meta"]["plan"] = plan
    text = render_markdown(result)
    bank, total = measured["stage1b_bank"], sum(measured.values())
    assert f"| stage1b_bank | 0 | {bank:.0f} | {bank / 0.4:.2f} |" in text
    assert f"| total | 3 | {total:.0f} | {total / 3:.2f} |" in text


def test_a_run_reports_the_plan_made_in_its_directory(tiny_run, tiny_plan, tmp_path):
    run_dir, argv, _ = tiny_run
    copy_dir = tmp_path / "runs" / "news_headline" / run_dir.name
    shutil.copytree(run_dir, copy_dir)
    (copy_dir / "plan.json").write_text(json.dumps(tiny_plan[1]))
    result = main("test", pipeline.write_results, elsewhere(argv, tmp_path / "runs"))
    assert result["meta"]["plan"] == tiny_plan[1]
    assert "measured / estimated" in (copy_dir / RESULTS_MD).read_text()


def test_make_plan_takes_the_variables_of_make_reproduce():
    variables = ["TASK=lamp2", "LAMP_DIR=/x", "PROFILE=cpu", "SEEDS=1 2", "USERS=3", "RUNS=/r", "METHODS=rag1,mta",
                 "EXECUTOR=ray", "WORKERS=3", "SET=n_anchors=8 stack.lr=3e-4"]

    def recipe(target: str) -> str:
        return subprocess.run(["make", "-n", target, *variables], capture_output=True, text=True, check=True,
                              cwd=ROOT, timeout=60).stdout

    assert recipe("plan") == recipe("reproduce").replace(" -m mta reproduce ", " -m mta plan ")
