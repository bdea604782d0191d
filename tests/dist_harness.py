"""Run a function on W real processes joined in a gloo process group (no mocked collectives)."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

SETUP_ATTEMPTS = 3
_SETUP_FAILED = "setup-failed"


def _worker(rank: int, world: int, init_file: str, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)  # W processes share 2 cores
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    except RuntimeError:
        # Gloo's full-mesh connect over 127.0.0.1 now and then fails with "Connection closed by peer"
        # when other processes churn local ports (measured here: 0 of 3,000 two-rank worlds alone,
        # 71 of 6,000 with two harnesses side by side; CI once). Nothing under test has run yet, so
        # the parent may start the world again; the marker tells it so. (With the retry: 0 of 3,000
        # failed beside a second harness.)
        (Path(out_dir) / f"{_SETUP_FAILED}-rank{rank}").touch()
        raise
    try:
        torch.save(fn(rank, world, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_world(fn, world: int, *args) -> list:
    """fn(rank, world, *args) on each rank; returns the per-rank results. fn must be importable.
    A world whose process group could not be made is started afresh (at most SETUP_ATTEMPTS in
    all); a failure inside fn never is."""
    for attempt in range(1, SETUP_ATTEMPTS + 1):
        with tempfile.TemporaryDirectory() as tmp:
            init_file = os.path.join(tmp, "init")
            try:
                mp.start_processes(_worker, args=(world, init_file, tmp, fn, args), nprocs=world, join=True,
                                   start_method="fork")
            except ProcessException as e:
                if attempt == SETUP_ATTEMPTS or not any(Path(tmp).glob(f"{_SETUP_FAILED}-*")):
                    raise
                warnings.warn(f"gloo group of {world} not made (attempt {attempt}): {str(e).strip()[-200:]}")
                continue
            return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]
