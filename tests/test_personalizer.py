import json
import re
from pathlib import Path

import numpy as np
import pytest

from mta.data.lamp import LampDataError, load_test_users
from mta.errors import InputError
from mta.peft.adapter import load_adapter
from mta.run.rundir import RunDir
from tests.conftest import N_USERS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "serving.md"


@pytest.fixture(scope="module")
def personalizer(tiny_run):
    import mta

    return mta.Personalizer.from_run(tiny_run[0])


@pytest.fixture(scope="module")
def user(tiny_run):
    """The run's first test user: MTA's output differs from the base model's for this one."""
    lamp = json.loads((tiny_run[0] / "config.json").read_text())["lamp_dir"]
    return load_test_users(lamp, "news_headline")[0]


@pytest.fixture(scope="module")
def one_at_a_time(tiny_run_inputs, tmp_path_factory):
    """MTA, Per-Pcs and PROPER on the tiny inputs, one user at a time (group_size=1): (run directory, results)."""
    from mta.run import pipeline
    from mta.run.cli import main
    from tests.fixtures import make_profile

    lamp, llm, bert = tiny_run_inputs
    root = tmp_path_factory.mktemp("one_at_a_time")
    argv = ["--profile", str(make_profile(root / "tiny.json", llm, bert, group_size=1)), "--lamp-dir",
            str(lamp), "--users", str(N_USERS), "--methods", "mta,perpcs,proper", "--runs", str(root / "runs"),
            "--no-progress"]
    result = main("test", pipeline.reproduce, argv)
    return root / "runs" / "news_headline" / "tiny-seed0", result


def run_outputs(result: dict, user_id: str, method: str) -> list[str]:
    return [q["output"] for q in result["per_user"][user_id][method]["queries"]]


@pytest.mark.parametrize("method", ["mta", "rag1"])
def test_a_test_users_answers_are_the_runs(tiny_run, personalizer, user, method):
    result = tiny_run[2]
    answers = personalizer.answer(user.history, [q.input for q in user.query], method, user.user_id)
    assert [a["output"] for a in answers] == run_outputs(result, user.user_id, method)
    assert all(set(a) == {"query", "output", "prediction", "prompt_cut"} for a in answers)


@pytest.mark.parametrize("method", ["mta", "perpcs", "proper"])
def test_a_user_is_set_up_as_a_run_in_groups_of_one_sets_it_up(one_at_a_time, user, method):
    """`personalize` + `generate` is a group of one on the run's own path: slot 0 of per-row adapters over W0 (or
    the procedure's population LoRA), token for token the answers of a run with group_size=1."""
    from mta.run.personalizer import Personalizer

    run_dir, result = one_at_a_time
    single = Personalizer.from_run(run_dir)
    answers = single.answer(user.history, [q.input for q in user.query], method, user.user_id)
    assert [a["output"] for a in answers] == run_outputs(result, user.user_id, method)
    if method == "mta":
        assert not single.engine.folded  # W0 as it is, the user's LoRAs in a slot of per-row adapters


def test_personalize_fuses_the_runs_anchors_at_its_alpha_and_trains_its_lora(tiny_run, personalizer, user):
    run_dir = tiny_run[0]
    unit = json.loads(RunDir(run_dir).user_result(user.user_id, "mta").read_text())
    done = personalizer.personalize(user.history, "mta", user.user_id)
    assert done.anchors == unit["anchors"]
    assert done.alpha == pytest.approx(unit["weights"], abs=1e-6)
    assert done.train["first_loss"] == pytest.approx(unit["train"]["first_loss"], rel=1e-5)
    assert done.adapter is not None and {"match", "fuse", "adapt"} <= set(done.seconds)


