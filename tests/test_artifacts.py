"""Every kind of artifact in a run directory, damaged four ways (deleted, truncated, swapped with another artifact,
edited): the next run notices each, names every damaged file it finds, makes it again, and ends with the results of
the run that was never damaged. Also what `mta.stamps` checks, one case at a time."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mta.files import atomic_path
from mta.run import pipeline
from mta.run.cli import main
from mta.stamps import FOLDER_STAMP, save_sealed_tensors, seal_folder, stale, write_sealed
from tests.conftest import N_USERS, RESULTS_JSON
from tests.fixtures import make_profile
from tests.test_integrity import comparable

# kind -> (the artifact damaged, the one it is swapped with): every kind a run directory holds
ARTIFACTS = {
    "stage-1 anchors": ("stage1/anchors.json", "stage2/matches.json"),
    "stage-1 user vectors": ("stage1/vectors/*.safetensors", "perpcs/gates/*.safetensors"),
    "stage-2 anchor embeddings": ("stage2/anchor_embeddings.safetensors", "perpcs/gates/*.safetensors"),
    "meta-LoRA": ("bank/*", "bank/*"),
    "OPPU task LoRA": ("population/oppu_task", "perpcs/task_lora"),
    "Per-Pcs task LoRA": ("perpcs/task_lora", "proper/population_lora"),
    "Per-Pcs sharer": ("perpcs/sharers/*", "perpcs/sharers/*"),
    "Per-Pcs gates": ("perpcs/gates/*.safetensors", "perpcs/gates/*.safetensors"),
    "PROPER population LoRA": ("proper/population_lora", "population/oppu_task"),
    "PROPER group stage": ("proper/group", "bank/*"),
    "result": ("users/*/mta.json", "users/*/mta.json"),
    "result of another method": ("users/*/rag1.json", "users/*/merged_only.json"),
}


def _instances(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


def _largest_file(path: Path) -> Path:
    return max((p for p in path.rglob("*") if p.is_file() and p.name != FOLDER_STAMP), key=lambda p: p.stat().st_size) \
        if path.is_dir() else path


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + "-swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def damage(root: Path, how: str) -> list[Path]:
    """Damage one artifact of every kind `how` says; returns the damaged paths that exist afterwards."""
    named = []
    for target, partner in ARTIFACTS.values():
        path = _instances(root, target)[0]
        if how == "delete":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            continue
        if how == "swap":
            other = next(p for p in _instances(root, partner) if p != path)
            if path.is_dir() != other.is_dir() or path.suffix != other.suffix or {path, other} & set(named):
                continue  # only artifacts a reader could take for each other, each swapped once
            _swap(path, other)
            named += [path, other]
            continue
        file = _largest_file(path)
        data = file.read_bytes()
        if how == "truncate":
            file.write_bytes(data[: len(data) // 2])
        elif file.suffix == ".json":
            record = json.loads(data)
            record["edited"] = True
            file.write_text(json.dumps(record))
        else:  # a weight in the last bytes of the file
            file.write_bytes(data[:-4] + bytes(b ^ 0x55 for b in data[-4:]))
        named.append(path)
    return named


@pytest.fixture(scope="module")
def one_by_one(tiny_run_inputs, tmp_path_factory):
    """The tiny run in groups of one (one anchor, one user at a time), so that an artifact made again has the
    shapes, hence the arithmetic, of the first (larger groups change with what is left to do): (run directory,
    argv, results)."""
    lamp, llm, bert = tiny_run_inputs
    root = tmp_path_factory.mktemp("one_by_one")
    argv = ["--profile", str(make_profile(root / "tiny.json", llm, bert, group_size=1)), "--lamp-dir",
            str(lamp), "--users", str(N_USERS), "--no-progress"]
    result = main("test", pipeline.reproduce, argv + ["--runs", str(root / "runs")])
    return root / "runs" / "news_headline" / "tiny-seed0", argv, result


@pytest.mark.slow
@pytest.mark.parametrize("how", ["delete", "truncate", "swap", "edit"])
def test_a_damaged_artifact_of_any_kind_is_made_again(one_by_one, tmp_path, capsys, how):
    run_dir, argv, reference = one_by_one
    copy = tmp_path / "runs" / "news_headline" / run_dir.name
    shutil.copytree(run_dir, copy)
    (copy / RESULTS_JSON).unlink()
    named = damage(copy, how)
    capsys.readouterr()
    result = main("test", pipeline.reproduce, argv + ["--runs", str(tmp_path / "runs")])
    out = capsys.readouterr()
    log = out.out + out.err
    assert comparable(result) == comparable(reference)
    for path in named:
        assert f"{path}: not reused" in log, path
    for target, _ in ARTIFACTS.values():
        assert _instances(copy, target)


def test_a_matches_entry_made_from_other_inputs_is_matched_again(tiny_run, tmp_path, capsys):
    run_dir, argv, _ = tiny_run
    copy = tmp_path / "runs" / "news_headline" / run_dir.name
    shutil.copytree(run_dir, copy)
    path = copy / "stage2" / "matches.json"
    matches = json.loads(path.read_text())
    (a, b), reference = list(matches)[:2], dict(matches)
    matches[a], matches[b] = matches[b], matches[a]  # swapped between users: each names the other's record
    path.write_text(json.dumps(matches))
    run = pipeline.Run("news_headline", pipeline.stored_profile(copy / "config.json"),
                       Path(argv[argv.index("--lamp-dir") + 1]), runs=tmp_path / "runs", n_users=2, progress=False)
    assert set(pipeline.current_matches(run, matches)) == set()
    fixed = pipeline.stage2_match_anchors(run)
    for u in (a, b):
        assert fixed[u]["similarities"] == pytest.approx(reference[u]["similarities"])


def test_a_meta_lora_missing_its_weights_is_trained_again(tiny_run, tmp_path, capsys):
    run_dir, argv, _ = tiny_run
    copy = tmp_path / "runs" / "news_headline" / run_dir.name
    shutil.copytree(run_dir, copy)
    adapter = _instances(copy, "bank/*")[0]
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").unlink()
    main("test", pipeline.stage1_bank, argv + ["--runs", str(tmp_path / "runs")])
    assert f"{adapter}: not reused, its files changed" in capsys.readouterr().out
    assert len((adapter / "adapter_model.safetensors").read_bytes()) == len(weights)


def test_results_of_another_profile_are_never_relabelled(tiny_run, tmp_path, capsys):
    """config.json deleted and the profile changed: no result of the old profile is taken for the new one's."""
    run_dir, argv, _ = tiny_run
    copy = tmp_path / "runs" / "news_headline" / run_dir.name
    shutil.copytree(run_dir, copy)
    (copy / "config.json").unlink()
    profile = tmp_path / "tiny.json"
    profile.write_text(json.dumps({**json.loads(Path(argv[1]).read_text()), "max_new_tokens": 3}))
    argv = [*argv, "--profile", str(profile), "--runs", str(tmp_path / "runs"), "--methods", "rag1"]
    capsys.readouterr()
    result = main("test", pipeline.run_and_report, argv)
    log = capsys.readouterr().out
    for user in result["users"]:
        assert f"users/{user}/rag1.json: not reused, it was made from other inputs (settings)" in log
        assert all(len(q["output"].split()) <= 3 for q in result["per_user"][user]["rag1"]["queries"])


