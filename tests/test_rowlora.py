"""Per-row adapters (mta.ops.rowlora, mta.peft.multi_lora) against a loop over users with ordinary LoRALinear
layers, and against fold-then-stack (mta.peft.fusion.stack_lora), on a tiny mta.models.llama model."""
import copy

import pytest
import torch

from mta.models.generation import generate
from mta.models.llama import LlamaConfig, LlamaForCausalLM
from mta.ops.rowlora import RowLoRALinear, row_lora
from mta.peft.adapter import Adapter, get_adapter, set_adapter
from mta.peft.fusion import stack_lora
from mta.peft.lora import LLAMA_TARGETS, LoRAConfig, find_targets, inject_lora, lora_layers
from mta.peft.multi_lora import (
    fresh_adapter,
    generate_many,
    get_row_adapter,
    inject_row_lora,
    row_layers,
    rows,
    set_slot,
    stack_many,
    unload_row_lora,
)
from mta.precision import bf16_supported

VOCAB = 97
STACK = LoRAConfig(r=2, alpha=4.0, target_modules=("q_proj", "v_proj", "down_proj"))
# Outputs of computations that differ only in GEMM shapes and summation order (fp32): a few ulps of values
# of order 1 through two layers.
TOL = dict(rtol=1e-5, atol=1e-5)


def assert_grads_close(got, want):
    """Gradients within 1e-5 of the largest entry: a sum over rows and positions, in another order."""
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= 1e-5 * scale + 1e-8, (err, scale)


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def random_adapter(model, config, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    adapter = Adapter(config, source=f"random-{seed}")
    for m in find_targets(model, config.target_modules):
        lin = model.get_submodule(m)
        adapter.A[m] = torch.randn(config.r, lin.in_features, generator=g) * std
        adapter.B[m] = torch.randn(lin.out_features, config.r, generator=g) * std
    return adapter


def bank(model):
    cfg = LoRAConfig(r=4, alpha=8.0, target_modules=LLAMA_TARGETS)
    return [random_adapter(model, cfg, seed) for seed in (11, 12, 13)]


def users(model):
    """Per user: the fused adapters, their weights, its stacked LoRA. User 2 fuses nothing (Adapt-only)."""
    b = bank(model)
    fused = [[b[0], b[1]], [b[2], b[0]], []]
    weights = [[0.6, 0.4], [0.7, 0.3], []]
    stacked = [random_adapter(model, STACK, 20 + u, std=0.3) for u in range(3)]
    return fused, weights, stacked


def test_row_lora_is_a_loop_over_rows():
    g = torch.Generator().manual_seed(0)
    x, A, B = torch.randn(5, 3, 8, generator=g), torch.randn(4, 2, 8, generator=g), torch.randn(4, 6, 2, generator=g)
    index = torch.tensor([3, 0, 3, 1, 2])
    got = row_lora(x, index, A, B, scaling=0.5)
    for n, u in enumerate(index.tolist()):
        torch.testing.assert_close(got[n], 0.5 * x[n] @ A[u].T @ B[u].T, **TOL)


def test_row_layer_checks_its_inputs():
    layer = RowLoRALinear(torch.nn.Linear(8, 6), n_adapters=2, r=2, alpha=4.0)
    assert torch.all(layer.lora_B == 0) and layer.scaling == 2.0 and not layer.base.weight.requires_grad
    with pytest.raises(RuntimeError, match="set_rows"):
        layer(torch.randn(3, 8))
    layer.set_rows(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2 row slots for a batch of 3"):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match="set_fused"):
        layer.set_fused(torch.zeros(2, 3, 8), torch.zeros(2, 6, 2))
    x = torch.randn(2, 8)  # (N, in) rows work as well as (N, T, in)
    torch.testing.assert_close(layer(x), layer.base(x))


def reference_user(model, fused, weights, stacked, mode):
    """One user's model the ordinary way: fold the fused LoRA into W0, LoRALinear on top (Eq. 7)."""
    ref = copy.deepcopy(model)
    stack_lora(ref, fused, weights, stacked.config, mode)
    set_adapter(ref, stacked)
    return ref


@pytest.mark.parametrize("mode", ["param", "delta"])
@pytest.mark.parametrize("with_fused", [True, False])
def test_rows_match_fold_then_stack_forward_and_backward(mode, with_fused):
    model = tiny()
    fused, weights, stacked = users(model)
    if not with_fused:  # stacked LoRA only: exactly a LoRALinear per user, nothing folded
        fused, weights = [[], [], []], [[], [], []]
    many = copy.deepcopy(model)
    stack_many(many, fused, weights, STACK, mode, seeds=[0, 1, 2])
    for u, a in enumerate(stacked):
        set_slot(many, u, a)
    if with_fused:
        ranks = {layer.fused_A.shape[1] for layer in row_layers(many).values()}
        assert ranks == ({4} if mode == "param" else {8})  # one rank-r pair, or K = 2 concatenated pairs
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (5, 9), generator=g)
    slots = [2, 0, 1, 0, 2]
    with rows(many, slots):
        out = many(ids)  # (5, 9, V)
    weights_out = torch.randn(out.shape, generator=g)
    (out * weights_out).sum().backward()
    refs = [reference_user(model, fused[u], weights[u], stacked[u], mode) for u in range(3)]
    for n, u in enumerate(slots):  # a loop over rows, each through its user's own model
        ref_out = refs[u](ids[n: n + 1])
        torch.testing.assert_close(out[n: n + 1].detach(), ref_out.detach(), **TOL)
        (ref_out * weights_out[n: n + 1]).sum().backward()
    for u in range(3):
        ref_layers = lora_layers(refs[u])
        for name, layer in row_layers(many).items():
            if name not in ref_layers:
                assert layer.r == 0 and layer.lora_A.grad is None
                continue
            assert_grads_close(layer.lora_A.grad[u], ref_layers[name].lora_A.weight.grad)
            assert_grads_close(layer.lora_B.grad[u], ref_layers[name].lora_B.weight.grad)
            assert not layer.base.weight.requires_grad and layer.base.weight.grad is None


def test_half_precision_base_keeps_fp32_adapters_and_stays_close():
    model = tiny()
    fused, weights, stacked = users(model)
    many = copy.deepcopy(model).to(torch.bfloat16)
    stack_many(many, fused, weights, STACK, "delta", seeds=[0, 1, 2])
    for u, a in enumerate(stacked):
        set_slot(many, u, a)
    layer = next(iter(row_layers(many).values()))
    assert layer.lora_A.dtype == layer.fused_A.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), rows(many, [0, 1, 2]):
        got = many(ids).float()
    for u in range(3):
        ref = reference_user(model, fused[u], weights[u], stacked[u], "delta")(ids[u: u + 1]).detach()
        assert (got[u] - ref[0]).abs().max().item() < 0.1  # bf16 activations against fp32


