"""kernels.merge against the naive formula W0 + Σ w_i s_i B_i A_i."""
import math

import pytest
import torch

from kernels.merge import MODES, bf16_factors, check_weights, combine_factors, fold_, uses_workspace


def random_loras(K, out, inp, seed, equal_rank=False):
    g = torch.Generator().manual_seed(seed)
    ranks = [4] * K if equal_rank else torch.randint(1, 9, (K,), generator=g).tolist()
    As = [torch.randn(r, inp, generator=g) for r in ranks]
    Bs = [torch.randn(out, r, generator=g) for r in ranks]
    scalings = [2.0] * K if equal_rank else (torch.rand(K, generator=g) * 4).tolist()
    weights = (torch.rand(K, generator=g) + 0.1).tolist()
    return As, Bs, scalings, weights


def naive_delta(As, Bs, scalings, weights):
    return sum(w * s * (b.double() @ a.double()) for a, b, s, w in zip(As, Bs, scalings, weights))


@pytest.mark.parametrize("K", range(1, 9))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [True, False])
def test_fold_matches_naive(K, dtype, inplace):
    g = torch.Generator().manual_seed(K)
    out_f, in_f = torch.randint(3, 70, (2,), generator=g).tolist()
    As, Bs, scalings, weights = random_loras(K, out_f, in_f, seed=K)
    W0 = torch.randn(out_f, in_f, generator=g).to(dtype)
    exact = W0.double() + naive_delta(As, Bs, scalings, weights)
    expected = exact.to(dtype)
    B, A = combine_factors(As, Bs, scalings, weights, "delta")
    assert B.shape[1] == A.shape[0] == sum(a.shape[0] for a in As)  # one GEMM over concatenated factors
    W = W0.clone()
    buf = torch.empty_like(W0)
    res = fold_(W, B, A, chunk_elements=2 * in_f + 5) if inplace else fold_(W, B, A, out=buf, chunk_elements=7)
    assert res is (W if inplace else buf)
    if not inplace:
        assert torch.equal(W, W0)
    if dtype == torch.float32:
        torch.testing.assert_close(res, expected, rtol=1e-5, atol=1e-4)
    else:  # one rounding of W0 + ΔW: one ulp from the exact value, plus ΔW's own error (2^-17 of |B||A| in bf16)
        ulp = exact.abs().clamp(min=2 ** -14) * torch.finfo(dtype).eps
        delta_err = 2 ** -16 * (B.double().abs() @ A.double().abs())
        assert torch.all((res.double() - exact).abs() <= ulp + delta_err)


def test_chunked_equals_unchunked_fp16():
    As, Bs, s, w = random_loras(3, 33, 17, seed=0)
    B, A = combine_factors(As, Bs, s, w)
    W0 = torch.randn(33, 17).half()
    whole = fold_(W0.clone(), B, A, chunk_elements=10 ** 9)
    for chunk in (1, 17, 50, 17 * 33):
        assert torch.equal(fold_(W0.clone(), B, A, chunk_elements=chunk), whole)


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
    As, Bs, s, w = random_loras(2, 20, 12, seed=3)
    B, A = combine_factors(As, Bs, s, w)
    W0 = torch.randn(20, 12)
    out = torch.empty(20, 12, dtype=torch.bfloat16)
    fold_(W0, B, A, out=out, chunk_elements=30)
    assert torch.equal(out, torch.addmm(W0, B, A).bfloat16())


@pytest.mark.parametrize("K", [1, 2, 5])
def test_modes_against_formulas(K):
    As, Bs, s, w = random_loras(K, 12, 10, seed=K, equal_rank=True)
    exact = naive_delta(As, Bs, s, w).float()
    for mode in ("delta", "cat"):
        B, A = combine_factors(As, Bs, s, w, mode)
        torch.testing.assert_close(B @ A, exact, rtol=1e-5, atol=1e-4)
    B, A = combine_factors(As, Bs, s, w, "param")
    eq5 = s[0] * sum(wi * b for wi, b in zip(w, Bs)) @ sum(wi * a for wi, a in zip(w, As))
    torch.testing.assert_close(B @ A, eq5, rtol=1e-5, atol=1e-4)
    B, A = combine_factors(As, Bs, s, w, "linear")
    root = [math.sqrt(wi * si) for wi, si in zip(w, s)]
    lin = sum(r * b for r, b in zip(root, Bs)) @ sum(r * a for r, a in zip(root, As))
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
        combine_factors([], [], [], [])
    with pytest.raises(ValueError, match="sum to zero"):
        check_weights([0.5, -0.5], 2)
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        combine_factors(As, Bs, s, [1.0])
    with pytest.raises(ValueError, match="unknown merge mode"):
        combine_factors(As, Bs, s, w, "ties")
    As[1] = torch.randn(As[0].shape[0] + 1, 8)
    Bs[1] = torch.randn(8, As[0].shape[0] + 1)
    with pytest.raises(ValueError, match="equal ranks"):
        combine_factors(As, Bs, s, w, "param")
    B, A = combine_factors(As, Bs, s, w)
    with pytest.raises(ValueError, match="fold"):
        fold_(torch.zeros(8, 9), B, A)
