"""The one prepared GPU check: correctness against the CPU, training throughput at 1M and 10M items against
the floor measured in the same call, and evaluation speed. Writes bench/GPU.md (the command, the machine,
the figures).

    python -m bench.gpu --out "$OUT/GPU.md"      # one CUDA GPU: a few minutes; V = 10M peaks at ~91 GiB (an
                                                 # H200; on an H100's 78 GiB add --items 1e6, or 10M is recorded
                                                 # as out of memory)
    python -m bench.gpu --device cpu --small     # the dry run the test suite makes: seconds, same code

Needs only PyTorch, numpy, pyarrow and tqdm (no Ray, no DeepSpeed, no network): one process joins a process
group of one (nccl on the GPU, gloo on the CPU) and drives the recipe's own functions, as a Ray worker does.

(a) correctness: the recipe on shards/default at W = 1 on the CPU and on the device, from the same initial
    state, on hard negatives only (no random draws, which differ between a CPU and a CUDA generator) and
    without dropout: the bands mined at every step, the per-step losses and the validation metrics side by
    side; exact fp32 (TF32 off) and the training precision (bf16 autocast + TF32). Then mining on the device
    against a brute-force sort.
(b) throughput: the trained ID network on the frozen text network's negatives at the paper's step shape
    (B = 1024, d = 300, k1 = 20, k2 = 20,000, bf16) over V = 1M and 10M synthetic items, per phase kind:
    sessions/s end to end (no syncs but the step marks), then a second pass with a sync at every section
    edge for the time split, and the peak memory. The floor in the same call, by its definition in
    ../shared/reference/gpu_floor.py: score + top-k2 over the catalog, and the band loss forward + backward
    with a dense band mask (V = 1M).
(c) evaluation: full-ranking evaluation sessions/s (id, text, fused) at each V.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from alterrec_dist.common.config import load_config
from alterrec_dist.common.device import configure_kernels
from alterrec_dist.data.reader import Batch
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.mining import mine_band
from alterrec_dist.training import step
from alterrec_dist.training.recipe import assemble_run, build_run, frozen_item_rows, train_epoch
from alterrec_dist.training.schedule import Phase, plan
from bench.scale_worker import CASES, FixedBatches, Profiler

ROOT = Path(__file__).resolve().parent.parent
PHASES = [(negatives, merge) for negatives, merge in CASES if merge in ("-", "threshold")]  # W = 1: one merge


@dataclass
class Shape:
    """The step shape of (b) and (c) and the sizes of (a)."""
    items: tuple[int, ...]
    batch: int
    dim: int
    text_dim: int
    k1: int
    k2: int
    p: int
    steps: int           # timed steps per phase kind
    eval_batches: int
    small_steps: int     # (a): steps per epoch on shards/default
    brute_items: int     # (a): the brute-force mining check
    floor_items: int     # the floor's loss half runs at this V (1M, as the reference)


FULL = Shape(items=(1_000_000, 10_000_000), batch=1024, dim=300, text_dim=384, k1=20, k2=20_000, p=5, steps=5,
             eval_batches=4, small_steps=30, brute_items=200_000, floor_items=1_000_000)
SMALL = Shape(items=(5_000, 20_000), batch=64, dim=32, text_dim=16, k1=5, k2=200, p=3, steps=2, eval_batches=1,
              small_steps=3, brute_items=3_000, floor_items=5_000)


def join_group(device: torch.device) -> tuple[Comm, Comm]:
    """A process group of one on the device's backend, and a gloo group of the same process for the CPU side."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return Comm(), Comm(dist.new_group(backend="gloo"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device: torch.device, reps: int, warm: int = 1) -> float:
    """Median milliseconds of `fn()` over `reps` runs after `warm` untimed ones, the queued kernels included."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


# -- (a) correctness ------------------------------------------------------------------------------

class BandRecorder:
    """Wraps step.mine_band to keep each step's band as sorted global item ids per query."""

    def __init__(self):
        self.bands: list[list[list[int]]] = []

    def __enter__(self):
        self.inner = step.mine_band

        def recording(comm, queries, item_rows, k1, k2, num_items, *args, **kwargs):
            band, cand = self.inner(comm, queries, item_rows, k1, k2, num_items, *args, **kwargs)
            ids = torch.where(band.mask, band.rows * comm.world + comm.rank, -1).sort(1).values.cpu()
            self.bands.append([[i for i in row if i >= 0] for row in ids.tolist()])
            return band, cand

        step.mine_band = recording
        return self

    def __exit__(self, *exc):
        step.mine_band = self.inner


