"""The authors' test conditions as one setting, LaMP-3 ratings parsed as the authors do: a 4-bit NF4 base at
decode, the chat template apart for training and test, the repetition penalty as transformers applies it,
each evaluation script's max_new_tokens."""

import pytest
import torch

from mta.baselines.proper import inject_mixture
from mta.data import lamp
from mta.models.generation import generate, penalize_repetition
from mta.ops.quant import nf4_roundtrip
from mta.peft.fusion import nf4_base
from mta.peft.lora import LoRAConfig, inject_lora
from mta.profiles import CPU, PAPER
from tests.fixtures import make_engine

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("llm")


def captured_generate(monkeypatch, engine):
    """Replace the decode by one that records its prompt ids, keyword arguments and a decoder weight."""
    from mta.stages import engine as engine_module

    seen = {}
    layer = engine.model.get_submodule("model.layers.0.self_attn.q_proj")

    def fake(model, ids, mask, **kw):
        seen.update(ids=ids, kw=kw, weight=getattr(layer, "base", layer).weight.detach().clone())
        return ids[:, :1]

    monkeypatch.setattr(engine_module, "generate", fake)
    return seen, layer


def test_repetition_penalty_equals_transformers_processor():
    torch.manual_seed(0)
    scores = torch.randn(3, 50) * 4
    ids = torch.randint(0, 50, (3, 12))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.1)(ids, scores.clone())
    assert torch.equal(penalize_repetition(scores, seen, 1.1), ref)


def test_generate_with_repetition_penalty_equals_transformers_generate():
    """The prompt's tokens count as transformers counts them: the same greedy tokens as its generate, and
    other tokens than without the penalty."""
    torch.manual_seed(3)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(config).eval()
    from mta.models.llama import LlamaConfig, LlamaForCausalLM
    ours = LlamaForCausalLM(LlamaConfig.from_hf_config(config.to_dict())).eval()
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k in ours.state_dict()})
    ids = torch.randint(0, 40, (1, 9))
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=3.0, pad_token_id=0,
                      eos_token_id=None)[:, 9:]
    got = generate(ours, ids, max_new_tokens=12, repetition_penalty=3.0)
    # the greedy choice is only comparable where the penalised top-2 gap exceeds rounding
    with torch.no_grad():
        logits = ours(torch.cat([ids, got], 1))[0, 8:-1].float()
    history = torch.cat([ids[0], got[0]])
    gaps = []
    for t in range(got.shape[1]):
        seen = torch.zeros(1, 40, dtype=torch.bool)
        seen[0, history[: 9 + t]] = True
        top = penalize_repetition(logits[t: t + 1], seen, 3.0).topk(2).values
        gaps.append((top[0, 0] - top[0, 1]).item())
    assert min(gaps) > 1e-4
    assert got.tolist() == ref.tolist()
    assert got.tolist() != generate(ours, ids, max_new_tokens=12).tolist()


def test_left_padding_is_not_penalised():
    torch.manual_seed(3)
    from mta.models.llama import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(1, 40, (1, 6))
    alone = generate(model, ids, max_new_tokens=6, repetition_penalty=3.0)
    padded = torch.cat([alone[:, :1].expand(1, 3), ids], 1)  # padding with the token it generates first
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    assert generate(model, padded, mask, max_new_tokens=6, repetition_penalty=3.0).tolist() == alone.tolist()


def test_authors_conditions_per_task():
    assert PAPER.test_conditions == "authors_code" and CPU.test_conditions == "ours"
    nf4 = {t: PAPER.test_conditions_for(t).nf4 for t in lamp.TASKS}
    assert nf4 == {"citation": True, "movie_tagging": True, "product_rating": True, "news_headline": False,
                   "scholarly_title": True}
    template = {t: PAPER.test_conditions_for(t).chat_template for t in lamp.TASKS}
    assert template == {"citation": True, "movie_tagging": True, "product_rating": True, "news_headline": False,
                        "scholarly_title": False}
    rating = PAPER.test_conditions_for("product_rating")
    assert rating.repetition_penalty == 1.1 and rating.max_new_tokens == 3
    ours = CPU.test_conditions_for("product_rating")
    assert not ours.nf4 and ours.repetition_penalty == 1.0 and ours.parse is None
    with pytest.raises(ValueError, match="test_conditions"):
        CPU.replace(test_conditions="authors")
    with pytest.raises(ValueError, match="test_chat_template"):
        CPU.replace(test_conditions="authors_code", test_chat_template=True)
    with pytest.raises(ValueError, match="base_quant"):
        CPU.replace(test_conditions="authors_code", base_quant="q4")


