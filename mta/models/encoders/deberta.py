"""DeBERTa-v2/v3 encoder with disentangled attention, Hugging Face parameter names, and its SentencePiece tokenizer.

Attention adds to the content score q_i.k_j two position terms over bucketed relative distances
r = bucket(i - j): content->position q_i.Pk[r] (c2p) and position->content k_j.Pq[r] (p2c), all
divided by sqrt(head_dim * (1 + number of position terms)). Pk and Pq are the relative embeddings
projected by the key/query projections (`share_att_key`, v3) or by their own `pos_*_proj` (v2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import sentencepiece
import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from torch import nn

from mta.files import read_json


@dataclass
class DebertaV2Config:
    vocab_size: int = 128100
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    relative_attention: bool = False
    max_relative_positions: int = -1
    position_buckets: int = -1
    position_biased_input: bool = True
    pos_att_type: list[str] = field(default_factory=list)
    share_att_key: bool = False
    norm_rel_ebd: str = "none"
    pad_token_id: int = 0
    embedding_size: int | None = None
    conv_kernel_size: int = 0
    head_dim: int = 0  # derived
    att_span: int = 0  # derived: number of relative distances on each side
    scale_factor: int = 1  # derived: 1 + number of position terms

    def __post_init__(self) -> None:
        if isinstance(self.pos_att_type, str):
            self.pos_att_type = [x.strip() for x in self.pos_att_type.lower().split("|") if x.strip()]
        self.pos_att_type = list(self.pos_att_type or [])
        if unknown := set(self.pos_att_type) - {"c2p", "p2c"}:
            raise ValueError(f"pos_att_type {sorted(unknown)} not supported (only c2p and p2c)")
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only the erf 'gelu')")
        if self.conv_kernel_size > 0:
            raise ValueError("conv_kernel_size > 0 (DeBERTa-v2 xlarge's ConvLayer) is not supported")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        self.embedding_size = self.embedding_size or self.hidden_size
        self.head_dim = self.hidden_size // self.num_attention_heads
        if self.max_relative_positions < 1:
            self.max_relative_positions = self.max_position_embeddings
        self.att_span = self.position_buckets if self.position_buckets > 0 else self.max_relative_positions
        self.scale_factor = 1 + len(self.pos_att_type)

    @classmethod
    def from_hf_config(cls, config: dict | str | Path) -> DebertaV2Config:
        if not isinstance(config, dict):
            config = read_json(config)
        fields = set(cls.__dataclass_fields__) - {"head_dim", "att_span", "scale_factor"}
        return cls(**{k: v for k, v in config.items() if k in fields and v is not None})


def log_bucket_position(rel: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """Relative distances kept exact inside +-bucket_size/2, log-spaced buckets beyond."""
    sign = torch.sign(rel)
    mid = bucket_size // 2
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.full_like(rel, mid - 1), rel.abs())
    log_max = torch.log(torch.tensor((max_position - 1) / mid))  # a float32 log, as transformers rounds it
    log_pos = torch.ceil(torch.log(abs_pos / mid) / log_max * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, rel.to(log_pos.dtype), log_pos * sign).long()


def relative_positions(T: int, config: DebertaV2Config, device: torch.device) -> torch.Tensor:
    """(T, T) bucketed relative distance i - j of query i to key j."""
    pos = torch.arange(T, device=device)
    rel = pos[:, None] - pos[None, :]
    if config.position_buckets > 0:
        rel = log_bucket_position(rel, config.position_buckets, config.max_relative_positions)
    return rel


class PosIndex(NamedTuple):
    """Rows of the relative embedding table per (query i, key j): c2p uses r(i, j), p2c uses r(j, i)."""

    c2p: torch.Tensor  # (T, T)
    p2c: torch.Tensor  # (T, T)

    @classmethod
    def build(cls, T: int, config: DebertaV2Config, device: torch.device) -> tuple[PosIndex, slice]:
        """Indices into the slice of the table (2 * att_span rows) that length-T inputs reach, and that slice."""
        span = config.att_span
        rel = relative_positions(T, config, device)
        c2p, p2c = (rel + span).clamp(0, 2 * span - 1), (-rel + span).clamp(0, 2 * span - 1)
        lo, hi = int(torch.minimum(c2p, p2c).min()), int(torch.maximum(c2p, p2c).max())
        return cls(c2p - lo, p2c - lo), slice(lo, hi + 1)


class DebertaV2Embeddings(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        E = config.embedding_size
        self.word_embeddings = nn.Embedding(config.vocab_size, E, padding_idx=config.pad_token_id)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, E) if config.position_biased_input else None
        )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, E) if config.type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(E, config.hidden_size, bias=False) if config.hidden_size != E else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(torch.arange(input_ids.size(1), device=input_ids.device))
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(torch.zeros_like(input_ids))
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        return self.LayerNorm(x) * mask.unsqueeze(-1).to(x.dtype)


class DisentangledSelfAttention(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.config = config
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.key_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.value_proj = nn.Linear(config.hidden_size, config.hidden_size)
        if config.relative_attention and not config.share_att_key:
            if "c2p" in config.pos_att_type:
                self.pos_key_proj = nn.Linear(config.hidden_size, config.hidden_size)
            if "p2c" in config.pos_att_type:
                self.pos_query_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.n_heads, self.head_dim).transpose(-3, -2)  # (..., n_heads, T, head_dim)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor, pos_idx: PosIndex | None, rel_emb: torch.Tensor | None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.heads(self.query_proj(x)), self.heads(self.key_proj(x)), self.heads(self.value_proj(x))
        scale = 1.0 / math.sqrt(self.head_dim * self.config.scale_factor)
        bias = torch.zeros(B, 1, 1, T, dtype=x.dtype, device=x.device)
        if self.config.relative_attention:
            bias = bias + self.position_bias(q, k, pos_idx, rel_emb) * scale  # (B, n_heads, T, T)
        bias = bias.masked_fill(~key_mask[:, None, None, :], torch.finfo(x.dtype).min)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # (B, n_heads, T, head_dim)
        return y.transpose(1, 2).reshape(B, T, C)

    def position_bias(
        self, q: torch.Tensor, k: torch.Tensor, pos_idx: PosIndex, rel_emb: torch.Tensor
    ) -> torch.Tensor:
        """Unscaled c2p + p2c scores (B, n_heads, T, T); `pos_idx` picks rows of `rel_emb` (R, hidden)."""
        share = self.config.share_att_key
        B, H, T, _ = q.shape
        score = torch.zeros((), dtype=q.dtype, device=q.device)
        if "c2p" in self.config.pos_att_type:
            # (n_heads, R, head_dim)
            pos_k = self.heads(self.key_proj(rel_emb) if share else self.pos_key_proj(rel_emb))
            c2p = q @ pos_k.transpose(-1, -2)  # (B, n_heads, T, R)
            score = score + torch.gather(c2p, -1, pos_idx.c2p.expand(B, H, T, T))
        if "p2c" in self.config.pos_att_type:
            pos_q = self.heads(self.query_proj(rel_emb) if share else self.pos_query_proj(rel_emb))
            p2c = k @ pos_q.transpose(-1, -2)  # (B, n_heads, T_key, R)
            score = score + torch.gather(p2c, -1, pos_idx.p2c.expand(B, H, T, T)).transpose(-1, -2)
        return score


class DebertaV2SelfOutput(nn.Module):
    """Projection, residual add, then LayerNorm (post-LN); also used after the MLP."""

    def __init__(self, d_in: int, config: DebertaV2Config):
        super().__init__()
        self.dense = nn.Linear(d_in, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class DebertaV2Attention(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.self = DisentangledSelfAttention(config)
        self.output = DebertaV2SelfOutput(config.hidden_size, config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, pos_idx: PosIndex | None, rel_emb) -> torch.Tensor:
        return self.output(self.self(x, key_mask, pos_idx, rel_emb), x)


class DebertaV2Intermediate(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU


class DebertaV2Layer(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.attention = DebertaV2Attention(config)
        self.intermediate = DebertaV2Intermediate(config)
        self.output = DebertaV2SelfOutput(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, pos_idx: PosIndex | None, rel_emb) -> torch.Tensor:
        x = self.attention(x, key_mask, pos_idx, rel_emb)
        return self.output(self.intermediate(x), x)


class DebertaV2Encoder(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.layer = nn.ModuleList(DebertaV2Layer(config) for _ in range(config.num_hidden_layers))
        if config.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * config.att_span, config.hidden_size)
        norm = [x.strip() for x in config.norm_rel_ebd.lower().split("|")]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if "layer_norm" in norm else None


class DebertaV2Model(nn.Module):
    """`forward` returns last_hidden_state (B, T, hidden)."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.config = config
        self.embeddings = DebertaV2Embeddings(config)
        self.encoder = DebertaV2Encoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        key_mask = attention_mask.bool()  # (B, T)
        x = self.embeddings(input_ids, attention_mask)  # (B, T, hidden)
        pos_idx = rel_emb = None
        if self.config.relative_attention:
            pos_idx, rows = PosIndex.build(input_ids.size(1), self.config, input_ids.device)
            rel_emb = self.encoder.rel_embeddings.weight[rows]  # (R, hidden), the rows these distances use
            if self.encoder.LayerNorm is not None:
                rel_emb = self.encoder.LayerNorm(rel_emb)
        for layer in self.encoder.layer:
            x = layer(x, key_mask, pos_idx, rel_emb)
        return x


