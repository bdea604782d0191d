"""Synthetic session data shaped like Amazon-M2, written in the dataset layout (data/layout.py).

    python -m alterrec_dist.synth --items N --sessions M --out OUT [--seed S]
        [--text-features sbert|random-projection] [--text-dim D] [--overwrite]

The command line only: the machinery is in `data/synth.py`.
"""
from __future__ import annotations

import argparse
import sys

from alterrec_dist.common.cli import ArgumentParser, run_cli
from alterrec_dist.data.layout import MAX_ITEMS
from alterrec_dist.data.synth import BLOCK_SESSIONS, SBERT_MAX_ITEMS, SESSIONS_PER_SEED, TEXT_DIM, write_synth


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m alterrec_dist.synth", description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, required=True, help="catalogue size N")
    p.add_argument("--sessions", type=int, required=True, help="sessions M (split 80/10/10)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the catalogue, the sessions and the text (default 0)")
    p.add_argument("--text-features", choices=("sbert", "random-projection"), default=None,
                   help=f"sbert: encode the titles with all-MiniLM-L6-v2 (default up to {SBERT_MAX_ITEMS:,} items); "
                        "random-projection: topic vectors through a fixed random projection (default above)")
    p.add_argument("--text-dim", type=int, default=None, help=f"random-projection feature size (default {TEXT_DIM})")
    p.add_argument("--block-sessions", type=int, default=BLOCK_SESSIONS, help="sessions handed to the writer at a time (memory bound; whole units of "
                        f"{SESSIONS_PER_SEED}, so the output does not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.items < 1 or args.sessions < 1:
        p.error("--items and --sessions must be >= 1")
    if args.items > MAX_ITEMS:  # before the catalogue is drawn: numpy's error was a traceback
        p.error(f"--items must be <= {MAX_ITEMS:,} (an item index is an int32 in the dataset layout)")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    if not 1 <= args.block_sessions <= 1_000_000:
        p.error("--block-sessions must be in 1..1000000")  # int32 list offsets per block
    if args.text_features is None:
        args.text_features = "sbert" if args.items <= SBERT_MAX_ITEMS else "random-projection"
    if args.text_dim is not None and args.text_features == "sbert":
        p.error("--text-dim applies to --text-features random-projection (SBERT's size is the model's)")
    if args.text_dim is not None and args.text_dim < 1:
        p.error("--text-dim must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = write_synth(args.out, items=args.items, sessions=args.sessions, seed=args.seed,
                      text_features=args.text_features, text_dim=args.text_dim or TEXT_DIM,
                      overwrite=args.overwrite, block_sessions=args.block_sessions,
                      progress=not args.no_progress,
                      command=["python", "-m", "alterrec_dist.synth", *(sys.argv[1:] if argv is None else argv)])
    print(f"wrote {out}")  # on stdout, as every command's success line
    return 0


if __name__ == "__main__":
    run_cli(main)
