"""A trained model ready to score on one process (`ScoringModel`), and its exact scorer: the engine's
ranking loop over the engine's shard layout and tiles, so ranks and top-N equal the training run's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from alterrec_dist.common.config import ModelConfig
from alterrec_dist.common.errors import DataError
from alterrec_dist.common.device import tile_rows as device_tile_rows
from alterrec_dist.data.layout import first_duplicate
from alterrec_dist.eval.evaluate import component_scores, kind_scores, rank_tiles, row_keys, tiles
from alterrec_dist.model.networks import Network
from alterrec_dist.parallel.table import Placement


# -- the bundle: everything scoring needs, from a run or from an export ------------------------

@dataclass
class ScoringModel:
    """A trained model ready to score, on one process. Item arrays are in item_idx order."""
    method: str
    model_cfg: ModelConfig
    networks: dict[str, Network]
    x: torch.Tensor | None            # (V, d) learnable ID table (None: the method has none)
    features: torch.Tensor            # (V, D) float16 frozen text features
    matrices: list[torch.Tensor]      # per component, (V, d_c): the engine's Scorer rows
    scales: list[float]               # per component logit scale
    weights: dict[str, list[float]]   # kind -> weight per component, as evaluate.Scorer
    world: int                        # training world size: the engine's shard layout
    tile_rows: int                    # eval.tile_rows as configured (0: per device, device.tile_rows)
    eval_batch_size: int
    max_len: int
    longtail_bins: list[int]
    item_ids: list[str]
    texts: list[str | None]
    popularity: np.ndarray
    provenance: dict = field(default_factory=dict)
    served: str = "fused"             # the kind it serves (ranks by): a run's chosen alpha (`from_run.served_kind`)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def device(self) -> torch.device:
        return self.features.device

    def to(self, device: torch.device | str) -> "ScoringModel":
        """Everything that scores on `device` (networks, tables, item matrices); loading is always on the CPU."""
        device = torch.device(device)
        for net in self.networks.values():
            net.to(device)
        self.x = self.x.to(device) if self.x is not None else None
        self.features = self.features.to(device)
        self.matrices = [m.to(device) for m in self.matrices]
        self.__dict__.pop("_scoring", None)
        return self

    @property
    def kinds(self) -> list[str]:
        return list(self.weights)

    @property
    def served_weights(self) -> list[float]:
        """Per component, the weight of the score it serves (`served`)."""
        return self.weights[self.served]

    def fused_vectors(self) -> torch.Tensor:
        """(V, sum d_c): [id_vec, text_vec] per item; fused score = fused_vec . Queries.fused."""
        return torch.cat(self.matrices, dim=1)

    def index_of(self) -> dict[str, int]:
        if not hasattr(self, "_index_of"):
            index = {item: i for i, item in enumerate(self.item_ids)}
            if len(index) < self.num_items:  # a dataset written before its writer refused it: one is never found
                repeated = self.item_ids[first_duplicate(pa.array(self.item_ids, type=pa.string()))]
                source = (self.provenance.get("dataset") or {}).get("path") or self.provenance.get("export", "")
                raise DataError(f"{source}: the model's items repeat the id {repeated!r} (an id names one item: "
                                "remake the dataset with prepare or synth)")
            self._index_of = index
        return self._index_of

    def scoring(self) -> "Scoring":
        if not hasattr(self, "_scoring"):
            self._scoring = Scoring(self)
        return self._scoring


# -- the item side: the engine's exact scores, ranks and top-N -------------------------------------

class Scoring:
    """Scores in the engine's float order over the engine's shard layout and tiles: the engine's own
    ranking loop (`evaluate.rank_tiles`) run over every shard's rows in turn."""

    def __init__(self, bundle: ScoringModel):
        V, W = bundle.num_items, bundle.world
        self.kinds = bundle.kinds
        self.weights = bundle.weights
        self.served = bundle.served
        self.scales = bundle.scales
        self.matrices = bundle.matrices
        self.device = bundle.device
        placement = Placement(W)
        # shard-major, as the ranks hold them
        self.ids = placement.shard_major(V, self.device)
        self.shard_matrices = [m[self.ids].contiguous() for m in bundle.matrices]
        self.keys = row_keys(bundle.matrices)  # item_idx order; shard-major below, as the ranks hold them
        self.shard_keys = self.keys[self.ids]
        tile = device_tile_rows(bundle.tile_rows, self.device, bundle.eval_batch_size)
        self.tiles = []  # (start, stop) in shard-major rows, never across a shard
        start = 0
        for r in range(W):
            n = len(placement.ids_of(r, V))
            self.tiles += tiles(n, tile, offset=start)
            start += n

    @torch.no_grad()
    def run(self, queries: list[torch.Tensor], top: int, target: torch.Tensor | None = None,
            top_kind: str | None = None) -> tuple[torch.Tensor | None, "TopN"]:
        """(counts (G, K) of items ordering before each target per kind, or None without targets;
        the top-`top` items of `top_kind` (default: the served kind) with their part scores)."""
        top_kind = top_kind or self.served
        target_scores = None
        if target is not None:
            target_scores = kind_scores(component_scores(queries, self.matrices, self.scales, target), self.weights)
        best = TopN(top, len(queries[0]), len(queries), self.device)
        counts = rank_tiles(queries, self.shard_matrices, self.scales, self.weights, self.tiles, self.ids,
                            target, target_scores, top_kind, best.add, self.shard_keys,
                            None if target is None else self.keys[target])
        return counts, best

    @torch.no_grad()
    def rescore(self, queries: list[torch.Tensor], candidates: torch.Tensor, top: int, kind: str | None = None):
        """Re-rank candidate item indices (G, C) (-1 = none) by the engine-order score of `kind` (default: the
        served kind): (scores (G, top), items (G, top), parts [(G, top)] per component)."""
        cand = candidates.clamp(min=0)
        parts = [torch.einsum("gd,gcd->gc", q, m[cand]) * sc for q, m, sc in zip(queries, self.matrices, self.scales)]
        scores = sum(w * p for w, p in zip(self.weights[kind or self.served], parts) if w)
        scores = torch.where(candidates >= 0, scores, float("-inf"))
        order = _order_desc(scores, candidates)[:, :top]
        return (scores.gather(1, order), candidates.gather(1, order), [p.gather(1, order) for p in parts])


