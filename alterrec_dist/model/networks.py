"""The dense part of AlterRec's networks: session encoders, the text adapter, dot or cosine scores.

Item tables are not here. The learnable ID rows X and the frozen text features F live in the
sharding layer (row-sharded across ranks) and come in as plain row tensors, so this module
knows nothing of ranks or collectives and every parameter it owns is dense and replicated.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from alterrec_dist.common.config import ModelConfig
from alterrec_dist.common.methods import method as method_of
from alterrec_dist.common.seeds import derived_seed

FUSED_KINDS = ("sum", "concat")  # NFRec: one network over rows fused from both tables
KINDS = ("id", "text", *FUSED_KINDS)
POS_INIT_STD = 0.02  # SASRec/BERT scale: positions of unit std would swamp item rows of std 0.02
MOE_EXPERTS = 8      # UniSRec's MoE adapter default (n_exps)


def _zero_key_bias_grad(grad: Tensor) -> Tensor:
    """The key bias adds the same amount to every score of a query, which softmax ignores: its true
    gradient is zero and what arrives is rounding noise, which Adam would blow up into lr-sized
    steps (and which differs with the world size). Make it exactly zero."""
    grad = grad.clone()
    third = len(grad) // 3
    grad[third:2 * third] = 0
    return grad


class LengthGroup(NamedTuple):
    """Sessions of similar length laid out as one (b_g, L_g) attention grid."""
    shape: tuple[int, int]           # (sessions, grid length)
    real: tuple[Tensor, Tensor]      # the grid's real positions (session in the group, position)
    tokens: Tensor                   # their rows in the packed (n, dim) layout, in the same order


def length_groups(mask: Tensor) -> list[LengthGroup]:
    """The sessions of a left-aligned batch grouped by length, each group in a grid as long as its longest
    power of two (capped at the window): attention costs L^2 per session, and most sessions are far shorter
    than the window while a batch's longest is often the whole window (Scientific: mean 4 of 50, 99th
    percentile 23), so one padded grid spent nearly all of attention's work on padding."""
    lengths = mask.sum(1)
    starts = lengths.cumsum(0) - lengths  # session i's tokens are packed rows starts[i] .. starts[i] + len - 1
    groups, low, window = [], 0, mask.shape[1]
    while low < window:
        high = min(max(2 * low, 1), window)
        members = ((lengths > low) & (lengths <= high)).nonzero().squeeze(1)
        if len(members):
            real = mask[members, :high].nonzero(as_tuple=True)
            groups.append(LengthGroup((len(members), high), real, starts[members][real[0]] + real[1]))
        low = high
    return groups


class SessionEncoder(nn.Module):
    """g(s, rows): a session's item rows -> one session embedding.

    rows (b, L, dim) are LEFT-aligned, oldest first; mask (b, L) marks real items (>= 1 per row).
    "transformer" is SASRec-shaped (as RecBole's, the baseline we compare with): learned positions,
    LayerNorm + dropout, post-norm GELU layers with a 4*dim feed-forward, causal attention, and
    the output at the last real position.
    """

    def __init__(self, dim: int, kind: str, max_len: int, layers: int, heads: int, dropout: float):
        super().__init__()
        if kind not in ("mean", "transformer"):
            raise ValueError(f"encoder kind must be mean or transformer, got {kind!r}")
        self.kind = kind
        self.drop = nn.Dropout(dropout)
        if kind == "transformer":
            self.pos = nn.Embedding(max_len, dim)
            nn.init.normal_(self.pos.weight, std=POS_INIT_STD)
            self.norm = nn.LayerNorm(dim)
            layer = nn.TransformerEncoderLayer(
                dim, heads, dim_feedforward=4 * dim, dropout=dropout, activation="gelu", batch_first=True
            )
            # no nested-tensor fast path: padded and unpadded batches must take the same kernels
            self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            for block in self.layers.layers:
                block.self_attn.in_proj_bias.register_hook(_zero_key_bias_grad)

    def hidden(self, rows: Tensor, mask: Tensor) -> Tensor:
        """Transformer outputs at every real position (b, L, dim), zeros at the padding; position t
        sees items 0..t only."""
        real = mask.nonzero(as_tuple=True)
        out = rows.new_zeros(rows.shape)
        out[real] = self._packed(rows, mask, real)
        return out

    def _packed(self, rows: Tensor, mask: Tensor, real: tuple[Tensor, Tensor]) -> Tensor:
        """The stock post-norm layers (nn.TransformerEncoderLayer's own weights and dropouts), with every
        per-token step on the real positions only, packed (n, dim): sessions here average ~4 items in a
        window of 50, so the padded layout spent >90% of the projections and feed-forward on padding.
        Attention runs per length group (`length_groups`), where left alignment + the causal mask keep every
        real query on real keys. (Finding the real positions is a few host reads per batch on a GPU.)"""
        groups = length_groups(mask)
        x = self.drop(self.norm(rows[real] + self.pos.weight[real[1]]))
        for block in self.layers.layers:
            x = block.norm1(x + block.dropout1(self._attend(block.self_attn, x, groups)))
            x = block.norm2(x + block.dropout2(block.linear2(block.dropout(block.activation(block.linear1(x))))))
        return x

    def _attend(self, attn: nn.MultiheadAttention, x: Tensor, groups: list[LengthGroup]) -> Tensor:
        """nn.MultiheadAttention's causal self-attention with q, k, v projected on the packed tokens."""
        heads, dim = attn.num_heads, x.shape[1]
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        o = qkv.new_empty(x.shape)  # qkv's dtype: bf16 under autocast, where x stays fp32
        for g in groups:
            grid = qkv.new_zeros(*g.shape, 3 * dim)
            grid[g.real] = qkv[g.tokens]
            q, k, v = grid.view(*g.shape, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)  # (b_g, heads, L_g, ...)
            drop = attn.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
            o[g.tokens] = out.transpose(1, 2).reshape(*g.shape, dim)[g.real]
        return attn.out_proj(o)

    def forward(self, rows: Tensor, mask: Tensor) -> Tensor:
        if self.kind == "mean":
            # A masked sum over the padded (b, L, dim) rows: selecting the real positions first would do less
            # arithmetic but read their count on the host (a GPU stall every step).
            real = mask.unsqueeze(-1).to(rows.dtype)
            return (self.drop(rows) * real).sum(1) / real.sum(1)
        real = mask.nonzero(as_tuple=True)  # row-major: each session's items contiguous, oldest first
        last = mask.sum(1).cumsum(0) - 1     # so the newest item of session i is packed row last[i]
        return self._packed(rows, mask, real)[last]


