"""One engine: a user alone is a group of one through per-row adapters, and equals, fp32 and token for token, the
fold-then-stack reference (`mta.peft.fusion.stack_lora` / `fold_adapters`, `mta.training.train.train`, plain
`mta.models.generation.generate`); nothing in mta/ chooses between engines."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from mta.data.lamp import Query, User
from mta.methods import METHODS, Method
from mta.models.generation import generate
from mta.peft.adapter import Adapter, get_adapter
from mta.peft.fusion import fold_adapters, stack_lora
from mta.peft.lora import find_targets
from mta.profiles import CPU, Profile, profile_from_dict
from mta.run.cli import override
from mta.seeding import derive_seed
from mta.stages.personalize import method_prompts, method_setup, run_group
from mta.training.train import train
from tests.fixtures import make_engine

ANCHORS = ("a0", "a1", "a2", "a3")
# Every fuse-then-train method that sets weights: fused anchors, a population LoRA, a trained LoRA, or several
SETS_WEIGHTS = [m for m in METHODS.values() if m.procedure == "fuse_then_train" and not m.on_base_weights]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # lrs large enough that a few steps move the stacked LoRAs far from their start
    return make_engine(tmp_path_factory.mktemp("one_engine") / "llm", max_new_tokens=8,
                       stack=dataclasses.replace(CPU.stack, lr=3e-2, batch_size=2),
                       oppu=dataclasses.replace(CPU.oppu, lr=3e-2, batch_size=4))


def random_adapter(model: torch.nn.Module, spec, llm: str, seed: int) -> Adapter:
    """A LoRA of `spec`'s shape with random, non-zero factors, so that it moves the model."""
    g = torch.Generator().manual_seed(seed)
    config = spec.lora_config(llm)
    adapter = Adapter(config)
    for name in find_targets(model, config.target_modules):
        out, inp = model.get_submodule(name).weight.shape
        adapter.A[name] = torch.randn(config.r, inp, generator=g) * 0.3
        adapter.B[name] = torch.randn(out, config.r, generator=g) * 0.3
    return adapter


def new_user() -> User:
    history = [{"id": f"u-{j}", "text": f"article {j} about topic{j % 3} and the news of the day {j}",
                "title": f"headline {j} topic{j % 3}"} for j in range(7)]
    queries = [Query("u-q0", "Generate a headline for the following article: rain falls on the town", "g0"),
               Query("u-q1", "Generate a headline for the following article: a long story " * 3, "g1")]
    return User("u", history, queries)


def reference(engine, user: User, method: Method, match: dict, bank: dict, unit_seed: int
              ) -> tuple[list[str], Adapter | None]:
    """The method's weights for one user folded into W (`fold_adapters`; `stack_lora` and `train` with a recipe),
    then a plain greedy decode of its prompts: (outputs, the trained LoRA)."""
    p, model = engine.profile, engine.model
    setup = method_setup(engine, user, method, match, bank, unit_seed)
    engine.reset()
    trained = None
    if setup.recipe is None:
        fold_adapters(model, setup.adapters, setup.weights, p.merge_space, engine.base)
    else:
        torch.manual_seed(unit_seed)
        config = setup.recipe.lora_config(p.llm)
        stack_lora(model, setup.adapters, setup.weights, config, p.merge_space, engine.base)
        train(model, setup.examples, setup.recipe.train_config(unit_seed, bf16=False), pad_id=engine.tok.pad_token_id)
        trained = get_adapter(model, config)
    model.eval()
    prompts = method_prompts(engine.task, user, method, p.prompt_style)
    assert not any(engine.prompt_cut(q) for q in prompts)
    tok = engine.test_tok
    ids, mask = tok.pad([tok.chat_prompt(q) for q in prompts], side="left")
    new = generate(model, ids, mask, max_new_tokens=p.max_new_tokens, stop_token_ids=tok.eos_token_ids,
                   pad_token_id=tok.pad_token_id, repetition_penalty=engine.conditions.repetition_penalty)
    engine.reset()
    engine.base.restore()  # the fold above is the test's, not the engine's
    return [engine.tok.decode(row.tolist()).strip() for row in new], trained


def test_a_group_of_one_equals_fold_then_stack_for_every_method_that_sets_weights(engine):
    p, model = engine.profile, engine.model
    assert {"oppu", "adapt_only", "merged_only", "mta"} <= {m.name for m in SETS_WEIGHTS}
    bank = {a: random_adapter(model, p.bank, p.llm, seed=i) for i, a in enumerate(ANCHORS)}
    bank["oppu_task"] = random_adapter(model, p.oppu_task, p.llm, seed=9)
    match = {"similarities": {"a0": 0.9, "a1": 0.6, "a2": 0.3, "a3": 0.1}, "seconds": 0.0}
    user = new_user()
    w0 = {n: t.clone() for n, t in model.state_dict().items()}
    base_prompts = method_prompts(engine.task, user, METHODS["rag1"], p.prompt_style)
    on_w0 = engine.generate(base_prompts)
    moved = 0
    for m in SETS_WEIGHTS:
        kept = {}
        got = run_group(engine, [user], [m], {user.user_id: match}, bank, seed=0, kept=kept)[user.user_id][m.name]
        assert got["group"] == 1, m.name
        outputs = [q["output"] for q in got["queries"]]
        want, trained = reference(engine, user, m, match, bank, derive_seed(0, user.user_id, m.name))
        assert outputs == want, m.name
        moved += outputs != on_w0
        if trained is None:
            assert kept[user.user_id][2] is None, m.name
            continue
        slot = kept[user.user_id][2]
        assert set(slot.A) == set(trained.A), m.name
        for name in trained.A:  # Adam turns rounding-level gradient differences into small element-wise ones
            for got_t, want_t in ((slot.A[name], trained.A[name]), (slot.B[name], trained.B[name])):
                assert (got_t - want_t).norm() <= 1e-3 * want_t.norm(), (m.name, name)
        assert any(trained.B[name].abs().max() > 1e-3 for name in trained.B), m.name  # training moved it
    assert moved >= len(SETS_WEIGHTS) // 2  # the weights each method sets change what it answers
    for n, t in model.state_dict().items():
        assert torch.equal(t, w0[n]), n  # back to W0 after each


def test_no_profile_names_a_second_engine():
    assert "engine" not in {f.name for f in dataclasses.fields(Profile)}
    with pytest.raises(ValueError, match=r"my.json: profile field 'engine' was removed: the engine is always the "
                                         r"batched one .*group_size=1"):
        profile_from_dict({"engine": "sequential"}, "my.json")
    with pytest.raises(ValueError, match=r"--set 'engine=batched': profile field 'engine' was removed"):
        override(CPU, "engine=batched")


def test_no_module_of_mta_chooses_an_engine():
    """Nothing in mta/ branches on an engine or names a second one, and the one-at-a-time entry points are gone."""
    root = Path(__file__).resolve().parents[1] / "mta"
    gone = re.compile(r"engine ==|(profile|\bp)\.engine\b|[\"']sequential[\"']|\brun_unit\b|\bprepare_weights\b|"
                      r"\bprepare_procedure\b|\btrained_adapter\b|engine\.personalize\(")
    found = [f"{path.relative_to(root)}:{n}: {line.strip()}" for path in sorted(root.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if gone.search(line)]
    assert not found, found