def test_fresh_slots_start_as_inject_lora_would_and_extract_back():
    model = tiny()
    fused, weights, _ = users(model)
    many = copy.deepcopy(model)
    seeds = [5, 6, 7]
    names = stack_many(many, fused, weights, STACK, "param", seeds)
    assert names == find_targets(model, LLAMA_TARGETS)  # fused targets every projection, stacked three of them
    for u, seed in enumerate(seeds):
        alone = copy.deepcopy(model)
        torch.manual_seed(seed)
        inject_lora(alone, STACK)
        want, got = get_adapter(alone, STACK), get_row_adapter(many, u, STACK)
        assert sorted(got.A) == sorted(want.A)
        for m in want.A:
            assert torch.equal(got.A[m], want.A[m]) and torch.equal(got.B[m], want.B[m])
    assert fresh_adapter(many, STACK, 5).A.keys() == want.A.keys()
    with pytest.raises(ValueError, match="rank"):
        set_slot(many, 0, random_adapter(model, LoRAConfig(r=3, alpha=6.0, target_modules=STACK.target_modules), 1))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_row_lora(many, 2, STACK)
    unload_row_lora(many)
    assert not row_layers(many) and all(p.requires_grad is False for p in many.parameters())


def test_fused_module_not_wrapped_is_an_error():
    model = tiny()
    fused, weights, _ = users(model)
    many = copy.deepcopy(model)
    inject_row_lora(many, 3, STACK)  # no fused targets
    from mta.peft.multi_lora import set_fused
    with pytest.raises(ValueError, match="is not a RowLoRALinear"):
        set_fused(many, fused, weights, "param")
    with pytest.raises(ValueError, match="3 slots but 2"):
        set_fused(many, fused[:2], weights[:2], "param")


