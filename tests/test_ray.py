"""`--executor ray` on a local Ray cluster of 2 workers with the tiny model: the same results as the
local run, a worker killed mid-job retried without loss, a killed driver resumed. Skipped without ray."""
import json
import os
import signal
import subprocess
import time

import pytest

from mta.run import pipeline
from mta.run.cli import main
from mta.run.executor import CRASH_ENV
from tests.conftest import N_USERS, RESULTS_JSON
from tests.test_integrity import ROOT, comparable, reference_of, reproduce_cmd, run_dir_of, with_runs

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
RAY = ["--executor", "ray", "--workers", "2"]


def test_ray_run_equals_the_local_run(tiny_run, tmp_path):
    _, argv, _ = tiny_run
    result = main("test", pipeline.reproduce, with_runs(argv, tmp_path / "runs") + RAY)
    assert comparable(json.loads(json.dumps(result))) == reference_of(tiny_run)
    assert len(result["users"]) == N_USERS and not any(result["failures"].values())


def test_a_worker_killed_mid_job_is_retried_and_nothing_is_lost(tiny_run, tmp_path, monkeypatch, capfd):
    _, argv, result = tiny_run
    users = ", ".join(result["users"][: -(-N_USERS // 2)])  # the first group: 2 workers, so the users split in two
    monkeypatch.setenv(CRASH_ENV, f"stage 3, mta: {users}")  # the first attempt's worker exits abruptly
    resumed = main("test", pipeline.reproduce, with_runs(argv, tmp_path / "runs") + RAY)
    assert f"stage 3, mta: {users}: its worker died; retry 1 of 2" in capfd.readouterr().out
    assert comparable(json.loads(json.dumps(resumed))) == reference_of(tiny_run)


def test_a_killed_ray_driver_resumes(tiny_run, tmp_path):
    _, argv, _ = tiny_run
    argv = with_runs(argv, tmp_path / "runs") + RAY
    run_dir = run_dir_of(argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(reproduce_cmd(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=ROOT, start_new_session=True)
    while not list(run_dir.glob("users/*/*.json")) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local cluster it started
    proc.wait()
    assert not (run_dir / RESULTS_JSON).exists()
    done = subprocess.run(reproduce_cmd(argv), capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert comparable(json.loads((run_dir / RESULTS_JSON).read_text())) == reference_of(tiny_run)
