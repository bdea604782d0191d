"""The query side, one function for recommend, batch scoring and serving: sessions -> the engine's queries."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alterrec_dist.common.errors import DataError
from alterrec_dist.data.reader import Batch, Rows, to_batch
from alterrec_dist.eval.evaluate import session_queries
from alterrec_dist.serve.scoring_model import ScoringModel


# -- the query side: one function for recommend, batch scoring and serving ----------------------

class LocalTable:
    """The whole item table on one process, shaped like `ShardedItemTable` for the engine's
    `session_queries` (fetch: distinct ids, their rows, the inverse) and `item_matrix`."""

    def __init__(self, x: torch.Tensor | None, features: torch.Tensor):
        self.x, self.features = x, features
        self.num_local = len(features)

    def fetch(self, ids: torch.Tensor, need_x: bool, need_f: bool):
        uniq, inverse = torch.unique(ids, return_inverse=True)
        x = self.x[uniq] if need_x else None
        f = self.features[uniq].float() if need_f else None
        return x, f, inverse


@dataclass
class Queries:
    parts: list[torch.Tensor]         # per component (G, d_c)
    scales: list[float]
    fused_weights: list[float]

    @property
    def fused(self) -> torch.Tensor:
        """(G, sum d_c): [w_id*s_id*q_id, w_text*s_text*q_text]; fused_vec . this = the fused score."""
        return fused_query(self.parts, self.scales, self.fused_weights)


def fused_query(parts: list[torch.Tensor], scales: list[float], weights: list[float]) -> torch.Tensor:
    return torch.cat([(w * s) * q for q, s, w in zip(parts, scales, weights)], dim=1)


@torch.no_grad()
def encode_sessions(bundle: ScoringModel, batches: list[Batch]) -> Queries:
    """The session queries of the rows of `batches` (concatenated in order), by the engine's own
    `evaluate.session_queries` on a one-process table. Pass the engine's per-rank slices of a
    global eval batch (see batch_input.local_batches) to reproduce its queries bit for bit."""
    table = LocalTable(bundle.x, bundle.features)
    per_batch = [session_queries(bundle.networks, table, b.to(bundle.device)) for b in batches]
    parts = [torch.cat(qs) for qs in zip(*per_batch)]
    return Queries(parts, bundle.scales, bundle.served_weights)


def session_batch(histories: list[list[int]], max_len: int) -> Batch:
    """Left-aligned batch of item_idx histories (each cut to its last max_len items), as the reader: on the
    host, as the reader's (`Batch.to` moves it)."""
    hist = [h[-max_len:] for h in histories]
    if any(not h for h in hist):
        raise DataError("empty session")
    n = len(hist)
    offsets = np.cumsum([0] + [len(h) for h in hist], dtype=np.int64)
    values = np.fromiter((i for h in hist for i in h), dtype=np.int64, count=int(offsets[-1]))
    return to_batch(Rows(np.arange(n, dtype=np.int64), offsets, values, np.zeros(n, dtype=np.int64)),
                    np.ones(n, dtype=bool))
