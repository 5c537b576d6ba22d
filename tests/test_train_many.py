"""U stacked LoRAs trained in one pass (mta.training.train_many) against each trained alone with
mta.training.train.train."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

from mta.peft.adapter import get_adapter, load_adapter, save_adapter
from mta.peft.fusion import stack_lora
from mta.peft.lora import LoRAConfig
from mta.peft.multi_lora import get_row_adapter, stack_many
from mta.precision import bf16_supported
from mta.training.train import TrainConfig, train
from mta.training.train_many import train_many
from tests.test_rowlora import VOCAB, tiny, users

STACK = LoRAConfig(r=2, alpha=4.0, target_modules=("q_proj", "v_proj", "down_proj"))
SEEDS = [3, 4, 5]


def examples(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, r = torch.randint(1, 12, (2,), generator=g).tolist()
        out.append((torch.randint(1, VOCAB, (p,), generator=g).tolist(),
                    torch.randint(1, VOCAB, (r,), generator=g).tolist()))
    return out


def setup():
    """Three users with different data sizes and recipes: steps 10, 3 and 2 (the short ones drop out)."""
    data = [examples(10, 1), examples(5, 2), examples(3, 3)]
    base = dict(progress=False, warmup_ratio=0.2, probe=True)
    configs = [TrainConfig(lr=1e-2, epochs=2, batch_size=2, seed=11, **base),
               TrainConfig(lr=5e-3, epochs=2, batch_size=2, grad_accum=2, schedule="linear", max_grad_norm=0.05,
                           group_by_length=True, max_len=12, seed=12, **base),
               TrainConfig(lr=2e-2, epochs=1, batch_size=2, weight_decay=0.1, schedule="constant", seed=13, **base)]
    return data, configs


def alone(model, fused, weights, data, configs, mode):
    """Each user the ordinary way: seed, fold-then-stack (Eq. 7), train()."""
    out = []
    for u in range(3):
        m = copy.deepcopy(model)
        torch.manual_seed(SEEDS[u])
        stack_lora(m, fused[u], weights[u], STACK, mode)
        log = train(m, data[u], configs[u])
        out.append((log, get_adapter(m, STACK)))
    return out


def assert_factors_close(got, want):
    for m in want.A:
        for x, y in ((got.A[m], want.A[m]), (got.B[m], want.B[m])):
            err, scale = (x - y).abs().max().item(), y.abs().max().item()
            assert err <= 1e-4 * scale, (m, err, scale)


@pytest.fixture(scope="module")
def trained_alone():
    model = tiny()
    fused, weights, _ = users(model)
    data, configs = setup()
    return alone(model, fused, weights, data, configs, "delta")


@pytest.mark.parametrize("rows_per_pass", [None, 3])
def test_many_adapters_in_one_pass_train_as_each_alone(rows_per_pass, trained_alone):
    model = tiny()
    fused, weights, _ = users(model)
    data, configs = setup()
    ref = trained_alone
    many = copy.deepcopy(model)
    stack_many(many, fused, weights, STACK, "delta", SEEDS)
    logs = train_many(many, data, configs, rows_per_pass=rows_per_pass)
    assert [len(log.losses) for log in logs] == [len(log.losses) for log, _ in ref] == [10, 4, 2]
    for u, (log, adapter) in enumerate(ref):
        assert logs[u].lrs == log.lrs  # the same schedule, exactly
        assert logs[u].tokens == log.tokens and logs[u].target_tokens == log.target_tokens  # the same examples
        assert logs[u].losses == pytest.approx(log.losses, rel=1e-5), u
        assert logs[u].probe == pytest.approx(log.probe, rel=1e-5), u  # the first step's batch before and after
        assert logs[u].grad_norms == pytest.approx(log.grad_norms, rel=1e-4), u
        assert_factors_close(get_row_adapter(many, u, STACK), adapter)
    assert logs[1].grad_norms[0] > configs[1].max_grad_norm  # clipping acted on the clipped adapter


def test_trained_slot_saves_as_a_peft_adapter(tmp_path):
    model = tiny()
    fused, weights, _ = users(model)
    data, _ = setup()
    many = copy.deepcopy(model)
    stack_many(many, fused, weights, STACK, "param", SEEDS)
    train_many(many, [d[:2] for d in data], TrainConfig(lr=1e-2, batch_size=2, progress=False))
    adapter = get_row_adapter(many, 1, STACK)
    assert any(b.abs().max() > 0 for b in adapter.B.values())
    save_adapter(adapter, tmp_path / "u1")
    loaded = load_adapter(tmp_path / "u1")
    assert loaded.config.r == STACK.r and all(torch.equal(loaded.A[m], adapter.A[m]) for m in adapter.A)


@pytest.mark.skipif(not bf16_supported("cpu"), reason="this CPU has no native bf16")
def test_bf16_autocast_trains_close_to_fp32():
    model = tiny()
    fused, weights, _ = users(model)
    data, _ = setup()
    cfg = TrainConfig(lr=1e-2, batch_size=2, max_steps=2, progress=False)
    logs = {}
    for bf16 in (False, True):
        many = copy.deepcopy(model)
        stack_many(many, fused, weights, STACK, "param", SEEDS)
        logs[bf16] = train_many(many, data, dataclasses.replace(cfg, bf16=bf16))
    for a, b in zip(logs[False], logs[True], strict=True):
        assert a.losses == pytest.approx(b.losses, rel=0.05)


def test_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match="no stacked"):
        train_many(model, [examples(2, 0)], TrainConfig(progress=False))
    stack_many(model, [[], []], [[], []], STACK, "param", [0, 1])
    with pytest.raises(ValueError, match="2 slots but 1"):
        train_many(model, [examples(2, 0)], TrainConfig(progress=False))
    with pytest.raises(ValueError, match="no examples for adapter 1"):
        train_many(model, [examples(2, 0), []], TrainConfig(progress=False))
    with pytest.raises(ValueError, match="one matrix per slot"):
        train_many(model, [examples(2, 0)] * 2, TrainConfig(progress=False), params=[nn.Parameter(torch.zeros(2, 4))])
    model.model.layers[0].self_attn.q_proj.lora_B.data[1].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="adapter 1 at its step 1/1"):
        train_many(model, [examples(2, 0), examples(2, 1)], TrainConfig(progress=False))
