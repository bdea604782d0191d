"""The run directory and what is checked on the driver before anything launches: the dataset, the
resources, the directory itself (new, or the one a resume goes on in), and the summary read back.
"""
from __future__ import annotations

import datetime
import os
import sys
from contextlib import ExitStack

from alterrec_dist.common import run_layout, storage
from alterrec_dist.common.config import Config, to_toml
from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.common.files import (atomic_write_bytes, atomic_write_json, check_outside, read_json,
                                        resolve_location, try_lock, writing)
from alterrec_dist.common.methods import method
from alterrec_dist.common.storage import Location, StorePath
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.parallel.mining import CATALOG_BAND_ENTRIES, catalog_band_entries
from alterrec_dist.training.checkpoint import newest_good


# -- checks and the run directory ------------------------------------------------------------

def check_dataset(cfg: Config) -> Location:
    """The dataset directory of `cfg` as an absolute path; DataError if it is not a dataset."""
    path = cfg.resolve_path(cfg.data.path)
    if not path.exists():
        raise DataError(
            f"{path}: dataset not found (data.path={cfg.data.path!r}; make one with "
            "`python -m alterrec_dist.prepare` or `python -m alterrec_dist.synth`)")
    data = Dataset(path)  # reads the manifest: DataError naming the file if it is missing or broken
    data.check()  # every file's size and shape, item indices in range: before Ray, not in the workers
    t = cfg.train
    if method(t.method).learns_from_text and not data.has_text().any():  # every text row zeros: one constant score
        raise ConfigError(f"{path}: no item has text, and train.method={t.method} learns from it (prepare the "
                          "dataset with its text columns, e.g. `prepare log --text-cols`, or train id_only)")
    if cfg.trainer.num_workers > data.num_items:  # a worker would hold no item row, which scoring cannot take
        raise ConfigError(f"trainer.num_workers={cfg.trainer.num_workers} is more than the {data.num_items} items of "
                          f"{path} (each worker holds a share of the item table)")
    # k2 is capped at the catalog; k1 at or past it leaves no band to mine, nor k2 - k1 random draws (a method
    # with catalog negatives and no hard phase never reads either)
    if t.k1 >= data.num_items and (method(t.method).hard or t.random_negatives == "sampled"):
        raise ConfigError(f"train.k1={t.k1}: the negatives' band starts past the {data.num_items} items of {path} "
                          "(k1 must be below the catalog size)")
    rows = data.num_rows("train")
    if rows < t.global_batch_size:  # training drops the last partial batch: no step at all
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is more than the {rows} train rows of {path}")
    entries = catalog_band_entries(t.global_batch_size, data.num_items, cfg.trainer.num_workers)
    if t.random_negatives == "catalog" and entries > CATALOG_BAND_ENTRIES:
        raise ConfigError(
            f"train.random_negatives = catalog: {data.num_items} items of {path} in batches of {t.global_batch_size} "
            f"on {cfg.trainer.num_workers} workers make {entries} negatives per worker and step, above "
            f"{CATALOG_BAND_ENTRIES}; use train.random_negatives = sampled (k2-k1 random draws)")
    return path


# CPU workers per CPU a private local Ray takes at most: it oversubscribes a small machine rather than wait, but
# each worker is a process with torch of its own (~0.4 GB), and 64 on 2 CPUs ran a 24 GB machine out of memory
# in 600 lines of Ray's warnings, exit 1, a run directory left behind (reviewer finding)
WORKERS_PER_CPU = 4


def check_resources(cfg: Config) -> None:
    """Fail fast on a GPU request this machine cannot meet (a local Ray would wait forever), and on more CPU
    workers than a private local Ray should start here (`WORKERS_PER_CPU`). Joining a cluster (RAY_ADDRESS),
    the workers and their GPUs are the cluster's: the driver may run on a CPU-only head."""
    t = cfg.trainer
    if t.launcher == "ray" and os.environ.get("RAY_ADDRESS"):
        return
    cpus = os.cpu_count() or 1
    if t.launcher == "ray" and not t.use_gpu and t.num_workers > WORKERS_PER_CPU * cpus:
        raise ConfigError(f"trainer.num_workers={t.num_workers} on a private local Ray of this machine's {cpus} "
                          f"CPUs: each is a process with torch of its own; give at most {WORKERS_PER_CPU * cpus} "
                          "here, or join a cluster (RAY_ADDRESS)")
    if not t.use_gpu:
        return
    import torch

    have = torch.cuda.device_count()
    if have == 0:
        raise ConfigError("trainer.use_gpu = true but no CUDA device is visible")
    if cfg.trainer.launcher == "ray" and have < cfg.trainer.num_workers:
        raise ConfigError(
            f"trainer.num_workers={cfg.trainer.num_workers} GPU workers need as many GPUs; this machine has {have}")


