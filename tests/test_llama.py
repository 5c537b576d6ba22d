"""Parity of mta.models.llama with transformers.LlamaForCausalLM on tiny random configs."""

import pytest
import torch

from mta.models.generation import generate, prefill, sample_next_token
from mta.models.llama import KVCache, LlamaConfig, LlamaForCausalLM, attention_bias_mask

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    model_type="llama",
)
VARIANTS = {
    "llama3-gqa": dict(rope_theta=500000.0),
    "llama3.1-rope-scaling": dict(
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "tied-mha": dict(rope_theta=10000.0, tie_word_embeddings=True, num_key_value_heads=4),
}


def make_pair(variant: str, seed: int = 0):
    """A random HF model and ours with identical weights (identity key map)."""
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**{**TINY, **VARIANTS[variant]})
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    ours = LlamaForCausalLM(LlamaConfig.from_hf_config(hf_config.to_dict())).eval()
    hf_state = hf.state_dict()
    ours.load_state_dict({k: v for k, v in hf_state.items() if k in ours.state_dict()}, strict=True)
    return hf, ours


# Greedy tokens from two computations (another library, batch size, padding or compiled kernels) are
# only comparable where the top-2 logit gap exceeds their rounding differences (<= 1e-6 here; logits
# agree to 1e-4 in the tests above). `greedy_gap` checks that margin, so a token comparison cannot
# fail on a CPU or BLAS whose GEMMs round differently.
MIN_GAP = 1e-4


def greedy_gap(model, ids, mask, new):
    """The smallest top-1 - top-2 logit gap over the greedy steps that produced `new` from `ids`."""
    full = torch.cat([ids, new], dim=1)
    full_mask = None if mask is None else torch.cat([mask, torch.ones_like(new)], dim=1)
    with torch.no_grad():
        logits = model(full, attention_mask=full_mask)[:, ids.shape[1] - 1 : -1].float()
    top = logits.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).min().item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant):
    hf, ours = make_pair(variant)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (got - ref).abs().max().item() <= 1e-4


def test_config_reads_rope_scaling():
    _, ours = make_pair("llama3.1-rope-scaling")
    assert ours.config.rope_scaling["factor"] == 8.0
    assert ours.config.rope_theta == 500000.0
    _, tied = make_pair("tied-mha")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