def small_run(comm: Comm, use_gpu: bool, precision: str, tf32: bool, shape: Shape) -> dict:
    """The recipe on shards/default at W = 1: hard phases only, no dropout, `shape.small_steps` steps an epoch.
    The CPU leg keeps the process's thread count (a worker's default, 1, would stay for every GPU leg after it)."""
    cfg = load_config(None, ["train.m_random=0", "train.m_gap=1", "train.m_max=2", "model.dropout=0.0",
                             "train.global_batch_size=256", f"trainer.cpu_threads={torch.get_num_threads()}",
                             "trainer.num_workers=1", f"trainer.use_gpu={use_gpu}", f"trainer.precision={precision}",
                             f"trainer.tf32={tf32}", "eval.batch_size=512"])
    run = build_run(cfg, comm)
    batches = list(islice(run.train_reader.epoch(0), shape.small_steps))
    run.train_reader = FixedBatches(batches, run.device)
    losses = []
    with BandRecorder() as recorder:
        for phase in plan(cfg.train.method, cfg.train.m_random, cfg.train.m_gap, cfg.train.m_max):
            losses += [s["loss"] for s in train_epoch(run, phase, frozen_item_rows(run, phase))]
    valid = run.evaluate("valid", 0)
    # evaluation ranks in exact fp32 whatever TF32 training set (device.exact_fp32_matmuls): with the flag flipped
    # the same metrics to the bit, or batch_score could not reproduce a GPU run's (only a GPU can tell)
    torch.backends.cuda.matmul.allow_tf32 = not tf32
    flipped = run.evaluate("valid", 0)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"losses": losses, "bands": recorder.bands, "eval_ignores_tf32": flipped == valid,
            "valid": {k: {m: v for m, v in valid[k].items() if m != "longtail"} for k in ("id", "text", "fused")}}


def band_agreement(a: list, b: list) -> dict:
    """Over every (step, query): the share of identical bands and the mean Jaccard overlap."""
    same, jaccard, n = 0, 0.0, 0
    for step_a, step_b in zip(a, b):
        for x, y in zip(step_a, step_b):
            sx, sy = set(x), set(y)
            same += sx == sy
            jaccard += len(sx & sy) / max(len(sx | sy), 1)
            n += 1
    return {"queries": n, "identical": same / max(n, 1), "jaccard": jaccard / max(n, 1)}


def compare_small(cpu: dict, dev: dict) -> dict:
    loss_cpu, loss_dev = np.array(cpu["losses"]), np.array(dev["losses"])
    return {"bands": band_agreement(cpu["bands"], dev["bands"]),
            "loss_max_rel_diff": float(np.max(np.abs(loss_dev - loss_cpu) / np.abs(loss_cpu))),
            "valid_max_abs_diff": max(abs(dev["valid"][k][m] - cpu["valid"][k][m])
                                      for k in cpu["valid"] for m in cpu["valid"][k] if m != "n"),
            "valid_cpu": cpu["valid"]["fused"], "valid_device": dev["valid"]["fused"],
            "eval_ignores_tf32": dev["eval_ignores_tf32"]}


