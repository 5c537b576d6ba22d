"""Per-Pcs and PROPER against their formulas (mta.baselines.perpcs, mta.baselines.proper), on tiny random models."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mta.baselines import perpcs, proper
from mta.data.lamp import HISTORY_HEADER, get_task, training_pairs
from mta.models.llama import LlamaConfig, LlamaForCausalLM
from mta.peft.adapter import Adapter, get_adapter
from mta.peft.lora import LoRAConfig, inject_lora, lora_layers, unload_lora
from mta.peft.multi_lora import set_rows
from mta.profiles import PAPER
from mta.training.train import TrainConfig, make_batch, train
from mta.training.train_many import train_many

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    hf = {"model_type": "llama", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "max_position_embeddings": 64, "tie_word_embeddings": False}
    return LlamaForCausalLM(LlamaConfig.from_hf_config(hf)).eval()


def examples(n: int = 4, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, 50, (6 + i,), generator=g).tolist(), torch.randint(1, 50, (3,), generator=g).tolist())
            for i in range(n)]


def random_sharers(model, n: int, seed: int = 0) -> tuple[list[Adapter], list[dict]]:
    """n random sharer LoRAs (B non-zero) and random gates on the attention projections."""
    torch.manual_seed(seed)
    config = LoRAConfig(r=4, alpha=4.0, target_modules=ATTENTION)
    sharers, gates = [], []
    for _ in range(n):
        inject_lora(model, config)
        a = get_adapter(model, config)
        a.B = {m: torch.randn_like(b) * 0.1 for m, b in a.B.items()}
        sharers.append(a)
        gates.append({m: torch.randn(t.shape[1]) for m, t in a.A.items()})
        unload_lora(model)
    return sharers, gates


# ----------------------------------------------------------------------------- Per-Pcs


def test_gate_score_and_topk_softmax_assembly_equal_the_formula():
    torch.manual_seed(0)
    S, d, r, out, k, tau = 5, 8, 3, 6, 3, 0.7
    x, gates = torch.randn(2, 7, d), torch.randn(S, d)
    positions = torch.zeros(2, 7, dtype=torch.bool)
    positions[0, 4:6], positions[1, 2:7] = True, True
    A, B = torch.randn(S, r, d), torch.randn(S, out, r)

    def ln(v):  # layer norm without affine parameters, written out
        return (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)

    direct = torch.zeros(S)
    for j in range(S):
        rows = []
        for b in range(2):
            ts = positions[b].nonzero().flatten().tolist()
            rows.append(sum(float(ln(x[b, t]) @ ln(gates[j])) / math.sqrt(d) for t in ts) / len(ts))
        direct[j] = sum(rows) / len(rows)
    scores = perpcs.gate_scores(x, positions, gates)
    assert torch.allclose(scores, direct, atol=1e-5)

    idx, w, A_k, B_k = perpcs.assemble(scores, A, B, k, tau)
    top = sorted(range(S), key=lambda j: -float(direct[j]))[:k]
    assert idx.tolist() == top
    e = [math.exp(float(direct[j]) / tau) for j in top]
    weights = [v / sum(e) for v in e]
    assert w.tolist() == pytest.approx(weights, abs=1e-6)
    assert torch.allclose(A_k, sum(wj * A[j] for wj, j in zip(weights, top, strict=True)), atol=1e-5)
    assert torch.allclose(B_k, sum(wj * B[j] for wj, j in zip(weights, top, strict=True)), atol=1e-5)


def test_k1_with_a_one_hot_score_is_that_sharers_lora_exactly():
    torch.manual_seed(1)
    A, B = torch.randn(4, 3, 8), torch.randn(4, 6, 3)
    for j in range(4):
        idx, w, A_k, B_k = perpcs.assemble(F.one_hot(torch.tensor(j), 4).float(), A, B, k=1, tau=1.0)
        assert idx.tolist() == [j] and w.tolist() == [1.0]
        assert torch.equal(A_k, A[j]) and torch.equal(B_k, B[j])


def test_assembly_on_a_model_with_k1_reproduces_the_chosen_sharer_and_records_the_pieces():
    model = tiny_llama()
    sharers, gates = random_sharers(model, 3)
    adapter, pieces = perpcs.assemble_for_user(model, sharers, gates, examples(5), k=1, tau=1.0, batch_size=16)
    assert not any(getattr(m, "is_wrapper", False) for m in model.modules())  # the model is left as it was
    assert set(pieces) == set(sharers[0].A)
    for m, batches in pieces.items():
        assert len(batches) == 1 and batches[0]["weights"] == [1.0]
        j = batches[0]["sharers"][0]
        assert torch.equal(adapter.A[m], sharers[j].A[m]) and torch.equal(adapter.B[m], sharers[j].B[m])
    # two batches: the factors are the uniform average of the two batches' assemblies
    adapter2, pieces2 = perpcs.assemble_for_user(model, sharers, gates, examples(5), k=2, tau=1.0, batch_size=3)
    for m, batches in pieces2.items():
        assert len(batches) == 2
        per_batch = [sum(w * sharers[j].A[m] for j, w in zip(b["sharers"], b["weights"], strict=True)) for b in batches]
        assert torch.allclose(adapter2.A[m], (per_batch[0] + per_batch[1]) / 2, atol=1e-6)



def release_gate_scores(x, label, gate):
    """llama/model.py 76-103 of the Per-Pcs release, transcribed: x (B, T, d), label (B, T) (prompt, padding: 0)."""
    dim = x.size(-1)
    hidden_state = F.layer_norm(x, normalized_shape=(dim,))
    gate_state = F.layer_norm(gate, normalized_shape=(dim,))
    scores = torch.matmul(hidden_state, gate_state.T) * math.sqrt(1 / dim)
    scores = scores[:, :-1, :]
    label = label[:, 1:]
    label_mask = label.gt(0)
    scores[~label_mask] = 0
    summed = torch.sum(scores, dim=1)
    count = label_mask.unsqueeze(-1).sum(1)
    return (summed / count).mean(dim=0)


def test_assembly_scores_the_positions_predicting_response_tokens_as_the_release(monkeypatch):
    """Every module's scores equal the release's on its own input: the positions whose *next* token is a response
    token (`scores[:, :-1]` under `label[:, 1:] > 0`), with the release's labels (lora_composition.py
    get_all_history_id: the prompt and the right padding 0)."""
    model = tiny_llama()
    sharers, gates = random_sharers(model, 3)
    data = examples(4)
    seen = []
    real = perpcs.gate_scores
    monkeypatch.setattr(perpcs, "gate_scores", lambda x, pos, g: seen.append((x, pos, g)) or real(x, pos, g))
    perpcs.assemble_for_user(model, sharers, gates, data, k=2, tau=1.0, batch_size=16)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()  # the assembly's shuffle
    rows = [data[j] for j in order]
    label = torch.zeros(len(rows), max(len(p) + len(r) for p, r in rows), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        label[i, len(p): len(p) + len(r)] = torch.tensor(r)
    release_positions = torch.zeros_like(label, dtype=torch.bool)
    release_positions[:, :-1] = label[:, 1:] > 0
    assert len(seen) == len(sharers[0].A)
    for x, positions, g in seen:
        assert torch.equal(positions, release_positions)
        want = release_gate_scores(x.float(), label, g)
        torch.testing.assert_close(real(x, positions, g), want, rtol=1e-5, atol=1e-6)


def test_assembly_pairs_use_each_item_twice_with_an_earlier_bm25_item_and_plain():
    """lora_composition.py process_train_data: items 1.. with the top BM25 item of the items before them, then every
    item plain (its instruction alone); LaMP-1 plain only; a cap counts items, not pairs."""
    task = get_task("news_headline")
    history = [{"text": t, "title": f"headline {i}"} for i, t in enumerate(
        ["rain falls on the city", "goal scored in the final", "rain floods the river", "goal keeper saves it",
         "vote count begins"])]
    pairs = perpcs.assembly_pairs(task, history, seed=3)
    assert len(pairs) == 2 * len(history) - 1
    for i, (prompt, target) in zip(range(1, 5), pairs[:4], strict=True):
        assert (prompt, target) == training_pairs(task, history[: i + 1])[i]  # leave-one-out over the items up to i
        assert prompt.startswith(HISTORY_HEADER) and history[i]["text"] in prompt
        shown = [j for j in range(5) if j != i and f"Article: {history[j]['text']} Headline" in prompt]
        assert len(shown) == 1 and shown[0] < i
    assert history[1]["text"] in pairs[2][0]  # item 3 shows item 1, its BM25 best among the earlier items
    assert pairs[4:] == [(task.render_instruction({"text": it["text"]}), it["title"]) for it in history]
    capped = perpcs.assembly_pairs(task, history, seed=3, limit=2)
    plain = capped[-2:]
    assert all(not p.startswith(HISTORY_HEADER) for p, _ in plain)
    assert len(capped) == 2 + sum(1 for p, t in plain if t != "headline 0")
    citation = get_task("citation")
    papers = [{"title": f"paper on {w}", "citation": f"cited {w}"} for w in ("graphs", "proofs", "codes")]
    cited = perpcs.assembly_pairs(citation, papers, seed=0)
    assert len(cited) == 3 and not any(p.startswith(HISTORY_HEADER) for p, _ in cited)


def test_a_users_assembly_runs_on_both_kinds_of_pairs():
    """`part` assembles on `assembly_pairs` of the user's history: 2n - 1 sequences for n items."""
    model = tiny_llama()
    sharers, gates = random_sharers(model, 2)
    task, history = get_task("news_headline"), [{"text": f"text number {i}", "title": f"title {i}"} for i in range(4)]
    got = []

    def tokenize(pairs):
        got.extend(pairs)
        return examples(len(pairs))

    engine = SimpleNamespace(profile=PAPER.replace(device="cpu", bf16=False), task=task, tokenize=tokenize,
                             model=model, tok=SimpleNamespace(pad_token_id=0))
    artifacts = perpcs.Artifacts(None, dict(zip("ab", sharers, strict=True)), dict(zip("ab", gates, strict=True)))
    _, _, details = perpcs.part(engine, SimpleNamespace(history=history), artifacts, 5)
    assert got == perpcs.assembly_pairs(task, history, 5) and (details["items"], details["sequences"]) == (4, 7)


