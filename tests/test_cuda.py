"""The CUDA subset (`pytest -m cuda`, run by tools/gpu_check.py): the kernels and the engine on a
GPU against the CPU results the other tests check. Skipped where there is no CUDA device."""
import copy
import dataclasses

import pytest
import torch

from mta.ops.merge import fold_
from mta.peft.multi_lora import generate_many, rows, set_slot, stack_many
from mta.training.train_many import train_many
from tests.test_kernels import fold_bound, within
from tests.test_rowlora import STACK, TOL, VOCAB, tiny, users
from tests.test_train_many import SEEDS, setup

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_on_cuda_within_the_cpu_bound(dtype):
    """cuBLAS accumulates the fold's GEMM in fp32 and rounds once, as the bound of test_kernels assumes."""
    g = torch.Generator().manual_seed(0)
    W0 = (torch.randn(1024, 768, generator=g) * 0.02).to(dtype)
    B, A = torch.randn(1024, 16, generator=g) * 0.05, torch.randn(16, 768, generator=g) * 0.02
    exact, err = fold_bound(W0, B, A, dtype)
    res = fold_(W0.cuda(), B.cuda(), A.cuda()).cpu()
    assert res.dtype == dtype and within(res, exact, err)


def many_users(device):
    model = tiny()
    fused, weights, stacked = users(model)
    many = copy.deepcopy(model)
    stack_many(many, fused, weights, STACK, "param", seeds=[0, 1, 2])
    for u, a in enumerate(stacked):
        set_slot(many, u, a)
    return many.to(device)


def test_per_row_forward_and_backward_on_cuda_match_cpu():
    ids = torch.randint(0, VOCAB, (5, 9), generator=torch.Generator().manual_seed(3))
    slots, grads, outs = [2, 0, 1, 0, 2], [], []
    for device in ("cpu", "cuda"):
        many = many_users(device)
        with rows(many, slots):
            out = many(ids.to(device))  # (5, 9, V)
        out.square().sum().backward()
        outs.append(out.detach().cpu())
        grads.append([p.grad.cpu() for p in many.parameters() if p.grad is not None])
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    for got, want in zip(grads[1], grads[0], strict=True):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-8


def test_batched_decode_on_cuda_matches_cpu_greedy():
    prompts = torch.randint(3, VOCAB, (4, 7), generator=torch.Generator().manual_seed(5))
    slots = [1, 0, 2, 1]
    got = [generate_many(many_users(d), prompts.to(d), None, slots, max_new_tokens=8).cpu() for d in ("cpu", "cuda")]
    assert torch.equal(got[0], got[1])


def test_adapters_trained_together_on_cuda_in_bf16_stay_close_to_fp32():
    model = tiny()
    fused, weights, _ = users(model)
    data, configs = setup()
    logs = {}
    for bf16 in (False, True):
        many = copy.deepcopy(model)
        stack_many(many, fused, weights, STACK, "delta", SEEDS)
        logs[bf16] = train_many(many.cuda(), data, [dataclasses.replace(c, bf16=bf16) for c in configs])
    for a, b in zip(logs[False], logs[True], strict=True):
        assert a.losses == pytest.approx(b.losses, rel=0.05)
