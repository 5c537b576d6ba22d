"""End to end on tiny self-made inputs: every stage and method through the entry point that
`make reproduce` uses, resumption, and bad input that must not stop the run."""

import json
import shutil

import numpy as np
import pytest
import torch

from mta.methods import ALL, DEFAULT
from mta.precision import bf16_supported
from mta.run import pipeline
from mta.run.cli import main
from mta.stages.matching import fusion_weights
from tests.conftest import N_USERS, RESULTS_JSON, RESULTS_MD


def test_every_artifact_and_both_tables(tiny_run):
    run_dir, _, result = tiny_run
    anchors = json.loads((run_dir / "stage1" / "anchors.json").read_text())
    assert len(anchors["anchors"]) >= 2
    assert np.load(run_dir / "stage1" / "user_vectors.npy").shape[0] == 12
    for a in anchors["anchors"]:
        bank = run_dir / "bank" / a["user_id"]
        files = {f.name for f in bank.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "train_log.json"} <= files
    matches = json.loads((run_dir / "stage2" / "matches.json").read_text())
    assert len(matches) == N_USERS
    log = (run_dir / "run.log").read_text()  # the command's log lines, one per finished group among them
    assert "stage 1a:" in log and "bank: group 1/1" in log and "stage 3:" in log
    for m in matches.values():
        assert len(m["similarities"]) == len(anchors["anchors"])
    mta = json.loads(next((run_dir / "users").iterdir()).joinpath("mta.json").read_text())
    assert len(mta["anchors"]) == 2 and abs(sum(mta["weights"]) - 1) < 1e-6
    assert set(result["methods"]) == set(DEFAULT)
    assert len(result["users"]) == N_USERS
    for name in ("rouge-1", "rouge-L", "rouge-1_stem", "rouge-L_stem"):
        assert name in result["methods"]["mta"]["metrics"]
    assert set(result["mta_vs"]) == set(DEFAULT) - {"mta"}
    for r in result["mta_vs"].values():
        assert r["ci95"][0] <= r["diff"] <= r["ci95"][1] and 0 <= r["outputs_differ"] <= N_USERS
    md = (run_dir / RESULTS_MD).read_text()
    assert "Table 1" in md and "Table 2" in md and "MTA against every other method" in md
    lamp = run_dir / RESULTS_JSON.replace(".json", "-lamp")  # LaMP's official format, beside results.json
    assert {f.name for f in lamp.iterdir()} == {f"{m}.json" for m in DEFAULT} | {"golds.json"}
    golds = json.loads((lamp / "golds.json").read_text())
    assert golds["task"] == "LaMP_4" and len(golds["golds"]) == result["n_queries"]
    assert json.loads((run_dir / "config.json").read_text())["profile"]["name"] == "tiny"
    assert not list(run_dir.rglob("*.tmp"))


def test_rerun_recomputes_only_the_deleted_unit(tiny_run, monkeypatch):
    run_dir, argv, _ = tiny_run
    victim = next((run_dir / "users").iterdir()) / "mta.json"
    before = json.loads(victim.read_text())
    victim.unlink()
    calls = []
    real = pipeline.run_group
    monkeypatch.setattr(pipeline, "run_group", lambda *a, **k: calls.append([m.name for m in a[2]]) or real(*a, **k))
    main("test", pipeline.reproduce, argv)
    assert calls == [["mta"]]
    after = json.loads(victim.read_text())
    assert after["queries"] == before["queries"]  # deterministic under the seed, whatever the order


