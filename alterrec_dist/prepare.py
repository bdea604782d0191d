"""`python -m alterrec_dist.prepare {recbole|amazon-m2|log} --out OUT ...`: turn real data into
the dataset layout of `data/layout.py` (sessions, items, frozen text features).
`python -m alterrec_dist.prepare verify DIR` checks a dataset in full (checksums, item indices,
item ids, finite text features).

The source is read and checked in full first, then sessions are streamed to the writer and
item texts are encoded (cached, see text_features.py; in this process, or with --ray on Ray Data,
see text_ray.py). Everything is built in a hidden
sibling of OUT and renamed into place at the end, so bad input, Ctrl-C or SIGTERM leave no OUT.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable

from alterrec_dist.common.cli import ArgumentParser, run_cli
from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import check_out, resolve_location
from alterrec_dist.data.build import build_dataset
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.data.layout import SPLITS, data_files
from alterrec_dist.data.sources.amazon_m2 import read_amazon_m2
from alterrec_dist.data.sources.log import read_log
from alterrec_dist.data.sources.recbole import read_recbole, recbole_files
from alterrec_dist.data.sources.tables import Source
from alterrec_dist.data.text_features import DEFAULT_BATCH_SIZE, default_cache_dir, default_model_path, encode_here
from alterrec_dist.data.text_ray import ray_encoder


def build_parser() -> argparse.ArgumentParser:
    common = ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="dataset directory to create")
    common.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    common.add_argument("--text-model", metavar="PATH",
                        help="local sentence-transformers model directory (default: bundled all-MiniLM-L6-v2)")
    common.add_argument("--batch-size", type=_int_at_least(1), default=DEFAULT_BATCH_SIZE,
                        help=f"texts per encoding batch (default {DEFAULT_BATCH_SIZE}: fastest on CPU; raise it on a GPU)")
    common.add_argument("--ray", action="store_true",
                        help="encode the texts the cache lacks on Ray Data: the cluster in RAY_ADDRESS, else a "
                             "private local Ray (same output, byte for byte)")
    common.add_argument("--ray-actors", type=_int_at_least(1), metavar="N",
                        help="with --ray: encoding actors (default: one per GPU of the cluster, else one per "
                             "--encode-threads CPUs)")
    common.add_argument("--encode-threads", type=_int_at_least(1), metavar="T",
                        help="torch threads of each encoding process, here or each Ray actor (which reserves T "
                             "CPUs); the same T gives the same bytes (default: torch's, every core of this machine)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--drop-short", action="store_true",
                        help="skip sessions shorter than 2 events with a warning instead of failing")

    parser = ArgumentParser(prog="python -m alterrec_dist.prepare", description=__doc__.split("\n\n")[0])
    # metavar: a missing one is named by its choices, not by the internal dest ("source")
    sub = parser.add_subparsers(dest="source", required=True, metavar="{recbole,amazon-m2,log,verify}")

    recbole = sub.add_parser("recbole", parents=[common], help="RecBole atomic files (keeps their split)")
    recbole.add_argument("--path", required=True, help="directory with NAME.{train,valid,test}.inter, NAME.item2index, NAME.text")
    recbole.add_argument("--name", help="dataset NAME when the directory holds several")

    m2 = sub.add_parser("amazon-m2", parents=[common], help="Amazon-M2 (KDD Cup 2023) task-2 sessions")
    m2.add_argument("--sessions", action="append", required=True, help="CSV or Parquet; repeat to concatenate")
    m2.add_argument("--labels", action="append", default=[],
                    help="row-aligned next_item file, once per --sessions; a sessions file with its own next_item "
                         "column (e.g. sessions_train.csv) needs none, or is named itself here beside the others")
    m2.add_argument("--products", help="products_train.csv: item texts (title. brand. desc)")
    m2.add_argument("--locale", help="keep only this locale's sessions, e.g. FR")
    m2.add_argument("--valid-frac", type=float, default=0.1, help="share of the sessions drawn for valid (default 0.1)")
    m2.add_argument("--test-frac", type=float, default=0.1, help="share of the sessions drawn for test (default 0.1)")
    m2.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the session split")

    log = sub.add_parser("log", parents=[common], help="any interaction log + item table (CSV or Parquet)")
    log.add_argument("--interactions", required=True, help="the interaction log: one event per row, CSV or Parquet")
    log.add_argument("--items", required=True, help="the item table, CSV or Parquet: an id column and text columns")
    log.add_argument("--user-col", required=True, help="user column of the log")
    log.add_argument("--item-col", required=True, help="item column of the log")
    log.add_argument("--time-col", required=True, help="time column of the log: events in its order (file order on "
                                                       "ties)")
    log.add_argument("--session-col", help="sessions from this column (default: each user's events)")
    log.add_argument("--text-cols", default="", help="comma-separated item-table columns joined into the text")
    log.add_argument("--item-id-col", help="item id column of the item table (default: --item-col)")
    log.add_argument("--split", choices=("leave-last-out", "time"), default="leave-last-out",
                     help="leave-last-out (default): each session's last event is its test target, the one before "
                          "its valid target; time: by the target's time (--cutoff, --valid-cutoff)")
    log.add_argument("--cutoff", help="with --split time: rows whose target is at or after this go to test")
    log.add_argument("--valid-cutoff", help="with --split time: rows whose target is at or after this "
                                            "(and before --cutoff) go to valid; earlier ones to train")

    verify = sub.add_parser("verify", help="check a dataset in full: every file's sha256 against its manifest, "
                                           "sizes and shapes, every item index in 0..V-1, every item id there once, "
                                           "every text feature finite, every item marked as having text a "
                                           "non-zero feature row")
    verify.add_argument("dataset", metavar="DIR", help="dataset directory")
    for source in (recbole, m2, log, verify):  # a usage error names the --help that lists its flags
        source.set_defaults(source_parser=source)
    return parser


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    parse.__name__ = "integer"  # argparse's word for a value it cannot parse: "invalid integer value"
    return parse


def read_source(args: argparse.Namespace) -> Source:
    if args.source == "recbole":
        return read_recbole(args.path, args.name, drop_short=args.drop_short)
    if args.source == "amazon-m2":
        return read_amazon_m2(args.sessions, args.labels, args.products, args.locale, args.valid_frac,
                              args.test_frac, args.seed, drop_short=args.drop_short)
    return read_log(args.interactions, args.items, args.user_col, args.item_col, args.time_col,
                    [c for c in args.text_cols.split(",") if c], args.session_col, args.item_id_col,
                    args.split, args.cutoff, args.valid_cutoff, drop_short=args.drop_short)


def source_paths(args: argparse.Namespace) -> list[str | None]:
    """What `read_source` reads and the text model it encodes with, which OUT must not hold (None: not given)."""
    if args.source == "recbole":
        read = recbole_files(args.path, args.name)  # its files, not the directory: OUT may lie beside them
    elif args.source == "amazon-m2":
        read = [*args.sessions, *args.labels, args.products]  # each repeatable flag: a list of files
    else:
        read = [args.interactions, args.items]
    return [*read, args.text_model or default_model_path()]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "ray_actors", None) and not args.ray:
        args.source_parser.error("--ray-actors needs --ray")
    if args.source == "log" and args.split != "time" and (args.cutoff or args.valid_cutoff):
        args.source_parser.error("--cutoff and --valid-cutoff need --split time")  # else leave-last-out, silently
    if args.source == "verify":
        return verify(args.dataset)
    check_out(args.out, args.overwrite, source_paths(args), apart=[default_cache_dir()])  # the text cache
    out, source, has_text, stats = build_dataset(
        args.out, args.overwrite, lambda: read_source(args), args.text_model, args.batch_size,
        progress=not args.no_progress, command=[sys.executable, "-m", "alterrec_dist.prepare", *argv],
        encoder=(ray_encoder(args.ray_actors, args.encode_threads) if args.ray
                 else functools.partial(encode_here, threads=args.encode_threads)))
    rows = ", ".join(f"{s} {len(source.splits[s]):,} ({source.splits[s].num_sessions:,})" for s in SPLITS)
    print(f"prepared {out}: {len(source.item_ids):,} items ({int(has_text.sum()):,} with text), "
          f"rows (sessions): {rows}; "
          f"text: {stats.encoded:,} encoded, {stats.cached:,} from cache")
    return 0


def verify(path: str) -> int:
    """`prepare verify DIR`: Dataset.verify and one line of result; damage is the usual one-line error."""
    if not resolve_location(path).is_dir():
        raise DataError(f"{path}: no such dataset directory")
    data = Dataset(path)
    for note in data.verify():
        print(f"note: {note}", file=sys.stderr)
    rows = ", ".join(f"{s} {data.num_rows(s):,}" for s in SPLITS)
    print(f"verified {path}: {data.num_items:,} items, rows {rows}; "
          f"{len(data_files(data.manifest))} files checked")
    return 0


if __name__ == "__main__":
    run_cli(main)
