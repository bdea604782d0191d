"""DeepSpeed's ZeRO buckets: its default size against the network's own (`stepper.bucket_elements`), side by side.

    python -m bench.deepspeed_buckets [--items 20000] [--steps 4] [--out bench/DEEPSPEED.md]

ZeRO 1-2 allocate a reduce buffer of the bucket's size every step; DeepSpeed's default is 5e8 elements,
made for models of billions of parameters, where ours have about a million dense ones. Each point is
the ID network's training step (causal Transformer, d = 300, the grid's shape) on a synthetic catalog,
2 gloo ranks in fresh processes (peak RSS is the point's own), the two bucket sizes run back to back
in alternating order so that background load falls on both alike. The ratio is what counts here
(absolute times only from a GPU); the losses must agree, as a bucket changes where a sum is cut, not
what is summed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import time
from itertools import islice
from pathlib import Path
from unittest.mock import patch

from bench import scale, scale_report, scale_worker
from alterrec_dist.common.config import load_config
from alterrec_dist.common.files import atomic_write_bytes
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.training import stepper
from alterrec_dist.training.recipe import build_run, train_epoch
from alterrec_dist.training.schedule import Phase

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = ("DeepSpeed's default", "the network")


def measure(spec: dict) -> dict:
    """In a spawned rank: `spec["steps"]` timed ID-network steps after one warm-up step."""
    comm = Comm()
    sets = [*scale_worker.overrides(spec, comm.world), "trainer.engine=deepspeed",
            f"trainer.zero_stage={spec['stage']}", "model.encoder=transformer"]
    default = patch.object(stepper, "bucket_elements", lambda net: stepper.DEEPSPEED_BUCKET)
    with default if spec["bucket"] == BUCKETS[0] else contextlib.nullcontext():
        run = build_run(load_config(None, sets), comm)
    batches = list(islice(run.train_reader.epoch(0), spec["steps"] + 1))
    run.train_reader = scale_worker.FixedBatches(batches[:1])
    train_epoch(run, Phase(0, "id", "random", False), None)  # warm-up: optimizer state, allocator
    run.train_reader = reader = scale_worker.FixedBatches(batches[1:])
    losses = [s["loss"] for s in train_epoch(run, Phase(1, "id", "random", False), None)]
    return {"step_s": statistics.median(reader.step_seconds()), "losses": losses,
            "dense": sum(p.numel() for p in run.networks["id"].parameters()),
            **scale_worker.peak_memory(run.device)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.deepspeed_buckets", description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=20_000, help="catalog size V")
    p.add_argument("--sessions", type=int, default=20_000, help="sessions of the synthetic catalog")
    p.add_argument("--batch", type=int, default=256, help="global batch B")
    p.add_argument("--dim", type=int, default=300, help="d")
    p.add_argument("--steps", type=int, default=4, help="timed steps per point")
    p.add_argument("--stages", type=scale.int_list, default=[1, 2], help="ZeRO stages")
    p.add_argument("--precisions", default="fp32,bf16", help="trainer.precision values, comma-separated")
    p.add_argument("--world", type=int, default=2, help="gloo ranks")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "bench")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "DEEPSPEED.md")
    args = p.parse_args(argv)
    args.text_dim = 64  # of the synthetic catalog, as bench.scale's default (its catalogs are shared)
    return args


def point(args: argparse.Namespace, data: Path, stage: int, precision: str, bucket: str) -> dict:
    """What `measure` and bench.scale_worker's `overrides` and `spawned` read."""
    return {"data": str(data), "batch": args.batch, "dim": args.dim, "k1": 5, "k2": 100, "p": 2, "device": "cpu",
            "dtype": precision, "sets": [], "threads": 1, "steps": args.steps, "stage": stage, "bucket": bucket}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = scale.catalog(args, args.items)
    rows, started = [], time.time()
    for i, (stage, precision) in enumerate((s, p) for s in args.stages for p in args.precisions.split(",")):
        got = {}
        for bucket in (BUCKETS if i % 2 == 0 else BUCKETS[::-1]):
            ranks = scale.spawn(args.world, point(args, data, stage, precision, bucket), target=measure)
            got[bucket] = {"step_s": max(r["step_s"] for r in ranks), "rss": max(r["peak_rss"] for r in ranks),
                           "dense": ranks[0]["dense"], "losses": ranks[0]["losses"]}
            print(f"ZeRO {stage} {precision}, {bucket}: {got[bucket]['step_s']:.3f} s a step", file=sys.stderr)
        default, sized = (got[b] for b in BUCKETS)
        ratio, gib = default["step_s"] / sized["step_s"], 2 ** 30
        rows.append(f"| {stage} | {precision} | {sized['dense']:,} | {default['step_s']:.3f} | {sized['step_s']:.3f} | "
                    f"{ratio:.1f}x | {default['rss'] / gib:.2f} | {sized['rss'] / gib:.2f} | "
                    f"{'yes' if default['losses'] == sized['losses'] else 'NO'} |")
    command = " ".join(["python -m bench.deepspeed_buckets", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    report = "\n".join([
        "# DeepSpeed ZeRO buckets: DeepSpeed's default (5e8 elements) against the network's size",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d', time.gmtime(started))} ({scale_report.machine()}, "
        f"load {os.getloadavg()[0]:.1f}): V = {args.items:,}, B = {args.batch}, d = {args.dim}, causal Transformer, "
        f"{args.world} gloo ranks, one torch thread each; the ID network's step, median of {args.steps} after a "
        "warm-up; peak RSS is the larger rank's.",
        "",
        "| ZeRO | precision | dense parameters (the bucket) | step s, default | step s, sized | ratio | "
        "peak RSS GiB, default | peak RSS GiB, sized | same losses |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows, ""])
    atomic_write_bytes(args.out, report.encode())
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
