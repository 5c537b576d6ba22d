"""A run can never lose or mix up a result: early checks of settings and data, errors that tell the truth,
and a run killed at any stage that resumes to exactly the uninterrupted run's results."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mta.errors import InputError
from mta.run import pipeline
from mta.run.cli import main
from tests.conftest import N_USERS, RESULTS_JSON
from tests.fixtures import make_profile

ROOT = Path(__file__).resolve().parents[1]


def reproduce_cmd(argv: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "reproduce.py"), *argv]


def run_dir_of(argv: list[str]) -> Path:
    return Path(argv[argv.index("--runs") + 1]) / "news_headline" / "tiny-seed0"


def with_runs(argv: list[str], runs: Path) -> list[str]:
    argv = list(argv)
    argv[argv.index("--runs") + 1] = str(runs)
    return argv


def comparable(result: dict) -> dict:
    """results.json without what legitimately differs between two runs: timings."""
    timings = ("seconds", "mta_latency_median_s", "stage_seconds", "method_seconds")

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in timings}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip(result)


def reference_of(tiny_run) -> dict:
    """The tiny run's own results (its directory's report may since have been rewritten by other tests)."""
    return comparable(json.loads(json.dumps(tiny_run[2])))


# ----------------------------------------------------------------------------- settings and data, checked first


def test_a_bad_set_fails_at_once_naming_the_allowed_values(tiny_run, tmp_path):
    _, argv, _ = tiny_run
    runs = tmp_path / "runs"
    start = time.perf_counter()
    proc = subprocess.run(reproduce_cmd(with_runs(argv, runs) + ["--set", "merge_space=params"]),
                          capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - start < 5 * 3  # under 5 s here; a loaded CI machine gets slack
    assert proc.returncode != 0
    assert "merge_space" in proc.stderr and "'param'" in proc.stderr and "'delta'" in proc.stderr
    assert not runs.exists()


@pytest.mark.parametrize("assignment, allowed", [
    ("fusion=eq6", "'paper'"), ("bank_data=x", "'adaptation'"), ("dtype=fp32", "'float32'"),
    ("device=gpu", "'cuda'"), ("stack.schedule=cos", "cosine"), ("n_anchors=abc", "int"), ("top_k=9", "1..8"),
])
def test_every_choice_field_is_checked_when_the_profile_is_built(tiny_run, assignment, allowed):
    _, argv, _ = tiny_run
    with pytest.raises(SystemExit, match=allowed):
        main("test", lambda run: pytest.fail("the stage ran"), argv + ["--set", assignment])


def test_set_takes_python_and_json_spellings_of_booleans_and_none():
    from mta.profiles import PROFILES
    from mta.run.cli import override

    cpu = PROFILES["cpu"]
    for text, value in (("True", True), ("true", True), ("false", False)):
        assert override(cpu, f"bf16={text}").bf16 is value, text
    for text in ("None", "null"):
        assert override(cpu, f"rows_per_pass={text}").rows_per_pass is None, text
    assert override(cpu, "group_size=auto").group_size == "auto"
    assert override(cpu, "chat_template=false").chat_template is False
    assert override(cpu, "base_quant=none").base_quant == "none"  # a string field keeps its word


def test_set_values_never_leave_the_runs_folder(tiny_run, tmp_path):
    from mta.run import cli

    _, argv, _ = tiny_run
    runs = tmp_path / "runs"
    for value in ("../x", "../../../etc", "/abs/path", "a/b", ".."):
        run = cli.run_from_args(cli.parser("t").parse_args(with_runs(argv, runs) + ["--set", f"llm={value}"]))
        folder = run.dir.root.resolve()
        assert folder.parent == (runs / "news_headline").resolve(), value
    names = {cli.run_from_args(cli.parser("t").parse_args(with_runs(argv, runs) + ["--set", f"llm={v}"])).dir.root
             for v in ("a/b", "a_b", "a b", "A_B")}
    assert len(names) == 4


def test_a_missing_data_directory_writes_nothing(tiny_run, tmp_path):
    _, argv, _ = tiny_run
    runs = tmp_path / "runs"
    bad = with_runs(argv, runs) + ["--lamp-dir", str(tmp_path / "nonexistent")]
    with pytest.raises(SystemExit, match="nonexistent"):
        main("test", pipeline.reproduce, bad)
    assert not runs.exists()


def _lamp_copy(tiny_run_inputs, tmp_path, edit) -> Path:
    import shutil

    lamp = tmp_path / "lamp"
    shutil.copytree(tiny_run_inputs[0], lamp)
    edit(lamp / "news_headline")
    return lamp


def _edit_json(path: Path, change) -> None:
    rows = json.loads(path.read_text())
    change(rows)
    path.write_text(json.dumps(rows))


@pytest.mark.parametrize("case", ["duplicate test user", "duplicate candidate", "test user is a candidate",
                                  "last test user is a candidate", "one history item", "no test users"])
def test_duplicate_and_overlapping_ids_fail_before_any_work(tiny_run, tiny_run_inputs, tmp_path, case):
    _, argv, _ = tiny_run
    test_file, cand_file = Path("test_100") / "test_100.json", Path("user_anchor_candidate.json")

    def edit(task_dir: Path) -> None:
        if case == "duplicate test user":
            _edit_json(task_dir / test_file, lambda rows: rows.append(dict(rows[0])))
        elif case == "duplicate candidate":
            _edit_json(task_dir / cand_file, lambda rows: rows.append(dict(rows[3])))
        elif case == "one history item":  # the last user: beyond --users 1, still trained on by PROPER
            _edit_json(task_dir / test_file, lambda rows: rows[-1].update(profile=rows[-1]["profile"][:1]))
        elif case == "no test users":
            (task_dir / test_file).write_text("[]")
        else:
            user = json.loads((task_dir / test_file).read_text())[0 if case == "test user is a candidate" else -1]
            _edit_json(task_dir / cand_file, lambda rows: rows.append({"user_id": user["user_id"],
                                                                       "profile": user["profile"]}))

    lamp = _lamp_copy(tiny_run_inputs, tmp_path, edit)
    runs = tmp_path / "runs"
    expected = {"duplicate test user": r"test_100\.json.*news_headline-t0.*repeated",
                "duplicate candidate": r"user_anchor_candidate\.json.*news_headline-c3.*repeated",
                "test user is a candidate": r"news_headline-t0.*also a bank candidate",
                "last test user is a candidate": r"news_headline-t3.*also a bank candidate",
                "one history item": r"test_100\.json: user news_headline-t3: profile: fewer than 2 items.*proper",
                "no test users": r"test_100\.json.*no users"}[case]
    with pytest.raises(SystemExit, match=expected):
        main("test", pipeline.reproduce, with_runs(argv, runs) + ["--lamp-dir", str(lamp), "--users", "1"])
    assert not runs.exists()


# ----------------------------------------------------------------------------- errors that tell the truth


def test_a_programming_error_in_stage3_raises_with_its_traceback(tiny_run, tmp_path, monkeypatch):
    from mta.stages import personalize

    _, argv, _ = tiny_run
    monkeypatch.setattr(personalize, "fused_anchors", lambda *a, **k: {}["no such key"])
    with pytest.raises(KeyError, match="no such key"):
        main("test", pipeline.reproduce, with_runs(argv, tmp_path / "runs") + ["--methods", "rag1,merged_only"])


def test_an_input_error_in_stage3_is_that_units_failure(tiny_run, tmp_path, monkeypatch):
    from mta.stages import personalize

    def bad_input(*a, **k):
        raise InputError("anchor file says no")

    _, argv, _ = tiny_run
    monkeypatch.setattr(personalize, "fused_anchors", bad_input)
    result = main("test", pipeline.reproduce, with_runs(argv, tmp_path / "runs") + ["--methods", "rag1,merged_only"])
    assert set(result["failures"]["merged_only"]) == set(result["failures"]["merged_only"]) and \
        all("anchor file says no" in e for e in result["failures"]["merged_only"].values())
    assert len(result["failures"]["merged_only"]) == N_USERS and not result["failures"]["rag1"]


# ----------------------------------------------------------------------------- killed runs lose nothing


# (the log line that opens a stage, the artifact to wait for before the kill: None kills as the stage opens)
KILL_POINTS = (("stage 1a:", None), ("stage 1b:", "bank/*/adapter_model.safetensors"),
               ("stage 1c:", "perpcs/sharers/*/adapter_model.safetensors"), ("stage 2:", None),
               ("stage 3:", "users/*/*.json"))


@pytest.mark.slow
def test_a_run_killed_at_every_stage_resumes_to_the_same_results(tiny_run, tiny_run_inputs, tmp_path):
    """SIGKILL a `make reproduce`-equivalent process in each stage, in the order they run (stage 1a, the bank
    after its first meta-LoRA, Per-Pcs's and PROPER's population stage after the first sharer LoRA, stage 2,
    stage 3 after its first result), rerun, and compare with the uninterrupted run:
    every output and score equal, and no temporary file left that a rerun could take for an artifact."""
    import torch

    reference_dir, argv, _ = tiny_run
    reference = json.loads((reference_dir / RESULTS_JSON).read_text())
    # The bank's 3 anchors in groups of two: a kill after the first saved meta-LoRA lands while the
    # second group trains (with one group, the rest of the bank and stage 2 can finish before the kill).
    _, llm, bert = tiny_run_inputs
    argv = with_runs(argv, tmp_path / "runs")
    argv[argv.index("--profile") + 1] = str(make_profile(tmp_path / "tiny.json", llm, bert, group_size=2))
    run_dir = run_dir_of(argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for line_start, artifact in KILL_POINTS:
        proc = subprocess.Popen(reproduce_cmd(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=ROOT)
        seen = next((line for line in proc.stdout if line_start in line), None)
        while artifact and not list(run_dir.glob(artifact)) and proc.poll() is None:
            time.sleep(0.02)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert seen and not finished, f"the run ended before it could be killed in {line_start!r}"
        leftovers = [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
        assert all(p.name.startswith(".") for p in leftovers)  # never the name of an artifact
        assert not (run_dir / RESULTS_JSON).exists()
    proc = subprocess.run(reproduce_cmd(argv), capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = json.loads((run_dir / RESULTS_JSON).read_text())
    assert comparable(resumed) == comparable(reference)
    assert not list(run_dir.rglob("*.tmp"))


@pytest.mark.slow
def test_a_run_killed_at_random_moments_resumes_to_the_same_results(tiny_run, tmp_path):
    """SIGKILL the run at seeded random moments (each kill a fresh process, killed between 0.5 s and 12 s after it
    starts), up to six times, then let it finish: the results equal the uninterrupted run's."""
    import random

    import torch

    reference_dir, argv, _ = tiny_run
    reference = json.loads((reference_dir / RESULTS_JSON).read_text())
    argv = with_runs(argv, tmp_path / "runs")
    run_dir = run_dir_of(argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    rng = random.Random(31)
    for _ in range(6):
        proc = subprocess.Popen(reproduce_cmd(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                                env=env)
        try:
            proc.wait(timeout=rng.uniform(0.5, 12.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if (run_dir / RESULTS_JSON).exists():
            break
    proc = subprocess.run(reproduce_cmd(argv), capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert comparable(json.loads((run_dir / RESULTS_JSON).read_text())) == comparable(reference)
    assert not list(run_dir.rglob("*.tmp"))


def test_a_second_command_on_a_busy_run_directory_fails_before_touching_it(tiny_run, tmp_path):
    """Two drivers on one run directory: the second stops at once, naming the holder, and leaves the
    first's temporaries alone (which its start-up would otherwise delete as stale)."""
    from mta.run.rundir import RunDir

    _, argv, _ = tiny_run
    argv = with_runs(argv, tmp_path / "runs")
    run_dir = RunDir(run_dir_of(argv))
    with run_dir.lock():
        in_flight = run_dir.root / "users" / ".u0.json.123.tmp"
        in_flight.parent.mkdir(parents=True)
        in_flight.write_text("{}")
        with pytest.raises(SystemExit, match=f"in use by pid {os.getpid()}"):
            main("test", pipeline.reproduce, argv)
        assert in_flight.exists() and not (run_dir.root / "config.json").exists()
    in_flight.unlink()
    with run_dir.lock():  # released: free again
        pass
