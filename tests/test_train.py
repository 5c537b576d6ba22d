"""The SFT loop: response-only loss, schedules, accumulation, determinism, NaN stop."""
import copy
import math

import pytest
import torch

from mta.data.lamp import TASKS
from mta.peft.lora import LoRAConfig, inject_lora, lora_layers
from mta.profiles import PAPER
from mta.training.train import TrainConfig, lr_factor, make_batch, response_loss_sum, step_batches, train

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def lora_model(seed=0):
    model = tiny_llama(seed)
    torch.manual_seed(seed)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules="all"))
    return model


def examples(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, r = torch.randint(1, 12, (2,), generator=g).tolist()
        out.append((torch.randint(1, 64, (p,), generator=g).tolist(), torch.randint(1, 64, (r,), generator=g).tolist()))
    return out


def test_make_batch_right_pads_and_marks_response_predictions():
    ids, mask, n = make_batch([([5, 6, 7], [8, 9]), ([1], [2, 3, 4, 5])], max_len=None, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]] and n == 10
    assert mask.tolist() == [[False, False, True, True, False], [True, True, True, True, False]]
    ids, mask, _ = make_batch([([1, 2, 3, 4], [5, 6])], max_len=4, pad_id=0)  # prompt cut from the left
    assert ids.tolist() == [[3, 4, 5, 6]] and mask.tolist() == [[False, True, True, False]]
    ids, _, _ = make_batch([([1, 2], [3]), ([4], [5, 6, 7])], max_len=None, pad_id=63)
    assert ids.tolist() == [[1, 2, 3, 63], [4, 5, 6, 7]]


def test_loss_is_on_response_tokens_only():
    model = tiny_llama().eval()
    batch = [([5, 6, 7, 8], [9, 10]), ([1, 2], [3, 4, 11])]
    ids, mask, _ = make_batch(batch, None, pad_id=0)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(batch):
        labels[i, len(p): len(p) + len(r)] = torch.tensor(r)
    ref = model(input_ids=ids, labels=labels).loss * 5  # HF: mean over the 5 response tokens
    torch.testing.assert_close(response_loss_sum(model, ids, mask), ref, rtol=1e-5, atol=1e-5)
    changed = ids.clone()
    changed[0, 1] = 33  # a prompt token changes the context but is never a target
    assert response_loss_sum(model, changed, mask) != response_loss_sum(model, ids, mask)
    changed = ids.clone()
    changed[1, 5] = 17  # row 1's pad position
    torch.testing.assert_close(response_loss_sum(model, changed, mask), response_loss_sum(model, ids, mask))


