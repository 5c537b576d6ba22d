"""Resuming a run: the README's `--users N` run then the full run in the same directory, a failed unit recorded
apart from results and retried up to a bound, every missing user named in the report, and stage 2 adding the users
it has not matched. Each test starts from a copy of one tiny run done in one go and compares with it."""

import json
import shutil

import pytest

from mta.errors import InputError
from mta.eval.report import build_results, render_markdown
from mta.run import pipeline
from mta.run.cli import main
from mta.stages import personalize
from tests.fixtures import make_profile

METHODS = "rag1,merged_only,mta"  # a method on W0, and the two that read stage 2's matches


@pytest.fixture(scope="module")
def one_go(tiny_run_inputs, tmp_path_factory):
    """Every test user of the tiny data (4) in one go: (argv without --runs, its run directory, its results)."""
    lamp, llm, bert = tiny_run_inputs
    root = tmp_path_factory.mktemp("one_go")
    argv = ["--profile", str(make_profile(root / "tiny.json", llm, bert)), "--lamp-dir", str(lamp),
            "--methods", METHODS, "--no-progress"]
    result = main("test", pipeline.reproduce, argv + ["--runs", str(root / "runs")])
    assert result["n_users"] == 4
    return argv, root / "runs" / "news_headline" / "tiny-seed0", result


def copy_before_stage3(run_dir, tmp_path):
    """The one-go run's directory without any stage-3 result or report: (--runs argv, the copy)."""
    copy = tmp_path / "runs" / "news_headline" / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("users", "results*"))
    return ["--runs", str(tmp_path / "runs")], copy


def assert_same_results(result, reference):
    """Every user scored, and the same scores, comparisons and outputs as the run done in one go."""
    assert result["users"] == reference["users"] and result["n_users"] == result["n_users_asked"] == 4
    assert not any(result["missing"].values())
    assert result["methods"] == reference["methods"] and result["mta_vs"] == reference["mta_vs"]
    for u, rows in reference["per_user"].items():
        assert {m: r["queries"] for m, r in result["per_user"][u].items()} == \
            {m: r["queries"] for m, r in rows.items()}, u


def test_users_n_then_the_full_run_equals_one_go(one_go, tmp_path):
    """The README's workflow: `--users 2`, then the full run in the same directory. Stage 2 adds the two users
    the first run did not match, so the full run scores every user as a run done in one go; a result file that
    holds only an error is no result, so a directory an earlier version left so is repaired too."""
    argv, _, reference = one_go
    runs = ["--runs", str(tmp_path / "runs")]
    assert main("test", pipeline.reproduce, argv + runs + ["--users", "2"])["n_users"] == 2
    run_dir = tmp_path / "runs" / "news_headline" / "tiny-seed0"
    for u in reference["users"][2:]:  # what versions before failure records left there: an error as a result
        (run_dir / "users" / u).mkdir(parents=True)
        (run_dir / "users" / u / "mta.json").write_text(json.dumps({"error": f"user {u}: no stage-2 match"}))
    full = main("test", pipeline.reproduce, argv + runs)
    assert_same_results(full, reference)
    assert not list(run_dir.glob("users/*/*.error.json"))
    assert "Missing users" not in (run_dir / "results.md").read_text()


@pytest.mark.parametrize("error, kind", [(InputError, "input"), (RuntimeError, "crash")])
def test_a_unit_that_fails_once_is_recorded_apart_and_retried(one_go, tmp_path, monkeypatch, error, kind):
    """One user's fused-LoRA setup fails the first time: an InputError (the run goes on) or a crash (the run
    stops). Its units get a failure record beside where the result would be, no result file, and the next run
    retries them and ends equal to the run done in one go."""
    argv, run_dir, reference = one_go
    runs, copy = copy_before_stage3(run_dir, tmp_path)
    victim, real, calls = reference["users"][1], personalize.method_setup, []

    def fail_once(engine, user, method, *a, **k):
        if user.user_id == victim and not calls:
            calls.append(method.name)
            raise error(f"user {victim}: a passing fault")
        return real(engine, user, method, *a, **k)

    monkeypatch.setattr(personalize, "method_setup", fail_once)
    if kind == "crash":
        with pytest.raises(RuntimeError, match="a passing fault"):
            main("test", pipeline.reproduce, argv + runs)
    else:
        first = main("test", pipeline.reproduce, argv + runs)
        assert victim not in first["users"]
    records = sorted(copy.glob("users/*/*.error.json"))
    assert records and (copy / "users" / victim / f"{calls[0]}.error.json") in records
    for path in records:  # a crash is charged to every unit of the group it ran in
        record = json.loads(path.read_text())
        assert (record["kind"], record["attempts"]) == (kind, 1) and "a passing fault" in record["error"]
        assert record["time"] and not path.with_name(f"{record['method']}.json").exists()
    if kind == "input":
        assert first["n_users_asked"] == 4 and first["missing"][calls[0]][victim]["reason"] == "failed"
        assert f"user {victim}: failed (bad input), attempt 1 of 3, retried by the next run: user {victim}: a " \
               f"passing fault" in (copy / "results.md").read_text()
    again = main("test", pipeline.reproduce, argv + runs)
    assert_same_results(again, reference)
    assert not list(copy.glob("users/*/*.error.json"))