def test_perpcs_and_proper_artifacts_and_results(tiny_run):
    """Both baselines ran end to end: their population-level artifacts exist, Per-Pcs chose its pieces among
    the stage-1 anchors, and PROPER trained a user LoRA and a router for every user."""
    from safetensors.torch import load_file

    run_dir, _, result = tiny_run
    anchors = [a["user_id"] for a in json.loads((run_dir / "stage1" / "anchors.json").read_text())["anchors"]]
    assert (run_dir / "perpcs" / "task_lora" / "adapter_model.safetensors").exists()
    for a in anchors:
        assert (run_dir / "perpcs" / "sharers" / a / "adapter_model.safetensors").exists()
        gates = load_file(run_dir / "perpcs" / "gates" / f"{a}.safetensors")
        assert gates and all(g.abs().sum() > 0 for g in gates.values())  # moved from their zero start
    assert (run_dir / "proper" / "population_lora" / "adapter_model.safetensors").exists()
    assert len(json.loads((run_dir / "proper" / "group" / "users.json").read_text())) == 4  # every target user
    p = json.loads((run_dir / "config.json").read_text())["profile"]
    caps = p["perpcs_user_items"], p["proper_user_items"], p["proper_router_items"]
    assert all(caps) and len(set(caps)) == 3  # told apart below
    for uid in result["users"]:
        pc = json.loads((run_dir / "users" / uid / "perpcs.json").read_text())
        assert pc["sharers"] == sorted(anchors) and pc["seconds"]["assemble"] > 0
        for batches in pc["pieces"].values():
            for b in batches:
                assert set(b["sharers"]) <= set(anchors) and sum(b["weights"]) == pytest.approx(1)
        pr = json.loads((run_dir / "users" / uid / "proper.json").read_text())
        assert pr["train"]["steps"] >= 1 and pr["train_router"]["steps"] >= 1
        assert (pc["items"], pr["train"]["examples"], pr["train_router"]["examples"]) == caps  # each its own cap
    assert {"perpcs", "proper"} <= set(result["mta_vs"])
    md = (run_dir / RESULTS_MD).read_text()
    table1 = md.split("## Table 1")[1].split("## Table 2")[0]
    order = ["Non-personalized", "RAG (BM25, k=1)", "RAG (BM25, k=3)", "RAG (BM25, k=5)", "OPPU", "Per-Pcs",
             "PROPER", "MTA"]
    assert [line.split(" | ")[0].lstrip("| ") for line in table1.splitlines() if line.startswith("| ")][1:] == order


def test_baselines_resume_like_every_unit(tiny_run, monkeypatch):
    """A sharer's gates and one user's Per-Pcs and PROPER results deleted: only those are recomputed, equal."""
    from safetensors.torch import load_file

    run_dir, argv, _ = tiny_run
    gates = next((run_dir / "perpcs" / "gates").iterdir())
    user = next((run_dir / "users").iterdir())
    before = load_file(gates), *(json.loads((user / f"{m}.json").read_text()) for m in ("perpcs", "proper"))
    gates.unlink()
    for m in ("perpcs", "proper"):
        (user / f"{m}.json").unlink()
    calls = []
    real = pipeline.run_group
    monkeypatch.setattr(pipeline, "run_group", lambda *a, **k: calls.append([m.name for m in a[2]]) or real(*a, **k))
    main("test", pipeline.reproduce, argv)
    assert calls == [["perpcs"], ["proper"]]
    after = load_file(gates), *(json.loads((user / f"{m}.json").read_text()) for m in ("perpcs", "proper"))
    assert all(torch.allclose(before[0][k], after[0][k], atol=1e-6) for k in before[0])
    assert after[1]["queries"] == before[1]["queries"] and after[2]["queries"] == before[2]["queries"]


def test_run_directory_keeps_its_profile(tiny_run):
    run_dir, argv, _ = tiny_run
    config = run_dir / "config.json"
    original = config.read_text()
    try:
        older = json.loads(original)
        del older["profile"]["stack"]["grad_accum"]  # written before the field existed: takes its default
        config.write_text(json.dumps(older))
        main("test", lambda run: None, argv)
        changed = json.loads(original)
        changed["profile"]["stack"]["lr"] = 0.5
        config.write_text(json.dumps(changed))
        with pytest.raises(SystemExit, match=r"made with other inputs .*profile fields stack"):
            main("test", lambda run: None, argv)
    finally:
        config.write_text(original)


def test_a_bad_test_user_stops_the_run_before_any_work(tiny_run, tmp_path):
    _, argv, _ = tiny_run
    lamp = tmp_path / "lamp"
    shutil.copytree(argv[argv.index("--lamp-dir") + 1], lamp)
    test_file = lamp / "news_headline" / "test_100" / "test_100.json"
    users = json.loads(test_file.read_text())
    users[2]["profile"] = []  # never skipped, whichever --users asks for
    test_file.write_text(json.dumps(users))
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit, match=f"{test_file}.*{users[2]['user_id']}.*profile"):
        main("test", pipeline.reproduce, argv + ["--lamp-dir", str(lamp), "--runs", str(runs), "--users", "1"])
    assert not runs.exists()