# ----------------------------------------------------------------------------- mta.stamps, case by case

INPUTS = {"artifact": "x", "data": "d1", "settings": "s1"}


def test_a_sealed_record_is_reused_only_unchanged_and_made_from_the_same_inputs(tmp_path):
    path = tmp_path / "r.json"
    assert stale(path, INPUTS) == "it does not exist"
    write_sealed(path, {"output": "a"}, INPUTS)
    assert stale(path, INPUTS) is None
    assert "other inputs (data)" in stale(path, {**INPUTS, "data": "d2"})
    assert "other inputs (artifact)" in stale(path, {**INPUTS, "artifact": "y"})
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "output": "b"}))
    assert "changed after it was written" in stale(path, INPUTS)
    path.write_text(json.dumps({"output": "a"}))
    assert stale(path, INPUTS) == "it holds no record of its inputs"
    path.write_text(path.read_text()[:5])
    assert "cannot be read" in stale(path, INPUTS) and str(path) in stale(path, INPUTS)


def test_a_sealed_tensor_file_is_checked_tensor_by_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    with atomic_path(path) as tmp:
        save_sealed_tensors(tmp, {"w": torch.arange(6.0).reshape(2, 3), "g": torch.ones(2, dtype=torch.bfloat16)},
                            INPUTS)
    assert stale(path, INPUTS) is None
    assert "other inputs (settings)" in stale(path, {**INPUTS, "settings": "s2"})
    data = path.read_bytes()
    path.write_bytes(data[:-2] + b"\x00\x00")
    assert "changed after it was written" in stale(path, INPUTS)
    path.write_bytes(data[: len(data) // 2])
    assert "cannot be read" in stale(path, INPUTS)


def test_a_sealed_folder_is_checked_file_by_file(tmp_path):
    path = tmp_path / "adapter"
    with atomic_path(path, is_dir=True) as tmp:
        (tmp / "weights").write_bytes(b"1234")
        (tmp / "log.json").write_text("{}")
        seal_folder(tmp, INPUTS)
    assert stale(path, INPUTS) is None
    (path / "weights").write_bytes(b"1235")
    assert stale(path, INPUTS) == "its files changed after it was written"
    (path / "weights").unlink()
    assert stale(path, INPUTS) == "its files changed after it was written"
    (path / FOLDER_STAMP).unlink()
    assert stale(path, INPUTS) == "it holds no record of its inputs"
