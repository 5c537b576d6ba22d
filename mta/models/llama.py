"""Llama-family causal LM (Llama 2/3/3.1, SmolLM2) in plain PyTorch, with Hugging Face parameter names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mta.files import read_json
from mta.ops.attention import gemm_attention
from mta.precision import gemm_input


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type == "default":
                self.rope_scaling = None
            elif rope_type != "llama3":
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported (only 'llama3')")
            else:
                self.rope_scaling = {**self.rope_scaling, "rope_type": "llama3"}

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_config(cls, config: dict | str | Path) -> LlamaConfig:
        """Build from a Hugging Face `config.json` (a dict, the file, or its directory)."""
        source = "config"
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            source = str(path)
            config = read_json(path)
        model_type = config.get("model_type")
        architectures = config.get("architectures") or []
        if model_type != "llama" and "LlamaForCausalLM" not in architectures:
            raise ValueError(f"{source}: model_type {model_type!r} is not a Llama model")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (only 'silu')")
        if "rope_parameters" in config:  # transformers >= 5 folds rope_theta into rope_parameters
            rope = dict(config["rope_parameters"] or {})
            rope_theta = rope.pop("rope_theta", 10000.0)
            rope_scaling = rope or None
        else:
            rope_theta = config.get("rope_theta", 10000.0)
            rope_scaling = config.get("rope_scaling")
        fields = {k: config[k] for k in cls.__dataclass_fields__ if k in config}
        fields.update(rope_theta=float(rope_theta), rope_scaling=rope_scaling)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), fp32, with Llama-3.1 frequency scaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if config.rope_scaling is None:
        return inv_freq
    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x / sqrt(mean(x^2) + eps), in fp32
        return gemm_input(self.weight * h.to(x.dtype))  # read by projections only: under autocast, cast once


class KVCache:
    """Preallocated keys/values for every layer; the first `length` positions are filled."""

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0

    def rows(self, index: slice) -> KVCache:
        """The same cache restricted to rows `index` (views: what it stores lands in this cache), at `length`."""
        view = object.__new__(KVCache)
        view.k, view.v, view.length = [k[index] for k in self.k], [v[index] for v in self.v], self.length
        return view

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def attention(q, k, v, mask, is_causal: bool, n_rep: int) -> torch.Tensor:
    """Scaled dot-product attention; GQA: query heads h*n_rep .. (h+1)*n_rep-1 share kv head h (no copies).

    Under CPU bf16 autocast a forward of more than one query position (training, scoring, prefill) runs as bf16
    GEMMs (`mta.ops.attention`, 2.5-3x faster there than the flash kernel), and a one-token decode step as SDPA
    in fp32 (its flash kernel is faster in fp32 than in bf16, and the fp32 KV cache is not recast).
    """
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            if q.shape[2] > 1:
                dtype = torch.get_autocast_dtype("cpu")
                return gemm_attention(q.to(dtype), k.to(dtype), v.to(dtype), None if is_causal else mask)
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                  is_causal=is_causal, enable_gqa=n_rep > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=n_rep > 1)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.n_rep = config.n_rep
        q_dim = config.num_attention_heads * config.head_dim
        kv_dim = config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, cos, sin, mask, is_causal, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, S, hd)
        y = gemm_input(attention(q, k, v, mask, is_causal, self.n_rep))  # (B, n_heads, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) padding mask -> (B, S) positions counting only kept tokens, as if each row were unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_bias_mask(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """(B, S) padding mask -> (B, 1, T, S) bool mask for the last T queries: causal, keys kept by the mask.

    Each query may always see its own key, so fully padded rows stay finite (their outputs are ignored).
    """
    S = attention_mask.shape[1]
    q_pos = torch.arange(S - T, S, device=attention_mask.device)[:, None]
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]
    mask = (k_pos <= q_pos) & attention_mask.bool()[:, None, None, :]
    return mask | (k_pos == q_pos)


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.inv_freq = rope_inv_freq(config)  # fp32 on purpose: not a buffer, so .to(dtype) leaves it alone

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden) for input_ids (B, T).

        attention_mask (B, S), 1 = keep, covers the cached tokens plus the new ones (S = cache.length + T).
        Positions default to counting kept tokens, so left padding does not shift them.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if attention_mask is not None and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            attention_mask = None  # (a data-dependent branch: compiled code keeps the mask)
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, S, device=input_ids.device).expand(B, T)
            else:
                position_ids = position_ids_from_mask(attention_mask)[:, -T:]
        if attention_mask is not None:
            mask, is_causal = attention_bias_mask(attention_mask, T), False
        elif past and T > 1:  # a chunk after cached tokens: causal with an offset
            mask, is_causal = attention_bias_mask(torch.ones(B, S, dtype=torch.bool, device=input_ids.device), T), False
        else:
            mask, is_causal = None, T > 1

        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        inv_freq = self.inv_freq.to(x.device)
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, is_causal, cache)
        if cache is not None:
            cache.length = S
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the input embedding with lm_head when the config asks for it (call again after assign-loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden), before lm_head (e.g. to apply it on response positions only)."""
        return self.model(input_ids, attention_mask, cache, position_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in the model dtype."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache, position_ids))
