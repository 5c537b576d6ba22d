"""Tokenizer: GGUF rebuild, HF directories, chat formats; ids equal to transformers' on SmolLM2."""

import json

import pytest
import torch
from tokenizers import AddedToken, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from mta.models.tokenizer import LLAMA3_SPLIT, Tokenizer
from tests.fixtures import SMOLLM_FILE, smollm_dir

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "o o"]


def tiny_metadata(pre: str = "llama-bpe", specials=LLAMA3_SPECIALS, template: str = "") -> dict:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [m.replace(" ", "") for m in MERGES] + specials
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - len(specials)) + [3] * len(specials),
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": tokens.index(specials[0]),
        "tokenizer.ggml.eos_token_id": tokens.index(specials[1]),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": template,
    }


def test_gguf_rebuild_llama3_chat_format_and_roundtrip():
    tok = Tokenizer.from_gguf_metadata(tiny_metadata(template="{{ '<|start_header_id|>' }}"))
    assert tok.chat_format == "llama3"
    eot, eos = tok.token_id("<|eot_id|>"), tok.token_id("<|end_of_text|>")
    assert tok.eos_token_ids == [eot, eos] and tok.pad_token_id == eot
    text = "so the cat said hello, 12345 😀 中文\r\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.token_id("Ġthe") in ids
    prompt = tok.chat_prompt("hi", system="be brief")
    assert tok.decode(prompt, skip_special_tokens=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert prompt.count(tok.token_id("<|start_header_id|>")) == 3  # specials matched whole, not split
    ids, start = tok.chat_example("hi", "the answer", system="be brief")
    assert ids[:start] == prompt and ids[-1] == eot
    assert tok.decode(ids[start:]) == "the answer"


def test_chatml_and_plain_formats():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    template = "{{ '<|im_start|>system\nYou are terse.<|im_end|>\n' }}{{ '<|im_start|>' + role }}"
    meta = tiny_metadata(pre="smollm", specials=specials, template=template)
    meta["tokenizer.ggml.add_bos_token"] = False
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.chat_format == "chatml" and tok.default_system == "You are terse."
    assert tok.eos_token_ids[0] == tok.token_id("<|im_end|>")
    rendered = tok.decode(tok.chat_prompt("hello"), skip_special_tokens=False)
    assert rendered == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(tok.chat_prompt("hello", system=""), skip_special_tokens=False).startswith("<|im_start|>user")
    plain = Tokenizer(tok.tokenizer, "plain", bos_token="<|endoftext|>", eos_tokens=["<|endoftext|>"], add_bos=True)
    assert plain.chat_prompt("hello") == [plain.bos_token_id, *plain.encode("hello")]
    ids, start = plain.chat_example("Q: 1+1=", " 2")
    assert plain.decode(ids[start:]) == " 2" and ids[-1] == plain.token_id("<|endoftext|>")


def test_smollm_pre_tokenizer_splits_digits():
    tok = Tokenizer.from_gguf_metadata(tiny_metadata(pre="smollm"))
    pieces = [p for p, _ in tok.tokenizer.pre_tokenizer.pre_tokenize_str("abc 2024")]
    assert pieces == ["abc", "Ġ", "2", "0", "2", "4"]


def test_llama3_split_regex_matches_reference_regex():
    regex = pytest.importorskip("regex")
    tok = Tokenizer.from_gguf_metadata(tiny_metadata())
    for text in ["Hello world!! 12345 it's I'LL", "  tabs\t\tand\r\n\nnewlines  ", "emoji😀 中文字符 x=3.14"]:
        pieces = [p for p, _ in pre_tokenizers.Split(
            __import__("tokenizers").Regex(LLAMA3_SPLIT), behavior="isolated").pre_tokenize_str(text)]
        assert pieces == regex.findall(LLAMA3_SPLIT, text)
        assert tok.decode(tok.encode(text)) == text


def test_gguf_metadata_with_mismatched_token_types_fails_naming_the_source():
    meta = tiny_metadata()
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"][:-1]
    with pytest.raises(ValueError, match=r"^x\.gguf: \d+ tokenizer\.ggml\.tokens but \d+ token types$"):
        Tokenizer.from_gguf_metadata(meta, source="x.gguf")


def test_pad_left_and_right():
    tok = Tokenizer.from_gguf_metadata(tiny_metadata())
    ids, mask = tok.pad([[5, 6, 7], [8]], side="left")
    assert ids.tolist() == [[5, 6, 7], [tok.pad_token_id] * 2 + [8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = tok.pad([[5, 6, 7], [8]], side="right")
    assert ids[1].tolist() == [8] + [tok.pad_token_id] * 2 and mask.dtype == torch.long


def test_from_dir_reads_tokenizer_json_and_config(tmp_path):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    inner = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(alphabet)}, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.add_special_tokens([AddedToken(t, special=True) for t in LLAMA3_SPECIALS])
    inner.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "chat_template": "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}",
    }))
    tok = Tokenizer.from_dir(tmp_path, eos_token_ids=[inner.token_to_id("<|eot_id|>")])
    assert tok.chat_format == "llama3"
    assert tok.eos_token_ids == [inner.token_to_id("<|eot_id|>"), inner.token_to_id("<|end_of_text|>")]
    assert tok.bos_token_id == inner.token_to_id("<|begin_of_text|>") and not tok.add_bos
    with pytest.raises(FileNotFoundError, match=r"nothing/tokenizer\.json"):
        Tokenizer.from_dir(tmp_path / "nothing")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)




def test_smollm2_ids_equal_transformers_tokenizer():
    transformers = pytest.importorskip("transformers")
    from mta.models.gguf import GGUFFile

    directory = smollm_dir()
    ours = Tokenizer.from_gguf_metadata(GGUFFile(directory / SMOLLM_FILE).metadata)
    ref = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM_FILE)
    texts = [
        "Call 555-0123 before 2024-12-31, or pay $1,000,000.50!",
        "emoji 😀👍🏽🇫🇷 and café naïve",
        "中文测试，日本語のテキスト、한국어",  # noqa: RUF001 - CJK punctuation on purpose: the tokenizer must keep it
        "windows\r\nline\r\n\r\nendings\n\n  indented\ttab",
        "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
        "  leading and trailing spaces   ",
    ]
    for text in texts:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ours.chat_prompt("What is 2+2?") == list(expected)
    assert ours.eos_token_ids == [ref.convert_tokens_to_ids("<|im_end|>")]