def test_a_unit_that_always_fails_stops_at_the_bound_and_is_named(one_go, tmp_path, monkeypatch):
    """Bad input for one user on every try: retried by each run until it has failed MAX_ATTEMPTS times, then left
    alone; the report scores the other users, says so in its header and names the user, method and error."""
    argv, run_dir, reference = one_go
    runs, copy = copy_before_stage3(run_dir, tmp_path)
    victim, real, calls = reference["users"][0], personalize.method_setup, []

    def bad_input(engine, user, method, *a, **k):
        if user.user_id == victim:
            calls.append(method.name)
            raise InputError(f"user {victim}: its history says no")
        return real(engine, user, method, *a, **k)

    monkeypatch.setattr(personalize, "method_setup", bad_input)
    for _ in range(pipeline.MAX_ATTEMPTS + 1):
        result = main("test", pipeline.run_and_report, argv + runs)
    assert sorted(calls) == sorted(["merged_only", "mta"] * pipeline.MAX_ATTEMPTS)  # none after the bound
    assert result["users"] == reference["users"][1:] and (result["n_users"], result["n_users_asked"]) == (3, 4)
    assert set(result["missing"]["rag1"]) == set()  # rag1 has the user, scored on none since the others lack it
    for m in ("merged_only", "mta"):
        gap = result["missing"][m][victim]
        assert (gap["reason"], gap["kind"], gap["attempts"]) == ("failed", "input", pipeline.MAX_ATTEMPTS)
        assert "its history says no" in gap["error"] and gap["record"] == f"users/{victim}/{m}.error.json"
        assert not (copy / "users" / victim / f"{m}.json").exists()
    md = (copy / "results.md").read_text()
    assert "of 3 of 4 test users scored on every method" in md
    assert "1 missing from at least one method (Merged-only: 1, MTA: 1)" in md
    section = md.split("## Missing users")[1]
    assert f"- MTA: 1 of 4 test users missing\n  - user {victim}: failed 3 times (bad input), not retried, delete " \
           f"users/{victim}/mta.error.json to try again: user {victim}: its history says no" in section


def test_stage2_adds_the_users_it_has_not_matched(one_go, tmp_path):
    """A `--users 2` stage 2, then the full one: the two new users are added, the first two's entries stay byte
    for byte; an edited anchors.json is made again, and the matches made from it stay."""
    argv, run_dir, reference = one_go
    runs, copy = copy_before_stage3(run_dir, tmp_path)
    path = copy / "stage2" / "matches.json"
    path.unlink()
    main("test", pipeline.stage2_match_anchors, argv + runs + ["--users", "2"])
    before = path.read_text()
    assert list(json.loads(before)) == reference["users"][:2]
    main("test", pipeline.stage2_match_anchors, argv + runs)
    after = path.read_text()
    assert after.startswith(before.rstrip()[:-1].rstrip() + ",\n")  # the old entries, byte for byte
    matches = json.loads(after)
    anchors = [a["user_id"] for a in json.loads((copy / "stage1" / "anchors.json").read_text())["anchors"]]
    assert list(matches) == reference["users"] and all(set(m["similarities"]) == set(anchors)
                                                       for m in matches.values())
    doc = json.loads((copy / "stage1" / "anchors.json").read_text())
    doc["anchors"][0]["user_id"] = next(u for u in doc["anchors"][0]["members"] if u not in anchors)
    (copy / "stage1" / "anchors.json").write_text(json.dumps(doc))  # edited: stage 1 makes it again
    main("test", pipeline.stage1_select, argv + runs)
    main("test", pipeline.stage2_match_anchors, argv + runs)
    assert [a["user_id"] for a in json.loads((copy / "stage1" / "anchors.json").read_text())["anchors"]] == anchors
    assert path.read_text() == after


def test_the_report_names_a_user_a_method_lacks():
    """A user with a result from one method only is missing from the other, never quietly dropped."""
    def row(uid):
        return {"user_id": uid, "queries": [{"query_id": f"{uid}-q", "output": "a cat", "prediction": "a cat",
                                             "gold": "a cat sat", "prompt_cut": False}], "seconds": {}}

    rows = {"rag1": {"u0": row("u0"), "u1": row("u1")}, "mta": {"u0": row("u0")}}
    result = build_results("news_headline", rows, meta={}, n_boot=10,
                           missing={"rag1": {"u2": {"reason": "failed", "kind": "input", "error": "no match",
                                                    "attempts": 1, "max_attempts": 3, "time": "t",
                                                    "record": "users/u2/rag1.error.json"}}})
    assert result["users"] == ["u0"] and (result["n_users"], result["n_users_asked"]) == (1, 3)
    assert result["missing"]["mta"] == {"u1": {"reason": "not run"}, "u2": {"reason": "not run"}}
    assert result["failures"] == {"rag1": {"u2": "no match"}, "mta": {}}
    md = render_markdown(result)
    assert "1 queries of 1 of 3 test users scored on every method, pooled over queries; 2 missing" in md
    assert "  - user u1: not run yet" in md
    assert "  - user u2: failed (bad input), attempt 1 of 3, retried by the next run: no match" in md
