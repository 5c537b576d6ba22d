"""Per-machine settings (`mta.run.calibrate`): "auto" fields are measured once per machine, torch build and model,
cached, recorded in config.json, and kept by a resumed run, a Ray worker's copy and an engine; explicit values are
never measured."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mta.data.lamp import get_task
from mta.models.checkpoint import load_llm
from mta.profiles import AUTO, CPU, MEASURED, resolve_profile
from mta.run import calibrate
from mta.run.calibrate import choose, chosen_split, executor_of, settle
from mta.run.cli import main
from mta.run.executor import Executor
from mta.stages.engine import Engine
from tests.fixtures import make_llm, make_profile

TASK = get_task("news_headline")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return make_llm(tmp_path_factory.mktemp("calibrate") / "llm")


def auto(llm_dir, **changes):
    return CPU.replace(llm=str(llm_dir), bf16=AUTO, group_size=AUTO, rows_per_pass=AUTO, **changes)


def refuse_loading():
    raise AssertionError("the LLM was loaded: the calibration was not taken from the cache")


def test_choices_follow_the_measurements():
    times = {"precision": {"fp32": 1.0, "bf16": 0.85}, "rows_per_pass": {"4": 3.0, "8": 2.0, "16": 1.95},
             "group_size": {"4": 0.4, "8": 0.5, "16": 0.7, "32": 1.3}}
    assert choose(times) == {"bf16": True, "rows_per_pass": 8, "group_size": 16}
    times["precision"]["bf16"] = 0.95  # faster, but by less than BF16_GAIN: fp32, the more exact, stays
    times["rows_per_pass"] = {"4": 1.0, "8": 2.0, "16": 3.0}
    times["group_size"] = {"4": 0.2, "8": 0.8, "16": 3.2, "32": 6.4}  # per user: 0.05, 0.1, 0.2, 0.2
    assert choose(times) == {"bf16": False, "rows_per_pass": 4, "group_size": 4}
    del times["precision"]["bf16"]  # not measured: no native bf16
    assert choose(times)["bf16"] is False


def test_worker_processes_only_when_their_throughput_is_measured_higher():
    # two one-thread processes, each 1.6 s a step, against 1.0 s with both threads in one: 1.25x the steps
    assert chosen_split({"one process": 1.0, "workers": 2, "threads": 1, "split": 1.6}) == {"workers": 2,
                                                                                          "threads": 1}
    assert chosen_split({"one process": 1.0, "workers": 2, "threads": 1, "split": 1.9}) is None  # 1.05x: not enough
    assert chosen_split({"one process": 1.0}) is None  # one thread: nothing to split
    record = {"chosen": {"executor": {"workers": 2, "threads": 1}}}
    assert executor_of(record, Executor("auto", retries=1)) == Executor("processes", 2, 1, retries=1)
    assert executor_of({"chosen": {"executor": None}}, Executor("auto")).kind == "local"
    assert executor_of(None, Executor("auto")).kind == "local"  # no calibration (every setting given, or a GPU)
    assert executor_of(record, Executor("ray", workers=4)) == Executor("ray", workers=4)  # a kind given is kept


def test_a_calibration_is_measured_once_per_machine_and_model(llm_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MTA_CACHE", str(tmp_path))
    loads, state = [], torch.random.get_rng_state()
    profile, record = settle(auto(llm_dir), TASK, lambda: loads.append(1) or load_llm(str(llm_dir)))
    assert loads == [1]
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random state is its own
    assert {f: getattr(profile, f) for f in MEASURED} == {f: record["chosen"][f] for f in MEASURED}
    assert set(record["measured"]) == {"precision", "rows_per_pass", "group_size", "executor"}
    split = record["measured"]["executor"]  # the same step in 2 one-thread processes at once, on 2+ threads
    assert set(split) == ({"one process"} if torch.get_num_threads() < 2 else {"one process", "workers", "threads",
                                                                                "split"})
    assert profile.group_size in calibrate.GROUPS and profile.rows_per_pass in calibrate.ROWS
    cached = [*tmp_path.glob("calibration/*.json")]
    assert len(cached) == 1 and json.loads(cached[0].read_text())["chosen"] == record["chosen"]

    again, _ = settle(auto(llm_dir), TASK, refuse_loading)
    assert again == profile
    # only the fields left "auto" are taken from it
    mixed, record = settle(auto(llm_dir).replace(group_size=3), TASK, refuse_loading)
    assert mixed.group_size == 3 and record["fields"] == ["bf16", "rows_per_pass"]
    assert settle(auto(llm_dir).replace(bf16=False, group_size=3, rows_per_pass=None), TASK, refuse_loading)[1] is None

    # another torch build, or another model, is another machine's calibration
    real = calibrate.machine
    monkeypatch.setattr(calibrate, "machine", lambda: {**real(), "torch": "0.0"})
    with pytest.raises(AssertionError, match="not taken from the cache"):
        settle(auto(llm_dir), TASK, refuse_loading)


def test_an_unreadable_cache_is_measured_again(llm_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MTA_CACHE", str(tmp_path))
    settle(auto(llm_dir), TASK, lambda: load_llm(str(llm_dir)))
    [cached] = tmp_path.glob("calibration/*.json")
    cached.write_text('{"key": ')
    with pytest.raises(AssertionError, match="not taken from the cache"):
        settle(auto(llm_dir), TASK, refuse_loading)


def test_without_native_bf16_fp32_is_chosen_without_timing_bf16(llm_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MTA_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "bf16_supported", lambda device: False)
    profile, record = settle(auto(llm_dir), TASK, lambda: load_llm(str(llm_dir)))
    assert profile.bf16 is False and set(record["measured"]["precision"]) == {"fp32"}


def test_off_the_cpu_bf16_follows_the_device_and_the_rest_must_be_numbers(llm_dir, monkeypatch):
    monkeypatch.setattr(calibrate, "bf16_supported", lambda device: True)
    profile, record = settle(CPU.replace(llm=str(llm_dir), device="cuda", group_size=8, rows_per_pass=4), TASK,
                             refuse_loading)
    assert profile.bf16 is True and "native bf16" in record["source"]
    with pytest.raises(ValueError, match="group_size, rows_per_pass = 'auto' is measured on the CPU only"):
        auto(llm_dir).replace(device="cuda")


def test_an_engine_refuses_unsettled_fields(llm_dir):
    model, tok = load_llm(str(llm_dir))
    with pytest.raises(ValueError, match="group_size, rows_per_pass still 'auto'"):
        Engine(auto(llm_dir).replace(bf16=False), TASK, model, tok)


def test_profile_fields_take_auto_or_a_setting():
    with pytest.raises(ValueError, match="group_size must be 'auto' or a setting"):
        CPU.replace(group_size="big")
    with pytest.raises(ValueError, match="bf16 must be 'auto' or a setting"):
        CPU.replace(bf16="yes")


def test_a_run_records_its_calibration_and_keeps_it_when_resumed(tiny_run_inputs, tmp_path, monkeypatch):
    lamp, llm, bert = tiny_run_inputs
    profile = make_profile(tmp_path / "tiny.json", llm, bert, bf16=AUTO, group_size=AUTO, rows_per_pass=AUTO)
    argv = ["--profile", str(profile), "--lamp-dir", str(lamp), "--runs", str(tmp_path / "runs"), "--users", "2",
            "--no-progress"]
    runs = []
    main("test", runs.append, argv)
    config = json.loads(runs[0].dir.config.read_text())
    chosen = {f: config["calibration"]["chosen"][f] for f in MEASURED}
    assert {f: config["profile"][f] for f in chosen} == chosen
    assert {f: getattr(runs[0].profile, f) for f in chosen} == chosen
    # a Ray worker's copy of the run keeps the driver's choice
    assert dataclasses.replace(runs[0]).profile == runs[0].profile
    # the default executor ("auto") is what the calibration measured faster
    split = config["calibration"]["chosen"]["executor"]
    assert (runs[0].executor.kind, runs[0].executor.workers) == (("processes", split["workers"]) if split else
                                                                 ("local", 2))

    # resumed on a machine whose calibration would choose otherwise: the run keeps what config.json records
    before = runs[0].dir.config.read_bytes()
    monkeypatch.setenv("MTA_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(calibrate, "measure", lambda engine: pytest.fail("a resumed run was calibrated again"))
    main("test", runs.append, argv)
    assert runs[1].profile == runs[0].profile and runs[1].executor == runs[0].executor
    assert runs[0].dir.config.read_bytes() == before

    # a bf16 directory resumed where bf16 is not native stops, naming config.json
    config["profile"]["bf16"] = True
    runs[0].dir.config.write_text(json.dumps(config))
    monkeypatch.setattr("mta.precision.bf16_supported", lambda device: False)
    with pytest.raises(SystemExit, match=r"config\.json: this run directory computes in bf16 autocast"):
        main("test", runs.append, argv)


def test_the_cpu_profile_measures_its_three_settings():
    assert {f: getattr(resolve_profile("cpu"), f) for f in ("bf16", "group_size", "rows_per_pass")} == \
        dict.fromkeys(("bf16", "group_size", "rows_per_pass"), AUTO)
