"""mta.peft.export: a user's fused bank LoRA and stacked LoRA as one PEFT LoRA, checked against fold-then-stack
(`mta.peft.fusion.stack_lora`) weight by weight and, loaded by peft on transformers' twin of the tiny model,
token by token."""
import copy
import json

import pytest
import torch

from mta.errors import InputError
from mta.models.checkpoint import load_llm
from mta.models.generation import generate
from mta.ops.merge import MODES
from mta.peft.adapter import Adapter, load_adapter, save_adapter, set_adapter
from mta.peft.export import export_adapter
from mta.peft.fusion import stack_lora
from mta.peft.lora import LoRAConfig, inject_lora, merge_lora
from tests.fixtures import make_llm
from tests.test_llama import MIN_GAP, greedy_gap
from tests.test_lora import random_adapter

# (bank targets, stacked targets): the same modules, the stack on a subset, and each part with modules of its own
TARGETS = [("all", "all"), ("all", ("q_proj", "v_proj")), (("o_proj", "q_proj"), ("down_proj", "q_proj"))]
WEIGHTS = {2: [0.6, 0.4], 3: [0.5, 0.3, 0.2]}
# the profile's merge spaces param and delta fully; the other modes of mta.ops.merge once
CASES = [(mode, k, t) for mode in ("param", "delta") for k in (2, 3) for t in TARGETS] + \
    [(mode, 2, TARGETS[2]) for mode in MODES if mode not in ("param", "delta")]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """(path, model, tokenizer) of the tiny random Llama of tests/fixtures.py."""
    path = make_llm(tmp_path_factory.mktemp("export") / "llm")
    return (path, *load_llm(path))


def user(model, k, bank_targets="all", stack_targets="all", base="tiny"):
    """K rank-8 meta-LoRAs (scaling 2) and a rank-4 stacked LoRA (scaling 2) on `model`."""
    merged = [random_adapter(model, r=8, alpha=16.0, targets=bank_targets, seed=s, name=base) for s in range(1, k + 1)]
    return merged, random_adapter(model, r=4, alpha=8.0, targets=stack_targets, seed=9, name=base)


def fold_then_stack(model, merged, weights, stacked, mode):
    """A copy of `model` with the fused LoRA folded in and the stacked LoRA on top, unmerged (what we decode with)."""
    model = copy.deepcopy(model)
    stack_lora(model, merged, weights, stacked.config, mode)
    set_adapter(model, stacked)
    return model


def merged_weights(model, adapter=None):
    """The state dict of `model` (with `adapter` injected and folded in, W0 + scaling · B A)."""
    model = copy.deepcopy(model)
    if adapter is not None:
        inject_lora(model, adapter.config)
        set_adapter(model, adapter)
    return merge_lora(model).state_dict()


def max_gap(model, exported, want):
    got = merged_weights(model, exported)
    return max((got[k] - want[k]).abs().max().item() for k in want)


@pytest.mark.parametrize(("mode", "k", "targets"), CASES)
def test_export_folds_to_fold_then_stack(llm, mode, k, targets):
    _, model, _ = llm
    merged, stacked = user(model, k, *targets)
    exported = export_adapter(merged, WEIGHTS[k], stacked, mode)
    want = merged_weights(fold_then_stack(model, merged, WEIGHTS[k], stacked, mode))
    got = merged_weights(model, exported)
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-5, atol=1e-5, msg=key)
    fused_rank = {"param": 8, "linear": 8, "svd": 8}.get(mode, k * 8)
    c = exported.config
    assert (c.r, c.alpha, c.scaling, c.use_rslora) == (fused_rank + 4, fused_rank + 4, 1.0, False)
    assert set(exported.A) == set(merged[0].A) | set(stacked.A)
    assert c.base_model_name_or_path == "tiny"