@pytest.mark.parametrize("variant", ["llama3-gqa", "tied-mha"])
def test_left_padded_batch_matches_transformers(variant):
    hf, ours = make_pair(variant)
    ids = torch.randint(0, TINY["vocab_size"], (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
        alone = ours(ids[0:1, 5:])  # the padded row on its own
    keep = mask.bool()
    assert (got[keep] - ref[keep]).abs().max().item() <= 1e-4
    assert (got[0, 5:] - alone[0]).abs().max().item() <= 1e-4
    assert torch.isfinite(got).all()


def test_kv_cache_decode_equals_full_recompute():
    _, ours = make_pair("llama3-gqa")
    ids = torch.randint(0, TINY["vocab_size"], (2, 20))
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(ours.config, 2, 20, torch.float32, "cpu")
        steps = [ours(ids[:, :8], cache=cache)]  # prefill 8, then a chunk of 4, then one token at a time
        steps.append(ours(ids[:, 8:12], cache=cache))
        steps += [ours(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_transformers(variant):
    hf, ours = make_pair(variant, seed=1)
    ids = torch.randint(3, TINY["vocab_size"], (1, 7))
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = generate(ours, ids, max_new_tokens=20)
    assert greedy_gap(ours, ids, None, got) > MIN_GAP
    assert got.tolist() == ref[:, 7:].tolist()


def test_batched_left_padded_generation_matches_transformers():
    hf, ours = make_pair("llama3-gqa", seed=2)
    ids = torch.randint(3, TINY["vocab_size"], (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=12)
    assert greedy_gap(ours, ids, mask, got) > MIN_GAP
    assert got.tolist() == ref[:, 9:].tolist()
    alone = generate(ours, ids[1:2, 4:], max_new_tokens=12)  # padding does not change a row's answer
    assert alone.tolist() == got[1:2].tolist()



def test_prefill_in_row_chunks_without_shared_padding_equals_one_forward():
    """Prompts prefilled a few rows at a time, each chunk cut to its own longest prompt: the same logits and
    cache (within fp32 rounding) as one forward over the padded batch, so the same greedy tokens."""
    _, ours = make_pair("llama3-gqa", seed=2)
    ids = torch.randint(3, TINY["vocab_size"], (5, 11))
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 6, 7, 2, 9)):
        mask[row, :pad] = 0
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches, logits = {}, {}
    with torch.no_grad():
        for rows in (None, 2, 1):
            caches[rows] = KVCache(ours.config, 5, 11, torch.float32, "cpu")
            logits[rows] = prefill(ours, ids, mask, caches[rows], positions, rows)
    for rows in (2, 1):
        torch.testing.assert_close(logits[rows], logits[None], rtol=1e-5, atol=1e-5)
        assert caches[rows].length == 11
        for layer in range(TINY["num_hidden_layers"]):
            kept = mask.bool()[:, None, :, None]  # padded positions are never read
            torch.testing.assert_close(caches[rows].k[layer] * kept, caches[None].k[layer] * kept, rtol=1e-5, atol=1e-5)
    want = generate(ours, ids, attention_mask=mask, max_new_tokens=8)
    assert greedy_gap(ours, ids, mask, want) > MIN_GAP
    assert generate(ours, ids, attention_mask=mask, max_new_tokens=8, prefill_rows=2).tolist() == want.tolist()

@pytest.mark.slow
def test_compiled_decode_gives_the_same_tokens():
    _, ours = make_pair("llama3-gqa", seed=2)
    ids = torch.randint(3, TINY["vocab_size"], (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for m in (None, mask):
        eager = generate(ours, ids, attention_mask=m, max_new_tokens=8)
        assert greedy_gap(ours, ids, m, eager) > MIN_GAP
        assert generate(ours, ids, attention_mask=m, max_new_tokens=8, compile=True).tolist() == eager.tolist()


def test_stop_tokens_end_rows_and_pad():
    _, ours = make_pair("llama3-gqa", seed=3)
    ids = torch.randint(3, TINY["vocab_size"], (2, 5))
    free = generate(ours, ids, max_new_tokens=10)
    stop = int(free[0, 2])
    got = generate(ours, ids, max_new_tokens=10, stop_token_ids=[stop], pad_token_id=1)
    first = got[0].tolist()
    assert first[: first.index(stop) + 1] == free[0, : first.index(stop) + 1].tolist()
    assert all(t == 1 for t in first[first.index(stop) + 1 :])


def test_sampling_is_deterministic_under_generator_and_filters():
    _, ours = make_pair("llama3-gqa")
    ids = torch.randint(3, TINY["vocab_size"], (2, 5))
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a = generate(ours, ids, generator=torch.Generator().manual_seed(7), **kwargs)
    b = generate(ours, ids, generator=torch.Generator().manual_seed(7), **kwargs)
    assert a.tolist() == b.tolist()
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]]).repeat(200, 1)
    assert set(sample_next_token(logits, 1.0, 2, 1.0, torch.Generator().manual_seed(0)).tolist()) <= {0, 1}
    assert set(sample_next_token(logits, 1.0, 0, 0.5, torch.Generator().manual_seed(0)).tolist()) == {0}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(dtype):
    _, ours = make_pair("llama3-gqa")
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    ref = ours(ids)
    half = ours.to(dtype)
    got = half(ids)
    assert got.dtype == dtype
    assert (got.float() - ref).abs().max().item() < 0.1
    assert generate(half, ids, max_new_tokens=4).shape == (2, 4)


class Wrapped(torch.nn.Module):
    """A stand-in for a LoRA wrapper: forward(x) like nn.Linear plus a zero-initialised delta."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base = base
        self.delta = torch.nn.Linear(base.in_features, base.out_features, bias=False)
        torch.nn.init.zeros_(self.delta.weight)

    def forward(self, x):
        return self.base(x) + self.delta(x)


def test_generation_with_wrapped_linears_and_hidden_states():
    _, ours = make_pair("llama3-gqa")
    ids = torch.randint(3, TINY["vocab_size"], (2, 6))
    before = generate(ours, ids, max_new_tokens=6)
    logits = ours(ids)
    for layer in ours.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, Wrapped(getattr(layer.self_attn, name)))
    assert generate(ours, ids, max_new_tokens=6).tolist() == before.tolist()
    hidden = ours.hidden_states(ids)
    assert hidden.shape == (2, 6, TINY["hidden_size"])
    assert torch.allclose(ours.lm_head(hidden), logits, atol=1e-6)


def test_non_llama_config_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 8}')
    with pytest.raises(ValueError, match=r"config\.json.*gpt2.*not a Llama"):
        LlamaConfig.from_hf_config(tmp_path)


def test_training_forward_backward_with_right_padding():
    hf, ours = make_pair("llama3-gqa")
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ours.train()
    logits = ours(ids, attention_mask=mask)
    loss = torch.nn.functional.cross_entropy(logits[mask.bool()], ids[mask.bool()])
    loss.backward()
    grads = [p.grad for p in ours.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
    assert (logits.detach()[mask.bool()] - ref[mask.bool()]).abs().max().item() <= 1e-4


def test_attention_under_cpu_bf16_autocast():
    """Under CPU bf16 autocast a forward of several positions runs as bf16 GEMMs (`mta.ops.attention` on the bf16
    casts of q, k, v), causal or masked; a one-token step runs SDPA in fp32 on the fp32 inputs (exact), not
    autocast's bf16 SDPA."""
    from mta.models.llama import attention
    from mta.ops.attention import gemm_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 16, generator=g) for h in (4, 2, 2))
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, :2] = False
    mask, step_mask = attention_bias_mask(keep, 7), attention_bias_mask(keep, 1)
    bf = [t.bfloat16() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        causal = attention(q, k, v, None, True, n_rep=2)
        masked = attention(q, k, v, mask, False, n_rep=2)
        step = attention(q[:, :, -1:], k, v, step_mask, False, n_rep=2)
        bf16 = torch.nn.functional.scaled_dot_product_attention(q[:, :, -1:], k, v, attn_mask=step_mask,
                                                                enable_gqa=True)
    assert torch.equal(causal, gemm_attention(*bf)) and torch.equal(masked, gemm_attention(*bf, mask))
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, -1:], k, v, attn_mask=step_mask, enable_gqa=True)
    assert step.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(step, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(bf16.float(), want, rtol=1e-6, atol=1e-6)