def default_run_dir(cfg: Config, now: datetime.datetime | None = None) -> Location:
    """Where a run goes without --out: trainer.storage_path / (trainer.name or method-timestamp)."""
    if not cfg.trainer.storage_path.strip():  # an unset variable: the run went into the project root
        raise ConfigError("trainer.storage_path is empty: give the directory runs go in, or --out")
    name = cfg.trainer.name or f"{cfg.train.method}-{(now or datetime.datetime.now()):%Y%m%d-%H%M%S}"
    return cfg.resolve_path(cfg.trainer.storage_path) / name


def make_run_dir(cfg: Config, out: str | None, held: ExitStack) -> Location:
    """Create the (absolute) run directory, hold it (`hold`) and write `config.toml` into it.

    `--out` is taken relative to the current directory; `trainer.storage_path` relative to the
    project root; either may be a store URI (s3://, gs://). An explicitly named directory that exists
    and is not empty is refused; an auto-named one (`<method>-<timestamp>`) that collides gets a `-1`,
    `-2`, ... suffix.
    """
    if out:
        run_dir = resolve_location(out)
        auto = False
    else:
        run_dir = default_run_dir(cfg).absolute()
        auto = not cfg.trainer.name
    if isinstance(run_dir, StorePath):
        if run_dir == run_dir.bucket:  # Ray Train's storage is the run's parent, which a bucket does not have
            raise ConfigError(f"{run_dir}: a run directory goes under a key in the bucket ({run_dir}/NAME), "
                              "not the bucket itself")
        run_dir.check_bucket()
    check_outside(run_dir)  # a dataset's (or an export's) --overwrite deleted a run put in it
    run_dir = _claim_auto_name(run_dir) if auto else run_dir
    _check_unused(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{run_dir}: cannot create the run directory ({e.strerror})") from None
    hold(run_dir, held)
    _check_unused(run_dir)  # again, held: another train may have begun there since
    try:
        write_config(cfg, run_dir)
        record_dataset(Dataset(cfg.resolve_path(cfg.data.path)), run_dir)
    except DataError:  # a full disk, a dataset that cannot be read: what was written goes, so the same --out
        for name in (run_layout.CONFIG, run_layout.DATASET):  # starts again once it can
            storage.remove_tree(run_dir / name)
        raise
    return run_dir


def _claim_auto_name(base: Location) -> Location:
    """The first of `base`, `base-1`, `base-2`, ... that no run has: made here, so two trains started in the same
    second take two names (they checked `exists()` together and the second was refused as "another train")."""
    if not isinstance(base, StorePath):
        if base.parent.exists() and not base.parent.is_dir():
            raise ConfigError(f"{base.parent}: trainer.storage_path is not a directory")
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{base}: cannot create the run directory ({e.strerror})") from None
    for i in range(1_000_000):
        run_dir = base.with_name(f"{base.name}-{i}") if i else base
        if isinstance(run_dir, StorePath):  # a store has no atomic make: the first name not there
            if not run_dir.exists():
                return run_dir
            continue
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:  # another run's (its parent is a directory: made above)
            continue
        except OSError as e:
            raise ConfigError(f"{run_dir}: cannot create the run directory ({e.strerror})") from None
    raise ConfigError(f"{base}: a million runs of this name exist already: give trainer.name or --out")


def _check_unused(run_dir: Location) -> None:
    """ConfigError unless `run_dir` is absent or an empty directory (its lock alone: a train that stopped before
    writing anything)."""
    if run_dir.exists():
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: run directory path exists and is not a directory")
        if any(f.name != run_layout.LOCK for f in run_dir.iterdir()):
            raise ConfigError(
                f"{run_dir}: run directory exists and is not empty (pick another --out or trainer.name, "
                "or continue that run with --resume)")


def hold(run_dir: Location, held: ExitStack) -> None:
    """Hold the run directory for as long as `held` is open: a second train on it (another --resume, a job
    retried beside the first) is refused in one line, as two trainers appended to one metrics.jsonl and took
    turns at its summary. A run in a store is not held: a store has nothing to lock."""
    if isinstance(run_dir, StorePath):
        return
    try:
        fd = try_lock(run_dir / run_layout.LOCK)
    except OSError as e:  # a file system without locks (an NFS mount with nolock): train, unguarded, and say so
        print(f"warning: {run_dir / run_layout.LOCK}: cannot lock it ({e.strerror or e}): a second train on this "
              "run directory would not be refused", file=sys.stderr, flush=True)
        return
    if fd is None:
        raise ConfigError(f"{run_dir}: another train is writing this run directory now (it holds "
                          f"{run_layout.LOCK}): let it end, or pick another --out")
    held.callback(os.close, fd)


def reopen_run_dir(cfg: Config, run_dir: Location, held: ExitStack) -> Location:
    """Go on in an existing run directory, held (`hold`): check its checkpoints (one-line warnings for damaged
    newer ones, DataError if none is intact) and that its data is the data it started on, then record
    the config it now runs with.

    The workers verify the checkpoint again when they load it (they also resume on their own after
    a failure, with no driver involved): the price of failing here, before anything starts."""
    refuse_links(run_dir)
    hold(run_dir, held)
    data = Dataset(cfg.resolve_path(cfg.data.path))
    check_same_dataset(data, run_dir)
    found = newest_good(run_dir / run_layout.CHECKPOINTS)
    if found is None:
        print(f"{run_dir}: no checkpoint yet, starting from the beginning", file=sys.stderr, flush=True)
    elif found[1].get("epoch", 0) > cfg.train.m_max:  # nothing to train, and config.toml would stop describing it
        raise ConfigError(f"{found[0]}: the run has trained {found[1]['epoch']} epochs, train.m_max={cfg.train.m_max} "
                          f"is fewer (resume with train.m_max >= {found[1]['epoch']}, or start a new run)")
    elif cfg.trainer.zero_stage and found[1].get("world_size") != cfg.trainer.num_workers:
        # each rank holds its own part of the dense optimizer state, which DeepSpeed does not re-split: the
        # workers would refuse it after Ray and the launch had started
        world = found[1].get("world_size")
        how = (f"torchrun --nproc_per_node {world}" if cfg.trainer.launcher == "torchrun"
               else f"trainer.num_workers={world}")
        raise ConfigError(f"{found[0]}: saved by {world} workers under ZeRO stage {cfg.trainer.zero_stage}, which "
                          f"splits the optimizer state among them; resume with {how}")
    # An earlier end's summary describes the config being replaced: gone first, so a resume stopped before the
    # workers start (Ray's start-up, a Ctrl-C) does not leave a run that looks finished under the new config.
    storage.remove_tree(run_dir / run_layout.SUMMARY)
    write_config(cfg, run_dir)
    record_dataset(data, run_dir)  # where it is now; a run made before the record gets it here
    return run_dir


def refuse_links(run_dir: Location) -> None:
    """ConfigError if an entry the run writes is a symbolic link: a resume of a run handed over with one would
    write through it, outside the run (it appended to the file a linked metrics.jsonl named, and pruned the
    directory a linked checkpoints/ named: reviewer findings)."""
    if isinstance(run_dir, StorePath):
        return
    for name in run_layout.WRITTEN:
        if (run_dir / name).is_symlink():
            raise ConfigError(f"{run_dir / name}: a symbolic link (to {os.readlink(run_dir / name)}), which this "
                              "resume would write through: replace it with what it names, or start a new run")


def write_config(cfg: Config, run_dir: Location) -> None:
    """RUN_DIR/config.toml, the config the run now runs with, written whole (a failed write leaves the earlier)."""
    with writing(run_dir / run_layout.CONFIG):
        atomic_write_bytes(run_dir / run_layout.CONFIG, to_toml(cfg).encode())


def record_dataset(data: Dataset, run_dir: Location) -> None:
    """RUN_DIR/dataset.json: where the run's data was and what it held (its files' sha256), which a resume
    checks (`check_same_dataset`) and serving compares the items with."""
    identity = data.identity()  # read first: its errors are the data's
    with writing(run_dir / run_layout.DATASET):
        atomic_write_json(run_dir / run_layout.DATASET, identity)


def check_same_dataset(data: Dataset, run_dir: Location) -> None:
    """DataError in one line if `data` holds other files than the run started on (a dataset remade in place, or
    another one): its checkpoints' item rows and batch order belong to those. The same files elsewhere (a moved
    copy) are fine. Nothing to check for a run made before the record, or on data without checksums."""
    record = run_dir / run_layout.DATASET
    unlike = data.unlike(record)
    if unlike:
        raise DataError(f"{data.mpath}: not the data this run started on ({record}: {unlike}); resume on that data "
                        "or start a new run")


def open_run_dir(cfg: Config, out: str | None, resume_dir: Location | None, held: ExitStack) -> Location:
    """The run directory, new or the one a resume goes on in, held until `held` closes."""
    return reopen_run_dir(cfg, resume_dir, held) if resume_dir is not None else make_run_dir(cfg, out, held)


def read_summary(run_dir: Location, fallback: dict | None = None) -> dict:
    """`run_dir/summary.json`, or `fallback` (the summary rank 0 reported through Ray) when the
    file is not visible here (a multi-node cluster whose storage_path is not shared)."""
    path = run_dir / run_layout.SUMMARY
    if path.is_file():
        return read_json(path)
    if fallback is not None:
        print(f"note: {path} is not on this node; showing the summary rank 0 reported", file=sys.stderr)
        return fallback
    raise RuntimeError(f"{path}: training finished without writing a summary")
