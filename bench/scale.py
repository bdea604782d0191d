"""Scale benchmark: training throughput and its time split, evaluation time, memory per worker and
bytes per collective per step, at W = 1 and W = 2, for every phase kind and both band merges; and the
engine against the per-step reference approach. Writes bench/RESULTS.md.

    python -m bench.scale                                   # the committed RESULTS.md (~30 min, 2 busy cores)
    python -m bench.scale --items 1000000 --workers 2       # one catalog, one world size
    torchrun --standalone --nproc_per_node 1 -m bench.scale --launcher torchrun --device cuda \\
        --items 1000000,10000000 --batch 1024 --dim 300 --k2 20000 --dtype bf16

Run from the repository root. Catalogs come from `alterrec_dist.synth` into --data-dir (ignored by
git) and are reused when present. With the spawn launcher (CPU, gloo) every (catalog, repeat, W)
point is a fresh set of worker processes, so peak RSS is that point's own, and W = 1 and W = 2 of a
catalog run back to back, alternating which goes first, so background load falls on both alike.
Under torchrun the world size is torchrun's and every point runs in the same processes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from unittest.mock import patch

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

from alterrec_dist.common.errors import DataError
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.data.synth import write_synth
from bench import reference_step, scale_report, scale_worker

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ITEMS = "100000,1000000,10000000"
SCORE_BUDGET = 320_000_000  # B x V cap per step (the loss was untiled when the batch rule was set; kept comparable)
# glibc hands every freed buffer above 32 MiB back to the OS, so a step that allocates big tensors page-faults
# them in again each time; these keep freed memory in the process (scale_report.KEEP_MEMORY_NOTE says them)
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def int_list(text: str) -> list[int]:
    """Comma-separated positive counts (1e6 reads as 1,000,000)."""
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not comma-separated numbers") from None
    if not values or min(values) < 1:  # a zero catalog divided the score budget by zero, zero workers indexed none
        raise argparse.ArgumentTypeError(f"{text!r}: each value must be >= 1")
    return values


def per_catalog(values: list[int] | None, items: list[int], rule) -> list[int]:
    """One value per catalog: the rule's, the single value given, or one given per catalog."""
    if values is None:
        return [rule(v) for v in items]
    if len(values) == 1:
        return values * len(items)
    if len(values) != len(items):
        raise SystemExit(f"error: {len(values)} values for {len(items)} catalogs")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int_list, default=int_list(DEFAULT_ITEMS), help="catalog sizes V")
    p.add_argument("--workers", type=int_list, default=[1, 2], help="world sizes W (spawn launcher)")
    p.add_argument("--batch", type=int_list, default=None,
                   help=f"global batch B per catalog; default min(128, {SCORE_BUDGET:.1e} / V), a multiple of 8")
    p.add_argument("--steps", type=int_list, default=None, help="timed steps per case; default 3, 2 above 1M items")
    p.add_argument("--repeats", type=int_list, default=None, help="repeats per point (fresh worker processes); default 2")
    p.add_argument("--dim", type=int, default=32, help="d")
    p.add_argument("--k1", type=int, default=20)
    p.add_argument("--k2", type=int, default=2000)
    p.add_argument("--p", type=int, default=5, help="augmented positives")
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--sessions", type=int, default=50_000, help="sessions per synthetic catalog")
    p.add_argument("--text-dim", type=int, default=64, help="text feature size of the synthetic catalogs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override, repeatable")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="trainer.precision: bf16 autocasts the trained network's layers (the ddp engine)")
    p.add_argument("--launcher", choices=("spawn", "torchrun"), default="spawn")
    p.add_argument("--reference-items", type=int, default=43_000, help="0 skips the reference comparison")
    p.add_argument("--reference-batch", type=int, default=512)
    p.add_argument("--reference-k2", type=int, default=20_000)
    p.add_argument("--reference-dim", type=int, default=64)
    p.add_argument("--reference-steps", type=int, default=5)
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "bench")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    p.add_argument("--report-only", type=Path, default=None, metavar="RAW_JSON",
                   help="rewrite --out from the raw figures a run saved (data/bench/results-*.json); measures nothing")
    args = p.parse_args(argv)
    if args.report_only is not None and not args.report_only.is_file():
        p.error(f"--report-only {args.report_only}: no such file (a data/bench/results-*.json a run saved)")
    args.batch = per_catalog(args.batch, args.items, lambda v: max(8, min(128, SCORE_BUDGET // v) // 8 * 8))
    args.steps = per_catalog(args.steps, args.items, lambda v: 3 if v <= 1_000_000 else 2)
    args.repeats = per_catalog(args.repeats, args.items, lambda v: 2)
    return args


def catalog_path(args: argparse.Namespace, items: int) -> Path:
    return args.data_dir / f"synth-{items}-s{args.sessions}-t{args.text_dim}"


def catalog(args: argparse.Namespace, items: int) -> Path:
    """The synthetic catalog of `items` items, made once and reused."""
    out = catalog_path(args, items)
    try:
        Dataset(out)
        return out
    except DataError:
        pass
    print(f"making {out} (alterrec_dist.synth)", file=sys.stderr)
    return write_synth(out, items=items, sessions=args.sessions, text_dim=args.text_dim, overwrite=True,
                       command=["python", "-m", "alterrec_dist.synth", "--items", str(items), "--sessions",
                                str(args.sessions), "--text-features", "random-projection", "--text-dim",
                                str(args.text_dim), "--out", str(out)])


def spec(args: argparse.Namespace, data: Path, batch: int, steps: int, **changes) -> dict:
    return {"data": str(data), "batch": batch, "dim": args.dim, "k1": args.k1, "k2": args.k2, "p": args.p,
            "steps": steps, "eval_batches": args.eval_batches, "device": args.device, "dtype": args.dtype,
            "threads": args.threads, "sets": args.sets, **changes}


def spawn(world: int, point: dict, target=scale_worker.measure) -> list[dict]:
    """`target(point)` on `world` fresh gloo processes; their results in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(scale_worker.spawned, args=(world, os.path.join(tmp, "init"), tmp, point, target),
                           nprocs=world, join=True, start_method="spawn")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def run_spawned(args: argparse.Namespace) -> tuple[list[dict], dict | None, dict | None]:
    points = []
    total = sum(r * len(args.workers) for r in args.repeats)
    with tqdm(total=total, desc="bench points", unit="point") as bar:
        for items, batch, steps, repeats in zip(args.items, args.batch, args.steps, args.repeats):
            data = catalog(args, items)
            for rep in range(repeats):
                for world in args.workers if rep % 2 == 0 else args.workers[::-1]:
                    bar.set_postfix_str(f"V={items:,} W={world} repeat {rep + 1}/{repeats}")
                    ranks = spawn(world, spec(args, data, batch, steps))
                    points.append({"items": items, "world": world, "repeat": rep, "ranks": ranks})
                    bar.update()
    reference = kept = None
    if args.reference_items:
        print("engine vs the per-step reference (glibc default allocator, then freed memory kept)", file=sys.stderr)
        data = catalog(args, args.reference_items)
        point = spec(args, data, args.reference_batch, args.reference_steps, dim=args.reference_dim,
                     k2=args.reference_k2)
        reference = spawn(1, point, target=reference_step.compare)[0]
        with patch.dict(os.environ, KEEP_FREED_MEMORY):  # read by glibc when the spawned process starts
            kept = spawn(1, point, target=reference_step.compare)[0]
    return points, reference, kept


def run_torchrun(args: argparse.Namespace) -> tuple[list[dict], dict | None, None] | None:
    """Every torchrun process runs this; rank 0 returns the results, the others None."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.set_num_threads(args.threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if rank == 0:
            for items in args.items + [args.reference_items] * (args.reference_items > 0):
                catalog(args, items)
        dist.barrier()  # the catalogs exist
        points = []
        for items, batch, steps, repeats in zip(args.items, args.batch, args.steps, args.repeats):
            data = catalog_path(args, items)
            for rep in range(repeats):
                mine = scale_worker.measure(spec(args, data, batch, steps))
                ranks = [None] * world
                dist.all_gather_object(ranks, mine)
                points.append({"items": items, "world": world, "repeat": rep, "ranks": ranks})
        reference = None
        if args.reference_items and world == 1:  # the reference holds the whole table on one process
            data = catalog_path(args, args.reference_items)
            reference = reference_step.compare(spec(args, data, args.reference_batch, args.reference_steps,
                                                    dim=args.reference_dim, k2=args.reference_k2))
        return (points, reference, None) if rank == 0 else None
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        scale_report.write(args.out, json.loads(args.report_only.read_text()))
        print(f"wrote {args.out} from {args.report_only}", file=sys.stderr)
        return 0
    started = time.time()
    load_before = os.getloadavg()
    result = run_torchrun(args) if args.launcher == "torchrun" else run_spawned(args)
    if result is None:
        return 0
    points, reference, kept = result
    args.data_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    launch = (f"torchrun --standalone --nproc_per_node {points[0]['world']} -m bench.scale"
              if args.launcher == "torchrun" else "python -m bench.scale")
    shown = " ".join([launch, *(sys.argv[1:] if argv is None else argv)])
    raw = {"command": shown, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "finished": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "machine": scale_report.machine(),
           "seconds": time.time() - started, "load": [load_before, os.getloadavg()], "points": points,
           "reference": reference, "reference_kept_memory": kept}
    if args.out.is_file():  # the run this one replaces, set beside it in the report
        raw["previous"] = scale_report.previous_figures(args.out.read_text())
    (args.data_dir / f"results-{stamp}.json").write_text(json.dumps(raw))
    scale_report.write(args.out, raw)
    print(f"wrote {args.out} (raw figures: {args.data_dir / f'results-{stamp}.json'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