def test_a_missing_adapter_is_recorded_in_each_unit_that_needs_it(tiny_run, tmp_path):
    run_dir, argv, _ = tiny_run
    runs = tmp_path / "runs"
    copy = runs / "news_headline" / "tiny-seed0"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "users")
    (copy / RESULTS_JSON).unlink()
    anchor = json.loads((copy / "stage1" / "anchors.json").read_text())["anchors"][0]["user_id"]
    shutil.rmtree(copy / "bank" / anchor)
    (copy / "bank" / anchor).mkdir()  # present but empty: the bank is missing this adapter
    result = main("test", pipeline.run_and_report, argv + ["--runs", str(runs), "--methods", "rag1,merged_only"])
    failures = result["failures"]
    assert not failures["rag1"]
    for user, rows in json.loads((copy / "stage2" / "matches.json").read_text()).items():
        sims = rows["similarities"]
        uses_missing = anchor in sorted(sims, key=lambda a: -sims[a])[:2]
        assert (anchor in failures["merged_only"].get(user, "")) == uses_missing
    assert result["meta"]["bank_missing"] == [anchor]


def test_a_smaller_run_on_the_same_directory_keeps_the_larger_report(tiny_run):
    run_dir, argv, result = tiny_run
    before = (run_dir / RESULTS_JSON).read_text()
    one = main("test", pipeline.reproduce, argv[:argv.index("--users")] + ["--users", "1", "--no-progress"])
    assert (run_dir / RESULTS_JSON).read_text() == before
    assert json.loads((run_dir / "results-1-users.json").read_text())["users"] == one["users"] == result["users"][:1]
    timings = json.loads((run_dir / "timings.json").read_text())
    assert list(timings) == ["stage1a_select", "stage1b_bank", "stage1c_population", "stage1c_perpcs",
                             "stage1c_proper", "stage2_match_anchors", "stage3"]
    assert "## Wall time" in (run_dir / RESULTS_MD).read_text()


def test_fusion_weights():
    assert fusion_weights([0.6, 0.2], "paper") == pytest.approx([0.75, 0.25])
    assert fusion_weights([0.6, 0.2], "authors_code") == pytest.approx([0.25, 0.75])
    with pytest.raises(ValueError, match="positive"):
        fusion_weights([-0.1, 0.05], "paper")


def test_fused_anchors_top_controls_and_fixed_alpha():
    from mta.profiles import CPU
    from mta.stages.matching import fused_anchors

    match = {"similarities": {"a": 0.9, "b": 0.6, "c": 0.3, "d": 0.1}, "seconds": 0.0}
    assert fused_anchors(match, CPU) == (["a", "b"], pytest.approx([0.6, 0.4]))
    assert fused_anchors(match, CPU.replace(top_k=3))[0] == ["a", "b", "c"]
    assert fused_anchors(match, CPU.replace(fixed_alpha=0.3)) == (["a", "b"], [0.3, 0.7])
    assert fused_anchors(match, CPU, "least") == (["d", "c"], [0.5, 0.5])
    chosen, _ = fused_anchors(match, CPU, "random", seed=1)
    assert chosen == fused_anchors(match, CPU, "random", seed=1)[0] and len(set(chosen)) == 2
    with pytest.raises(ValueError, match="top_k"):
        fused_anchors(match, CPU.replace(top_k=5))


def test_bank_data_selects_how_bank_examples_are_built(tiny_run, monkeypatch):
    from mta.run import cli
    from mta.stages import engine

    _, argv, _ = tiny_run
    seen, real = [], engine.training_pairs
    monkeypatch.setattr(engine, "training_pairs", lambda *a, **k: seen.append(k["bank"]) or real(*a, **k))
    for value in ("adaptation", "authors_code"):
        run = cli.run_from_args(cli.parser("test").parse_args(argv + ["--set", f"bank_data={value}"]))
        user = run.candidates[0]
        assert run.engine.examples(user.history, seed=0, bank=True)
        run.engine.examples(user.history, seed=0)
    assert seen == [False, False, True, False]


def test_methods_all_runs_the_controls_beside_every_method(tiny_run):
    from mta.run import cli

    _, argv, _ = tiny_run
    assert cli.run_from_args(cli.parser("test").parse_args(argv + ["--methods", "all"])).methods == ALL
    assert cli.run_from_args(cli.parser("test").parse_args(argv)).methods == DEFAULT


