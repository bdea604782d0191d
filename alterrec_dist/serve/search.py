"""Top-N for one session: exact (the engine's order) or through a FAISS inner-product index, re-ranked exactly."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.eval.evaluate import COMPONENTS
from alterrec_dist.serve.queries import Queries, encode_sessions, session_batch
from alterrec_dist.serve.scoring_model import ScoringModel


HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 200, 128
INDEXES = ("exact", "faiss", "faiss-hnsw")


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise DataError("--index faiss needs the optional faiss-cpu package: "
                        "pip install 'alterrec_dist[faiss]' (or use --index exact)") from None
    return faiss


class Searcher:
    """Top-N of the fused kind: exact engine-order scoring, or FAISS candidates re-ranked by it."""

    def __init__(self, bundle: ScoringModel, index: str = "exact"):
        if index not in INDEXES:
            raise ConfigError(f"--index must be one of {', '.join(INDEXES)}, got {index!r}")
        self.bundle, self.kind = bundle, index
        self.index = None
        if index != "exact":
            faiss = import_faiss()
            vectors = np.ascontiguousarray(bundle.fused_vectors().cpu().numpy(), dtype=np.float32)
            d = vectors.shape[1]
            if index == "faiss":
                self.index = faiss.IndexFlatIP(d)
            else:
                self.index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
                self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
                self.index.hnsw.efSearch = HNSW_EF_SEARCH
            self.index.add(vectors)

    def candidates(self, queries: Queries, k: int) -> torch.Tensor:
        """(G, k) item indices from the index by the single fused inner product (-1 where none)."""
        _, ids = self.index.search(np.ascontiguousarray(queries.fused.cpu().numpy(), dtype=np.float32), k)
        return torch.from_numpy(ids.astype(np.int64)).to(self.bundle.device)

    def search(self, queries: Queries, top: int):
        """(scores (G, top), items (G, top), [id scores, text scores]), by (fused desc, index asc). An HNSW
        index may find fewer than `top`: item -1 with score -inf fills the rest of a row."""
        top = min(top, self.bundle.num_items)
        if self.index is None:
            _, best = self.bundle.scoring().run(queries.parts, top)
            return best.scores, best.items, best.parts
        # a margin of candidates absorbs the rounding between one inner product and the engine order
        k = min(self.bundle.num_items, max(2 * top, top + 20))
        return self.bundle.scoring().rescore(queries.parts, self.candidates(queries, k), top)


@dataclass
class Recommendation:
    session: list[str]                # the known item ids used, oldest first (the last max_len the model reads)
    skipped: list[str]                # unknown ids dropped under skip_unknown
    cut: int                          # known ids older than those, which the model does not read (data.max_len)
    components: list[str]             # the components the served score weighs (an ID-only model: just "id")
    rows: list[dict]                  # rank, item_idx, item_id, text, fused, scores (component -> scaled score)


def resolve_session(bundle: ScoringModel, item_ids: list[str], skip_unknown: bool) -> tuple[list[int], list[str], list[str]]:
    index = bundle.index_of()
    known = [i for i in item_ids if i in index]
    unknown = [i for i in item_ids if i not in index]
    if unknown and not skip_unknown:
        shown = ", ".join(map(repr, unknown[:5])) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise DataError(f"unknown item id(s) {shown}: not among the {bundle.num_items} items of the model's "
                        "dataset (pass --skip-unknown to drop them)")
    if not known:
        raise DataError("no known item id in the session" + (f" (all {len(unknown)} unknown)" if unknown else ""))
    return [index[i] for i in known], known, unknown


def recommend(bundle: ScoringModel, item_ids: list[str], top: int = 10, skip_unknown: bool = False,
              searcher: Searcher | None = None) -> Recommendation:
    history, known, unknown = resolve_session(bundle, item_ids, skip_unknown)
    queries = encode_sessions(bundle, [session_batch([history], bundle.max_len)])
    scores, items, parts = (searcher or Searcher(bundle)).search(queries, top)
    # a component the served score gives no weight (a lone network's never-trained other one) is not shown
    shown = [c for c, w in zip(COMPONENTS, bundle.served_weights) if w]
    part_of = {c: p[0].tolist() for c, p in zip(COMPONENTS, parts)}
    # an approximate index may find fewer candidates than asked (-1, ranked last): they are not items
    rows = [{"rank": rank, "item_idx": i, "item_id": bundle.item_ids[i], "text": bundle.texts[i], "fused": s,
             "scores": {c: part_of[c][rank - 1] for c in shown}}
            for rank, (i, s) in enumerate(zip(items[0].tolist(), scores[0].tolist()), 1) if i >= 0]
    used = known[-bundle.max_len:]  # what session_batch keeps: the most recent max_len items
    return Recommendation(used, unknown, len(known) - len(used), shown, rows)
