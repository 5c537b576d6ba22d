"""Every sweep (Figs. 2-6) end to end on the tiny run, producing its JSON and PNG."""

import functools
import json
import shutil

import pytest

from mta.run import pipeline
from mta.run.cli import main
from mta.run.sweeps import llama3_8b_shapes, lora_parameters, run_sweep
from mta.stages.engine import Engine
from tests.conftest import RESULTS_JSON

POINTS = {"alpha": (None, 0.0, 1.0), "k": (1, 2), "rank": (2, 4), "bank": (2, 3), "adapt": ((3e-2, 1, 2), (1e-3, 1, 4))}


@pytest.mark.parametrize("what", [*POINTS, "efficiency"])
def test_sweep_writes_json_and_png(tiny_run, what, monkeypatch):
    run_dir, argv, _ = tiny_run
    out = main("test", lambda run: run_sweep(run, what, POINTS.get(what)), argv)
    path = run_dir / "sweeps" / f"{what}.json"
    assert json.loads(path.read_text())["what"] == what
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    if what == "efficiency":  # a group's training time counts once, though each of its anchors logs it
        logs = [json.loads(f.read_text()) for f in run_dir.glob("bank/*/train_log.json")]
        assert out["measured"]["bank_seconds"] == pytest.approx(sum(lg["seconds"] / lg.get("group", 1) for lg in logs))
        assert out["measured"]["bank_seconds"] < sum(lg["seconds"] for lg in logs)
    else:
        assert len(out["points"]) == len(POINTS[what])
        ref = out["reference_point"]
        others = [p for p in out["points"] if p != ref]
        assert all("vs_reference" in row for p in others for row in out["points"][p].values())
        assert all("changed" in row for p in out["points"].values() for m, row in p.items() if m != "merged_only")
        # a finished sweep recomputes nothing
        calls = []
        monkeypatch.setattr(pipeline, "run_group", lambda *a, **k: calls.append(a) or None)
        main("test", lambda run: run_sweep(run, what, POINTS.get(what)), argv)
        assert calls == []


def test_points_share_the_bank_unless_they_change_it(tiny_run):
    run_dir, argv, _ = tiny_run
    for what in ("k", "bank"):
        main("test", functools.partial(sweep_of, what=what, points=POINTS[what]), argv)
    assert not (run_dir / "sweeps" / "k" / "1" / "bank").exists()
    assert (run_dir / "sweeps" / "bank" / "2" / "bank").is_dir()


def sweep_of(run, what, points):
    return run_sweep(run, what, points)


@pytest.fixture
def fresh_run(tiny_run, tmp_path):
    """A private copy of the finished tiny run without any sweep, so no test depends on what another left."""
    run_dir, argv, result = tiny_run
    copy = tmp_path / "runs" / run_dir.parent.name / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("sweeps"))
    argv = list(argv)
    argv[argv.index("--runs") + 1] = str(tmp_path / "runs")
    return copy, argv, result


def test_alpha_reaches_the_merge(fresh_run, monkeypatch):
    """Each fixed-alpha point folds alpha * anchor_1 + (1 - alpha) * anchor_2; alpha = 1 is anchor 1 alone,
    which is the K = 1 point."""
    from mta.stages import engine

    run_dir, argv, _ = fresh_run
    seen, fold, many = [], engine.fold_adapters, engine.Engine.personalize_many
    monkeypatch.setattr(engine, "fold_adapters", lambda model, adapters, weights, *a: seen.append(
        (len(adapters), list(weights))) or fold(model, adapters, weights, *a))
    monkeypatch.setattr(engine.Engine, "personalize_many", lambda self, fused, weights, *a: seen.extend(
        (len(f), list(w)) for f, w in zip(fused, weights, strict=True)) or many(self, fused, weights, *a))
    main("test", lambda run: run_sweep(run, "alpha", (0.0, 0.3, 1.0), methods=("merged_only",)), argv)
    assert sorted(w for _, w in seen) == sorted([[0.0, 1.0]] * 2 + [[0.3, 0.7]] * 2 + [[1.0, 0.0]] * 2)
    main("test", lambda run: run_sweep(run, "k", (1,), methods=("merged_only",)), argv)
    alpha1, k1 = (json.loads((run_dir / "sweeps" / w / p / RESULTS_JSON).read_text())["per_user"]
                  for w, p in (("alpha", "1.0"), ("k", "1")))
    assert {u: r["merged_only"]["queries"] for u, r in alpha1.items()} == \
        {u: r["merged_only"]["queries"] for u, r in k1.items()}


def anchors(root):
    return {a["user_id"] for a in json.loads((root / "stage1" / "anchors.json").read_text())["anchors"]}


def count_trainings(monkeypatch) -> list:
    trained = []
    personalize_many = Engine.personalize_many

    def counting_many(self, fused, weights, recipe, *rest, **kw):
        trained.extend(recipe for adapters in fused if not adapters and recipe is not None)  # fresh on W0: the bank's
        return personalize_many(self, fused, weights, recipe, *rest, **kw)

    monkeypatch.setattr(Engine, "personalize_many", counting_many)
    return trained


def test_a_bank_point_trains_only_the_anchors_the_main_run_lacks(fresh_run, monkeypatch):
    run_dir, argv, _ = fresh_run
    trained = count_trainings(monkeypatch)
    main("test", lambda run: run_sweep(run, "bank", POINTS["bank"], methods=("merged_only",)), argv)
    points = [run_dir / "sweeps" / "bank" / "2"]  # V = 3 is the tiny profile's own
    assert anchors(points[0]) & anchors(run_dir)
    assert len(trained) == sum(len(anchors(p) - anchors(run_dir)) for p in points)
    for p in points:
        for a in anchors(p) & anchors(run_dir):
            assert (p / "bank" / a / "adapter_model.safetensors").read_bytes() == \
                (run_dir / "bank" / a / "adapter_model.safetensors").read_bytes()


def test_a_bank_point_reuses_the_meta_loras_of_other_points(fresh_run, monkeypatch):
    run_dir, argv, _ = fresh_run
    main("test", lambda run: run_sweep(run, "bank", (4,), methods=("merged_only",)), argv)
    trained = count_trainings(monkeypatch)
    main("test", lambda run: run_sweep(run, "bank", (5,), methods=("merged_only",)), argv)
    bank = run_dir / "sweeps" / "bank"
    known = anchors(run_dir) | anchors(bank / "4")
    assert anchors(bank / "5") & (anchors(bank / "4") - anchors(run_dir))  # something to reuse from V = 4
    assert len(trained) == len(anchors(bank / "5") - known)


def test_the_main_profile_point_is_the_main_run(tiny_run):
    run_dir, argv, _ = tiny_run
    before = (run_dir / RESULTS_JSON).read_text()
    out = main("test", lambda run: run_sweep(run, "k", (2, 1), methods=("merged_only",)), argv)
    assert not (run_dir / "sweeps" / "k" / "2").exists()  # top_k = 2 is the tiny profile's own
    assert (run_dir / RESULTS_JSON).read_text() == before
    assert set(out["points"]["1"]) == {"merged_only"}


def test_llama3_8b_lora_size():
    # rank 8 on every linear layer of Llama-3-8B: 8 * 81920 per layer * 32 layers
    assert lora_parameters(llama3_8b_shapes(), 8) == 20_971_520
