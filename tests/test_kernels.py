"""mta.ops.merge against the naive formula W0 + Σ w_i s_i B_i A_i.

No BLAS promises bit-identical results for GEMMs of different shapes (row chunks against the whole
matrix, or one library against another): the summation order, blocking and FMA use may change with
the row count. Fold results are therefore checked against the exact (float64) value within the
rounding bound of `fold_bound`, which is orders of magnitude below any ΔW entry that a chunking bug
(a chunk skipped, folded twice or offset) would add or drop; `assert_catches_chunk_bugs` checks that.
"""
import math

import pytest
import torch

from mta.ops.merge import MODES, bf16_factors, check_weights, combine_factors, fold_, uses_workspace

FP32_UNIT = 2.0 ** -24  # unit roundoff of fp32 accumulation
BF16_SPLIT = 2.0 ** -14  # |B'A' - BA| <= (3 + small) 2^-16 |B||A| for `bf16_factors` (hi/lo splits, B_lo A_lo dropped)


def random_loras(K, out, inp, seed, equal_rank=False):
    g = torch.Generator().manual_seed(seed)
    ranks = [4] * K if equal_rank else torch.randint(1, 9, (K,), generator=g).tolist()
    As = [torch.randn(r, inp, generator=g) for r in ranks]
    Bs = [torch.randn(out, r, generator=g) for r in ranks]
    scalings = [2.0] * K if equal_rank else (torch.rand(K, generator=g) * 4).tolist()
    weights = (torch.rand(K, generator=g) + 0.1).tolist()
    return As, Bs, scalings, weights


def naive_delta(As, Bs, scalings, weights):
    return sum(w * s * (b.double() @ a.double()) for a, b, s, w in zip(As, Bs, scalings, weights, strict=True))


def fold_bound(W0, B, A, out_dtype):
    """(exact W0 + B @ A in float64, elementwise bound on |fold_(...) - exact|) for any BLAS and chunking.

    The GEMM accumulates W0 + Σ_k B_ik A_kj in fp32 in some order: at most k + 1 roundings, so an error of
    at most gamma(k + 1) (|W0| + |B||A|), gamma(n) = n u / (1 - n u) < 2 n u, u = 2^-24 (Higham, Accuracy
    and Stability of Numerical Algorithms, §3.1). The single-GEMM bf16 path runs over `bf16_factors` (3r
    terms; their |B'||A'| is within 2 % of |B||A|) and adds that split's error. The fp32 accumulator is
    then rounded once to `out_dtype`: half an ulp, and we allow a whole ulp, eps · max(|x|, tiny) with
    |x| <= |exact| + the errors above.
    """
    Bd, Ad = B.double(), A.double()
    exact = W0.double() + Bd @ Ad
    BA = Bd.abs() @ Ad.abs()
    split = not uses_workspace(W0, torch.empty(0, dtype=out_dtype)) and W0.dtype == torch.bfloat16
    terms = 3 * A.shape[0] if split else A.shape[0]
    err = 2 * (terms + 1) * FP32_UNIT * (W0.double().abs() + 1.02 * BA) + (BF16_SPLIT * BA if split else 0)
    if out_dtype != torch.float32:  # fp32 output: the accumulator is the result, no final rounding
        info = torch.finfo(out_dtype)
        err = err + info.eps * (exact.abs() + err).clamp(min=info.tiny)
    return exact, err


def within(res, exact, err):
    return bool(torch.all((res.double() - exact).abs() <= err))


def assert_catches_chunk_bugs(res, W0, exact, err, rows):
    """The bound is tight enough to reject, for every row chunk, the result with that chunk skipped
    (W0 left as is) or folded twice (W0 + 2 ΔW): the test above it would fail on such a bug."""
    delta = exact - W0.double()
    for i in range(0, W0.shape[0], rows):
        skipped, twice = res.clone(), res.clone()
        skipped[i:i + rows] = W0[i:i + rows].to(res.dtype)
        twice[i:i + rows] = (exact[i:i + rows] + delta[i:i + rows]).to(res.dtype)
        assert not within(skipped, exact, err), f"rows {i}:{i + rows} skipped would pass"
        assert not within(twice, exact, err), f"rows {i}:{i + rows} folded twice would pass"