class Whitening(nn.Module):
    """UniSRec's parametric whitening: (f - b) W. Sentence embeddings are anisotropic (all items close
    to one mean direction); the learned shift b takes that common part out before the projection."""

    def __init__(self, text_dim: int, dim: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.shift = nn.Parameter(torch.zeros(text_dim, device="cpu"))  # built on the CPU as every layer; .to moves it
        self.proj = nn.Linear(text_dim, dim, bias=False)

    def forward(self, f: Tensor) -> Tensor:
        return self.proj(self.drop(f) - self.shift)


class MoEWhitening(nn.Module):
    """UniSRec's MoE adapter: MOE_EXPERTS whitenings mixed by a softmax gate on the features."""

    def __init__(self, text_dim: int, dim: int, dropout: float):
        super().__init__()
        self.experts = nn.ModuleList(Whitening(text_dim, dim, dropout) for _ in range(MOE_EXPERTS))
        self.gate = nn.Linear(text_dim, MOE_EXPERTS, bias=False)

    def forward(self, f: Tensor) -> Tensor:
        weights = self.gate(f).softmax(-1)                           # (n, E)
        outs = torch.stack([e(f) for e in self.experts], dim=-2)     # (n, E, d)
        return (weights.unsqueeze(-1) * outs).sum(-2)


def text_adapter(cfg: ModelConfig, text_dim: int) -> nn.Module:
    """Frozen text features -> item rows of width cfg.dim (model.text_adapter)."""
    d = cfg.dim
    if cfg.text_adapter == "whitening":
        return Whitening(text_dim, d, cfg.dropout)
    if cfg.text_adapter == "moe":
        return MoEWhitening(text_dim, d, cfg.dropout)
    if cfg.text_hidden == 0:
        return nn.Linear(text_dim, d)
    h = cfg.text_hidden
    return nn.Sequential(nn.Linear(text_dim, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, d))


class Network(nn.Module):
    """One network of AlterRec: item rows from the tables, a session encoder, dot or cosine scores
    (`model.id_logits`, `model.text_logits`).

    kind: "id" (rows = X), "text" (rows = A(F), A the text adapter `model.text_adapter`), "sum" (NFRec:
    rows = X + A(F)), "concat" (NFRec: rows = [X, A(F)], width 2d).
    """

    def __init__(self, kind: str, cfg: ModelConfig, text_dim: int, max_len: int):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"network kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.dim = kind, cfg.dim
        d = cfg.dim
        if self.uses_text:
            self.text_mlp = text_adapter(cfg, text_dim)  # the name of today's checkpoints, whatever the adapter
        # The official code normalises both tables' rows; one LayerNorm per table since X and
        # MLP(F) have unrelated scales.
        self.id_norm = nn.LayerNorm(d) if cfg.item_layernorm and self.uses_id else None
        self.text_norm = nn.LayerNorm(d) if cfg.item_layernorm and self.uses_text else None
        self.out_dim = 2 * d if kind == "concat" else d
        self.logit_scale = 1.0 / (cfg.text_temperature if kind == "text" else cfg.id_temperature)
        # cosine: unit item rows and unit queries, so every path that scores q @ rows.T * logit_scale
        # (training, mining, evaluation) gets cosine / temperature; NFRec's kinds stay dot (config checks)
        self.cosine = (cfg.text_logits if kind == "text" else cfg.id_logits) == "cosine"
        self.encoder = SessionEncoder(self.out_dim, cfg.encoder, max_len, cfg.layers, cfg.heads, cfg.dropout)

    @property
    def fused(self) -> bool:
        return self.kind in FUSED_KINDS

    @property
    def uses_id(self) -> bool:
        return self.kind == "id" or self.fused

    @property
    def uses_text(self) -> bool:
        return self.kind == "text" or self.fused

    def _id_part(self, x: Tensor) -> Tensor:
        return self.id_norm(x) if self.id_norm is not None else x

    def _text_part(self, f: Tensor) -> Tensor:
        h = self.text_mlp(f)
        return self.text_norm(h) if self.text_norm is not None else h

    def part_rows(self, x: Tensor | None, f: Tensor | None) -> tuple[Tensor, Tensor]:
        """NFRec only: the (id part, text part) of the item rows, each (n, d)."""
        assert self.fused, "part_rows is for the NFRec kinds"
        return self._id_part(x), self._text_part(f)

    def item_rows(self, x: Tensor | None, f: Tensor | None) -> Tensor:
        """x (n, d) ID rows, f (n, D) float text features -> (n, out_dim) rows to score against."""
        if self.kind == "id":
            return self._unit(self._id_part(x))
        if self.kind == "text":
            return self._unit(self._text_part(f))
        return self.join_parts(*self.part_rows(x, f))

    def _unit(self, v: Tensor) -> Tensor:
        """Rows over their norms. A zero row (an item without text, through a whitening) stays zero with the
        gradient of the identity: `F.normalize` divides it by eps = 1e-12, whose gradient (about 1e10 on the
        adapter's shift, measured) fills AdamW's second moment and freezes that parameter for thousands of
        steps. Other rows come out as `F.normalize` makes them."""
        if not self.cosine:
            return v
        norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        return v / torch.where(norm > 0, norm, 1.0)

    def join_parts(self, id_part: Tensor, text_part: Tensor) -> Tensor:
        """NFRec only: the item rows from their (id, text) parts, by sum or concatenation."""
        return id_part + text_part if self.kind == "sum" else torch.cat([id_part, text_part], dim=-1)

    def part_queries(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """NFRec only: the query halves so that y = y_id + y_text (paper App. B)."""
        if self.kind == "sum":
            return q, q
        assert self.kind == "concat", "part_queries is for the NFRec kinds"
        return q[:, : self.dim], q[:, self.dim :]

    def encode(self, rows: Tensor, mask: Tensor) -> Tensor:
        """rows (b, L, out_dim) of the session's items, mask (b, L) -> queries (b, out_dim)."""
        return self._unit(self.encoder(rows, mask))

    def logits(self, q: Tensor, rows: Tensor) -> Tensor:
        """(b, n) scores, divided by the network's temperature (cosine ones: q and rows are unit already)."""
        scores = q @ rows.T
        return scores if self.logit_scale == 1.0 else scores * self.logit_scale  # x * 1.0 == x: skip a pass over G x V

    def dense_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())


def text_init_rows(x: Tensor, f: Tensor, mean: Tensor, std: float, seed: int) -> Tensor:
    """ID rows started from the text (model.id_init = "text", as LLM2SASRec): each item's centred
    features (f - mean) through one fixed random projection, scaled to the norm an N(0, std) row has
    (std * sqrt(d)). The projection depends on the seed alone and a row on its own item's features,
    so every world size starts item i alike. Items without text (all-zero features) keep their row in x."""
    g = torch.Generator(device="cpu").manual_seed(derived_seed(seed, 7))  # CPU draws: the same on any device
    proj = torch.randn(f.shape[1], x.shape[1], generator=g, device="cpu").to(f.device)
    rows = nn.functional.normalize((f - mean) @ proj, dim=1) * (std * x.shape[1] ** 0.5)
    has_text = (f != 0).any(1, keepdim=True)
    return torch.where(has_text, rows, x)


def build_networks(method: str, cfg: ModelConfig, text_dim: int, max_len: int) -> dict[str, Network]:
    """The networks a method trains (`methods.Method.networks`), built in a fixed order so a seeded build
    is reproducible."""
    return {name: Network(kind, cfg, text_dim, max_len) for name, kind in method_of(method).networks.items()}
