"""Recommend for one session: the top-N items with their text and their id, text and fused scores.

    python -m alterrec_dist.recommend --run RUN_DIR --session ITEM_ID,ITEM_ID,... [--top 10]
        [--skip-unknown] [--index exact|faiss|faiss-hnsw]      (or --export EXPORT_DIR instead of --run)

Item ids are the dataset's original ids (`item_id` in items.parquet), oldest first; the session is
cut to its last `data.max_len` items as in training. An unknown id is a one-line error (exit 2), or
is dropped with a warning under --skip-unknown.

Search. `exact` (default) scores every item in the engine's float order and ranks by (fused score
desc, item index asc), the engine's order. `faiss` is an inner-product index (IndexFlatIP: exact
inner products) over the exported `fused_vec = [id_vec, text_vec]` with the query
`[alpha*q_id, (1-alpha)*s*q_text]`; `faiss-hnsw` is an approximate HNSW graph over the same vectors,
for large catalogs. Either returns candidates that are re-ranked by the engine-order fused score.
FAISS is optional (`pip install 'alterrec_dist[faiss]'`).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch

from alterrec_dist.cli import run_cli
from alterrec_dist.errors import ConfigError, DataError
from alterrec_dist.export import Bundle, Queries, add_device_argument, encode_sessions, load_bundle, session_batch

INDEXES = ("exact", "faiss", "faiss-hnsw")
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 200, 128


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise DataError("--index faiss needs the optional faiss-cpu package: "
                        "pip install 'alterrec_dist[faiss]' (or use --index exact)") from None
    return faiss


class Searcher:
    """Top-N of the fused kind: exact engine-order scoring, or FAISS candidates re-ranked by it."""

    def __init__(self, bundle: Bundle, index: str = "exact"):
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
        """(scores (G, top), items (G, top), [id scores, text scores]), by (fused desc, index asc)."""
        top = min(top, self.bundle.num_items)
        if self.index is None:
            _, best = self.bundle.scoring().run(queries.parts, top)
            return best.scores, best.items, best.parts
        # a margin of candidates absorbs the rounding between one inner product and the engine order
        k = min(self.bundle.num_items, max(2 * top, top + 20))
        return self.bundle.scoring().rescore(queries.parts, self.candidates(queries, k), top)


@dataclass
class Recommendation:
    session: list[str]                # the known item ids used, oldest first
    skipped: list[str]                # unknown ids dropped under skip_unknown
    rows: list[dict]                  # rank, item_idx, item_id, text, fused, id, text_score


def resolve_session(bundle: Bundle, item_ids: list[str], skip_unknown: bool) -> tuple[list[int], list[str], list[str]]:
    index = bundle.index_of()
    known = [i for i in item_ids if i in index]
    unknown = [i for i in item_ids if i not in index]
    if unknown and not skip_unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise DataError(f"unknown item id(s) {shown}: not among the {bundle.num_items} items of the model's "
                        "dataset (pass --skip-unknown to drop them)")
    if not known:
        raise DataError("no known item id in the session" + (f" (all {len(unknown)} unknown)" if unknown else ""))
    return [index[i] for i in known], known, unknown


def recommend(bundle: Bundle, item_ids: list[str], top: int = 10, skip_unknown: bool = False,
              searcher: Searcher | None = None) -> Recommendation:
    history, known, unknown = resolve_session(bundle, item_ids, skip_unknown)
    queries = encode_sessions(bundle, [session_batch([history], bundle.max_len)])
    scores, items, parts = (searcher or Searcher(bundle)).search(queries, top)
    rows = []
    for rank, (i, s, a, b) in enumerate(zip(items[0].tolist(), scores[0].tolist(), parts[0][0].tolist(),
                                            parts[1][0].tolist()), 1):
        rows.append({"rank": rank, "item_idx": i, "item_id": bundle.item_ids[i], "text": bundle.texts[i],
                     "fused": s, "id": a, "text_score": b})
    return Recommendation(known, unknown, rows)


def format_recommendation(rec: Recommendation, width: int = 70) -> str:
    lines = [f"session ({len(rec.session)} items, oldest first): {' '.join(rec.session)}",
             f"{'rank':>4}  {'item_id':<14}{'fused':>11}{'id':>11}{'text':>11}  text"]
    for r in rec.rows:
        text = r["text"] if r["text"] else r["item_id"]
        text = " ".join(text.split())
        if len(text) > width:
            text = text[:width - 3] + "..."
        lines.append(f"{r['rank']:>4}  {r['item_id']:<14}{r['fused']:>11.5f}{r['id']:>11.5f}{r['text_score']:>11.5f}  {text}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m alterrec_dist.recommend", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="training run directory")
    p.add_argument("--export", help="export directory (from `python -m alterrec_dist.export`), instead of --run")
    p.add_argument("--data", help="dataset directory (default: the one the run's model names)")
    p.add_argument("--session", required=True, help="comma-separated item ids, oldest first")
    p.add_argument("--top", type=int, default=10, help="items to recommend (default 10)")
    p.add_argument("--skip-unknown", action="store_true", help="drop unknown item ids with a warning")
    p.add_argument("--index", choices=INDEXES, default="exact", help="exact (default), faiss (flat inner product) "
                   "or faiss-hnsw (approximate)")
    add_device_argument(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    item_ids = [s.strip() for s in args.session.split(",") if s.strip()]
    if not item_ids:
        raise ConfigError("--session is empty (give comma-separated item ids)")
    bundle = load_bundle(args.run, args.export, args.data, args.device)
    rec = recommend(bundle, item_ids, args.top, args.skip_unknown, Searcher(bundle, args.index))
    if rec.skipped:
        print(f"warning: skipped {len(rec.skipped)} unknown item id(s): {', '.join(rec.skipped)}", file=sys.stderr)
    print(format_recommendation(rec))
    return 0


if __name__ == "__main__":
    run_cli(main)
