"""`--executor processes` with 2 spawned workers and the tiny model: the same results as the local run, and a
worker killed mid-job retried without loss."""
import json

import pytest

from mta.log import on_report
from mta.run import pipeline
from mta.run.cli import main
from mta.run.executor import CRASH_ENV, Executor
from tests.conftest import N_USERS
from tests.test_integrity import comparable, reference_of, with_runs

pytestmark = pytest.mark.slow
PROCESSES = ["--executor", "processes", "--workers", "2"]


def test_worker_processes_give_the_local_results(tiny_run, tmp_path, capfd):
    _, argv, _ = tiny_run
    reported = []
    with on_report(lambda tag, series: reported.append(tag)):  # what --report-to tensorboard listens to
        result = main("test", pipeline.reproduce, with_runs(argv, tmp_path / "runs") + PROCESSES)
    assert comparable(json.loads(json.dumps(result))) == reference_of(tiny_run)
    assert len(result["users"]) == N_USERS and not any(result["failures"].values())
    out = capfd.readouterr().out
    assert "stage 1b: training" in out and ", processes executor; beside them stage 1c's perpcs, proper" in out
    assert "bank + stage 1c: group 3/" in out and "(perpcs) done in" in out  # in the bank's workers
    assert "stage 3: group 1/" in out  # the driver logs each finished job
    # the workers' training series reach the driver (the bank's, and each trained method's per user)
    assert any(tag.startswith("bank/") for tag in reported)
    assert {f"stage3/mta/{u}" for u in result["users"]} <= set(reported)


def test_train_bank_with_workers_trains_the_bank_alone(tiny_run, tmp_path):
    """Stage 1c joins the bank's workers only where the run goes on to it (`reproduce`, a sweep), not for the
    `train-bank` command."""
    _, argv, result = tiny_run
    main("test", pipeline.stage1_bank, with_runs(argv, tmp_path / "runs") + PROCESSES)
    run_dir = next((tmp_path / "runs").glob("*/*"))
    assert len(list(run_dir.glob("bank/*/adapter_model.safetensors"))) == len(result["meta"]["anchors"])
    assert not any((run_dir / d).exists() for d in ("population", "perpcs", "proper"))


def test_a_killed_worker_process_is_retried_and_nothing_is_lost(tiny_run, tmp_path, monkeypatch, capfd):
    _, argv, result = tiny_run
    users = ", ".join(result["users"][: -(-N_USERS // 2)])  # the first of the two groups
    monkeypatch.setenv(CRASH_ENV, f"stage 3, mta: {users}")  # its first attempt's worker exits abruptly
    resumed = main("test", pipeline.reproduce, with_runs(argv, tmp_path / "runs") + PROCESSES)
    assert f"stage 3, mta: {users}: its worker died (exit code 1); retry 1 of 2" in capfd.readouterr().out
    assert comparable(json.loads(json.dumps(resumed))) == reference_of(tiny_run)


@pytest.mark.parametrize("kind, n, size, expected", [("local", 50, 32, 32), ("processes", 50, 32, 25),
                                                     ("processes", 16, 32, 8), ("ray", 5, 32, 3),
                                                     ("processes", 1, 32, 1), ("processes", 90, 32, 32)])
def test_groups_shrink_so_every_worker_gets_a_job(kind, n, size, expected):
    assert Executor(kind, workers=2).group_size(n, size) == expected
