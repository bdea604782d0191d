"""The tiled band loss against the untiled one it replaced, side by side in one process on the CPU: forward +
backward time and the loss value, at the bench.scale step shape. Writes bench/LOSS.md.

    python -m bench.loss_tiles                      # V = 100k and 1M per worker, G = 128, d = 32, band 1980

The untiled loss is `alterrec_dist/loss.py` as of commit 1b57529 (the (G, V) logits, then gathers), read from
git; both run alternately, one torch thread, on the same queries, rows and band.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

from alterrec_dist.parallel import loss as tiled
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.mining import Band
from bench.at_commit import module_at

ROOT = Path(__file__).resolve().parent.parent
UNTILED_AT = "1b57529"
# where the modules the untiled loss.py imports live now (the package has had layers since)
MOVED_SINCE = {"alterrec_dist.mining": "alterrec_dist.parallel.mining",
               "alterrec_dist.sharded": "alterrec_dist.parallel.comm"}


def measure(comm: Comm, untiled, rows: int, G: int, d: int, band: int, reps: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    q0, x0 = torch.randn(G, d, generator=g), torch.randn(rows, d, generator=g) * 0.1
    b = Band(torch.randint(rows, (G, band), generator=g), torch.ones(G, band, dtype=torch.bool))
    pos, owned, w = torch.randint(rows, (G, 1), generator=g), torch.ones(G, 1, dtype=torch.bool), torch.ones(G, 1)

    def run(kind: str) -> float:
        q, x = q0.clone().requires_grad_(), x0.clone().requires_grad_()
        if kind == "untiled":
            value, _ = untiled.band_loss(comm, q @ x.T, b, pos, owned, w, G)
        else:
            value, _ = tiled.tiled_band_loss(comm, q, x, 1.0, b, pos, owned, w, G, 0)
        value.backward()
        return value.item()

    values = {k: run(k) for k in ("untiled", "tiled")}  # also the warm-up
    times = {"untiled": [], "tiled": []}
    for i in range(reps):
        for kind in ("untiled", "tiled") if i % 2 == 0 else ("tiled", "untiled"):
            start = time.perf_counter()
            run(kind)
            times[kind].append(time.perf_counter() - start)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"rows": rows, "ms": ms, "values": values}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loss_tiles", description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="100000,1000000", help="shard rows V/W")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--band", type=int, default=1980)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "LOSS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    try:
        untiled = module_at(UNTILED_AT, "alterrec_dist/loss.py", moved=MOVED_SINCE)
        results = [measure(Comm(), untiled, int(float(r)), args.batch, args.dim, args.band, args.reps)
                   for r in args.rows.split(",")]
    finally:
        dist.destroy_process_group()
    lines = ["# Tiled band loss against the untiled one, side by side", "",
             f"Command: `python -m bench.loss_tiles {' '.join(argv if argv is not None else sys.argv[1:])}` "
             f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()[0]:.1f}); "
             f"G = {args.batch}, d = {args.dim}, band {args.band}, one torch thread, median of {args.reps} forward + "
             f"backward passes each, alternating. Untiled: alterrec_dist/loss.py at {UNTILED_AT}; tiled: this "
             "checkout (65,536-row tiles, the CPU default).", "",
             "| shard rows | untiled ms | tiled ms | tiled / untiled | loss (both) |", "|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['ms']['untiled']:.0f} | {r['ms']['tiled']:.0f} | "
                     f"{r['ms']['tiled'] / r['ms']['untiled']:.2f} | {r['values']['untiled']:.6f} / "
                     f"{r['values']['tiled']:.6f} |")
    lines += ["", "Peak memory is not compared here: the untiled loss holds the (G, V/W) logits and their gradient "
              "(2 x 4 x G x V/W bytes), the tiled one a (G, tile) tile of each (bench/RESULTS.md's memory table).", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
