import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

N_USERS = 2  # of the tiny data's 4 test users, so its report is results-2-users.json
RESULTS_JSON, RESULTS_MD = f"results-{N_USERS}-users.json", f"results-{N_USERS}-users.md"


@pytest.fixture(scope="session", autouse=True)
def calibration_cache(tmp_path_factory):
    """Per-machine calibrations (mta.run.calibrate) cached in the session's own folder, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTA_CACHE", str(tmp_path_factory.mktemp("mta-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory):
    """(lamp_dir, llm_dir, bert_dir) of tiny self-made inputs, shared by the pipeline tests."""
    from tests.fixtures import make_bert, make_lamp, make_llm

    root = tmp_path_factory.mktemp("tiny")
    return make_lamp(root / "lamp"), make_llm(root / "llm"), make_bert(root / "bert")


@pytest.fixture(scope="session")
def tiny_run(tiny_run_inputs, tmp_path_factory):
    """A finished `reproduce` on the tiny inputs: (run directory, its argv, results)."""
    from mta.run import pipeline
    from mta.run.cli import main
    from tests.fixtures import make_profile

    lamp, llm, bert = tiny_run_inputs
    root = tmp_path_factory.mktemp("run")
    profile = make_profile(root / "tiny.json", llm, bert)
    argv = ["--profile", str(profile), "--lamp-dir", str(lamp), "--runs", str(root / "runs"),
            "--users", str(N_USERS), "--no-progress"]
    result = main("test", pipeline.reproduce, argv)
    return root / "runs" / "news_headline" / "tiny-seed0", argv, result