@pytest.mark.parametrize("K", range(1, 9))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [True, False])
def test_fold_matches_naive(K, dtype, inplace):
    g = torch.Generator().manual_seed(K)
    out_f, in_f = torch.randint(3, 70, (2,), generator=g).tolist()
    As, Bs, scalings, weights = random_loras(K, out_f, in_f, seed=K)
    W0 = torch.randn(out_f, in_f, generator=g).to(dtype)
    exact = W0.double() + naive_delta(As, Bs, scalings, weights)
    B, A = combine_factors(As, Bs, scalings, weights, "delta")
    assert B.shape[1] == A.shape[0] == sum(a.shape[0] for a in As)  # one GEMM over concatenated factors
    W = W0.clone()
    buf = torch.empty_like(W0)
    res = fold_(W, B, A, chunk_elements=2 * in_f + 5) if inplace else fold_(W, B, A, out=buf, chunk_elements=7)
    assert res is (W if inplace else buf)
    if not inplace:
        assert torch.equal(W, W0)
    # The fp32 factors carry w_i s_i B_i rounded (twice, from the float64 product): 3u of |B||A| more.
    err = fold_bound(W0, B, A, dtype)[1] + 3 * FP32_UNIT * (B.double().abs() @ A.double().abs())
    assert within(res, exact, err)


@pytest.mark.parametrize(
    ("chunk", "rows"),
    [(1, 1), (17, 1), (50, 2), (5 * 17 + 3, 5), (17 * 33, 33), (10 ** 9, 33)],  # 33 = 16·2 + 1 = 6·5 + 3: short tails
)
@pytest.mark.parametrize("inplace", [True, False])
def test_chunked_fp16_fold_within_one_rounding(chunk, rows, inplace):
    """fp16 weights go through fp32 row chunks of `rows` rows: every chunking (single rows, short last chunk,
    one chunk) gives W0 + ΔW within one fp16 ulp plus the fp32 accumulation bound, hence chunked and
    unchunked folds agree within twice that bound, without assuming bit-identical GEMMs across row counts."""
    As, Bs, s, w = random_loras(3, 33, 17, seed=0)
    B, A = combine_factors(As, Bs, s, w, "delta")
    W0 = torch.randn(33, 17, generator=torch.Generator().manual_seed(1)).half()
    exact, err = fold_bound(W0, B, A, torch.float16)
    if inplace:
        res = fold_(W0.clone(), B, A, chunk_elements=chunk)
    else:
        res = fold_(W0, B, A, out=torch.empty_like(W0), chunk_elements=chunk)
    assert res.dtype == torch.float16 and within(res, exact, err)
    assert_catches_chunk_bugs(res, W0, exact, err, rows)
    shared = torch.empty(rows * 17 + 3)  # a caller's workspace: the same chunking
    assert within(fold_(W0.clone(), B, A, workspace=shared), exact, err)
    whole = fold_(W0.clone(), B, A, chunk_elements=10 ** 9)
    assert torch.all((res.double() - whole.double()).abs() <= 2 * err)


def test_bf16_factors_carry_16_bit_accuracy():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(300, 16, generator=g), torch.randn(16, 200, generator=g)
    B3, A3 = bf16_factors(B, A)
    assert B3.dtype == A3.dtype == torch.bfloat16 and B3.shape == (300, 48) and A3.shape == (48, 200)
    exact = B.double() @ A.double()
    err = (B3.double() @ A3.double() - exact).abs() / (B.double().abs() @ A.double().abs())
    assert err.max() < 2 ** -16


