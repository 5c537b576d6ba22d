"""config.json records what made a run directory: the profile, the sha256 of each data file and what the first
command ran with (the code version, the package versions, the machine); it is checked, never rewritten, and each
command's record is added to provenance.json."""

import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path

import pytest
import torch

from mta.data.lamp import CANDIDATES_FILE, TEST_FILE
from mta.files import sha256_file
from mta.run import provenance
from mta.run.cli import main
from tests.fixtures import make_lamp, make_profile


@pytest.fixture
def cheap(tmp_path, tiny_run_inputs):
    """(argv, lamp task folder, run directory) of a command that checks the tiny data and models and writes
    config.json, then stops: the models are never loaded."""
    _, llm, bert = tiny_run_inputs
    lamp = make_lamp(tmp_path / "lamp")
    profile = make_profile(tmp_path / "tiny.json", llm, bert)
    argv = ["--profile", str(profile), "--lamp-dir", str(lamp), "--runs", str(tmp_path / "runs"), "--users", "2",
            "--no-progress"]
    return argv, lamp / "news_headline", tmp_path / "runs" / "news_headline" / "tiny-seed0"


def _start(argv):
    return main("test", lambda run: run.dir.root, argv)


def test_config_records_what_the_run_was_made_with(cheap):
    argv, task_dir, run_dir = cheap
    _start(argv)
    config = json.loads((run_dir / "config.json").read_text())
    made = config["provenance"]
    files = [task_dir / CANDIDATES_FILE, task_dir / TEST_FILE]
    assert made["data"] == {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert [config["data"][r]["sha256"] for r in ("candidates", "test_users")] == list(made["data"].values())
    assert made["packages"]["torch"] == torch.__version__ == importlib.metadata.version("torch")
    for name in ("tokenizers", "safetensors", "numpy", "tqdm"):  # runtime dependencies of setup.py
        assert made["packages"][name] == importlib.metadata.version(name)
    assert not {"pytest", "ruff", "transformers", "ray"} & set(made["packages"])  # extras are not runtime
    assert made["machine"]["threads"] == torch.get_num_threads() and made["machine"]["cpu"]
    assert made["machine"]["gpu"] is None  # a CPU profile
    assert made["executor"]["kind"] == "local"  # every setting given: no calibration, so "auto" is local
    assert set(made["code"]) in ({"commit", "dirty"}, {"version"})
    assert json.loads((run_dir / "provenance.json").read_text()) == [made]


def test_a_resume_adds_its_record_and_a_changed_data_file_is_refused(cheap):
    argv, task_dir, run_dir = cheap
    _start(argv)
    config = (run_dir / "config.json").read_text()
    _start(argv)
    history = json.loads((run_dir / "provenance.json").read_text())
    assert len(history) == 2 and history[0] == json.loads(config)["provenance"]
    assert (run_dir / "config.json").read_text() == config  # checked, not rewritten
    test_file = task_dir / TEST_FILE
    users = json.loads(test_file.read_text())
    test_file.write_text(json.dumps(users[::-1]))  # other data under the same run directory
    with pytest.raises(SystemExit, match=f"made with other inputs .*{test_file}"):
        _start(argv)
    assert (run_dir / "config.json").read_text() == config and len(json.loads(
        (run_dir / "provenance.json").read_text())) == 2


def test_another_profile_is_still_refused(cheap):
    argv, _, run_dir = cheap
    _start(argv)
    profile = Path(argv[1])
    profile.write_text(json.dumps({**json.loads(profile.read_text()), "max_new_tokens": 7}))
    with pytest.raises(SystemExit, match=r"made with other inputs .*profile fields max_new_tokens"):
        _start(argv)
    assert len(json.loads((run_dir / "provenance.json").read_text())) == 1


def test_a_stale_tmp_link_to_outside_is_removed_and_the_run_goes_on(cheap, tmp_path):
    argv, _, run_dir = cheap
    _start(argv)
    target = tmp_path / "elsewhere"
    (target / "data").mkdir(parents=True)
    (target / "data" / "x.json").write_text("keep")
    (run_dir / ".results.json.ab.tmp").symlink_to(target, target_is_directory=True)
    assert _start(argv) == run_dir
    assert not (run_dir / ".results.json.ab.tmp").is_symlink() and (target / "data" / "x.json").read_text() == "keep"


def test_code_version_is_the_checkout_commit_or_the_installed_version(monkeypatch):
    code = provenance.code_version()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(provenance.__file__).parents[2],
                          capture_output=True, text=True)
    if head.returncode == 0:
        assert code["commit"] == head.stdout.strip() and isinstance(code["dirty"], bool)
    monkeypatch.setenv("PATH", "")  # no git
    assert provenance.code_version() == {"version": importlib.metadata.version("mta")}


def test_the_gpu_is_named_only_on_a_cuda_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"GPU of {device}")
    assert provenance.machine("cuda:1")["gpu"] == "GPU of cuda:1"
    assert provenance.machine("cpu")["gpu"] is None


def test_sha256_of_a_file_over_several_chunks(tmp_path):
    data = bytes(range(256)) * 9000  # over two chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=1 << 20) == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()