def test_template_in_training_and_not_at_test(llm_dir, monkeypatch):
    """LaMP-4 under the authors' conditions (and `test_chat_template=False` under ours): training prompts in the
    chat template, test prompts without; `chat_template=False` alone leaves both without, as before."""
    for changes in ({"test_conditions": "authors_code"}, {"test_chat_template": False}):
        engine = make_engine(llm_dir, **changes)
        start = engine.tok.token_id("<|im_start|>")
        (prompt, _), = engine.tokenize([("Team coach season.", "Goal.")])
        assert prompt[0] == start
        seen, _ = captured_generate(monkeypatch, engine)
        engine.generate(["Team coach season."])
        assert start not in seen["ids"][0].tolist()
        assert seen["ids"][0].tolist() == engine.test_tok.chat_prompt("Team coach season.")
    engine = make_engine(llm_dir, chat_template=False)
    assert engine.tokenize([("Team coach season.", "Goal.")])[0][0][0] != engine.tok.token_id("<|im_start|>")
    assert engine.test_tok.chat_format == "plain"
    engine = make_engine(llm_dir, chat_template=False, test_chat_template=True)
    assert engine.tok.chat_format == "plain" and engine.test_tok.chat_format == "chatml"


def test_nf4_base_at_decode_only_with_the_lora_unmerged(llm_dir, monkeypatch):
    engine = make_engine(llm_dir, task="citation", test_conditions="authors_code")
    inject_lora(engine.model, LoRAConfig(r=2, alpha=4.0, target_modules=("q_proj",)))
    seen, layer = captured_generate(monkeypatch, engine)
    w0, lora_a = layer.base.weight.detach().clone(), layer.lora_A.weight.detach().clone()
    engine.generate(["Team coach season."])
    assert torch.equal(seen["weight"], nf4_roundtrip(w0)) and not torch.equal(seen["weight"], w0)
    assert torch.equal(layer.base.weight, w0) and torch.equal(layer.lora_A.weight, lora_a)  # back after decoding
    assert seen["kw"]["max_new_tokens"] == 5 and seen["kw"]["repetition_penalty"] == 1.0
    head = engine.model.lm_head.weight.detach().clone()
    with nf4_base(engine.nf4_linears):
        assert torch.equal(engine.model.lm_head.weight, head)  # lm_head stays unquantised
        assert torch.equal(layer.base.weight, nf4_roundtrip(w0))
    # LaMP-4 keeps a bf16 base in the authors' script; ours never rounds
    for changes in ({"task": "news_headline", "test_conditions": "authors_code"}, {"task": "citation"}):
        engine = make_engine(llm_dir, **changes)
        seen, layer = captured_generate(monkeypatch, engine)
        w0 = layer.weight.detach().clone()
        engine.generate(["Team coach season."])
        assert torch.equal(seen["weight"], w0)


def test_nf4_rounds_the_base_not_an_adapters_own_linears(llm_dir):
    """PROPER's routers are linears of the adapter, trained in full precision: only the base is rounded."""
    engine = make_engine(llm_dir, task="citation", test_conditions="authors_code")
    mixture = next(iter(inject_mixture(engine.model, ("up_proj",), n_experts=2, r=2, alpha=4.0, n_users=1).values()))
    router, base = mixture.router_x.weight.detach().clone(), mixture.base.weight.detach().clone()
    with nf4_base(engine.nf4_linears):
        assert torch.equal(mixture.router_x.weight, router)
        assert torch.equal(mixture.base.weight, nf4_roundtrip(base))


def test_product_rating_decodes_and_parses_as_the_authors(llm_dir, monkeypatch):
    engine = make_engine(llm_dir, task="product_rating", test_conditions="authors_code")
    assert engine.task.parse is lamp.parse_rating_authors
    seen, _ = captured_generate(monkeypatch, engine)
    engine.generate(["Review: fine. Score:"])
    assert seen["kw"]["repetition_penalty"] == 1.1 and seen["kw"]["max_new_tokens"] == 3
    assert make_engine(llm_dir, task="product_rating").task.parse is lamp.parse_rating


@pytest.mark.parametrize("text, expected", [
    ("4", "4"), (" 3 ", "3"), ("4.6", "5"), ("2.5", "2"), ("3.5", "4"), ("7", "5"), ("0", "1"), ("-2", "1"),
    ("1e0", "1"), ("4/5", None), ("Score: 4", None), ("", None), ("nan", None), ("inf", None),
])
def test_parse_rating_authors(text, expected):
    """evaluate_product_rating.py: float(), Python's round (half to even), clamped to 1..5."""
    assert lamp.parse_rating_authors(text) == expected


def test_run_engine_leaves_the_templates_to_the_engine(tiny_run_inputs, tmp_path):
    from mta.run import cli
    from tests.fixtures import make_profile

    lamp_dir, llm, bert = tiny_run_inputs
    argv = ["--profile", str(make_profile(tmp_path / "tiny.json", llm, bert)), "--lamp-dir", str(lamp_dir),
            "--runs", str(tmp_path / "runs"), "--set", "chat_template=false", "--set", "test_chat_template=true"]
    run = cli.run_from_args(cli.parser("test").parse_args(argv))
    assert run.engine.tok.chat_format == "plain" and run.engine.test_tok.chat_format == "chatml"
