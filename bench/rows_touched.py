"""How many ID rows one training step's gradient touches, per phase kind, at the paper's step shape: the figure
that decides between a dense (fused) and a sparse row update. Appends a table to bench/ROWS.md.

    python -m bench.rows_touched                       # V = 1M and 10M, B = 1024, k2 = 20,000 (CPU: minutes)
    python -m bench.rows_touched --items 100000 --dim 16

A row is touched when its gradient is not zero after the step's backward: the band's negatives, the positives
and the items of the sessions. The data are bench.gpu's synthetic sessions (skewed to popular items) and
random text features, so the hard bands come from a frozen text network that was never trained: real bands
concentrate more on popular items, and so touch fewer rows than these.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from alterrec_dist.training.recipe import frozen_item_rows, train_epoch
from alterrec_dist.training.schedule import Phase
from bench.gpu import FULL, PHASES, join_group, synthetic_run

ROOT = Path(__file__).resolve().parent.parent


def touched(items: int, shape) -> list[dict]:
    comm, _ = join_group(torch.device("cpu"))
    try:
        run = synthetic_run(comm, torch.device("cpu"), shape, items, "fp32")
        out = []
        for i, (negatives, _) in enumerate(PHASES):
            phase = Phase(i, "id", "random" if negatives == "random" else "hard", negatives == "augmented")
            train_epoch(run, phase, frozen_item_rows(run, phase))
            rows = int((run.table.x.grad != 0).any(1).sum())
            out.append({"phase": negatives, "rows": rows, "share": rows / items})
        return out
    finally:
        torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rows_touched", description=__doc__.split("\n")[0])
    p.add_argument("--items", default="1000000,10000000")
    p.add_argument("--dim", type=int, default=32, help="d (the count does not depend on it)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "ROWS.md")
    args = p.parse_args(argv)
    shape = replace(FULL, dim=args.dim, text_dim=64, steps=1)
    start = time.perf_counter()
    lines = []
    for items in (int(float(v)) for v in args.items.split(",")):
        for r in touched(items, shape):
            lines.append(f"| {items:,} | {r['phase']} | {r['rows']:,} | {r['share']:.1%} |")
            print(lines[-1], flush=True)
    header = [f"Command: `python -m bench.rows_touched {' '.join(argv if argv is not None else sys.argv[1:])}` "
              f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {(time.perf_counter() - start) / 60:.1f} min); "
              f"B = {shape.batch}, k1 = {shape.k1}, k2 = {shape.k2:,}, one step per phase kind, W = 1.", "",
              "| V | phase | rows touched | share of the table |", "|---:|---|---:|---:|"]
    with open(args.out, "a") as f:
        f.write("\n".join(header + lines) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
