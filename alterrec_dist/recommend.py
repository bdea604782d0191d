"""Recommend for one session: the top-N items with their text, their fused score and the component scores it
weighs (id and text; a lone network's model shows its own only).

The fused score is the one the model serves: at the alpha its run chose on validation (summary.json's
`alpha.chosen`), or `eval.alpha` where the run chose none.

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
import json
import sys

from alterrec_dist.common.cli import ArgumentParser, add_device_argument, add_model_arguments, run_cli
from alterrec_dist.common.errors import ConfigError
from alterrec_dist.serve.export_dir import load_scoring_model
from alterrec_dist.serve.search import INDEXES, Recommendation, Searcher, recommend


NO_TEXT = "(no text)"


def shown(value: str) -> str:
    """`value` as the terminal may print it: a character that is not printable (an escape sequence in a catalog's
    text or ids would retitle or recolour the terminal) as its Python escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


def format_recommendation(rec: Recommendation, width: int = 70) -> str:
    lines = [f"session ({len(rec.session)} items, oldest first): {shown(' '.join(rec.session))}",
             f"{'rank':>4}  {'item_id':<14}{'fused':>11}" + "".join(f"{c:>11}" for c in rec.components) + "  item text"]
    for r in rec.rows:
        text = shown(" ".join((r["text"] or "").split())) or NO_TEXT  # not the id: beside it, it read as its text
        if len(text) > width:
            text = text[:width - 3] + "..."
        scores = "".join(f"{r['scores'][c]:>11.5f}" for c in rec.components)
        lines.append(f"{r['rank']:>4}  {shown(r['item_id']):<14}{r['fused']:>11.5f}{scores}  {text}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m alterrec_dist.recommend", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--session", required=True, help="comma-separated item ids, oldest first (spaces around an id are "
                   "dropped unless the id holds them); a value in [ ] is a JSON list of them, for ids that hold a "
                   "comma")
    p.add_argument("--top", type=int, default=10, help="items to recommend (default 10)")
    p.add_argument("--skip-unknown", action="store_true", help="drop unknown item ids with a warning")
    p.add_argument("--index", choices=INDEXES, default="exact", help="exact (default), faiss (flat inner product) "
                   "or faiss-hnsw (approximate)")
    add_device_argument(p)
    return p.parse_args(argv)


def session_ids(session: str) -> list[str]:
    """--session's ids as given (`as_known` strips them where only that names an item): a value in [ ] is a JSON
    list of strings, for ids that hold a comma (a mistyped one is an error, not other ids); else comma-separated."""
    if not (session.strip().startswith("[") and session.strip().endswith("]")):
        return [i for i in session.split(",") if i.strip()]
    try:
        ids = json.loads(session)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--session: not a JSON list of item ids ({e})") from None
    if not all(isinstance(i, str) for i in ids):
        raise ConfigError("--session: a JSON list of item ids holds strings only")
    return [i for i in ids if i]


def as_known(item_ids: list[str], known: dict[str, int]) -> list[str]:
    """Each id as the model knows it: as given when it names an item (" x" and "x" may both be ids), else without
    its surrounding spaces ("A, B" as typed)."""
    return [i if i in known or i.strip() not in known else i.strip() for i in item_ids]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    item_ids = session_ids(args.session)
    if not item_ids:
        raise ConfigError("--session is empty (give comma-separated item ids)")
    if args.export and args.data:
        raise ConfigError("--data goes with --run: an export holds its own items (--data would be ignored)")
    bundle = load_scoring_model(args.run, args.export, args.data, args.device)
    item_ids = as_known(item_ids, bundle.index_of())
    rec = recommend(bundle, item_ids, args.top, args.skip_unknown, Searcher(bundle, args.index))
    if rec.skipped:
        print(f"warning: skipped {len(rec.skipped)} unknown item id(s): {', '.join(map(repr, rec.skipped))}",
              file=sys.stderr)
    if rec.cut:
        print(f"warning: the model reads a session's last {len(rec.session)} items (data.max_len); the {rec.cut} "
              "older ones were left out", file=sys.stderr)
    asked = min(args.top, bundle.num_items)
    if len(rec.rows) < asked:
        print(f"warning: --index {args.index} found {len(rec.rows)} of the {asked} items asked (use --index exact "
              "for a full list)", file=sys.stderr)
    print(format_recommendation(rec))
    return 0


if __name__ == "__main__":
    run_cli(main)
