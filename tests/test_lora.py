"""Golden tests of mta.peft.lora, mta.peft.adapter and mta.peft.fusion against peft
on tiny random transformers Llama models."""
import copy
import os

import pytest
import torch

from mta.peft.adapter import Adapter, get_adapter, load_adapter, save_adapter, set_adapter
from mta.peft.fusion import BaseWeights, fold_adapters, merged_factors, stack_lora
from mta.peft.lora import (
    LLAMA_TARGETS,
    LoRAConfig,
    LoRALinear,
    count_parameters,
    find_targets,
    inject_lora,
    lora_layers,
    merge_lora,
    unload_lora,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PREFIX = "base_model.model."


def tiny_llama(seed=0, hidden=32, inter=64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def random_adapter(model, r=4, alpha=8.0, targets=LLAMA_TARGETS, seed=1, rslora=False, name="x"):
    g = torch.Generator().manual_seed(seed)
    cfg = LoRAConfig(r=r, alpha=alpha, target_modules=targets, use_rslora=rslora, base_model_name_or_path=name)
    adapter = Adapter(cfg)
    for m in find_targets(model, cfg.target_modules):
        lin = model.get_submodule(m)
        adapter.A[m] = torch.randn(r, lin.in_features, generator=g) * 0.2
        adapter.B[m] = torch.randn(lin.out_features, r, generator=g) * 0.2
    return adapter


def peft_model_with(model, adapter, name="default"):
    """A PEFT model holding `adapter` under `name` (added to an existing PeftModel if given one)."""
    c = adapter.config
    pcfg = peft.LoraConfig(r=c.r, lora_alpha=c.alpha, target_modules=list(c.target_modules), lora_dropout=0.0,
                           use_rslora=c.use_rslora, task_type="CAUSAL_LM")
    if isinstance(model, peft.PeftModel):
        model.add_adapter(name, pcfg)
    else:
        model = peft.get_peft_model(model, pcfg, adapter_name=name)
    with torch.no_grad():
        for n, mod in model.named_modules():
            if hasattr(mod, "lora_A") and name in mod.lora_A:
                mod.lora_A[name].weight.copy_(adapter.A[n.removeprefix(PREFIX)])
                mod.lora_B[name].weight.copy_(adapter.B[n.removeprefix(PREFIX)])
    return model


def ids(seed=0, B=2, T=12):
    return torch.randint(0, 96, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    return model(input_ids=x).logits


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_grads_match_peft(rslora):
    base = tiny_llama()
    adapter = random_adapter(base, r=4, alpha=8.0, rslora=rslora)
    ours = copy.deepcopy(base)
    inject_lora(ours, adapter.config)
    set_adapter(ours, adapter)
    ref = peft_model_with(copy.deepcopy(base), adapter)
    x = ids()
    lo, lr = logits(ours, x), logits(ref, x)
    torch.testing.assert_close(lo, lr, rtol=1e-5, atol=1e-5)
    lo.square().mean().backward()
    lr.square().mean().backward()
    ref_layers = {n.removeprefix(PREFIX): m for n, m in ref.named_modules() if hasattr(m, "lora_A")}
    for n, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.lora_A.weight.grad, ref_layers[n].lora_A["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.weight.grad, ref_layers[n].lora_B["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)


def test_init_freeze_and_counts():
    model = tiny_llama()
    total0 = count_parameters(model)[1]
    names = inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all"))
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    trainable, total = count_parameters(model)
    expected = sum(4 * (lin.in_features + lin.out_features) for lin in (model.get_submodule(n).base for n in names))
    assert trainable == expected and total == total0 + expected
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    layer = model.get_submodule(names[0])
    assert torch.all(layer.lora_B.weight == 0) and layer.scaling == 2.0
    bound = 1 / layer.base.in_features ** 0.5  # kaiming_uniform_(a=sqrt(5)) bound
    assert layer.lora_A.weight.abs().max() <= bound
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoRAConfig())
    unload_lora(model)
    assert not lora_layers(model) and count_parameters(model)[1] == total0


def test_dropout_only_on_lora_path():
    lin = torch.nn.Linear(16, 8)
    layer = LoRALinear(lin, r=4, alpha=4, dropout=0.5).train()
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), lin(x))  # B = 0, so base output untouched by dropout