def test_assembly_under_bf16_autocast_chooses_and_averages_in_fp32():
    """The forward may run under bf16 autocast; the chosen pieces are still averaged in fp32 (a bf16 einsum would
    round the factors to 8 bits)."""
    model = tiny_llama()
    sharers, gates = random_sharers(model, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adapter, pieces = perpcs.assemble_for_user(model, sharers, gates, examples(5), k=2, tau=1.0, batch_size=16)
    for m, batches in pieces.items():
        b = batches[0]
        want = sum(w * sharers[j].A[m] for j, w in zip(b["sharers"], b["weights"], strict=True))
        assert adapter.A[m].dtype == torch.float32
        torch.testing.assert_close(adapter.A[m], want, rtol=1e-6, atol=1e-6)

def test_deeper_layers_see_the_pieces_already_chosen():
    """A layer-1 module's input, hence its choice, depends on what layer 0 assembled."""
    model = tiny_llama()
    sharers, gates = random_sharers(model, 3)
    seen = {}
    real = perpcs.PieceAssembly.forward

    def spy(self, x):
        seen.setdefault(id(self), x.clone())
        return real(self, x)

    perpcs.PieceAssembly.forward = spy
    try:
        perpcs.assemble_for_user(model, sharers, gates, examples(2), k=1, tau=1.0, batch_size=16)
        first = dict(seen)
        seen.clear()
        scaled = [Adapter(s.config, s.A, {m: 10 * b for m, b in s.B.items()}) for s in sharers]
        perpcs.assemble_for_user(model, scaled, gates, examples(2), k=1, tau=1.0, batch_size=16)
    finally:
        perpcs.PieceAssembly.forward = real
    inputs_a, inputs_b = list(first.values()), list(seen.values())
    assert torch.equal(inputs_a[0], inputs_b[0])  # layer 0, q_proj: before any piece acts
    assert not torch.allclose(inputs_a[-1], inputs_b[-1])  # layer 1, o_proj: after layer 0's pieces


def test_gate_training_trains_only_the_gates_and_rescales_the_lora_input():
    model = tiny_llama()
    inject_lora(model, LoRAConfig(r=4, alpha=4.0, target_modules=ATTENTION))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    gated = perpcs.inject_gates(model)
    layer = next(iter(gated.values()))
    x = torch.randn(3, 16)
    expected = layer.base(x) + (x * torch.sigmoid(x @ layer.gate)[:, None]) @ layer.lora_A.weight.T \
        @ layer.lora_B.weight.T * layer.scaling
    assert torch.allclose(layer(x), expected, atol=1e-6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, examples(), TrainConfig(lr=1e-1, batch_size=4, progress=False))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".gate") for n in changed)


