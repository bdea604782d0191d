"""What one worker measures for `bench.scale`: step time by section, bytes per collective, memory.

Runs inside a process group (spawned gloo workers, or torchrun). It drives the recipe's public
functions (build_run, frozen_item_rows, train_epoch) and only wraps, from outside, the functions a
training step calls, so the numbers are the engine's as it is, not a copy's:

    mining     mine_band, top_items, random_band, exclude_items (negatives and extra positives)
    loss       Network.item_rows of the trained network, tiled_band_loss, and backward until the queries'
               gradient arrives
    encoder    ShardedItemTable.fetch, Network.item_rows, Network.encode, and the rest of backward
               (encoder, the lookup all-to-all, the dense-gradient all-reduce)
    optimizer  Stepper.zero_grad, Stepper.step
    other      the step time left over: query/target all-gathers in train_step, logging

The trained network is always the ID network (the one with the sharded learnable table); the
frozen text network supplies the hard negatives. Bytes are `Comm.bytes`, counted in the sharding
layer as each collective is called (and, for autograd collectives, as their backward runs).
"""
from __future__ import annotations

import json
import resource
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from alterrec_dist.common.config import load_config
from alterrec_dist.eval.evaluate import evaluate, kind_weights
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.mining import CountPacker
from alterrec_dist.training import recipe, step
from alterrec_dist.training.recipe import build_run, frozen_item_rows, train_epoch
from alterrec_dist.training.schedule import Phase

# (negatives, merge): the three phase kinds, the mined ones under both band merges
CASES = (("random", "-"), ("hard", "threshold"), ("hard", "allgather"),
         ("augmented", "threshold"), ("augmented", "allgather"))
STEP_CALLS = {"mine_band": "mining", "top_items": "mining", "random_band": "mining",
                "exclude_items": "mining", "tiled_band_loss": "loss"}


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class Profiler:
    """Seconds per section and collective bytes per wrapped call, accumulated until `reset`.

    Wrappers are installed on the step module (`training/step.py`) and on the classes of the run's objects, and
    removed on exit. Sections never nest inside a training step; a wrapper says so if they do.
    `sync` (on a GPU, torch.cuda.synchronize) runs at every section edge, so a section's seconds are
    its kernels' and not their launches'; it slows the step, so time throughput without it.
    """

    def __init__(self, comm: Comm, sync=None):
        self.comm, self.sync = comm, sync or (lambda: None)
        self.seconds: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()  # by wrapped call
        self.collective_bytes: Counter[tuple[str, str]] = Counter()  # by (wrapped call, collective)
        self.query_grad_at: float | None = None
        self._active: str | None = None
        self._undo: list = []

    def __enter__(self) -> "Profiler":
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, fn, had in reversed(self._undo):
            if had:
                setattr(owner, name, fn)
            else:  # it was inherited: uncover the base class's again
                delattr(owner, name)

    def reset(self) -> None:
        self.seconds.clear()
        self.bytes.clear()
        self.collective_bytes.clear()

    def _add_bytes(self, call: str, before: Counter) -> None:
        self.bytes[call] += sum(self.comm.bytes.values()) - sum(before.values())
        for collective, total in self.comm.bytes.items():
            self.collective_bytes[call, collective] += total - before[collective]

    def _replace(self, owner, name: str, wrapper) -> None:
        fn = getattr(owner, name)  # AttributeError: the step no longer calls it; update the bench
        self._undo.append((owner, name, fn, name in vars(owner)))
        setattr(owner, name, wrapper(fn))

    def section(self, owner, name: str, section: str, after=None) -> None:
        def wrapper(fn):
            def timed(*args, **kwargs):
                if self._active:
                    raise RuntimeError(f"{name} ran inside {self._active}: the sections would double count")
                self.sync()
                self._active, before, start = name, self.comm.bytes.copy(), time.perf_counter()
                try:
                    out = fn(*args, **kwargs)
                    self.sync()
                finally:
                    self.seconds[section] += time.perf_counter() - start
                    self._add_bytes(name, before)
                    self._active = None
                return after(out) if after else out
            return timed
        self._replace(owner, name, wrapper)

    def _mark_query_grad(self, q: torch.Tensor) -> torch.Tensor:
        """Backward reaches the trained queries once the loss's part of it is done: mark when."""
        if q.requires_grad:
            def mark(grad):
                self.sync()
                self.query_grad_at = time.perf_counter()
            q.register_hook(mark)
        return q

    def split_backward(self, owner) -> None:
        def wrapper(fn):
            def timed(stepper, loss):
                self.sync()
                self.query_grad_at, before, start = None, self.comm.bytes.copy(), time.perf_counter()
                fn(stepper, loss)
                self.sync()
                end = time.perf_counter()
                split = self.query_grad_at or end
                self.seconds["loss"] += split - start
                self.seconds["encoder"] += end - split
                self._add_bytes("backward", before)
            return timed
        self._replace(owner, "backward", wrapper)

    def install(self, run: recipe.Run) -> None:
        for name, section in STEP_CALLS.items():
            self.section(step, name, section)
        net = type(run.networks["id"])
        self.section(net, "item_rows", "encoder")
        self.section(net, "encode", "encoder", after=self._mark_query_grad)
        self.section(type(run.table), "fetch", "encoder")
        stepper = type(run.steppers["id"])
        self.section(stepper, "zero_grad", "optimizer")
        self.section(stepper, "step", "optimizer")
        self.split_backward(stepper)