def test_mta_llama_response_head_matches_full_logits():
    llama = pytest.importorskip("mta.models.llama")
    hf = tiny_llama().eval()
    ours = llama.LlamaForCausalLM(llama.LlamaConfig.from_hf_config(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    ids, mask, _ = make_batch(examples(4), None, pad_id=0)
    torch.testing.assert_close(response_loss_sum(ours, ids, mask), response_loss_sum(hf, ids, mask),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_matches_transformers(schedule):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    make = {"cosine": transformers.get_cosine_schedule_with_warmup,
            "linear": transformers.get_linear_schedule_with_warmup}[schedule]
    sched = make(opt, num_warmup_steps=3, num_training_steps=17)
    for step in range(17):
        assert lr_factor(step, 17, 3, schedule) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lr_factor(0, 17, 3, schedule) == 0.0 and lr_factor(0, 17, 0, schedule) == 1.0


def test_same_seed_same_result_and_loss_decreases():
    cfg = TrainConfig(lr=5e-3, epochs=4, batch_size=3, grad_accum=2, warmup_ratio=0.2, progress=False, seed=7)
    logs, states = [], []
    for _ in range(2):
        model = lora_model()
        logs.append(train(model, examples(), cfg))
        states.append({n: layer.lora_B.weight.clone() for n, layer in lora_layers(model).items()})
    assert logs[0].losses == logs[1].losses and logs[0].lrs == logs[1].lrs
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert len(logs[0].losses) == 4 * 2 and logs[0].lrs[0] == 0.0
    assert logs[0].losses[-1] < logs[0].losses[0]
    assert logs[0].tokens == 4 * sum(len(p) + len(r) for p, r in examples())
    other = train(lora_model(), examples(), TrainConfig(**{**cfg.__dict__, "seed": 8}))
    assert other.losses != logs[0].losses


def test_probe_scores_the_first_batch_before_and_after_without_changing_the_training():
    """The probe is the first step's loss re-scored without dropout: before training it equals the first
    step's loss of a dropout-free run, after a few steps it is lower, and the run's losses are untouched."""
    cfg = TrainConfig(lr=2e-2, epochs=1, batch_size=2, grad_accum=2, progress=False, seed=3)
    plain = train(lora_model(), examples(8), cfg)
    probed = train(lora_model(), examples(8), TrainConfig(**{**cfg.__dict__, "probe": True}))
    assert plain.probe is None and probed.losses == plain.losses
    before, after = probed.probe
    model = lora_model()
    for layer in lora_layers(model).values():
        layer.dropout = torch.nn.Identity()
    no_dropout = train(model, examples(8), cfg)
    assert before == pytest.approx(no_dropout.losses[0], rel=1e-6)
    assert after < before


def test_gradient_accumulation_equals_big_batch():
    base = lora_model()
    for p in base.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    for layer in lora_layers(base).values():
        layer.dropout = torch.nn.Identity()
    kw = dict(lr=1e-2, max_steps=2, shuffle=False, progress=False, max_grad_norm=None)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    la = train(a, examples(8), TrainConfig(batch_size=4, grad_accum=1, **kw))
    lb = train(b, examples(8), TrainConfig(batch_size=2, grad_accum=2, **kw))
    assert la.losses == pytest.approx(lb.losses, rel=1e-5)
    for x, y in zip(lora_layers(a).values(), lora_layers(b).values(), strict=True):
        torch.testing.assert_close(x.lora_A.weight, y.lora_A.weight, rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_clearly():
    model = lora_model()
    with torch.no_grad():
        next(iter(lora_layers(model).values())).lora_B.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* step 1/"):
        train(model, examples(), TrainConfig(progress=False))


def test_bad_input():
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(tiny_llama().requires_grad_(False), examples(), TrainConfig(progress=False))
    with pytest.raises(ValueError, match="empty response"):
        make_batch([([1, 2], [])], None, 0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")


def epoch_orders(data, cfg, n_epochs):
    """The example indices step_batches visits, one list per epoch."""
    position = {id(ex): i for i, ex in enumerate(data)}
    steps = step_batches(data, cfg)
    n_steps = math.ceil(math.ceil(len(data) / cfg.batch_size) / cfg.grad_accum)
    return [[position[id(ex)] for _ in range(n_steps) for batch in next(steps) for ex in batch]
            for _ in range(n_epochs)]


@pytest.mark.parametrize("n,batch_size,grad_accum,max_len", [
    (1, 1, 1, None), (5, 2, 1, None), (10, 2, 1, None), (10, 3, 2, None), (16, 1, 1, 9), (37, 4, 1, None),
    (64, 2, 2, None), (250, 2, 1, 12), (260, 4, 2, None), (1000, 1, 1, None)])
def test_group_by_length_is_transformers_sampler(n, batch_size, grad_accum, max_len):
    """Each epoch: get_length_grouped_indices over the cut lengths, with the step's batch (micro-batch x
    accumulation) as the Trainer passes it, drawing from one generator seeded with config.seed."""
    get_length_grouped_indices = pytest.importorskip("transformers.trainer_pt_utils").get_length_grouped_indices
    data = examples(n, seed=n)  # lengths 2..22 with many ties
    cfg = TrainConfig(batch_size=batch_size, grad_accum=grad_accum, max_len=max_len, seed=n + 7,
                      group_by_length=True, progress=False)
    lengths = [min(len(p) + len(r), max_len or 10**9) for p, r in data]
    g = torch.Generator().manual_seed(cfg.seed)
    want = [get_length_grouped_indices(lengths, batch_size * grad_accum, generator=g) for _ in range(3)]
    got = epoch_orders(data, cfg, 3)
    assert got == want
    if n >= 10:
        assert got[0] != got[1] != got[2]  # a new order each epoch


def test_group_by_length_training_is_deterministic():
    cfg = TrainConfig(lr=1e-3, epochs=2, batch_size=3, group_by_length=True, progress=False)
    data = examples(9)
    a, b = lora_model(), lora_model()
    train(a, data, cfg), train(b, data, cfg)
    assert all(torch.equal(x.lora_B.weight, y.lora_B.weight)
               for x, y in zip(lora_layers(a).values(), lora_layers(b).values(), strict=True))
    with pytest.raises(ValueError, match="shuffle"):
        TrainConfig(group_by_length=True, shuffle=False)

def test_paper_stacked_lora_is_the_authors_run():
    """run_experiment.sh:242-262: rank 4 on every linear, batch 2 x 4, cosine, and transformers' defaults for
    the rest (no warm-up, no length grouping, no weight decay, clipping at 1, LLaMA-Factory's alpha 2r, no dropout)."""
    for task in TASKS:
        spec = PAPER.for_task(task).stack
        cfg = spec.train_config(seed=0)
        assert (spec.rank, spec.alpha, spec.dropout, spec.targets) == (4, 8.0, 0.0, "all")
        assert (cfg.batch_size, cfg.grad_accum, cfg.schedule) == (2, 4, "cosine")
        assert (cfg.warmup_ratio, cfg.group_by_length, cfg.weight_decay, cfg.max_grad_norm) == (0.0, False, 0.0, 1.0)