def test_mta_is_eq7_on_the_top_k_anchors_of_the_most_active_users(tiny_run, tiny_run_inputs):
    """Fails if an anchor is not its cluster's most active eligible user (Eq. 3), if MTA fuses other than
    the top-K anchors with Eq. 6's weights, or if it skips the stacked LoRA or trains it with OPPU's recipe."""
    from mta.data.lamp import load_candidates
    from mta.profiles import resolve_profile

    run_dir, argv, result = tiny_run
    profile = resolve_profile(argv[argv.index("--profile") + 1])
    items = {u.user_id: len(u.history) for u in load_candidates(tiny_run_inputs[0], "news_headline")}
    doc = json.loads((run_dir / "stage1" / "anchors.json").read_text())
    for a in doc["anchors"]:
        eligible = [u for u in a["members"] if items[u] >= profile.min_anchor_items] or a["members"]
        assert a["user_id"] == min(eligible, key=lambda u: (-items[u], u))
        assert len({items[u] for u in eligible}) > 1 or len(eligible) == 1  # the rule had a choice to make
    assert any(len({items[u] for u in a["members"] if items[u] >= 11}) > 1 for a in doc["anchors"])
    matches = json.loads((run_dir / "stage2" / "matches.json").read_text())
    for uid, m in matches.items():
        sims = m["similarities"]
        mta = json.loads((run_dir / "users" / uid / "mta.json").read_text())
        top = sorted(sims, key=lambda a: -sims[a])[:profile.top_k]
        assert mta["anchors"] == top
        assert mta["weights"] == pytest.approx([sims[a] / sum(sims[a] for a in top) for a in top])
        steps = -(-10 // profile.stack.batch_size) * profile.stack.epochs  # 10 history items each
        assert mta["train"]["steps"] == steps != -(-10 // profile.oppu.batch_size) * profile.oppu.epochs
        assert max(mta["train"]["lrs"]) == pytest.approx(profile.stack.lr) != profile.oppu.lr
        oppu = json.loads((run_dir / "users" / uid / "oppu.json").read_text())
        assert max(oppu["train"]["lrs"]) == pytest.approx(profile.oppu.lr)
    assert result["mta_vs"]["merged_only"]["outputs_differ"] > 0  # the stacked LoRA acted


def test_several_seeds_give_a_summary_across_them(tiny_run):
    from mta.run.pipeline import reproduce_seeds

    run_dir, argv, result = tiny_run
    summary = main("test", pipeline.reproduce, argv + ["--seed", "0 1", "--methods", "rag1,merged_only,mta"],
                   across_seeds=reproduce_seeds)
    folder = run_dir.parent / f"tiny-seeds0-1-{N_USERS}-users"
    assert json.loads((folder / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert "mean ± sd" in (folder / "summary.md").read_text()
    seed1 = json.loads((run_dir.parent / "tiny-seed1" / RESULTS_JSON).read_text())
    for m in ("rag1", "merged_only", "mta"):
        values = [result["methods"][m]["metrics"]["rouge-1"], seed1["methods"][m]["metrics"]["rouge-1"]]
        assert summary["methods"][m]["rouge-1"]["mean"] == pytest.approx(np.mean(values))
        assert summary["methods"][m]["rouge-1"]["std"] == pytest.approx(np.std(values, ddof=1))
    assert set(summary["mta_vs_pooled"]) == {"rag1", "merged_only"}
    with pytest.raises(SystemExit, match="one seed at a time"):
        main("test", pipeline.reproduce, argv + ["--seed", "0,1"])


def test_groups_of_many_and_groups_of_one_give_the_same_outputs(tiny_run, tmp_path):
    """Groups of anchors and users through per-row adapters (the tiny run) against one at a time
    (group_size=1), from cold: the same bank and PROPER losses and the same output for every (user, method)."""
    run_dir, argv, result = tiny_run
    runs = argv.index("--runs") + 1
    ones_argv = [*argv[:runs], str(tmp_path / "runs"), *argv[runs + 1:], "--set", "group_size=1"]
    ones = main("test", pipeline.reproduce, ones_argv)
    assert result["methods"] and set(ones["methods"]) == set(result["methods"])
    for uid, rows in result["per_user"].items():
        for m, row in rows.items():
            assert ones["per_user"][uid][m]["queries"] == row["queries"], (uid, m)
    (ones_dir,) = (tmp_path / "runs" / "news_headline").iterdir()
    for log in (run_dir / "bank").glob("*/train_log.json"):
        batched, alone = json.loads(log.read_text()), json.loads((ones_dir / "bank" / log.parent.name /
                                                                 "train_log.json").read_text())
        assert batched["group"] > 1 and "group" not in alone
        assert batched["first_loss"] == pytest.approx(alone["first_loss"], rel=1e-5)
        assert batched["last_loss"] == pytest.approx(alone["last_loss"], rel=1e-4)
    compared = 0
    for uid in result["per_user"]:  # PROPER's user and router stages, many users in one pass against a group of one
        batched, alone = (json.loads((d / "users" / uid / "proper.json").read_text()) for d in (run_dir, ones_dir))
        if batched.get("group", 1) == 1:  # recomputed alone by an earlier test
            continue
        compared += 1
        for stage in ("train", "train_router"):
            for key in ("first_loss", "last_loss", "probe_before", "probe_after"):
                assert batched[stage][key] == pytest.approx(alone[stage][key], rel=1e-4), (uid, stage, key)
    assert compared


def test_bf16_where_native_runs_every_method_and_is_recorded(tiny_run, tmp_path):
    """`bf16 = True` where this CPU has native bf16: every method trains and decodes under bf16 autocast, and
    config.json records it; on a CPU without it, True fails before any work. ("auto", the cpu profile's choice, is
    measured: tests/test_calibrate.py.)"""
    _, argv, _ = tiny_run
    runs = argv.index("--runs") + 1
    here = [*argv[:runs], str(tmp_path / "runs"), *argv[runs + 1:], "--users", "1"]
    if not bf16_supported("cpu"):
        with pytest.raises(SystemExit, match="no native bf16"):
            main("test", pipeline.reproduce, [*here, "--set", "bf16=True"])
        assert not (tmp_path / "runs").exists()
        return
    result = main("test", pipeline.reproduce, [*here, "--set", "bf16=True"])
    (run_dir,) = (tmp_path / "runs" / "news_headline").iterdir()
    assert json.loads((run_dir / "config.json").read_text())["profile"]["bf16"] is True
    rows = [row for per in result["per_user"].values() for row in per.values()]
    assert set(result["methods"]) == set(DEFAULT) and not any(row.get("error") for row in rows)


def test_stage3_scores_every_query_of_a_user(tmp_path, monkeypatch):
    """A user with 3 queries gets 3 rows, in order, each with its query id, output, prediction, gold and whether
    the cap cut its prompt: one personalisation per user, all queries decoded in one batch, under its slot."""
    from mta.data.lamp import Query, User
    from mta.methods import get, units
    from mta.stages import personalize
    from tests.fixtures import make_engine

    engine = make_engine(tmp_path / "llm", max_test_tokens=200)
    item = {"title": "a cat sat on a mat", "text": "the cat sat on the mat"}
    users = [User("u0", [item, {**item, "title": "rain in spain"}],
                  [Query(f"u0-q{j}", f"Generate a headline for the following article: {t}", f"gold {j}")
                   for j, t in enumerate(["cats sit", "rain falls " * 40, "dogs bark"])]),
             User("u1", [item, item], [Query("u1-q0", "Generate a headline for the following article: x", "g")])]
    calls, trained = [], []
    real_generate, real_train = engine.generate, engine.personalize_many
    monkeypatch.setattr(engine, "generate", lambda prompts, slots=None: calls.append((list(prompts), slots))
                        or real_generate(prompts, slots))
    monkeypatch.setattr(engine, "personalize_many", lambda *a, **k: trained.append(len(a[0])) or real_train(*a, **k))
    style = engine.profile.prompt_style
    (rag,) = [u for u in units(["base", "rag1"]) if u[0].name == "base"]
    for out in (personalize.run_group(engine, users, rag, {}, {}, 0), personalize.run_group(engine, users[:1], rag, {},
                                                                                             {}, 0)):
        rows = out["u0"]["rag1"]["queries"]
        assert [r["query_id"] for r in rows] == ["u0-q0", "u0-q1", "u0-q2"]
        assert [r["gold"] for r in rows] == ["gold 0", "gold 1", "gold 2"]
        assert [r["prompt_cut"] for r in rows] == [False, True, False]
        assert all(r["prediction"] == engine.task.parse(r["output"]) for r in rows)
        assert len(out["u0"]["base"]["queries"]) == 3
    assert sorted(calls[0][0]) == sorted(p for u in users for m in rag for p in
                                         personalize.method_prompts(engine.task, u, m, style))
    calls.clear()
    out = personalize.run_group(engine, users, [get("adapt_only")], {}, {}, 0)
    assert trained == [2] and len(calls) == 1 and calls[0][1] == [0, 0, 0, 1]
    assert calls[0][0] == [p for u in users for p in personalize.method_prompts(engine.task, u, get("adapt_only"),
                                                                                 style)]
    assert [len(out[u]["adapt_only"]["queries"]) for u in ("u0", "u1")] == [3, 1]