# ----------------------------------------------------------------------------- PROPER


def mixture_model(n_users: int = 3) -> tuple[LlamaForCausalLM, dict]:
    model = tiny_llama()
    torch.manual_seed(0)
    modules = proper.inject_mixture(model, FFN, n_experts=5, r=4, alpha=8.0, n_users=n_users)
    with torch.no_grad():
        for m in modules.values():
            m.experts_B.normal_(0, 0.3)
    return model, modules


def test_mixture_output_equals_the_formula_for_hand_set_routers():
    _, modules = mixture_model()
    m = modules["model.layers.0.mlp.up_proj"]
    torch.manual_seed(3)
    with torch.no_grad():
        m.router_x.weight.copy_(torch.randn_like(m.router_x.weight))
        m.router_e.weight.copy_(torch.randn_like(m.router_e.weight))
        m.router_l.weight.copy_(torch.randn_like(m.router_l.weight))
    m.add_user_lora(4, 8.0)
    with torch.no_grad():
        m.user_B.normal_(0, 0.3)
    x, users = torch.randn(2, 3, 16), torch.tensor([2, 0])

    def expert(i, v):
        return m.experts_B[i] @ (m.experts_A[i] @ v) * (8.0 / 4)

    for stage in proper.STAGES:
        m.stage, m.users = stage, users
        y = m(x)
        for b in range(2):
            for t in range(3):
                v = x[b, t]
                u = m.user_B @ (m.user_A @ v) * (8.0 / 4)
                if stage == "router":
                    r = torch.softmax(m.router_l.weight @ u, 0)
                else:
                    e = m.user_embedding.weight[users[b]]
                    r = torch.softmax(torch.softmax(m.router_x.weight @ v, 0)
                                      + torch.softmax(m.router_e.weight @ e, 0), 0)
                want = m.base(v) + 0.2 * sum(r[i] * expert(i, v) for i in range(5)) + (0 if stage == "group" else u)
                assert torch.allclose(y[b, t], want, atol=1e-5), (stage, b, t)