def test_bf16_fold_rounds_once_without_workspace():
    """One bf16 GEMM, no workspace: W0 + ΔW rounded once, so within one ulp (plus ΔW's 2^-17 error) of the
    exact value, and equal to its correct rounding but where that error meets a rounding tie."""
    g = torch.Generator().manual_seed(1)
    W0 = (torch.randn(512, 384, generator=g) * 0.02).bfloat16()
    B, A = torch.randn(512, 16, generator=g) * 0.05, torch.randn(16, 384, generator=g) * 0.02
    assert not uses_workspace(W0)
    exact = W0.double() + B.double() @ A.double()
    ulp = exact.abs() * 2 ** -7 + 2 ** -16 * (B.double().abs() @ A.double().abs())
    for res in (fold_(W0.clone(), B, A), fold_(W0, B, A, out=torch.empty_like(W0))):
        assert torch.all((res.double() - exact).abs() <= ulp)
        assert (res != exact.bfloat16()).float().mean() < 2e-3


def test_fold_from_fp32_snapshot_into_bf16_weight():
    """fp32 W0 into a bf16 weight: fp32 row chunks (2 rows of 12 here), rounded once to bf16."""
    As, Bs, s, w = random_loras(2, 20, 12, seed=3)
    B, A = combine_factors(As, Bs, s, w, "delta")
    W0 = torch.randn(20, 12, generator=torch.Generator().manual_seed(4))
    out = torch.empty(20, 12, dtype=torch.bfloat16)
    assert uses_workspace(W0, out)
    fold_(W0, B, A, out=out, chunk_elements=30)
    exact, err = fold_bound(W0, B, A, torch.bfloat16)
    assert within(out, exact, err)
    assert_catches_chunk_bugs(out, W0, exact, err, rows=2)


@pytest.mark.parametrize("K", [1, 2, 5])
def test_modes_against_formulas(K):
    As, Bs, s, w = random_loras(K, 12, 10, seed=K, equal_rank=True)
    exact = naive_delta(As, Bs, s, w).float()
    for mode in ("delta", "cat"):
        B, A = combine_factors(As, Bs, s, w, mode)
        torch.testing.assert_close(B @ A, exact, rtol=1e-5, atol=1e-4)
    B, A = combine_factors(As, Bs, s, w, "param")
    eq5 = s[0] * sum(wi * b for wi, b in zip(w, Bs, strict=True)) @ sum(wi * a for wi, a in zip(w, As, strict=True))
    torch.testing.assert_close(B @ A, eq5, rtol=1e-5, atol=1e-4)
    B, A = combine_factors(As, Bs, s, w, "linear")
    root = [math.sqrt(wi * si) for wi, si in zip(w, s, strict=True)]
    lin = sum(r * b for r, b in zip(root, Bs, strict=True)) @ sum(r * a for r, a in zip(root, As, strict=True))
    torch.testing.assert_close(B @ A, lin, rtol=1e-5, atol=1e-4)
    B, A = combine_factors(As, Bs, s, w, "svd", svd_rank=4 * K)  # full rank: exact
    torch.testing.assert_close(B @ A, exact, rtol=1e-4, atol=1e-3)
    if K == 1:  # one adapter: every mode is the plain update
        for mode in MODES:
            B, A = combine_factors(As, Bs, s, [1.0], mode)
            torch.testing.assert_close(B @ A, exact / w[0], rtol=1e-4, atol=1e-3)


def test_bad_inputs():
    As, Bs, s, w = random_loras(2, 8, 8, seed=0)
    with pytest.raises(ValueError, match="empty adapter list"):
        combine_factors([], [], [], [], "delta")
    with pytest.raises(ValueError, match="sum to zero"):
        check_weights([0.5, -0.5], 2)
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        combine_factors(As, Bs, s, [1.0], "delta")
    with pytest.raises(ValueError, match="unknown merge mode"):
        combine_factors(As, Bs, s, w, "ties")
    As[1] = torch.randn(As[0].shape[0] + 1, 8)
    Bs[1] = torch.randn(8, As[0].shape[0] + 1)
    with pytest.raises(ValueError, match="equal ranks"):
        combine_factors(As, Bs, s, w, "param")
    B, A = combine_factors(As, Bs, s, w, "delta")
    with pytest.raises(ValueError, match="fold"):
        fold_(torch.zeros(8, 9), B, A)
