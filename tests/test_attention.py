"""mta.ops.attention: attention as per-row GEMMs against SDPA, forward and backward, causal and masked."""
import pytest
import torch
import torch.nn.functional as F

from mta.models.llama import attention_bias_mask
from mta.ops.attention import gemm_attention


def qkv(B, H, KV, T, d, dtype, S=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for h, n in ((H, T), (KV, S or T), (KV, S or T))]


def forward_backward(fn, q, k, v, seed=1):
    out = fn(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in (q, k, v)]


def sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=q.shape[1] != k.shape[1])


def padding_mask(B, T, S):
    """The model's mask for the last T of S positions with rows left-padded by 0, 1, 2, ... positions."""
    keep = torch.ones(B, S, dtype=torch.bool)
    for b in range(B):
        keep[b, :b] = False
    return attention_bias_mask(keep, T)  # (B, 1, T, S)


@pytest.mark.parametrize("H,KV", [(4, 4), (9, 3)])
def test_causal_equals_sdpa_in_float64_forward_and_backward(H, KV):
    ours = forward_backward(gemm_attention, *qkv(3, H, KV, 11, 8, torch.float64))
    ref = forward_backward(sdpa, *qkv(3, H, KV, 11, 8, torch.float64))
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("T,S", [(11, 11), (4, 11)])
def test_masked_equals_sdpa_in_float64(T, S):
    """A padding mask, over a whole prompt (T == S) or over its last T positions after cached ones (T < S)."""
    mask = padding_mask(3, T, S)
    ours = forward_backward(lambda q, k, v: gemm_attention(q, k, v, mask), *qkv(3, 9, 3, T, 8, torch.float64, S))
    ref = forward_backward(lambda q, k, v: sdpa(q, k, v, mask), *qkv(3, 9, 3, T, 8, torch.float64, S))
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_gradcheck():
    assert torch.autograd.gradcheck(gemm_attention, qkv(2, 4, 2, 5, 4, torch.float64))
    mask = padding_mask(2, 3, 5)
    assert torch.autograd.gradcheck(lambda q, k, v: gemm_attention(q, k, v, mask), qkv(2, 4, 2, 3, 4, torch.float64, 5))


def test_bf16_is_within_bf16_rounding_of_fp64():
    """The production dtype: bf16 GEMMs, fp32 softmax; every output and gradient within 2 % of the largest."""
    ours = forward_backward(gemm_attention, *qkv(4, 9, 3, 96, 64, torch.bfloat16))
    ref = forward_backward(sdpa, *qkv(4, 9, 3, 96, 64, torch.float64))
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).abs().max() <= 0.02 * b.abs().max()


def test_each_mask_is_its_own():
    """A second mask, or the same mask changed in place, is not served the bias cached for the first."""
    q, k, v = (t.detach() for t in qkv(3, 4, 2, 6, 8, torch.float64))
    first, second = padding_mask(3, 6, 6), padding_mask(3, 6, 6).flip(0)
    for mask in (first, second, second):
        torch.testing.assert_close(gemm_attention(q, k, v, mask), sdpa(q, k, v, mask), rtol=1e-10, atol=1e-12)
    second[0] = second[2]
    torch.testing.assert_close(gemm_attention(q, k, v, second), sdpa(q, k, v, second), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shapes", [((2, 3, 5, 4), (2, 2, 5, 4), None), ((2, 4, 5, 4), (2, 2, 6, 4), None),
                                    ((2, 4, 5, 4), (1, 2, 5, 4), None), ((2, 4, 5, 4), (2, 2, 5, 8), None),
                                    ((2, 4, 5, 4), (2, 2, 6, 4), (2, 1, 5, 5))])
def test_refuses_mismatched_shapes(shapes):
    qs, ks, ms = shapes
    mask = None if ms is None else torch.ones(ms, dtype=torch.bool)
    with pytest.raises(ValueError, match="gemm_attention"):
        gemm_attention(torch.zeros(qs), torch.zeros(ks), torch.zeros(ks), mask)