def test_serving_many_users_gives_each_row_its_own_users_router_stage():
    """`serve_users` + `multi_lora.set_rows`: each batch row routes by its own user's W_l over its own user LoRA, as the
    router stage does with that user's part in place."""
    model, modules = mixture_model()
    parts, ids = [], make_batch(examples(3), None, 0)[0]  # (3, T)
    for u in range(3):
        torch.manual_seed(10 + u)
        for m in modules.values():
            m.add_user_lora(4, 8.0)
            with torch.no_grad():
                m.user_B.normal_(0, 0.3)
                m.router_l.weight.normal_(0, 1.0)
        parts.append(proper.user_part(model))
    proper.set_stage(model, "router")
    with torch.no_grad():
        alone = []  # alone[u]: every row under user u's part, in place
        for part in parts:
            for name, m in modules.items():
                m.user_A.copy_(part[name][0]), m.user_B.copy_(part[name][1]), m.router_l.weight.copy_(part[name][2])
            alone.append(model(ids))
        proper.serve_users(model, parts)
        slots = torch.tensor([2, 0, 2])
        set_rows(model, slots)
        together = model(ids)
    for row, u in enumerate(slots.tolist()):
        torch.testing.assert_close(together[row], alone[u][row], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone[0], alone[2], atol=1e-3)  # the users differ