def _order_desc(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, the column order by (score desc, id asc)."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, by_id), dim=1, descending=True, stable=True)
    return by_id.gather(1, by_score)


class TopN:
    """Running top-n per row over tiles, ordered by (score desc, item index asc): the engine's order."""

    def __init__(self, n: int, rows: int, num_parts: int, device: torch.device):
        self.n = n
        self.scores = torch.empty(rows, 0, device=device)
        self.items = torch.empty(rows, 0, dtype=torch.long, device=device)
        self.parts = [torch.empty(rows, 0, device=device) for _ in range(num_parts)]

    def add(self, scores: torch.Tensor, tile_ids: torch.Tensor, parts: list[torch.Tensor]) -> None:
        G, T = scores.shape
        k = min(self.n, T)
        threshold = scores.topk(k, dim=1).values[:, -1:]  # values are exact whatever topk's tie order
        above = scores > threshold
        tied = scores == threshold
        # fill up with the tied items of smallest index (tile ids are ascending)
        need = k - above.sum(1, keepdim=True)
        keep = above | (tied & (tied.cumsum(1) <= need))
        cols = keep.nonzero()[:, 1].view(G, k)
        self.scores = torch.cat([self.scores, scores.gather(1, cols)], 1)
        self.items = torch.cat([self.items, tile_ids[cols]], 1)
        self.parts = [torch.cat([a, p.gather(1, cols)], 1) for a, p in zip(self.parts, parts)]
        order = _order_desc(self.scores, self.items)[:, :self.n]
        self.scores, self.items = self.scores.gather(1, order), self.items.gather(1, order)
        self.parts = [p.gather(1, order) for p in self.parts]