def test_the_docs_example_runs(tiny_run, user, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    section = DOCS.read_text().split("## Personalising a new user from Python")[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {"run_dir": tiny_run[0], "history": user.history, "queries": [q.input for q in user.query]}
    exec(code, scope)
    assert scope["user"].user_id == "new-user" and (tmp_path / "new-user-lora" / "adapter_config.json").exists()
    assert [set(a) for a in scope["answers"]] == [{"query", "output", "prediction", "prompt_cut"}] * len(user.query)


def test_the_export_is_one_lora_of_the_fused_and_trained_ranks(personalizer, user, tmp_path):
    done = personalizer.personalize(user.history, "mta", "someone")
    exported = load_adapter(personalizer.export(done, tmp_path / "lora"))
    p = personalizer.run.profile
    assert exported.config.r == p.bank.rank + p.stack.rank
    with pytest.raises(InputError, match="trains no LoRA"):
        personalizer.export(personalizer.personalize(user.history, "rag1"), tmp_path / "none")


@pytest.mark.parametrize(("history", "queries", "method", "named"), [
    ([], ["Generate a headline for the following article: x"], "mta", "history: empty"),
    ([{"text": "a"}], ["Generate a headline for the following article: x"], "rag1", r"history\[0\]\.title"),
    (None, [3], "rag1", r"queries\[0\]"),
    (None, [], "rag1", "queries: empty"),
    ("one", ["Generate a headline for the following article: x"], "mta", "fewer than 2 items"),
])
def test_bad_input_is_named_before_any_work(personalizer, user, history, queries, method, named):
    history = user.history if history is None else user.history[:1] if history == "one" else history
    before = personalizer.current
    with pytest.raises(LampDataError, match=named):
        personalizer.answer(history, queries, method, "newcomer")
    assert personalizer.current is before


def test_generate_needs_a_personalised_user_and_a_known_method(tiny_run, user):
    from mta.run.personalizer import Personalizer

    fresh = Personalizer.from_run(tiny_run[0])
    with pytest.raises(InputError, match="call personalize"):
        fresh.generate(["Generate a headline for the following article: x"])
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        fresh.personalize(user.history, "nope")


def test_from_run_refuses_a_folder_that_is_no_run(tmp_path):
    from mta.run.personalizer import Personalizer

    with pytest.raises(InputError, match=r"config\.json: missing"):
        Personalizer.from_run(tmp_path)


def test_importing_mta_stays_light():
    import subprocess
    import sys

    code = "import sys, mta; assert 'torch' not in sys.modules; mta.Personalizer; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture(scope="module")
def users(tiny_run):
    lamp = json.loads((tiny_run[0] / "config.json").read_text())["lamp_dir"]
    return load_test_users(lamp, "news_headline")[:N_USERS]


@pytest.mark.parametrize("method", ["mta", "rag1", "oppu", "perpcs", "proper"])
def test_a_group_of_requests_gets_each_users_run_answers(tiny_run, users, method):
    from mta.run.personalizer import Personalizer, Request

    result = tiny_run[2]
    personalizer = Personalizer.from_run(tiny_run[0])
    bad = Request([], ["Generate a headline for the following article: x"], method, "nobody")
    requests = [Request(u.history, [q.input for q in u.query], method, u.user_id) for u in users]
    done = personalizer.answer_many([requests[0], bad, *requests[1:]])
    assert isinstance(done[1], InputError) and "history: empty" in str(done[1])
    for request, answered in zip(requests, [done[0], *done[2:]], strict=True):
        assert [a["output"] for a in answered.answers] == run_outputs(result, request.user_id, method)
        assert answered.group == len(users) and not answered.kept


def test_a_kept_adapter_answers_a_returning_user_without_training(tiny_run, users):
    from mta.run.personalizer import Personalizer, Request

    result = tiny_run[2]
    personalizer = Personalizer.from_run(tiny_run[0], keep=2)
    requests = [Request(users[0].history, [users[0].query[0].input], "mta", "first-out")] + \
        [Request(u.history, [q.input for q in u.query], "mta", u.user_id) for u in users]
    first = personalizer.answer_many(requests)
    assert len(personalizer.kept) == 2 and requests[0].key() not in personalizer.kept  # least recent out
    again = personalizer.answer_many(requests[1:])
    assert all(a.kept and "adapt" not in a.personalized.seconds for a in again)
    for request, a, b in zip(requests[1:], first[1:], again, strict=True):
        assert [x["output"] for x in b.answers] == [x["output"] for x in a.answers] \
            == run_outputs(result, request.user_id, "mta")
    one = Personalizer.from_run(tiny_run[0], keep=1)
    one.answer_many(requests[1:2])
    newcomer, returning = one.answer_many([requests[2], requests[1]])  # the newcomer's adapter evicts the kept one
    assert not newcomer.kept and returning.kept and returning.answers == again[0].answers
    assert Personalizer.from_run(tiny_run[0]).answer_many(requests[:1])[0].personalized.adapter is not None
    assert not Personalizer.from_run(tiny_run[0]).kept
    with pytest.raises(ValueError, match="keep"):
        Personalizer.from_run(tiny_run[0], keep=-1)


def test_an_unknown_method_is_named_as_the_requests_field(personalizer, user):
    from mta.run.personalizer import Request

    [done] = personalizer.answer_many([Request(user.history, ["x"], "nope", "someone")])
    assert isinstance(done, InputError) and "method: unknown method 'nope'" in str(done)


def test_stage_2_keeps_the_anchors_embeddings_so_a_new_user_costs_one_encoder_pass(tiny_run, monkeypatch):
    from mta.run import pipeline
    from mta.run.personalizer import Personalizer

    path = RunDir(tiny_run[0]).anchor_embeddings
    assert path.exists()
    embedded = []
    real = pipeline.anchor_embeddings
    monkeypatch.setattr(pipeline, "anchor_embeddings", lambda *a, **k: embedded.append(1) or real(*a, **k))
    kept = Personalizer.from_run(tiny_run[0]).anchor_emb
    assert not embedded and kept.shape[0] == len(json.loads(RunDir(tiny_run[0]).anchors.read_text())["anchors"])
    before = path.read_bytes()
    path.write_bytes(before[:-8])  # damaged: embedded again, the run's folder left as it is
    try:
        np.testing.assert_allclose(Personalizer.from_run(tiny_run[0]).anchor_emb, kept, atol=1e-5)
        assert embedded and path.read_bytes() == before[:-8]
    finally:
        path.write_bytes(before)


def test_two_requests_of_one_user_id_are_answered_apart(tiny_run, users):
    from mta.run.personalizer import Personalizer, Request

    personalizer = Personalizer.from_run(tiny_run[0])
    requests = [Request(u.history, [q.input for q in u.query], "mta", "same") for u in users[:2]]
    together = personalizer.answer_many(requests)
    alone = [personalizer.answer_many([r])[0] for r in requests]
    assert [a.answers for a in together] == [a.answers for a in alone]
    assert [a.group for a in together] == [1, 1]
