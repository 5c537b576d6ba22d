"""Tokenizer: a `tokenizers.Tokenizer` plus special tokens and chat formats (llama3, chatml, plain)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from mta.files import read_json

CHAT_FORMATS = ("llama3", "chatml", "plain")

# Pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` name (byte-level BPE vocabularies).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_TOKENIZERS = {
    "llama-bpe": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]),
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}


class Tokenizer:
    """Encode/decode text and render chat turns to ids.

    `chat_format` is one of CHAT_FORMATS; `default_system` is the system prompt the model's own template
    inserts when none is given (SmolLM2 has one, Llama-3 has none).
    """

    def __init__(
        self,
        tokenizer: HFTokenizer,
        chat_format: str,
        bos_token: str | None,
        eos_tokens: list[str],
        pad_token: str | None = None,
        add_bos: bool = False,
        default_system: str | None = None,
    ):
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format {chat_format!r} is not one of {CHAT_FORMATS}")
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.add_bos = add_bos
        self.default_system = default_system
        self.bos_token_id = self.token_id(bos_token) if bos_token else None
        self.eos_token_ids = list(dict.fromkeys(self.token_id(t) for t in eos_tokens))
        self.pad_token_id = self.token_id(pad_token) if pad_token else self.eos_token_ids[0]

    def token_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        """The token that ends an assistant turn in this chat format (training target end)."""
        return self.eos_token_ids[0]

    def encode(self, text: str) -> list[int]:
        """Ids for `text`; special tokens written in the text are recognised, nothing is added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _prompt_text(self, user: str, system: str | None) -> str:
        system = self.default_system if system is None else system
        if self.chat_format == "llama3":
            text = "<|begin_of_text|>"
            if system:
                text += f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
            return text + f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>" \
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
        if self.chat_format == "chatml":
            text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
            return text + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        return user

    def chat_prompt(self, user: str, system: str | None = None) -> list[int]:
        """Ids of one user turn followed by the assistant generation prompt."""
        ids = self.encode(self._prompt_text(user, system))
        if self.chat_format == "plain" and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def chat_example(self, user: str, response: str, system: str | None = None) -> tuple[list[int], int]:
        """(ids, start) for training: prompt ids, then the response ids and the end-of-turn token.

        ids[start:] is the response part (the loss targets). Prompt and response are encoded separately,
        so the prompt ids are exactly what `chat_prompt` gives at generation time.
        """
        prompt = self.chat_prompt(user, system)
        return prompt + self.encode(response) + [self.eos_token_id], len(prompt)

    def pad(self, sequences: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """Pad id lists into (input_ids, attention_mask), both (B, T) long; left padding for generation."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, span] = torch.tensor(s, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, source: str = "GGUF") -> Tokenizer:
        """Rebuild a byte-level BPE tokenizer from llama.cpp's `tokenizer.ggml.*` metadata."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{source}: tokenizer.ggml.model {model!r} is not supported (only byte-level BPE 'gpt2')")
        pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
        if pre not in _GGUF_PRE_TOKENIZERS:
            raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported ({sorted(_GGUF_PRE_TOKENIZERS)})")
        tokens = metadata["tokenizer.ggml.tokens"]
        types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"{source}: {len(tokens)} tokenizer.ggml.tokens but {len(types)} token types")
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
        tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = _GGUF_PRE_TOKENIZERS[pre]()
        tok.decoder = decoders.ByteLevel()
        # Token types 3 (control) and 4 (user-defined) are matched whole in text, never split by BPE.
        tok.add_special_tokens([
            AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty in (3, 4)
        ])

        def name(key):
            i = metadata.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        template = metadata.get("tokenizer.chat_template", "")
        chat_format = _chat_format(template)
        eos = [name("tokenizer.ggml.eos_token_id"), name("tokenizer.ggml.eot_token_id")]
        return cls(
            tok,
            chat_format,
            bos_token=name("tokenizer.ggml.bos_token_id"),
            eos_tokens=_eos_tokens(chat_format, [t for t in eos if t]),
            pad_token=name("tokenizer.ggml.padding_token_id"),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
            default_system=_default_system(template),
        )

    @classmethod
    def from_dir(cls, directory: str | Path, eos_token_ids: list[int] | None = None) -> Tokenizer:
        """From a Hugging Face directory: tokenizer.json plus tokenizer_config.json (special tokens, template)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path) if config_path.exists() else {}

        def content(token):
            return token.get("content") if isinstance(token, dict) else token

        template = config.get("chat_template") or ""
        if isinstance(template, list):  # named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), "")
        chat_format = _chat_format(template)
        eos = [content(config.get("eos_token"))] + [tok.id_to_token(i) for i in eos_token_ids or []]
        bare, marked = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
        return cls(
            tok,
            chat_format,
            bos_token=content(config.get("bos_token")),
            eos_tokens=_eos_tokens(chat_format, [t for t in eos if t]),
            pad_token=content(config.get("pad_token")),
            add_bos=len(marked) > len(bare),
            default_system=_default_system(template),
        )


def _chat_format(template: str) -> str:
    """The format a model's own chat template uses; plain when it has none."""
    if "<|start_header_id|>" in template:
        return "llama3"
    if "<|im_start|>" in template:
        return "chatml"
    return "plain"


def _eos_tokens(chat_format: str, eos: list[str]) -> list[str]:
    """The end-of-turn token of the chat format first, then the checkpoint's own end tokens."""
    turn_end = {"llama3": ["<|eot_id|>"], "chatml": ["<|im_end|>"], "plain": []}[chat_format]
    return turn_end + eos


def _default_system(template: str) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none (e.g. SmolLM2's)."""
    m = re.search(r"<\|im_start\|>system(?:\\n|\n)(.+?)<\|im_end\|>", template)
    return m.group(1) if m and "{{" not in m.group(1) else None