def test_merge_matches_peft_merge_and_unload():
    base = tiny_llama()
    adapter = random_adapter(base)
    ours = copy.deepcopy(base)
    inject_lora(ours, adapter.config)
    set_adapter(ours, adapter)
    merged = merge_lora(ours).state_dict()
    ref = peft_model_with(copy.deepcopy(base), adapter).merge_and_unload().state_dict()
    assert merged.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(merged[k], ref[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("combo", ["linear", "cat", "svd"])
def test_weighted_combinations_match_peft(combo):
    base = tiny_llama()
    ranks = [4, 4, 4] if combo == "linear" else [4, 2, 6]
    adapters = [random_adapter(base, r=r, alpha=a, seed=s)
                for r, a, s in zip(ranks, [8.0, 4.0, 16.0], [1, 2, 3], strict=True)]
    weights = [0.5, -0.2, 0.7]
    ref = peft_model_with(copy.deepcopy(base), adapters[0], "a0")
    for i, a in enumerate(adapters[1:], 1):
        peft_model_with(ref, a, f"a{i}")
    ref.add_weighted_adapter(["a0", "a1", "a2"], weights, "m", combination_type=combo)
    checked = 0
    for n, mod in ref.named_modules():
        if hasattr(mod, "lora_A") and "m" in mod.lora_A:
            B, A = merged_factors(adapters, weights, n.removeprefix(PREFIX), mode=combo)
            assert mod.scaling["m"] == 1.0
            if combo == "svd":  # factors are unique only up to signs
                torch.testing.assert_close(B @ A, mod.get_delta_weight("m"), rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(A, mod.lora_A["m"].weight, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(B, mod.lora_B["m"].weight, rtol=1e-6, atol=1e-6)
            checked += 1
    assert checked == 14


def test_delta_and_param_modes_are_the_formulas():
    base = tiny_llama()
    adapters = [random_adapter(base, seed=s) for s in (1, 2)]
    w = [0.3, 0.7]
    m = "model.layers.1.mlp.down_proj"
    s = adapters[0].config.scaling
    B, A = merged_factors(adapters, w, m, "delta")
    torch.testing.assert_close(B @ A, sum(wi * s * a.B[m] @ a.A[m] for wi, a in zip(w, adapters, strict=True)))
    B, A = merged_factors(adapters, w, m, "param")  # paper Eq. 5: average A and B separately
    avg_A = sum(wi * a.A[m] for wi, a in zip(w, adapters, strict=True))
    avg_B = sum(wi * a.B[m] for wi, a in zip(w, adapters, strict=True))
    torch.testing.assert_close(B @ A, s * avg_B @ avg_A)


def test_save_here_load_in_peft(tmp_path):
    base = tiny_llama()
    adapter = random_adapter(base, targets="all", rslora=True)
    ours = copy.deepcopy(base)
    inject_lora(ours, adapter.config)
    set_adapter(ours, adapter)
    save_adapter(get_adapter(ours, adapter.config), tmp_path / "ad")
    assert sorted(os.listdir(tmp_path)) == ["ad"]
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    x = ids(3)
    torch.testing.assert_close(logits(ours, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    save_adapter(adapter, tmp_path / "ad", extra={"train_log.json": "{}"})  # overwriting is atomic too
    assert sorted(os.listdir(tmp_path)) == ["ad"] and (tmp_path / "ad" / "train_log.json").read_text() == "{}"
    with pytest.raises(ValueError, match="bad extra file name"):
        save_adapter(adapter, tmp_path / "ad2", extra={"../x": ""})
    assert sorted(os.listdir(tmp_path)) == ["ad"]


def test_save_in_peft_load_here(tmp_path):
    base = tiny_llama()
    adapter = random_adapter(base, r=3, alpha=5.0)
    ref = peft_model_with(copy.deepcopy(base), adapter)
    ref.save_pretrained(tmp_path / "p")
    loaded = load_adapter(tmp_path / "p")
    assert loaded.config.r == 3 and loaded.config.alpha == 5.0
    ours = copy.deepcopy(base)
    inject_lora(ours, loaded.config)
    set_adapter(ours, loaded)
    x = ids(4)
    torch.testing.assert_close(logits(ours, x), logits(ref, x), rtol=1e-5, atol=1e-5)


def test_stacking_matches_peft_merge_then_new_adapter():
    base = tiny_llama()
    adapters = [random_adapter(base, seed=s) for s in (1, 2)]
    weights = [0.6, 0.4]
    new = random_adapter(base, r=2, alpha=4.0, targets=("q_proj", "v_proj"), seed=9)
    ours = copy.deepcopy(base)
    stack_lora(ours, adapters, weights, new.config, "delta")  # PEFT's `cat` is the exact merge
    set_adapter(ours, new)
    ref = peft_model_with(copy.deepcopy(base), adapters[0], "a0")
    peft_model_with(ref, adapters[1], "a1")
    ref.add_weighted_adapter(["a0", "a1"], weights, "m", combination_type="cat")
    ref.set_adapter("m")
    ref = peft_model_with(ref.merge_and_unload(), new)
    x = ids(5)
    torch.testing.assert_close(logits(ours, x), logits(ref, x), rtol=1e-5, atol=1e-5)


def test_base_weights_restore_without_drift():
    model = tiny_llama().to(torch.bfloat16)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    snap = BaseWeights(model)
    users = [[random_adapter(model, seed=s) for s in (1, 2)], [random_adapter(model, seed=s) for s in (3, 4)]]
    for adapters in users:
        fold_adapters(model, adapters, [0.5, 0.5], mode="delta", base=snap)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(w0)
    fold_adapters(fresh, users[1], [0.5, 0.5], "delta")
    for k, v in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k  # user 2 sees W0 + ΔW2 exactly, nothing of user 1
    snap.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k
    with pytest.raises(ValueError, match="no pristine copy"):
        fold_adapters(model, [random_adapter(model, targets="all")], [1.0], "delta", BaseWeights(model, ("q_proj",)))


def test_bad_inputs(tmp_path):
    base = tiny_llama()
    a, b = random_adapter(base, seed=1), random_adapter(base, r=2, seed=2)
    with pytest.raises(ValueError, match="empty adapter list"):
        fold_adapters(base, [], [], "delta")
    with pytest.raises(ValueError, match="sum to zero"):
        fold_adapters(base, [a, a], [0.5, -0.5], "delta")
    with pytest.raises(ValueError, match=r"module 'model.*needs equal ranks"):
        fold_adapters(base, [a, b], [0.5, 0.5], mode="param")
    other = random_adapter(tiny_llama(hidden=48, inter=80), seed=3)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*wrong base model"):
        fold_adapters(base, [other], [1.0], "delta")
    q_only = random_adapter(base, targets=("q_proj",))
    with pytest.raises(ValueError, match="target different modules"):
        fold_adapters(base, [a, q_only], [0.5, 0.5], "delta")
    renamed = random_adapter(base, seed=4, name="another-base")
    with pytest.raises(ValueError, match="different base models"):
        fold_adapters(base, [a, renamed], [0.5, 0.5], "delta")
    # an adapter file missing one module's tensors
    save_adapter(a, tmp_path / "a")
    from safetensors.torch import load_file, save_file
    f = tmp_path / "a" / "adapter_model.safetensors"
    sd = load_file(f)
    del sd[PREFIX + "model.layers.1.mlp.up_proj.lora_A.weight"], sd[PREFIX + "model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(sd, f)
    broken = load_adapter(tmp_path / "a")
    model = copy.deepcopy(base)
    inject_lora(model, broken.config)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj"):
        set_adapter(model, broken)
    del sd[PREFIX + "model.layers.0.mlp.up_proj.lora_B.weight"]
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*only one"):
        load_adapter(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_adapter(tmp_path / "missing")
    with pytest.raises(ValueError, match="rank"):  # rank mismatch between adapter and injected LoRA
        model2 = copy.deepcopy(base)
        inject_lora(model2, a.config)
        set_adapter(model2, b)


def test_injection_into_mta_llama():
    llama = pytest.importorskip("mta.models.llama")
    hf = tiny_llama()
    cfg = llama.LlamaConfig.from_hf_config(hf.config.to_dict())
    ours = llama.LlamaForCausalLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    adapter = random_adapter(hf)
    inject_lora(ours, adapter.config)
    set_adapter(ours, adapter)
    ref = peft_model_with(copy.deepcopy(hf), adapter)
    x = ids(6)
    out = ours(x)
    out = out if torch.is_tensor(out) else out.logits
    torch.testing.assert_close(out, logits(ref, x), rtol=1e-4, atol=1e-4)