def test_adapt_only_exports_the_stacked_lora_with_its_scaling_folded(llm):
    _, model, _ = llm
    _, stacked = user(model, 1, stack_targets=("q_proj",))
    exported = export_adapter([], [], stacked, "param")
    want = merged_weights(model, stacked)
    assert exported.config.r == 4 and exported.config.scaling == 1.0
    assert max_gap(model, exported, want) < 1e-6


def test_mutated_exports_do_not_fold_to_fold_then_stack(llm):
    """The weight check above fails on an export that forgets the stack's scaling, has a scaling other than 1,
    or misaligns the parts."""
    _, model, _ = llm
    merged, stacked = user(model, 2, "all", ("q_proj", "v_proj"))
    exported = export_adapter(merged, WEIGHTS[2], stacked, "delta")
    want = merged_weights(fold_then_stack(model, merged, WEIGHTS[2], stacked, "delta"))
    assert max_gap(model, exported, want) < 1e-5
    unscaled = copy.deepcopy(exported)
    for m in stacked.A:
        unscaled.B[m][:, 16:] /= stacked.config.scaling
    alpha = Adapter(LoRAConfig(r=20, alpha=16.0, target_modules=exported.config.target_modules), exported.A, exported.B)
    shifted = copy.deepcopy(exported)
    for m in shifted.A:
        shifted.A[m] = shifted.A[m].roll(1, 0)
    for mutant in (unscaled, alpha, shifted):
        assert max_gap(model, mutant, want) > 1e-2


@pytest.mark.parametrize("mode", ["param", "delta"])
def test_peft_loads_the_export_and_decodes_our_tokens(llm, tmp_path, mode):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    path, model, tok = llm
    merged, stacked = user(model, 2, ("o_proj", "q_proj"), ("down_proj", "q_proj"), base=str(path))
    ours = fold_then_stack(model, merged, WEIGHTS[2], stacked, mode)
    save_adapter(export_adapter(merged, WEIGHTS[2], stacked, mode), tmp_path / "user")
    config = json.loads((tmp_path / "user" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(path) and config["r"] == config["lora_alpha"]
    hf = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "user").eval()
    changed = 0
    for text in ["Write a headline for: rain in the city", "Summarise the match", "What is new today?"]:
        ids = torch.tensor([tok.chat_prompt(text)])
        got = generate(ours, ids, max_new_tokens=10)
        with torch.no_grad():
            ref = theirs.generate(input_ids=ids, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        assert greedy_gap(ours, ids, None, got) > MIN_GAP
        changed += got.tolist() != generate(model, ids, max_new_tokens=10).tolist()
        assert got.tolist() == ref[:, ids.shape[1]:].tolist()
    assert changed  # the adapter changes the answers, so PEFT applied it
    assert load_adapter(tmp_path / "user").config.r == 8 * (2 if mode == "delta" else 1) + 4


def test_base_model_and_bad_inputs(llm):
    _, model, _ = llm
    merged, stacked = user(model, 2)
    exported = export_adapter(merged, WEIGHTS[2], stacked, "param", base_model="llama3-8b-instruct")
    assert exported.config.base_model_name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    hub = export_adapter(merged, WEIGHTS[2], stacked, "param", "org/model")
    assert hub.config.base_model_name_or_path == "org/model"
    _, other = user(model, 1, base="another")
    with pytest.raises(InputError, match="different base models"):
        export_adapter(merged, WEIGHTS[2], other, "param")
    q_only, _ = user(model, 1, bank_targets=("q_proj",))
    with pytest.raises(InputError, match="target different modules"):
        export_adapter([merged[0], *q_only], WEIGHTS[2], stacked, "param")
    wide = copy.deepcopy(stacked)
    wide.B["model.layers.0.mlp.up_proj"] = torch.zeros(7, 4)
    with pytest.raises(InputError, match=r"model\.layers\.0\.mlp\.up_proj.*wrong base model"):
        export_adapter(merged, WEIGHTS[2], wide, "param")