def test_constraint_loss_is_the_formula_and_has_a_gradient():
    model, modules = mixture_model()
    proper.set_stage(model, "group")
    proper.set_users(model, torch.tensor([1, 2]))
    ids, _, _ = make_batch(examples(2), None, 0)
    model(ids)
    loss = proper.constraint_loss(model)
    direct = []
    for m in modules.values():
        M = m.mean_routing
        direct.append(sum(abs(M[i] * M[j]) for i in range(5) for j in range(5) if i != j))
    assert torch.allclose(loss, torch.stack(direct).mean())
    loss.backward()
    for m in modules.values():
        assert m.router_x.weight.grad.abs().sum() > 0 and m.router_e.weight.grad.abs().sum() > 0


def test_each_proper_stage_trains_only_its_own_parameters():
    model, modules = mixture_model()
    for m in modules.values():
        m.add_user_lora(4, 8.0)
    own = {"group": ("experts_A", "experts_B", "router_x.weight", "router_e.weight", "user_embedding.weight"),
           "user": ("user_A", "user_B"), "router": ("router_l.weight",)}
    data = [proper.UserExample(ex, i % 3) for i, ex in enumerate(examples(4))]
    for stage in proper.STAGES:
        proper.set_stage(model, stage)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(model, data, TrainConfig(lr=5e-2, batch_size=2, progress=False),
              before_forward=lambda batch: proper.set_users(model, torch.tensor([ex.row for ex in batch])),
              aux_loss=(lambda: proper.constraint_loss(model)) if stage == "group" else None)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {f"{n}.{k}" for n in modules for k in own[stage]}, stage