class FixedBatches:
    """Stands in for run.train_reader: the same pre-read batches every epoch (reading Parquet is
    not what is measured), and a timestamp at every step boundary: train_epoch asks for the next
    batch when the previous step is done. On a GPU a mark first waits for the queued kernels."""

    def __init__(self, batches: list, device: torch.device = torch.device("cpu")):
        self.batches, self.marks = batches, []
        self.sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def _mark(self) -> None:
        self.sync()
        self.marks.append(time.perf_counter())

    def epoch(self, epoch: int):
        self.marks = []
        for batch in self.batches:
            self._mark()
            yield batch
        self._mark()

    def step_seconds(self) -> list[float]:
        return np.diff(self.marks).tolist()


def table_bytes(run: recipe.Run, frozen_rows: torch.Tensor) -> dict[str, int]:
    """This worker's item-table memory, from the tensors: ID rows, their gradient and optimizer
    state, the float16 text features, the frozen network's item matrix."""
    x = run.table.x
    rows_optimizer = run.steppers["id"].rows  # the ID rows' own AdamW: the only optimizer holding x
    state = sum(nbytes(t) for t in rows_optimizer.state.get(x, {}).values() if torch.is_tensor(t))
    return {"x": nbytes(x), "x_grad": nbytes(x.grad), "x_optimizer": state, "f16": nbytes(run.table.features),
            "frozen_rows": nbytes(frozen_rows)}


def overrides(spec: dict, world: int) -> list[str]:
    B = spec["batch"]
    return [f"data.path={spec['data']}", f"trainer.num_workers={world}", "train.method=alterrec_aug",
            f"train.global_batch_size={B}", f"eval.batch_size={B}", f"model.dim={spec['dim']}",
            f"train.k1={spec['k1']}", f"train.k2={spec['k2']}", f"train.p={spec['p']}", "model.dropout=0.0",
            f"trainer.use_gpu={spec['device'].startswith('cuda')}", f"trainer.precision={spec['dtype']}",
            "model.item_layernorm=false",  # as every committed run of this benchmark (the default turned it on)
            *spec["sets"]]


def peak_memory(device: torch.device) -> dict[str, int]:
    out = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # ru_maxrss is KiB
    if device.type == "cuda":
        out["device_peak"] = torch.cuda.max_memory_allocated(device)
    return out


def measure(spec: dict) -> dict:
    """Every case of CASES for `spec["steps"]` timed steps each (after one untimed warm-up step),
    then `spec["eval_batches"]` evaluation batches. Returns this worker's figures."""
    comm = Comm()
    cfg = load_config(None, overrides(spec, comm.world))
    start = time.perf_counter()
    run = build_run(cfg, comm)
    device = run.device
    build_s = time.perf_counter() - start
    batches = list(islice(run.train_reader.epoch(0), spec["steps"]))
    eval_batches = [b.to(device) for b in islice(run.eval_readers["valid"].epoch(0), spec["eval_batches"])]
    cases, tables = [], {}
    with Profiler(comm) as prof:
        prof.install(run)
        run.train_reader = FixedBatches(batches[:1], device)
        train_epoch(run, Phase(0, "id", "random", False), None)  # warm-up: allocator, optimizer state
        run.train_reader = reader = FixedBatches(batches, device)
        for i, (negatives, merge) in enumerate(CASES):
            phase = Phase(i + 1, "id", "random" if negatives == "random" else "hard", negatives == "augmented")
            if merge != "-":
                cfg.train.merge = merge
            setup = time.perf_counter()
            frozen = frozen_item_rows(run, phase)  # once per phase in training; not part of a step
            setup = time.perf_counter() - setup
            comm.bytes.clear()
            prof.reset()
            train_epoch(run, phase, frozen)
            n = len(batches)
            counts = CountPacker([cfg.train.k1 + 1, run.k2 + 1], comm.world)  # the merge's per round
            ties = CountPacker([cfg.train.k1, run.k2], comm.world)  # the tie check's, once per step (no tie here)
            G = cfg.train.global_batch_size
            sum_bytes = prof.collective_bytes["mine_band", f"all_reduce_{dist.ReduceOp.SUM}"] / n
            sum_bytes -= G * ties.dtype.itemsize if negatives != "random" else 0
            cases.append({"negatives": negatives, "merge": merge, "step_s": reader.step_seconds(),
                          "merge_rounds": sum_bytes / (G * counts.dtype.itemsize),
                          "setup_s": setup if frozen is not None else 0.0,
                          "sections": {k: v / n for k, v in prof.seconds.items()},
                          "bytes": {k: v / n for k, v in comm.bytes.items()},
                          "bytes_by_call": {k: v / n for k, v in prof.bytes.items()}})
            if frozen is not None:
                tables = table_bytes(run, frozen)
            del frozen
    comm.bytes.clear()
    e = cfg.eval
    start = time.perf_counter()
    evaluate(comm, run.networks, run.table, eval_batches, len(eval_batches), run.popularity,
             kind_weights(cfg.train.method, e.alpha), e.longtail_bins, e.tile_rows, desc="eval")
    eval_s = time.perf_counter() - start
    return {"rank": comm.rank, "world": comm.world, "items": run.table.num_items, "local_items": run.table.num_local,
            "batch": cfg.train.global_batch_size, "k2": run.k2, "build_s": build_s, "cases": cases,
            "table_bytes": tables, "eval": {"sessions": len(eval_batches) * e.batch_size, "seconds": eval_s,
                                            "bytes": dict(comm.bytes)},
            **peak_memory(device)}


def spawned(rank: int, world: int, init_file: str, out_dir: str, spec: dict, target=measure) -> None:
    """Entry point of one spawned CPU worker: join the gloo group, measure, write rankN.json."""
    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = target(spec)
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
