"""Fused LoRA merge kernels built from GEMM primitives only (cuBLAS on CUDA, MKL/oneDNN on CPU).

A set of K LoRAs on one linear layer is given by factors A_i (r_i, in), B_i (out, r_i), scalings s_i
and user weights w_i. `combine_factors` turns them into one pair (B, A) with ΔW = B @ A:

  delta   exact Σ w_i s_i B_i A_i: concatenated factors, w_i s_i folded into B (same as PEFT `cat`)
  param   the paper's Eq. 5 taken literally: s · (Σ w_i B_i)(Σ w_i A_i), equal ranks and scalings
  linear  PEFT `linear`: the √|w_i s_i| form of `param` (sign on A), new scaling 1
  cat     PEFT `cat`: w_i s_i folded into A, B concatenated, new scaling 1
  svd     PEFT `svd`: rank-r truncated SVD of Σ w_i s_i B_i A_i

`fold_` then writes W = W0 + B @ A as one GEMM, in place or into a preallocated buffer, rounding once
from fp32 for half-precision weights: bf16 weights take a bf16 GEMM (fp32 accumulation) over the factors
split into bf16 parts, which needs no workspace; fp16 weights go through fp32 row chunks of bounded size.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

MODES = ("delta", "param", "linear", "cat", "svd")
CHUNK_ELEMENTS = 1 << 18  # fp32 elements per row chunk and thread for half-precision weights (1 MiB)


def check_weights(weights: Sequence[float], n: int) -> None:
    """Fail clearly on an empty adapter list, a count mismatch or weights summing to zero."""
    if n == 0:
        raise ValueError("merge: empty adapter list")
    if len(weights) != n:
        raise ValueError(f"merge: {n} adapters but {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"merge: non-finite weight in {list(weights)}")
    if abs(math.fsum(weights)) < 1e-12:
        raise ValueError(f"merge: weights {list(weights)} sum to zero")


def combine_factors(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    scalings: Sequence[float],
    weights: Sequence[float],
    mode: str,
    svd_rank: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Merge K LoRAs of one layer into fp32 factors (B (out, r'), A (r', in)) with ΔW = B @ A."""
    check_weights(weights, len(As))
    if not (len(As) == len(Bs) == len(scalings)):
        raise ValueError(f"merge: got {len(As)} A, {len(Bs)} B and {len(scalings)} scalings")
    As = [a.float() for a in As]
    Bs = [b.float() for b in Bs]
    ws = [w * s for w, s in zip(weights, scalings, strict=True)]
    if mode in ("delta", "cat"):
        if mode == "delta":
            return torch.cat([w * b for w, b in zip(ws, Bs, strict=True)], 1), torch.cat(As, 0)
        return torch.cat(Bs, 1), torch.cat([w * a for w, a in zip(ws, As, strict=True)], 0)
    if mode in ("param", "linear"):
        if len({a.shape[0] for a in As}) != 1:
            raise ValueError(f"merge mode {mode!r} needs equal ranks, got {[a.shape[0] for a in As]}")
        if mode == "param":
            if len(set(scalings)) != 1:
                raise ValueError(f"merge mode 'param' needs equal scalings, got {list(scalings)}")
            wa = wb = list(weights)
            s = scalings[0]
        else:
            wa = [math.copysign(math.sqrt(abs(w)), w) for w in ws]
            wb = [math.sqrt(abs(w)) for w in ws]
            s = 1.0
        A = sum(w * a for w, a in zip(wa, As, strict=True))
        B = sum(w * b for w, b in zip(wb, Bs, strict=True))
        return s * B, A
    if mode == "svd":
        delta = sum(w * (b @ a) for w, a, b in zip(ws, As, Bs, strict=True))
        r = svd_rank or max(a.shape[0] for a in As)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return U[:, :r] * S[:r], Vh[:r]
    raise ValueError(f"unknown merge mode {mode!r}; choose from {MODES}")


def bf16_factors(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """bf16 (B', A') of rank 3r with B' @ A' = B @ A (fp32 factors) to about 2^-17 relative.

    Each factor is split into bf16 parts, x = hi + lo + O(2^-18 x); B'A' = B_hi A_hi + B_hi A_lo + B_lo A_hi
    drops only B_lo A_lo. ΔW's error is then about 1/500 of a bf16 ulp of ΔW, and a bf16 GEMM computes it.
    """
    B_hi, A_hi = B.bfloat16(), A.bfloat16()
    B_lo, A_lo = (B - B_hi).bfloat16(), (A - A_hi).bfloat16()  # the fp32 differences are exact (Sterbenz)
    return torch.cat([B_hi, B_hi, B_lo], 1), torch.cat([A_hi, A_lo, A_hi], 0)


def uses_workspace(W0: Tensor, out: Tensor | None = None) -> bool:
    """Whether fold_ goes through fp32 row chunks (fp16 or mixed dtypes) rather than a single GEMM."""
    out = W0 if out is None else out
    return not (W0.dtype == out.dtype and W0.dtype in (torch.float32, torch.bfloat16))


def default_chunk() -> int:
    """fp32 chunk size for folds: a cache-sized piece per intra-op thread."""
    return CHUNK_ELEMENTS * torch.get_num_threads()


@torch.no_grad()
def fold_(
    W0: Tensor, B: Tensor, A: Tensor, out: Tensor | None = None, chunk_elements: int | None = None,
    workspace: Tensor | None = None,
) -> Tensor:
    """out = W0 + B @ A as one GEMM (in place on W0 when out is None); returns out.

    fp32 weights: one fp32 addmm. bf16 weights: one bf16 addmm over `bf16_factors`; the GEMM accumulates
    W0 + B'A' in fp32 and rounds once (cuBLAS and oneDNN with beta = 1), with no copy of W0. Other
    dtypes (fp16, or W0 and out of different dtypes) are converted to fp32 one row chunk at a time,
    accumulated with addmm and rounded once, so the extra memory is one fp32 chunk (taken from
    `workspace`, a flat fp32 tensor, when given, so many folds can share it).
    """
    out = W0 if out is None else out
    if out.shape != W0.shape or B.shape[0] != W0.shape[0] or A.shape[1] != W0.shape[1]:
        raise ValueError(f"fold: W0 {tuple(W0.shape)}, out {tuple(out.shape)}, B {tuple(B.shape)}, A {tuple(A.shape)}")
    B = B.to(device=out.device, dtype=torch.float32)
    A = A.to(device=out.device, dtype=torch.float32)
    if not uses_workspace(W0, out):
        if W0.dtype == torch.bfloat16:
            B, A = bf16_factors(B, A)
        if out is W0:
            return out.addmm_(B, A)
        return torch.addmm(W0.to(out.device), B, A, out=out)
    n_out, n_in = W0.shape
    if workspace is None:
        workspace = torch.empty(min(n_out * n_in, max(chunk_elements or default_chunk(), n_in)), device=out.device)
    rows = min(n_out, workspace.numel() // n_in)
    if rows == 0 or workspace.dtype != torch.float32:
        raise ValueError(f"fold: workspace of {workspace.numel()} {workspace.dtype} cannot hold a row of {n_in} fp32")
    chunk = workspace[: rows * n_in].view(rows, n_in)  # (rows, in) fp32
    for i in range(0, n_out, rows):
        acc = chunk if i + rows <= n_out else chunk[: n_out - i]
        acc.copy_(W0[i:i + rows])
        acc.addmm_(B[i:i + rows], A)
        out[i:i + rows].copy_(acc)
    return out
