"""Sequence caps per role: a training cap per LoRA recipe (None: the profile's) and a
test-time cap, the authors' values in `paper`; prompts each cap cut are counted."""

import json

import pytest

from mta.profiles import CPU, PAPER, LoRASpec
from mta.stages.bank import train_adapter
from tests.fixtures import make_engine

LONG = " ".join(["Team coach season match goal players league win score stadium fans final."] * 30)
SHORT = "Team coach season."


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("llm")


def test_paper_takes_the_authors_caps_per_role_and_cpu_one_cap():
    assert PAPER.bank.max_tokens == 8192 and PAPER.stack.max_tokens == 2048  # prepare_meta_lora.py; LLaMA-Factory
    for task in ("citation", "movie_tagging", "product_rating"):
        assert PAPER.for_task(task).max_test_tokens is None  # apply_chat_template, no truncation
    for task in ("news_headline", "scholarly_title"):
        p = PAPER.for_task(task)
        assert p.max_test_tokens == 4096 and p.stack.max_tokens == 2048  # the per-task row keeps the cap
    assert CPU.max_prompt_tokens == CPU.max_test_tokens == 384
    assert CPU.bank.max_tokens is None and CPU.stack.max_tokens is None
    with pytest.raises(ValueError, match="max_tokens"):
        LoRASpec(max_tokens=0)
    with pytest.raises(ValueError, match="max_test_tokens"):
        CPU.replace(max_test_tokens=0)


def test_training_cap_is_the_recipes_and_the_test_cap_its_own(llm_dir):
    engine = make_engine(llm_dir, max_prompt_tokens=64, max_test_tokens=None)
    template = len(engine.tok.chat_prompt(""))
    pairs = [(LONG, "Goal."), (SHORT, "Win.")]
    default = engine.tokenize(pairs)
    assert len(default[0][0]) + len(default[0][1]) <= 64 < len(engine.tok.chat_prompt(LONG)) and default.cut == 1
    assert default[1][0] == engine.tok.chat_prompt(SHORT)  # a short prompt is left whole
    capped = engine.tokenize(pairs, LoRASpec(max_tokens=32))
    assert len(capped[0][0]) + len(capped[0][1]) <= 32 and capped.cut == 1
    roomy = engine.tokenize(pairs, LoRASpec(max_tokens=4096))
    assert roomy[0][0] == engine.tok.chat_prompt(LONG) and roomy.cut == 0
    assert engine.train_budget(None) == 64 - template
    # the bank's recipe caps bank examples
    bank = make_engine(llm_dir, max_prompt_tokens=64, bank=LoRASpec(batch_size=1, max_tokens=4096))
    history = [{"id": str(j), "text": LONG, "title": "Goal."} for j in range(3)]
    assert bank.examples(history, seed=0, bank=True).cut == 0
    assert bank.examples(history, seed=0).cut == 3
    # no test cap: nothing is cut at test however long
    assert not engine.prompt_cut(LONG)


def test_a_long_target_keeps_half_the_cap_and_the_example_fits(llm_dir):
    engine = make_engine(llm_dir, max_prompt_tokens=64)
    whole = engine.tokenize([(SHORT, LONG)], LoRASpec(max_tokens=4096))[0]
    for prompt in (SHORT, LONG):
        (ids, target), = engine.tokenize([(prompt, LONG)])
        assert len(ids) + len(target) <= 64
        assert target == whole[1][: len(target)] and len(target) >= 32  # its start, at least half the cap
    (ids, target), = engine.tokenize([(SHORT, LONG)])
    assert ids == whole[0]  # a short prompt stays whole, the target takes the rest


def test_prompt_cut_follows_the_test_cap_and_generate_cuts_the_same_prompts(llm_dir, monkeypatch):
    engine = make_engine(llm_dir, max_prompt_tokens=4096, max_test_tokens=48)
    assert engine.prompt_cut(LONG) and not engine.prompt_cut(SHORT)
    assert engine.tokenize([(LONG, "Goal.")]).cut == 0  # the training cap is another one
    seen = []
    from mta.stages import engine as engine_module
    monkeypatch.setattr(engine_module, "generate", lambda model, ids, mask, **kw: seen.append(mask.sum(1)) or
                        ids[:, :1])
    engine.generate([LONG, SHORT])
    lengths = seen[0].tolist()
    assert lengths[0] <= 48 and lengths[1] == len(engine.test_tok.chat_prompt(SHORT))


def test_a_saved_loras_train_log_counts_the_prompts_its_cap_cut(llm_dir, tmp_path):
    engine = make_engine(llm_dir, max_prompt_tokens=64)
    examples = engine.tokenize([(LONG, "Goal."), (SHORT, "Win."), (LONG, "Final.")])
    train_adapter(engine, tmp_path / "lora", examples, LoRASpec(rank=2, epochs=1, batch_size=3), seed=0)
    log = json.loads((tmp_path / "lora" / "train_log.json").read_text())
    assert (log["examples"], log["prompts_cut"]) == (3, 2)