def brute_force_mining(comm: Comm, device: torch.device, shape: Shape) -> dict:
    """mine_band on the device at W = 1 against a full sort of the same fp32 scores (TF32 off)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    queries = torch.randn(128, shape.dim, generator=g).to(device)
    rows = (torch.randn(shape.brute_items, shape.dim, generator=g) / math.sqrt(shape.dim)).to(device)
    k1, k2 = shape.k1, shape.k2
    ids = torch.arange(shape.brute_items, device=device)
    band, _ = mine_band(comm, queries, rows, ids, k1, k2, shape.brute_items, 1.0, "threshold", tile_rows=0)
    mined = torch.zeros(len(queries), shape.brute_items, dtype=torch.bool, device=device)
    mined.scatter_(1, band.rows, band.mask)
    # ranks k1..k2-1 by (score desc, id asc), as mining defines them: a stable sort keeps a tie in id order
    ranked = (queries @ rows.T).sort(dim=1, descending=True, stable=True).indices
    expected = torch.zeros_like(mined).scatter_(1, ranked[:, k1:k2], True)
    return {"queries": len(queries), "items": shape.brute_items, "k1": k1, "k2": k2,
            "equal": bool(torch.equal(mined, expected)), "band_sizes": [int(expected.sum(1).min()),
                                                                        int(expected.sum(1).max())]}


def correctness(comm: Comm, cpu_comm: Comm, device: torch.device, shape: Shape) -> dict:
    use_gpu = device.type == "cuda"
    cpu = small_run(cpu_comm if use_gpu else comm, False, "fp32", False, shape)
    exact = small_run(comm, use_gpu, "fp32", False, shape)
    fast = small_run(comm, use_gpu, "bf16", True, shape)
    configure_kernels(device, tf32=False, cpu_threads=torch.get_num_threads())
    brute = brute_force_mining(comm, device, shape)
    return {"fp32": compare_small(cpu, exact), "bf16_tf32": compare_small(cpu, fast), "brute_force": brute}


# -- (b) throughput and (c) evaluation ------------------------------------------------------------

def random_batches(rng: np.random.Generator, count: int, size: int, num_items: int, max_len: int = 20) -> list:
    """Sessions with 1..max_len items, drawn with a Zipf-like skew (popular items recur, as in real logs)."""
    out = []
    for _ in range(count):
        lens = rng.integers(1, max_len + 1, size)
        width = int(lens.max())
        ranks = (num_items * rng.random((size, width + 1)) ** 3).astype(np.int64)  # skewed to low ids
        mask = np.arange(width)[None, :] < lens[:, None]
        out.append(Batch(items=torch.from_numpy(np.where(mask, ranks[:, :width], 0)), mask=torch.from_numpy(mask),
                         target=torch.from_numpy(ranks[:, width].copy()),
                         example=torch.arange(size, device="cpu"), valid=torch.ones(size, dtype=torch.bool,
                                                                                     device="cpu")))
    return out


def synthetic_run(comm: Comm, device: torch.device, shape: Shape, num_items: int, dtype: str):
    """The recipe's run over random item features and sessions (no dataset on disk: 10M items of text features
    would take minutes to write), trained as `train.method=alterrec_aug` at `shape`."""
    B = shape.batch
    cfg = load_config(None, ["train.method=alterrec_aug", f"train.global_batch_size={B}", f"eval.batch_size={B}",
                             f"model.dim={shape.dim}", f"train.k1={shape.k1}", f"train.k2={shape.k2}",
                             f"train.p={shape.p}", "model.dropout=0.0", "trainer.num_workers=1",
                             f"trainer.use_gpu={device.type == 'cuda'}", f"trainer.precision={dtype}",
                             "model.text_temperature=0.07"])
    rng = np.random.default_rng(0)

    def text_features(items: np.ndarray) -> np.ndarray:
        feats = rng.standard_normal((len(items), shape.text_dim), dtype=np.float32)
        return (feats / np.sqrt(shape.text_dim)).astype(np.float16)

    train = FixedBatches(random_batches(rng, shape.steps, B, num_items), device)
    valid = FixedBatches(random_batches(rng, shape.eval_batches, B, num_items), device)
    return assemble_run(cfg, comm, num_items, shape.text_dim, text_features, train, {"valid": valid},
                        np.zeros(num_items, dtype=np.int64))


def floor_ms(device: torch.device, shape: Shape, num_items: int, reps: int) -> dict:
    """The reference floor (../shared/reference/gpu_floor.py) at this V, measured here: bf16 score + top-k2
    over the catalog in chunks of 1M rows; at shape.floor_items also the band loss forward + backward with a
    dense band mask."""
    B, d, k1, k2 = shape.batch, shape.dim, shape.k1, shape.k2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU matmuls in bf16 crawl
    X = torch.randn(num_items, d, device=device, dtype=dtype) / math.sqrt(d)
    Q = torch.randn(B, d, device=device, dtype=dtype)
    chunk = 1_000_000

    def mine():
        vals, idx = [], []
        for s in range(0, num_items, chunk):
            v, i = torch.topk(Q @ X[s:s + chunk].T, k2, dim=1, sorted=False)
            vals.append(v)
            idx.append(i + s)
        v, i = torch.cat(vals, 1), torch.cat(idx, 1)
        v, j = torch.topk(v, k2, dim=1) if len(vals) > 1 else torch.sort(v, dim=1, descending=True)
        return torch.gather(i, 1, j)[:, k1:k2]

    out = {"mine_ms": timed_ms(mine, device, reps)}
    if num_items == shape.floor_items:
        Xg, Qg = X.clone().requires_grad_(), Q.clone().requires_grad_()
        neg = torch.randint(0, num_items, (B, k2 - k1), device=device)
        tgt = torch.randint(0, num_items, (B,), device=device)
        mask = torch.zeros(B, num_items, device=device, dtype=torch.bool)
        mask.scatter_(1, neg, True)
        mask.scatter_(1, tgt[:, None], True)

        def dense():
            lg = (Qg @ Xg.T).float().masked_fill(~mask, float("-inf"))
            (torch.logsumexp(lg, 1) - lg.gather(1, tgt[:, None]).squeeze(1)).mean().backward()

        out["loss_ms"] = timed_ms(dense, device, reps)
    return out


def throughput(comm: Comm, device: torch.device, shape: Shape, num_items: int) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run = synthetic_run(comm, device, shape, num_items, "bf16")
    build_s = time.perf_counter() - start
    reader = run.train_reader
    train_epoch(run, Phase(0, "id", "random", False), None)  # warm-up: allocator, optimizer state, kernels
    cases = []
    for i, (negatives, _) in enumerate(PHASES):
        phase = Phase(i + 1, "id", "random" if negatives == "random" else "hard", negatives == "augmented")
        frozen = frozen_item_rows(run, phase)
        train_epoch(run, phase, frozen)
        step_ms = [s * 1e3 for s in reader.step_seconds()]
        with Profiler(run.comm, sync=lambda: sync(device)) as prof:
            prof.install(run)
            train_epoch(run, phase, frozen)
        split = {k: v * 1e3 / shape.steps for k, v in prof.seconds.items()}
        split["other"] = float(np.mean([s * 1e3 for s in reader.step_seconds()])) - sum(split.values())
        touched = int((run.table.x.grad != 0).any(1).sum())  # the last step's: what a sparse row update would visit
        cases.append({"phase": negatives, "step_ms": float(np.median(step_ms)),
                      "sessions_per_s": shape.batch / float(np.median(step_ms)) * 1e3, "split_ms": split,
                      "rows_touched": touched / num_items})
        del frozen
    run.table.x.grad = None  # the row gradient of the last step: evaluation needs the room at 10M
    eval_s = timed_ms(lambda: run.evaluate("valid", 0), device, reps=1, warm=1) / 1e3
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    floor = floor_ms(device, shape, num_items, reps=3)
    return {"items": num_items, "build_s": build_s, "cases": cases, "peak_bytes": peak, "floor": floor,
            "eval_sessions_per_s": shape.eval_batches * shape.batch / eval_s}


# -- the report -------------------------------------------------------------------------------------

def machine(device: torch.device) -> str:
    gpu = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if device.type == "cuda" else "no GPU"
    return (f"{gpu}; {os.cpu_count()} CPU cores; {platform.platform()}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def report(results: dict) -> str:
    s, c = results["shape"], results["correctness"]
    lines = [
        "# GPU check: correctness, throughput against the floor, evaluation", "",
        f"Command: `{results['command']}` (finished {results['finished']}, {results['wall_s'] / 60:.1f} min wall).",
        f"Machine: {results['machine']}.", "",
        "## (a) Correctness: the device against the CPU, W = 1, shards/default", "",
        f"Hard phases only, no dropout, {s['small_steps']} steps an epoch, 2 epochs (ID then text), from the same "
        "initial state; bands compared per (step, query).", "",
        "| device run | identical bands | mean Jaccard | max rel. loss diff | max abs. valid metric diff | "
        "valid fused ndcg@10 CPU / device | valid metrics the same with TF32 flipped |",
        "|---|---:|---:|---:|---:|---|---|"]
    for name, label in (("fp32", "fp32, TF32 off"), ("bf16_tf32", "bf16 autocast + TF32 (training precision)")):
        r = c[name]
        lines.append(f"| {label} | {r['bands']['identical']:.4f} | {r['bands']['jaccard']:.4f} | "
                     f"{r['loss_max_rel_diff']:.2e} | {r['valid_max_abs_diff']:.2e} | "
                     f"{r['valid_cpu']['ndcg@10']:.4f} / {r['valid_device']['ndcg@10']:.4f} | "
                     f"{'yes' if r['eval_ignores_tf32'] else '**NO**'} |")
    b = c["brute_force"]
    lines += ["", f"Mining on the device against a brute-force sort ({b['queries']} queries, {b['items']:,} items, "
              f"k1 = {b['k1']}, k2 = {b['k2']}, fp32): **{'equal' if b['equal'] else 'DIFFERENT'}** "
              f"(band sizes {b['band_sizes'][0]}-{b['band_sizes'][1]}).", "",
              "## (b) Training throughput (trained: ID network; frozen: text network), bf16", "",
              f"B = {s['batch']}, d = {s['dim']}, k1 = {s['k1']}, k2 = {s['k2']:,}, p = {s['p']}, text features "
              f"{s['text_dim']}-dim float16 (random), mean session encoder, {s['steps']} timed steps per phase after "
              "a warm-up. The floor is measured in the same call: score + top-k2 (bf16, chunks of 1M rows) and the "
              f"dense-mask band loss fwd+bwd (at V = {s['floor_items']:,}); *vs floor* = engine sessions/s over "
              "B / (mine + loss) of the floor.", "",
              "| V | phase | sessions/s | step ms | vs floor | mining | loss | encoder | optimizer | other | "
              "rows touched | peak GPU memory |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    measured = [t for t in results["throughput"] if "out_of_memory" not in t]
    loss_ms = next((t["floor"]["loss_ms"] for t in measured if "loss_ms" in t["floor"]), math.nan)
    for t in measured:
        floor_step = t["floor"]["mine_ms"] + loss_ms
        peak = f"{t['peak_bytes'] / 2**30:.1f} GiB" if t["peak_bytes"] is not None else "-"
        for case in t["cases"]:
            sp = case["split_ms"]
            lines.append(f"| {t['items']:,} | {case['phase']} | {case['sessions_per_s']:,.0f} | {case['step_ms']:.1f} | "
                         f"{floor_step / case['step_ms']:.2f} | " + " | ".join(
                             f"{sp.get(k, 0.0):.1f}" for k in ("mining", "loss", "encoder", "optimizer", "other"))
                         + f" | {case['rows_touched']:.1%} | {peak} |")
    lines += ["", "Floor (this machine, this call):", "", "| V | score + top-k2 ms | band loss fwd+bwd ms | "
              "floor sessions/s |", "|---:|---:|---:|---:|"]
    for t in measured:
        f = t["floor"]
        lines.append(f"| {t['items']:,} | {f['mine_ms']:.1f} | {loss_ms:.1f} | "
                     f"{s['batch'] / (f['mine_ms'] + loss_ms) * 1e3:,.0f} |")
    lines += ["", "## (c) Full-ranking evaluation", "", "| V | sessions/s (id, text and fused ranks) |", "|---:|---:|"]
    lines += [f"| {t['items']:,} | {t['eval_sessions_per_s']:,.0f} |" for t in measured]
    lines += [f"\nV = {t['items']:,}: out of memory on this device ({t['out_of_memory']})."
              for t in results["throughput"] if "out_of_memory" in t]
    lines += ["", "## Raw figures", "", "```json", json.dumps(results, indent=1), "```", ""]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of the same code)")
    p.add_argument("--small", action="store_true", help="tiny shapes: the dry run's (seconds on a CPU)")
    p.add_argument("--items", default=None, help="comma-separated catalog sizes (default 1M,10M; --small 5k,20k)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "GPU.md")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible (a dry run: --device cpu --small)", file=sys.stderr)
        return 2
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)  # set_device refuses a bare "cuda" (torch 2.11)
        torch.cuda.set_device(device)
    shape = SMALL if args.small else FULL
    if args.items:
        shape = replace(shape, items=tuple(int(float(v)) for v in args.items.split(",")))
    start = time.perf_counter()
    comm, cpu_comm = join_group(device)
    try:
        results = {"command": "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "machine": machine(device), "shape": shape.__dict__}
        results["correctness"] = correctness(comm, cpu_comm, device, shape)
        print(json.dumps(results["correctness"]), flush=True)
        results["throughput"] = []
        write_report(args.out, results, start, done=False)
        for V in shape.items:
            try:
                results["throughput"].append(throughput(comm, device, shape, V))
            except torch.OutOfMemoryError as e:  # a catalog this device cannot hold: recorded, the others kept
                results["throughput"].append({"items": V, "out_of_memory": " ".join(str(e).split())[:300]})
                torch.cuda.empty_cache()
            print(json.dumps(results["throughput"][-1]), flush=True)
            # after each catalog: a call cut short by its time limit still brings back what it measured
            write_report(args.out, results, start, done=V == shape.items[-1])
    finally:
        dist.destroy_process_group()
    print(f"wrote {args.out}")
    return 0


def write_report(out: Path, results: dict, start: float, done: bool) -> None:
    results["wall_s"] = time.perf_counter() - start
    results["finished"] = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC" + ("" if done else ", partial")
    out.write_text(report(results))


if __name__ == "__main__":
    sys.exit(main())
