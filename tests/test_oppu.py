"""OPPU as released (a per-user LoRA on W0 + its task LoRA, history from earlier items only) and the population
data of the population LoRAs of OPPU, Per-Pcs and PROPER (one query with its gold per bank candidate)."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from mta.data.lamp import Query, User, get_task, query_prompt, training_pairs
from mta.methods import METHODS, Method
from mta.models.checkpoint import load_llm
from mta.peft.adapter import Adapter
from mta.peft.multi_lora import rows
from mta.profiles import CPU, OPPU_TASK, OPPU_USER, PAPER
from mta.stages import engine as engine_module
from mta.stages import procedure
from mta.stages.engine import Engine
from mta.stages.personalize import method_setup, run_group
from tests.fixtures import make_llm

TASK = get_task("news_headline")
PROBE = torch.tensor([[5, 17, 33, 60, 91, 120]])


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return make_llm(tmp_path_factory.mktemp("oppu") / "llm")


def make_engine(llm_dir, **changes) -> Engine:
    oppu = dataclasses.replace(CPU.oppu, epochs=1, batch_size=4)
    profile = CPU.replace(llm=str(llm_dir), bf16=False, group_size=16, rows_per_pass=8, max_prompt_tokens=256,
                          max_new_tokens=2, oppu=oppu,
                          **changes)
    model, tok = load_llm(profile.llm, dtype=profile.torch_dtype, device="cpu")
    return Engine(profile, TASK, model, tok)


def item(uid: str, j: int) -> dict:
    return {"id": f"{uid}-{j}", "text": f"article {j} of {uid} about topic{j} and more words",
            "title": f"headline{j} {uid}"}


def user(uid: str, n: int, query: bool = False) -> User:
    q = [Query(f"{uid}-q", f"Generate a headline for the following article: query article {uid}", f"gold {uid}")]
    return User(uid, [item(uid, j) for j in range(n)], q if query else [])


def task_lora(model: torch.nn.Module, seed: int = 1) -> Adapter:
    """A task LoRA with random (non-zero) factors on q, k and v."""
    g = torch.Generator().manual_seed(seed)
    adapter = Adapter(CPU.oppu_task.lora_config())
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in OPPU_TASK:
            out, inp = m.weight.shape
            adapter.A[name] = torch.randn(CPU.oppu_task.rank, inp, generator=g) * 0.5
            adapter.B[name] = torch.randn(out, CPU.oppu_task.rank, generator=g) * 0.5
    return adapter


def folded_by_hand(model: torch.nn.Module, adapter: Adapter) -> torch.nn.Module:
    """W0 + (alpha / r) B A on a copy of the model, written out independently of `mta.peft`."""
    ref = copy.deepcopy(model)
    scale = adapter.config.alpha / adapter.config.r
    with torch.no_grad():
        for name in adapter.A:
            ref.get_submodule(name).weight += scale * adapter.B[name] @ adapter.A[name]
    return ref


# ----------------------------------------------------------------------------- OPPU as released


def test_profiles_hold_the_released_recipes():
    u, t = PAPER.oppu, PAPER.oppu_task
    assert (u.rank, u.alpha, u.targets, u.dropout, u.epochs, u.batch_size, u.schedule, u.warmup_ratio,
            u.weight_decay, u.max_grad_norm, u.lr, u.earlier_only) == (8, 8.0, OPPU_USER, 0.05, 2, 16, "linear",
                                                                     0.1, 0.01, 0.3, 1e-4, True)
    assert (t.rank, t.alpha, t.targets, t.dropout, t.epochs, t.batch_size, t.schedule, t.warmup_ratio,
            t.weight_decay, t.max_grad_norm, t.lr, t.earlier_only) == (8, 8.0, OPPU_TASK, 0.05, 3, 16, "linear",
                                                                     0.1, 0.01, 0.3, 1e-4, False)
    # cpu: the same structure; no dropout; the 2-step user LoRA takes 1e-3, the 58-step task LoRA the release's lr
    assert u.max_tokens == t.max_tokens == 2048  # --cut_off; cpu: the profile's cap
    assert CPU.oppu == dataclasses.replace(PAPER.oppu, dropout=0.0, lr=1e-3, max_tokens=None)
    assert CPU.oppu_task == dataclasses.replace(PAPER.oppu_task, dropout=0.0, epochs=1, batch_size=1, max_tokens=None)
    assert METHODS["oppu"].population == "oppu_task" and METHODS["oppu"].recipe == "oppu"
    assert all(m.population == "none" for name, m in METHODS.items() if name != "oppu")
    assert not METHODS["oppu"].on_base_weights
    with pytest.raises(ValueError, match="population"):
        Method("x", "x", ("table1",), 1, "top", "stack", population="oppu_task")


def test_the_user_lora_trains_on_w0_plus_the_task_lora_and_only_on_q_and_v(llm_dir, monkeypatch):
    eng = make_engine(llm_dir)
    task = task_lora(eng.model)
    with torch.no_grad():
        expected, w0 = folded_by_hand(eng.model, task)(PROBE), eng.model(PROBE)
    assert not torch.allclose(expected, w0, atol=1e-3)  # the task LoRA moves the model
    seen = {}
    real = engine_module.train_many

    def spy(model, *args, **kwargs):
        with torch.no_grad(), rows(model, [0]):
            seen["logits"] = model(PROBE)
        seen["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
        return real(model, *args, **kwargs)

    monkeypatch.setattr(engine_module, "train_many", spy)
    u = user("u1", 6, query=True)
    out = run_group(eng, [u], [METHODS["oppu"]], {}, {"oppu_task": task}, seed=0)[u.user_id]["oppu"]
    assert "error" not in out and out["train"]["steps"] >= 1
    torch.testing.assert_close(seen["logits"], expected, atol=2e-4, rtol=1e-4)  # W = W0 + ΔW_task, B = 0 at init
    assert seen["trainable"]
    assert all(any(f".{t}." in n for t in OPPU_USER) for n in seen["trainable"]), seen["trainable"]
    with torch.no_grad():
        torch.testing.assert_close(eng.model(PROBE), w0)  # reset: back to W0


def test_oppu_without_its_task_lora_is_an_error_not_a_lora_from_w0(llm_dir):
    eng = make_engine(llm_dir)
    out = run_group(eng, [user("u1", 6, query=True)], [METHODS["oppu"]], {}, {}, seed=0)["u1"]["oppu"]
    assert "oppu_task" in out["error"]


def test_each_oppu_example_retrieves_from_earlier_items_only():
    history = [item("u", j) for j in range(5)]
    seen = []

    def retrieve(query, docs, k, sep=" "):
        seen.append(list(docs))
        return list(range(min(k, len(docs))))

    pairs = training_pairs(TASK, history, retrieve=retrieve, earlier_only=True)
    assert [t for _, t in pairs] == [it["title"] for it in history]
    assert "History" not in pairs[0][0] and history[0]["text"] in pairs[0][0]  # the first item: instruction alone
    assert len(seen) == 4
    for i, docs in enumerate(seen, start=1):  # item i sees items 0..i-1
        assert len(docs) == i
        assert all(history[j]["text"] in doc for j, doc in enumerate(docs))
    seen.clear()
    training_pairs(TASK, history, retrieve=retrieve)  # leave-one-out, the default of the other recipes
    assert [len(d) for d in seen] == [4] * 5


def test_the_oppu_row_selects_earlier_only_examples_through_its_recipe(llm_dir):
    eng = make_engine(llm_dir)
    u = user("u1", 6, query=True)
    task = task_lora(eng.model)
    setup = method_setup(eng, u, METHODS["oppu"], None, {"oppu_task": task}, 7)
    assert setup.adapters == [task] and setup.weights == [1.0] and setup.recipe == eng.profile.oppu
    assert setup.examples == eng.tokenize(training_pairs(TASK, u.history, seed=7, earlier_only=True))
    stacked = method_setup(eng, u, METHODS["adapt_only"], None, {}, 7)
    assert stacked.examples == eng.tokenize(training_pairs(TASK, u.history, seed=7))
    assert stacked.examples != setup.examples


def test_the_task_lora_is_built_once_in_stage_1c_and_reused(llm_dir, tmp_path, monkeypatch):
    eng = make_engine(llm_dir, population_items=3)
    run = SimpleNamespace(profile=eng.profile, seed=0, progress=False, engine=eng, artifacts=tmp_path,
                          candidates=[user(f"c{i}", 4) for i in range(5)],
                          population_inputs=lambda artifact: {"artifact": artifact})
    calls = []
    real = procedure.train_adapter

    def counted(engine, path, examples, spec, seed, **kw):
        calls.append((path, len(examples), spec))
        return real(engine, path, examples, spec, seed, **kw)

    monkeypatch.setattr(procedure, "train_adapter", counted)
    methods = [METHODS[m] for m in ("base", "oppu", "mta")]
    assert procedure.load_population_loras(run, methods) == {}
    for _ in range(2):
        procedure.build_population_loras(run, methods)
    assert calls == [(tmp_path / "population" / "oppu_task", 3, eng.profile.oppu_task)]
    loaded = procedure.load_population_loras(run, methods)
    assert set(loaded) == {"oppu_task"}
    assert {m.rsplit(".", 1)[-1] for m in loaded["oppu_task"].A} == set(OPPU_TASK)
    procedure.build_population_loras(run, [METHODS["base"], METHODS["perpcs"]])  # no method folds one: nothing
    assert len(calls) == 1


# ----------------------------------------------------------------------------- population data


def test_population_examples_are_one_query_with_its_gold_per_user(llm_dir):
    eng = make_engine(llm_dir)
    with_query = [user(f"q{i}", 4, query=True) for i in range(3)]
    without = [user(f"h{i}", 5) for i in range(2)]
    too_short = User("s", [item("s", 0)])
    examples = eng.population_examples([*with_query, *without, too_short], seed=0)
    assert len(examples) == 5  # one per usable user, not one per history item (22 items)
    expected = [(query_prompt(TASK, u.history, u.query[0]), u.query[0].gold) for u in with_query]
    # no query: the last item is held out as one, its history retrieved from the items before it
    expected += [training_pairs(TASK, u.history, items=slice(-1, None))[0] for u in without]
    assert [t for _, t in expected[3:]] == [u.history[-1]["title"] for u in without]
    assert all(u.history[-1]["title"] not in p for (p, _), u in zip(expected[3:], without, strict=True))
    for (prompt, _), u in zip(expected[3:], without, strict=True):  # LaMP-4: exactly a test query's prompt
        last = u.history[-1]
        assert prompt == query_prompt(TASK, u.history[:-1], Query("x", TASK.question.format(**last), last["title"]))
    assert examples == eng.tokenize(expected)
    golds = [eng.tok.decode(ids).strip() for _, ids in examples]
    assert [g.removesuffix(eng.tok.decode([eng.tok.eos_token_id])).strip() for g in golds] == \
        [t for _, t in expected]


def test_population_items_caps_the_users_by_a_seeded_draw(llm_dir):
    eng = make_engine(llm_dir)
    users = [user(f"q{i}", 4, query=True) for i in range(8)]
    by_prompt = {tuple(eng.tokenize([(query_prompt(TASK, u.history, u.query[0]), "")])[0][0]): u.user_id
                 for u in users}
    draws = [[by_prompt[tuple(p)] for p, _ in eng.population_examples(users, seed=s, limit=3)] for s in (0, 0, 1, 2)]
    assert all(len(d) == len(set(d)) == 3 for d in draws)
    assert draws[0] == draws[1] and len({tuple(d) for d in draws}) > 1
    assert all(d == sorted(d, key=lambda uid: int(uid[1:])) for d in draws)  # in the file's order


def test_a_quantised_base_takes_oppu():
    from mta.stages.personalize import refuse_on_quantised_base

    refuse_on_quantised_base(CPU.replace(base_quant="q4"), [METHODS["oppu"]])  # its task LoRA stays unmerged
