"""Attention as GEMMs, one batch row at a time: what a CPU forward of more than one query position runs under bf16
autocast (`mta.models.llama.attention`): training, scoring and prefill.

For batch row b and kv head g, the n_rep query heads that share g are stacked along the queries, Q (n_rep·T, d):

    S = Q Kᵀ / √d + M       M (n_rep·T, S): 0 where the query may see the key, -inf elsewhere (causal, or a mask)
    P = softmax(S)          in fp32 (at least), kept in the inputs' dtype
    O = P V

and the backward uses the saved P (nothing is recomputed):

    dV = Pᵀ dO     dP = dO Vᵀ     dS = P ⊙ (dP - rowsum(dP ⊙ P))     dQ = dS K / √d     dK = dSᵀ Q / √d

Why. PyTorch's CPU flash-attention kernel runs its inner products as small fp32 GEMMs and is no faster in bf16;
here every product is one bf16 GEMM per row (fp32 accumulation), and a row's S and P stay in the cache. On 2
cores of an AMD EPYC (AVX512-BF16) at (8 rows, 9 heads, 256 tokens, head_dim 64), forward and backward take
8.3 ms against 23.1 ms for fp32 flash (`tools/bench_llama.py --attention`); in fp32 flash stays faster, so fp32
runs SDPA. The cost is memory: P is kept for the backward, (n_heads · T · S) elements per row and layer.
"""
from __future__ import annotations

import torch
from torch import Tensor

_CAUSAL: dict[tuple, Tensor] = {}
_last = (None, None)  # (key, bias) of the last mask converted: every layer of a forward passes the same one


def stacked_bias(mask: Tensor | None, T: int, S: int, n_rep: int, dtype: torch.dtype) -> Tensor:
    """M as (1 or B, n_rep·T, S): causal when `mask` is None (T == S), else from a bool mask (B, 1, T, S) whose
    True entries may be seen; cached (the causal one per shape, a mask's until another comes)."""
    if mask is None:
        key = (T, n_rep, dtype)
        if key not in _CAUSAL:
            above = torch.ones(T, T, dtype=torch.bool).triu(1)
            _CAUSAL[key] = torch.zeros(T, T).masked_fill(above, float("-inf")).repeat(n_rep, 1).to(dtype)[None]
        return _CAUSAL[key]
    global _last
    version = None if mask.is_inference() else mask._version  # (inference tensors keep no version counter)
    key, last = (mask, version, n_rep, dtype), _last  # one read: another thread may replace it
    if last[0] is None or last[0][0] is not mask or last[0][1:] != key[1:]:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        last = _last = key, bias.expand(-1, n_rep, -1, -1).reshape(mask.shape[0], n_rep * T, S)
    return last[1]


class GemmAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        B, H, T, d = q.shape
        KV = k.shape[1]
        qs = q.reshape(B, KV, H // KV * T, d)  # (B, KV, n_rep·T, d): the query heads of kv head g, stacked
        exp_dtype = torch.promote_types(q.dtype, torch.float32)  # the softmax of bf16 scores in fp32
        o = torch.empty_like(qs)
        P = torch.empty(B, KV, qs.shape[2], k.shape[2], dtype=q.dtype, device=q.device)
        for b in range(B):
            s = torch.baddbmm(bias[b % bias.shape[0]], qs[b], k[b].transpose(1, 2), alpha=d ** -0.5)  # (KV, n_rep·T, S)
            P[b] = torch.softmax(s, -1, dtype=exp_dtype)
            torch.bmm(P[b], v[b], out=o[b])  # (KV, n_rep·T, d)
        ctx.save_for_backward(qs, k, v, P)
        ctx.q_shape = q.shape
        return o.view(B, H, T, d)

    @staticmethod
    def backward(ctx, do: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        qs, k, v, P = ctx.saved_tensors
        B, KV, RT, d = qs.shape
        do = do.to(qs.dtype).reshape(B, KV, RT, d)
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(k), torch.empty_like(v)
        for b in range(B):
            torch.bmm(P[b].transpose(1, 2), do[b], out=dv[b])  # (KV, S, d): sums over the stacked query heads
            dp = torch.bmm(do[b], v[b].transpose(1, 2))  # (KV, n_rep·T, S)
            ds = torch._softmax_backward_data(dp, P[b], -1, qs.dtype)  # P ⊙ (dP - rowsum(dP ⊙ P)), fp32 inside
            torch.bmm(ds, k[b], out=dq[b])
            torch.bmm(ds.transpose(1, 2), qs[b], out=dk[b])
        scale = d ** -0.5
        return (dq * scale).view(ctx.q_shape), dk * scale, dv, None


def gemm_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q Kᵀ / √d + M) V for q (B, H, T, d), k and v (B, KV, S, d), H a multiple of KV (GQA: query heads
    h·n_rep .. (h+1)·n_rep - 1 share kv head h) -> (B, H, T, d) in the inputs' dtype. M: causal when `mask` is
    None (T == S), else 0 where the bool mask (B, 1, T, S) is True and -inf elsewhere."""
    B, H, T, d = q.shape
    if H % k.shape[1] or k.shape != v.shape or k.shape[0] != B or k.shape[3] != d \
            or (mask is None and k.shape[2] != T) or (mask is not None and mask.shape != (B, 1, T, k.shape[2])):
        raise ValueError(f"gemm_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, mask "
                         f"{None if mask is None else tuple(mask.shape)}")
    return GemmAttention.apply(q, k, v, stacked_bias(mask, T, k.shape[2], H // k.shape[1], q.dtype))