class DebertaV2Tokenizer:
    """Tokenises like transformers' `DebertaV2Tokenizer` built from `spm.model`.

    The SentencePiece model supplies the unigram vocabulary and scores; text is normalised as
    transformers does (optional lower-casing, runs of whitespace and tabs/newlines -> one space, NFC,
    right strip), split into words with a leading "▁", segmented by the unigram model, and
    wrapped as [CLS] ... [SEP], truncated to `max_length` ids. Control pieces and [UNK], [CLS], [SEP],
    [PAD], [MASK] written in the text are matched as whole tokens ([MASK] gets the id after the
    SentencePiece vocabulary when it is not in it, 128000 for v3); SentencePiece user-defined symbols are not
    (the `sentencepiece` runtime does not expose piece types), and DeBERTa-v3's vocabulary has none.
    """

    def __init__(self, spm_path: str | Path, max_length: int = 512, do_lower_case: bool = False,
                 split_by_punct: bool = False):
        sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
        vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
        self.tokenizer = Tokenizer(Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
        steps = [normalizers.Lowercase()] if do_lower_case else []
        steps += [normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "), normalizers.NFC(),
                  normalizers.Strip(left=False, right=True)]
        self.tokenizer.normalizer = normalizers.Sequence(steps)
        splits = [pre_tokenizers.Punctuation(behavior="isolated")] if split_by_punct else []
        splits.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"))
        self.tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)
        specials = [p for i, (p, _) in enumerate(vocab) if sp.is_control(i)]
        specials += [p for p in ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]") if p not in specials]
        self.tokenizer.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in specials])
        piece_id = {p: i for i, (p, _) in enumerate(vocab)}
        if "[CLS]" not in piece_id or "[SEP]" not in piece_id:
            raise ValueError(f"{spm_path}: SentencePiece model has no [CLS]/[SEP] pieces; not a DeBERTa tokenizer")
        self.tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0",
            special_tokens=[("[CLS]", piece_id["[CLS]"]), ("[SEP]", piece_id["[SEP]"])],
        )
        self.tokenizer.enable_truncation(max_length)
        self.pad_token_id = piece_id.get("[PAD]", 0)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]
