"""The `paper` profile end to end on CPU, before any GPU: `mta reproduce --profile paper --methods all` on tiny
models packaged as the paper's (a Llama-3-8B-Instruct-shaped checkpoint with Llama-3's tokenizer, special tokens,
chat template and end tokens; a deberta-v3-large-shaped and a bge-small-en-v1.5-shaped encoder), every stage and
every method, on LaMP-4 (no template at test) and LaMP-2 (the chat template and an NF4 base at test).

The `--set` overrides change sizes and the device only, never a structural choice of `paper`:
- `llm`, `stage1_encoder`, `stage2_encoder`: the tiny checkpoints instead of the Hub's;
- `device=cpu`: no GPU here (`dtype` stays bfloat16 and `bf16` 'auto', measured on this CPU);
- `n_anchors=3`: V = 50 needs 50 candidates; the tiny data has 12, 8 of them with more than 10 items;
- `bank.epochs`, `stack.epochs`, `oppu.epochs`, `oppu_task.epochs`, `proper_population.epochs`,
  `proper_group.epochs` to 1, `perpcs_sharer.max_steps` and `perpcs_gate.max_steps` (100 and 200) to 2: fewer
  optimizer steps of the same recipes;
- `group_size=2`: stage 3 of the 4 test users (and the bank) runs in several groups, as 100 users do in groups of 8.
Everything else stays as `paper` has it: test conditions `authors_code` (the per-task template, NF4 base, end tokens
and `max_new_tokens`), the chat template in training, Eq. 6 fusion, the LoRA targets and ranks, batch sizes and
accumulation, the sequence caps (8192 bank, 2048 stacked, 4096 or none at test), `rows_per_pass`, K = 2.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mta.data.lamp import get_task, load_test_users, query_prompt, training_pairs
from mta.methods import ALL
from mta.models.checkpoint import load_llm
from mta.profiles import PAPER
from mta.run import pipeline
from mta.run.cli import main
from mta.stages.engine import Engine
from tests.fixtures import make_bge, make_deberta, make_lamp, make_llama3
from tests.test_lamp_release import build_lamp

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

SIZES = ["n_anchors=3", "group_size=2", "bank.epochs=1", "stack.epochs=1", "oppu.epochs=1", "oppu_task.epochs=1",
         "proper_population.epochs=1", "proper_group.epochs=1", "perpcs_sharer.max_steps=2",
         "perpcs_gate.max_steps=2"]
TASKS = ["lamp4", "lamp2"]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models' steps are bound by per-op overhead, which a second thread adds to (several times over on
    busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paper_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-models")
    return make_llama3(root / "llama3"), make_deberta(root / "deberta"), make_bge(root / "bge")


@pytest.fixture(scope="module")
def lamp_dirs(tmp_path_factory):
    """task -> a tiny LAMP_DIR: 12 bank candidates and 4 test users of 10 items each."""
    root = tmp_path_factory.mktemp("paper-lamp")
    return {"lamp4": make_lamp(root / "lamp4"),
            "lamp2": build_lamp(root / "lamp2", "lamp2", n_users=12, n_items=12, n_test=4, test_items=10)}


@pytest.mark.parametrize("task", TASKS)
def test_the_tiny_llama3_renders_prompts_as_transformers_does(task, paper_models, lamp_dirs):
    """Every prompt the `paper` run of `task` renders, as ids, equals what transformers makes of the same files:
    training examples in the chat template (`apply_chat_template`, then the response and <|eot_id|>), test
    queries in it (LaMP-2) or as the authors' LaMP-4 script tokenizes them, plain with the BOS; and decoding
    stops on both of Llama-3-8B-Instruct's end tokens (generation_config.json)."""
    llm = paper_models[0]
    model, tok = load_llm(str(llm))
    spec = get_task(task)
    engine = Engine(PAPER.for_task(spec.name).replace(llm=str(llm), device="cpu", bf16=False), spec, model, tok)
    ref = transformers.AutoTokenizer.from_pretrained(llm)

    def templated_ids(text):
        return list(ref.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                            add_generation_prompt=True, return_dict=False))

    users = load_test_users(lamp_dirs[task], task)
    for user in users:
        for prompt, target in training_pairs(spec, user.history, style=PAPER.prompt_style):
            ids, start = engine.tok.chat_example(prompt, target)
            assert ids[:start] == templated_ids(prompt)
            assert ids[start:] == ref(target, add_special_tokens=False).input_ids + [ref.eos_token_id]
        for query in user.query:
            prompt = query_prompt(spec, user.history, query, style=PAPER.prompt_style)
            expected = templated_ids(prompt) if task == "lamp2" else ref(prompt).input_ids
            assert engine.test_tok.chat_prompt(prompt) == expected
    ends = transformers.GenerationConfig.from_pretrained(llm).eos_token_id
    assert set(engine.test_tok.eos_token_ids) == set(ends) == {
        ref.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")}


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_the_paper_profile_runs_every_stage_and_method(task, paper_models, lamp_dirs, tmp_path):
    """Every stage's artifacts (anchors, a meta-LoRA per anchor, matches, the population LoRAs and the Per-Pcs and
    PROPER parts) and a result of every method for every test user, none missing; config.json keeps `paper`'s
    structural settings."""
    llm, deberta, bge = paper_models
    sets = [f"llm={llm}", f"stage1_encoder={deberta}", f"stage2_encoder={bge}", "device=cpu", *SIZES]
    argv = ["--task", task, "--profile", "paper", "--lamp-dir", str(lamp_dirs[task]), "--runs", str(tmp_path / "runs"),
            "--methods", "all", "--no-progress", *(a for s in sets for a in ("--set", s))]
    result = main("test", pipeline.reproduce, argv)
    assert set(result["methods"]) == set(ALL) and len(result["users"]) == 4
    assert not any(result["missing"].values())
    run_dir = next((tmp_path / "runs" / result["task"]).iterdir())
    config = json.loads((run_dir / "config.json").read_text())["profile"]
    paper = PAPER.for_task(result["task"])
    assert config["test_conditions"] == "authors_code" and config["fusion"] == paper.fusion
    assert config["max_test_tokens"] == paper.max_test_tokens and config["dtype"] == "bfloat16"
    anchors = json.loads((run_dir / "stage1" / "anchors.json").read_text())["anchors"]
    assert len(anchors) == 3
    for a in anchors:
        assert (run_dir / "bank" / a["user_id"] / "adapter_model.safetensors").exists()
    matches = json.loads((run_dir / "stage2" / "matches.json").read_text())
    assert set(matches) == set(result["users"])
    for part in ("population/oppu_task", "perpcs/task_lora", "perpcs/sharers", "perpcs/gates",
                 "proper/population_lora", "proper/group/mixture.safetensors"):
        assert (run_dir / part).exists(), part
    for user in result["users"]:
        assert {p.stem for p in (run_dir / "users").glob(f"*{user}*/*.json")} >= set(ALL)
    assert (run_dir / "results.md").exists()


@pytest.mark.slow
def test_gpu_check_pipeline_times_every_stage_and_extrapolates(lamp_dirs, tmp_path):
    """`tools/gpu_check.py --pipeline` on tiny models: every stage of the `paper` profile runs on a synthetic pool,
    every method scores every test user, and each stage's estimate is its time x (official count / count run)."""
    sets = ["bank.epochs=1", "max_items_per_anchor=8", "perpcs_sharer.max_steps=2", "perpcs_gate.max_steps=2"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--pipeline", "--shape", "tiny", "--device", "cpu",
         "--source", str(lamp_dirs["lamp4"]), "--candidates", "12", "--anchors", "2", "--users", "2",
         *(a for s in sets for a in ("--set", s))],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "every method scored for all 2 test users" in out.stdout
    table = out.stdout.split("upper bound):\n")[1].splitlines()
    rows = {line.split()[0]: line.split() for line in table[1:] if line.startswith("stage")}
    assert list(rows) == ["stage1a_select", "stage1b_bank", "stage1c_population", "stage1c_perpcs", "stage1c_proper",
                          "stage2_match_anchors", "stage3"]
    for name, cells in rows.items():
        seconds, ran, official, estimate = (float(c.replace(",", "")) for c in (cells[1], *cells[-3:]))
        assert abs(estimate - seconds * official / ran) <= 0.05 * official / ran + 0.5, name
    assert rows["stage3"][-3:-1] == ["2", "100"]  # test users: 2 run, the paper's 100
    assert rows["stage1c_perpcs"][3] == "candidates"  # 12 of 14,352 against 2 of 50 anchors: the larger ratio