def test_batched_generation_equals_one_user_at_a_time():
    from tests.test_llama import MIN_GAP, greedy_gap

    model = tiny(seed=1)
    fused, weights, stacked = users(model)
    many = copy.deepcopy(model)
    stack_many(many, fused, weights, STACK, "param", seeds=[0, 1, 2])
    for u, a in enumerate(stacked):
        set_slot(many, u, a)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (6, 9, 4, 7)]
    slots = [1, 0, 2, 1]  # user 1 twice, with different prompts
    refs = [reference_user(model, fused[u], weights[u], stacked[u], "param") for u in range(3)]
    free = generate(refs[1], prompts[0][None], max_new_tokens=10)
    stop = int(free[0, 3])  # a stop token that ends some rows early
    kw = dict(stop_token_ids=[stop], pad_token_id=0)
    limits = [10, 10, 3, 10]  # every row its own stop condition: its stop token or its own length
    alone = []
    for p, u, n in zip(prompts, slots, limits, strict=True):
        new = generate(refs[u], p[None], max_new_tokens=n, **kw)
        assert greedy_gap(refs[u], p[None], None, new) > MIN_GAP
        alone.append(new[0].tolist())
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for n, p in enumerate(prompts):  # left padding
        ids[n, T - len(p):], mask[n, T - len(p):] = p, 1
    for prefill_rows in (None, 2):  # each prefill forward of 2 rows serves those rows' slots
        got = generate_many(many, ids, mask, slots, max_new_tokens=limits, prefill_rows=prefill_rows, **kw)
        for n, want in enumerate(alone):
            row = got[n].tolist()
            assert row[: len(want)] == want and all(t == 0 for t in row[len(want):])
    assert len(alone[2]) == 3 and stop not in alone[2]  # ended by its own length
    assert any(3 < len(w) < 10 for w in alone) and any(len(w) == 10 for w in alone)  # by the stop token, or not
    if bf16_supported("cpu"):  # bf16 autocast decodes too (tokens may differ from fp32: no comparison)
        assert generate_many(many, ids, mask, slots, bf16=True, max_new_tokens=4).shape == (4, 4)
    with pytest.raises(ValueError, match="3 slots for 4 prompts"):
        generate_many(many, ids, mask, slots[:3], max_new_tokens=4)


def test_fused_only_rows_equal_folded_merges():
    """Merged-only for many users: no stacked LoRA, each row's fused merge against fold_adapters."""
    from mta.peft.fusion import fold_adapters

    model = tiny()
    fused, weights, _ = users(model)
    many = copy.deepcopy(model)
    stack_many(many, fused, weights, None, "delta")
    assert all(layer.r == 0 for layer in row_layers(many).values())
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), rows(many, [0, 1, 2]):
        got = many(ids)
    for u in range(3):
        ref = copy.deepcopy(model)
        if fused[u]:
            fold_adapters(ref, fused[u], weights[u], "delta")
        torch.testing.assert_close(got[u: u + 1], ref(ids[u: u + 1]).detach(), **TOL)


def test_dropout_acts_on_the_stacked_term_in_training_only():
    layer = RowLoRALinear(torch.nn.Linear(8, 6), n_adapters=2, r=2, alpha=4.0, dropout=0.5)
    layer.set_fused(torch.randn(2, 3, 8), torch.randn(2, 6, 3))
    torch.nn.init.normal_(layer.lora_B)
    layer.set_rows(torch.tensor([1, 0, 1]))
    x = torch.randn(3, 4, 8)
    plain = copy.deepcopy(layer)
    plain.dropout = torch.nn.Identity()
    layer.eval()
    torch.testing.assert_close(layer(x), plain(x))
    layer.train()
    torch.manual_seed(0)
    noisy = layer(x)
    assert not torch.allclose(noisy, plain(x))
    layer.lora_B.data.zero_()  # with the stacked term gone, dropout changes nothing: the fused term has none
    torch.testing.assert_close(layer(x), layer.base(x) + row_lora(x, layer.rows, layer.fused_A, layer.fused_B), **TOL)


def test_inference_cache_follows_factor_changes():
    model = tiny()
    fused, weights, stacked = users(model)
    many = copy.deepcopy(model)
    stack_many(many, fused, weights, STACK, "param", seeds=[0, 1, 2])
    ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), rows(many, [0, 1, 2]):
        before = many(ids)
        set_slot(many, 1, stacked[1])  # in place: the cached banks must be rebuilt
        after = many(ids)
        from mta.peft.multi_lora import set_fused
        set_fused(many, [[], [], []], [[], [], []], "param")  # replaced buffers
        unfused = many(ids)
    torch.testing.assert_close(after[0], before[0])
    assert not torch.allclose(after[1], before[1])
    ref = reference_user(model, fused[1], weights[1], stacked[1], "param")
    torch.testing.assert_close(after[1:2], ref(ids[1:2]).detach(), **TOL)
    ref = reference_user(model, [], [], stacked[1], "param")
    torch.testing.assert_close(unfused[1:2], ref(ids[1:2]).detach(), **TOL)


def test_row_layer_under_autocast_is_autocasts_computation_and_caches_in_its_dtype():
    """Under bf16 autocast a row needs no fp32 round trip: the output is bf16 and within bf16 rounding of fp32;
    without autograd the factor banks are kept in bf16 and rebuilt in fp32 once autocast is off."""
    model = tiny()
    fused, weights, stacked = users(model)
    many = copy.deepcopy(model)
    stack_many(many, fused, weights, STACK, "param", seeds=[0, 1, 2])
    for u in range(3):
        set_slot(many, u, stacked[u])
    layer = many.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), rows(many, [0, 1, 2]):
        want = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x)
            assert layer.factors()[0].dtype == torch.bfloat16
        assert layer.factors()[0].dtype == torch.float32
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