def test_many_users_user_and_router_stages_train_together_as_each_alone():
    """`add_user_slots` + `train_many` over the served banks (PROPER's `parts`) against each user's user and router
    stages trained alone on one mixture with `train` (the reference): the same initialisation, losses and
    probes at every step, the same trained parts; users with different numbers of examples and steps."""
    model, _ = mixture_model()
    with torch.no_grad():
        for m in proper.mixtures(model).values():
            m.router_l.weight.normal_(0, 1.0)
            m.user_embedding.weight.normal_(0, 1.0)
    rows, seeds = [2, 0, 1], [5, 6, 7]
    data = [examples(5, 1), examples(2, 2), examples(3, 3)]  # 3, 1 and 2 user-stage steps
    configs = {"user": [TrainConfig(lr=2e-2, batch_size=2, seed=s, probe=True, progress=False) for s in seeds],
               "router": [TrainConfig(lr=5e-2, batch_size=1, seed=s, probe=True, progress=False, weight_decay=0.1)
                          for s in seeds]}
    stage_data = {"user": data, "router": [d[:2] for d in data]}
    alone, start = [], []
    for u in range(3):
        m = copy.deepcopy(model)
        torch.manual_seed(seeds[u])
        for mix in proper.mixtures(m).values():
            mix.add_user_lora(4, 8.0)
        start.append(proper.user_part(m))

        def same_user(batch, m=m, u=u):
            proper.set_users(m, torch.tensor([rows[u]] * len(batch)))

        logs = {}
        for stage in ("user", "router"):
            proper.set_stage(m, stage)
            logs[stage] = train(m, stage_data[stage][u], configs[stage][u], before_forward=same_user)
        alone.append((logs, proper.user_part(m)))
    many = copy.deepcopy(model)
    proper.add_user_slots(many, 4, 8.0, seeds)
    for u in range(3):
        for name, tensors in proper.user_part(many, u).items():
            assert all(torch.equal(a, b) for a, b in zip(tensors, start[u][name], strict=True)), (u, name)
    logs = {}
    for stage in ("user", "router"):
        proper.set_stage(many, stage)
        params = [t for m in proper.mixtures(many).values() for t in m.stage_parameters(stage)]
        logs[stage] = train_many(many, stage_data[stage], configs[stage], params=params, rows_per_pass=2,
                                 before_pass=lambda slots: proper.set_users(many, torch.tensor(rows)[slots]))
    for u, (ref, part) in enumerate(alone):
        for stage in ("user", "router"):
            got, want = logs[stage][u], ref[stage]
            assert got.lrs == want.lrs and got.target_tokens == want.target_tokens, (u, stage)
            assert got.losses == pytest.approx(want.losses, rel=1e-5), (u, stage)
            assert got.probe == pytest.approx(want.probe, rel=1e-5), (u, stage)
            assert got.grad_norms == pytest.approx(want.grad_norms, rel=1e-4), (u, stage)
        for name, tensors in proper.user_part(many, u).items():
            for got, want in zip(tensors, part[name], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert [len(logs["user"][u].losses) for u in range(3)] == [3, 1, 2]


def test_mixture_state_round_trips_and_refuses_another_model():
    model, _ = mixture_model()
    sd = proper.mixture_state(model)
    other, _ = mixture_model()
    with torch.no_grad():
        for m in proper.mixtures(other).values():
            m.experts_A.zero_()
    proper.load_mixture_state(other, sd)
    assert all(torch.equal(v, proper.mixture_state(other)[k]) for k, v in sd.items())
    bigger, _ = mixture_model(n_users=4)
    with pytest.raises(ValueError, match="shape"):
        proper.load_mixture_state(bigger, sd)


def recipe(spec) -> tuple:
    return (spec.rank, spec.alpha, spec.dropout, tuple(spec.targets), spec.lr, spec.schedule, spec.warmup_ratio,
            spec.weight_decay, spec.max_grad_norm, spec.batch_size, spec.grad_accum, spec.epochs, spec.max_steps,
            spec.group_by_length)


def test_paper_recipes_of_both_baselines_are_the_release_scripts():
    """Per-Pcs: task_LoRA.py, train_anchor_PEFT.py and train_anchor_gate.py defaults (clip 0.3, shuffled batches;
    the step loops run max_step steps). PROPER: run_loramoe_stage1.sh under TRL's defaults (dropout 0.05, linear),
    stage2.sh, stage3.1.sh and stage3.2.sh (lr 2e-4, cosine, warm-up 0.03, wd 0, dropout 0.05); none groups by
    length."""
    assert recipe(PAPER.perpcs_task) == (8, 8.0, 0.05, ATTENTION, 1e-4, "cosine", 0.0, 0.01, 0.3, 6, 1, 3, None, False)
    assert recipe(PAPER.perpcs_sharer) == (8, 8.0, 0.05, ATTENTION, 2e-5, "cosine", 0.0, 0.01, 0.3, 6, 1, 1, 100, False)
    assert recipe(PAPER.perpcs_gate)[4:] == (2e-5, "cosine", 0.0, 0.0, 0.3, 6, 1, 1, 200, False)
    assert recipe(PAPER.proper_population) == \
        (8, 16.0, 0.05, ATTENTION, 3e-4, "linear", 0.03, 0.1, 1.0, 2, 4, 3, None, False)
    for spec, epochs in ((PAPER.proper_group, 2), (PAPER.proper_user, 1), (PAPER.proper_router, 1)):
        assert recipe(spec) == (4, 8.0, 0.05, FFN, 2e-4, "cosine", 0.03, 0.0, 1.0, 1, 1, epochs, None, False)


def test_mixture_dropout_masks_each_lora_path_input_in_training_only():
    """The release (lora.py 396-414) calls its dropout once per LoRA path: each expert and the user LoRA see their
    own mask of x, the routers see x itself; nothing is dropped in eval or with p = 0. Expert i and the user LoRA
    write x_0 · mask into output 0, 1 and 2 alone, so a zero there is that path's dropped x_0."""
    base = torch.nn.Linear(4, 6, bias=False)
    torch.nn.init.zeros_(base.weight)
    m = proper.MixtureLinear(base, n_experts=2, r=1, alpha=1.0, n_users=1)
    m.add_user_lora(1, 1.0)
    with torch.no_grad():
        m.experts_A.zero_()[:, 0, 0] = 1.0
        m.experts_B.zero_()[0, 0, 0] = m.experts_B[1, 1, 0] = 1.0
        m.user_A.zero_()[0, 0] = 1.0
        m.user_B.zero_()[2, 0] = 1.0
    x, m.users = torch.ones(1, 400, 4), torch.tensor([0])
    for stage in ("group", "user", "router"):
        m.stage, m.dropout = stage, 0.5
        paths = 2 if stage == "group" else 3
        m.eval()
        y_eval, routing_eval = m(x), m.mean_routing
        assert (y_eval[..., :paths] != 0).all()
        m.train()
        torch.manual_seed(0)
        dropped = m(x)[0, :, :paths] == 0  # (T, paths)
        assert ((dropped.float().mean(0) - 0.5).abs() < 0.1).all(), stage  # p of each path's positions
        assert (dropped[:, 0] != dropped[:, 1]).any() and (paths == 2 or (dropped[:, 0] != dropped[:, 2]).any())
        if stage != "router":
            torch.testing.assert_close(m.mean_routing, routing_eval)  # the routers saw x undropped
        m.dropout = 0.0
        torch.testing.assert_close(m(x), y_eval)


@pytest.mark.parametrize("n_users", [1, 2])
def test_proper_user_and_router_stages_take_their_recipes_dropout_and_warm_up(monkeypatch, n_users):
    """`parts`, for one user or many, trains the user and router stages with the recipe's dropout set on every
    mixture, and the recipe's warm-up reaches the schedule: with warm-up the first step's lr is 0."""
    model, _ = mixture_model()
    profile = PAPER.replace(rows_per_pass=4)
    engine = SimpleNamespace(profile=profile, model=model, tok=SimpleNamespace(pad_token_id=0),
                             examples=lambda history, seed: examples(3, seed % 7),
                             train_config=lambda spec, seed, probe=False: spec.train_config(seed, probe=probe))
    artifacts = proper.Artifacts(None, proper.mixture_state(model), ["a", "b", "c"])
    seen = []
    real = proper.train_many

    def spy(model, *args, **kwargs):
        seen.append({(mix.stage, mix.dropout) for mix in proper.mixtures(model).values()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(proper, "train_many", spy)
    users = [SimpleNamespace(user_id=u, history=[]) for u in ("b", "c")][:n_users]
    out = proper.parts(engine, users, artifacts, [11, 12][:n_users])
    assert len(out) == n_users
    assert seen == [{("user", 0.05)}, {("router", 0.05)}]
    for _, _, details in out:
        for stage in ("train", "train_router"):
            lrs = details[stage]["lrs"]
            assert len(lrs) == 3 and lrs[0] == 0.0 and lrs[1] == pytest.approx(2e-4)
