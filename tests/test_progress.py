"""What a person watching a run sees: a status every training step, one log line per finished group, the log file,
and every step's loss, lr and gradient norm in the train log."""
import copy
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

import tests.test_train_many as many
from mta.log import log, log_to, on_status, status
from mta.peft.fusion import stack_lora
from mta.peft.multi_lora import stack_many
from mta.run.executor import Executor, Job, run_jobs
from mta.stages.engine import summarize
from mta.training.train import lr_factor, schedule_length, train
from mta.training.train_many import train_many
from tests.test_rowlora import tiny, users


@pytest.fixture(scope="module")
def trained():
    """The three adapters of tests/test_train_many.py trained together, and the first alone, with every status."""
    model = tiny()
    fused, weights, _ = users(model)
    data, configs = many.setup()
    together, alone = copy.deepcopy(model), copy.deepcopy(model)
    stack_many(together, fused, weights, many.STACK, "delta", many.SEEDS)
    seen_many, seen_one = [], []
    with on_status(seen_many.append):
        logs = train_many(together, data, configs, rows_per_pass=3)
    torch.manual_seed(many.SEEDS[0])
    stack_lora(alone, fused[0], weights[0], many.STACK, "delta")
    with on_status(seen_one.append):
        log_one = train(alone, data[0], configs[0])
    return data, configs, logs, log_one, seen_many, seen_one


def test_train_log_keeps_every_steps_loss_lr_and_grad_norm(trained):
    data, configs, logs, log_one, _, _ = trained
    for log_, ex, config in [*zip(logs, data, configs, strict=True), (log_one, data[0], configs[0])]:
        total, warmup = schedule_length(config, len(ex))
        saved = summarize(log_)
        assert saved["steps"] == total
        assert len(saved["losses"]) == len(saved["lrs"]) == len(saved["grad_norms"]) == total
        assert all(math.isfinite(x) and x > 0 for x in saved["losses"])
        assert saved["lrs"] == pytest.approx([config.lr * lr_factor(s, total, warmup, config.schedule)
                                              for s in range(total)], rel=1e-5)
        assert all(x > 0 for x in saved["grad_norms"])
        assert saved["losses"] == pytest.approx(log_.losses, rel=1e-5)
        assert saved["grad_norms"] == pytest.approx(log_.grad_norms, rel=1e-5)


def test_every_step_reports_its_progress_then_a_summary(trained):
    _, _, logs, log_one, seen_many, seen_one = trained
    for seen, desc, n_steps in ((seen_many, "train x3", len(logs[0].losses)), (seen_one, "train", len(log_one.losses))):
        assert len(seen) == n_steps + 1
        for k, text in enumerate(seen[:-1], 1):
            assert re.fullmatch(rf"{desc} step {k}/{n_steps}, \d+ tok/s, ETA \d\d:\d\d", text), text
        assert re.fullmatch(rf"{desc}: {n_steps} steps, [\d.]+ steps/s, \d+ tok/s, loss [\d.]+ -> [\d.]+", seen[-1])
    mean_first = sum(log_.losses[0] for log_ in logs) / 3
    assert f"loss {mean_first:.4g} -> " in seen_many[-1]
    assert f"loss {log_one.losses[0]:.4g} -> {log_one.losses[-1]:.4g}" in seen_one[-1]


def test_log_lines_go_to_the_log_file_while_attached(tmp_path):
    path = tmp_path / "run" / "run.log"
    log("before")
    with log_to(path):
        log("one")
        with log_to(tmp_path / "other.log"):
            log("two")
        log("three")
    log("after")
    lines = path.read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["one", "three"]
    assert all(re.match(r"\[mta \d\d:\d\d:\d\d\] ", line) for line in lines)
    assert (tmp_path / "other.log").read_text().endswith("] two\n")


def test_local_jobs_show_each_status_and_log_one_line_per_group(tmp_path, monkeypatch):
    shown = []

    class Bar:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def update(self, n):
            shown.append(f"+{n}")

        def set_postfix_str(self, text):
            shown.append(text)

    def work(run, job, cache):
        for k in range(1, 3):
            status(f"{job.ids[0]} step {k}/2")
        status(f"{job.ids[0]} summary")
        if job.kind == "stage3":
            status("decode x1: token 1/1, 9 tok/s")

    monkeypatch.setattr("mta.run.executor.tqdm", Bar)
    jobs = [Job("bank: a, b", "bank", ("a", "b"), size=2), Job("stage 3, x+y: u", "stage3", ("u",), ("x", "y"), 2)]
    with log_to(tmp_path / "run.log"):
        assert run_jobs(SimpleNamespace(progress=True, executor=Executor()), jobs, work, "stage") == {}
    assert shown == ["a step 1/2", "a step 2/2", "a summary", "+2", "u step 1/2", "u step 2/2", "u summary",
                     "decode x1: token 1/1, 9 tok/s", "+2"]
    lines = [line.split("] ", 1)[1] for line in (tmp_path / "run.log").read_text().splitlines()]
    assert lines == ["stage: group 1/2 (2 anchors) done in 0 s; a summary",
                     "stage: group 2/2 (1 user: x+y) done in 0 s; u summary; decode x1: token 1/1, 9 tok/s"]


def test_a_decode_reports_each_token_and_each_prefill_chunk():
    from mta.models.generation import generate

    model = tiny()
    ids = torch.randint(3, model.config.vocab_size, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    seen = []
    with on_status(seen.append):
        new = generate(model, ids, mask, max_new_tokens=4, stop_token_ids=(), prefill_rows=2)
    assert seen[:2] == ["prefill x3: rows 1-2", "prefill x3: rows 3-3"]
    steps = seen[2:]
    assert len(steps) == new.shape[1] == 4
    for k, text in enumerate(steps, 1):
        assert re.fullmatch(rf"decode x3: token {k}/4, \d+ tok/s", text), text


def test_report_to_tensorboard_writes_every_training_step_of_the_run(tiny_run_inputs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mta.run import pipeline
    from mta.run.cli import main
    from tests.conftest import N_USERS
    from tests.fixtures import make_profile

    lamp, llm, bert = tiny_run_inputs
    argv = ["--profile", str(make_profile(tmp_path / "tiny.json", llm, bert)), "--lamp-dir", str(lamp), "--users",
            str(N_USERS), "--methods", "mta,oppu", "--runs", str(tmp_path / "runs"), "--no-progress",
            "--report-to", "tensorboard"]
    main("test", pipeline.reproduce, argv)
    run_dir = tmp_path / "runs" / "news_headline" / "tiny-seed0"
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    trained = [*sorted((run_dir / "bank").iterdir()), run_dir / "population" / "oppu_task"]
    for path in trained:
        saved = json.loads((path / "train_log.json").read_text())
        tag = f"{path.parent.name}/{path.name}"
        assert [e.value for e in events.Scalars(f"{tag}/loss")] == pytest.approx(saved["losses"], rel=1e-5)
        assert [e.step for e in events.Scalars(f"{tag}/lr")] == list(range(1, saved["steps"] + 1))
    users = {t.split("/")[2] for t in tags if t.startswith("stage3/mta/")}
    assert len(users) == N_USERS and {f"stage3/oppu/{u}/grad_norm" for u in users} <= tags


def test_report_to_tensorboard_without_tensorboard_says_how_to_install_it(monkeypatch, tmp_path):
    import sys

    from mta.run.tensorboard import INSTALL, reporting

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match=re.escape(INSTALL)), reporting("tensorboard", tmp_path):
        pass
