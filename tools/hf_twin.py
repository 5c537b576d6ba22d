"""The benchmarks' `transformers` side: a LlamaForCausalLM holding exactly our model's weights."""

from __future__ import annotations

import importlib
import sys

import torch
from torch import nn


def hf_twin(ours: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """transformers' LlamaForCausalLM of `ours`'s config with its weights (HF parameter names: an identity map,
    every tensor loaded, strictly), in `dtype` (default: ours'), eval mode, SDPA attention."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        sys.exit("the reference side needs transformers: pip install -e '.[test]'")
    c = ours.config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, attn_implementation="sdpa",
    )
    ref = transformers.LlamaForCausalLM(config).to(dtype or next(ours.parameters()).dtype)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref.eval()
