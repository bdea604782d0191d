"""Training driver: `python -m alterrec_dist.train [--config F] [--set a.b=c ...] [--out DIR] [--launcher L]`,
or `... --resume RUN_DIR [--set ...]` to continue a run from its newest intact checkpoint.

Launchers (the same worker code runs under both; see `recipe.run_worker`):

* `ray` (default): a Ray Train `TorchTrainer` with `trainer.num_workers` workers (gloo on CPU,
  nccl on GPU). With no `RAY_ADDRESS` it starts a private local Ray; under `ray job submit`
  (which sets `RAY_ADDRESS`) it joins that cluster.
* `torchrun`: `torchrun --nproc_per_node N -m alterrec_dist.train --launcher torchrun ...`;
  every process joins the process group from the torchrun environment. Without `WORLD_SIZE`
  (plain `python -m alterrec_dist.train --launcher torchrun`) it runs a group of one.

Everything that can be checked before launching (config, dataset, run directory, the checkpoint
to resume from) is checked on the driver, so bad input costs a one-line error and exit code 2, not
a Ray start.

Resuming (see `load_run_config`): the workers always start from the newest intact checkpoint in
RUN_DIR/checkpoints when there is one, so the same code path serves `--resume`, Ray restarting the
workers after a failure (`trainer.max_failures`), and a retried job (`--resume auto`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
from pathlib import Path

from alterrec_dist import ray_watchdog
from alterrec_dist.checkpoint import newest_good
from alterrec_dist.cli import run_cli
from alterrec_dist.config import Config, load_config, to_toml
from alterrec_dist.dataset import Dataset
from alterrec_dist.errors import ConfigError, DataError
from alterrec_dist.files import atomic_write_bytes, read_json

METRIC_COLUMNS = ("hit@10", "hit@20", "ndcg@10", "ndcg@20", "mrr@20")
SCORE_ROWS = ("id", "text", "fused")


# -- checks and the run directory ------------------------------------------------------------

def check_dataset(cfg: Config) -> Path:
    """The dataset directory of `cfg` as an absolute path; DataError if it is not a dataset."""
    path = cfg.resolve_path(cfg.data.path)
    if not path.exists():
        raise DataError(
            f"{path}: dataset not found (data.path={cfg.data.path!r}; make one with "
            "`python -m alterrec_dist.prepare` or `python -m alterrec_dist.synth`)")
    data = Dataset(path)  # reads the manifest: DataError naming the file if it is missing or broken
    data.check()  # every file's size and shape, item indices in range: before Ray, not in the workers
    rows = data.num_rows("train")
    if rows < cfg.train.global_batch_size:  # training drops the last partial batch: no step at all
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is more than the {rows} train rows of {path}")
    return path


def check_resources(cfg: Config) -> None:
    """Fail fast on a GPU request this machine cannot meet (a local Ray would wait forever).
    Joining a cluster (RAY_ADDRESS), the GPUs are the workers': the driver may run on a CPU-only head."""
    if not cfg.trainer.use_gpu or (cfg.trainer.launcher == "ray" and os.environ.get("RAY_ADDRESS")):
        return
    import torch

    have = torch.cuda.device_count()
    if have == 0:
        raise ConfigError("trainer.use_gpu = true but no CUDA device is visible")
    if cfg.trainer.launcher == "ray" and have < cfg.trainer.num_workers:
        raise ConfigError(
            f"trainer.num_workers={cfg.trainer.num_workers} GPU workers need as many GPUs; this machine has {have}")


def default_run_dir(cfg: Config, now: datetime.datetime | None = None) -> Path:
    name = cfg.trainer.name or f"{cfg.train.method}-{(now or datetime.datetime.now()):%Y%m%d-%H%M%S}"
    return cfg.resolve_path(cfg.trainer.storage_path) / name


def make_run_dir(cfg: Config, out: str | None) -> Path:
    """Create the (absolute) run directory and write `config.toml` into it.

    `--out` is taken relative to the current directory; `trainer.storage_path` relative to the
    project root. An explicitly named directory that exists and is not empty is refused; an
    auto-named one (`<method>-<timestamp>`) that collides gets a `-1`, `-2`, ... suffix.
    """
    if out:
        run_dir = Path(out).expanduser().absolute()
        auto = False
    else:
        run_dir = default_run_dir(cfg).absolute()
        auto = not cfg.trainer.name
    if auto:
        base, i = run_dir, 0
        while run_dir.exists():
            i += 1
            run_dir = base.with_name(f"{base.name}-{i}")
    if run_dir.exists():
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: run directory path exists and is not a directory")
        if any(run_dir.iterdir()):
            raise ConfigError(
                f"{run_dir}: run directory exists and is not empty (pick another --out or trainer.name, "
                "or continue that run with --resume)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{run_dir}: cannot create the run directory ({e.strerror})") from None
    atomic_write_bytes(run_dir / "config.toml", to_toml(cfg).encode())
    return run_dir


def load_run_config(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """The config to run and, when an existing run goes on, its directory (else None: a new run).

    `--resume RUN_DIR`: RUN_DIR's config.toml with the `--set` values on top (e.g. another
    trainer.num_workers). `--resume auto` (a retried job with a fixed command line): the same for the
    run directory that `--out` or `trainer.name` names, if an attempt has started there (it holds a
    config.toml), else a new run there from `--config` and `--set`."""
    if args.resume is None:
        return load_config(args.config, args.overrides), None
    if args.resume == "auto":
        cfg = load_config(args.config, args.overrides)
        if not (args.out or cfg.trainer.name):
            raise ConfigError("--resume auto needs a run directory a retry finds again: --out or trainer.name")
        run_dir = Path(args.out).expanduser().absolute() if args.out else default_run_dir(cfg).absolute()
        if not (run_dir / "config.toml").is_file():
            return cfg, None
    else:
        if args.config or args.out:
            raise ConfigError("--resume RUN_DIR goes on with the run's own config.toml: drop --config and --out")
        run_dir = Path(args.resume).expanduser().absolute()
        if not (run_dir / "config.toml").is_file():
            raise ConfigError(f"{run_dir}: not a run directory (no config.toml)")
    return load_config(run_dir / "config.toml", args.overrides), run_dir


def reopen_run_dir(cfg: Config, run_dir: Path) -> Path:
    """Go on in an existing run directory: check its checkpoints (one-line warnings for damaged
    newer ones, DataError if none is intact), then record the config it now runs with.

    The workers verify the checkpoint again when they load it (they also resume on their own after
    a failure, with no driver involved): the price of failing here, before anything starts."""
    found = newest_good(run_dir / "checkpoints")
    if found is None:
        print(f"{run_dir}: no checkpoint yet, starting from the beginning", file=sys.stderr, flush=True)
    atomic_write_bytes(run_dir / "config.toml", to_toml(cfg).encode())
    return run_dir


def open_run_dir(cfg: Config, out: str | None, resume_dir: Path | None) -> Path:
    return reopen_run_dir(cfg, resume_dir) if resume_dir is not None else make_run_dir(cfg, out)


# -- the summary table ------------------------------------------------------------------------

def format_summary(summary: dict, run_dir: Path, metric: str = "") -> str:
    """The test table (rows id/text/fused, and with eval.alpha_sweep the fused weight chosen on
    validation; columns METRIC_COLUMNS), best epoch and run dir."""
    test = summary.get("test", {})
    rows = [(row, test[row], "") for row in SCORE_ROWS if row in test]
    alpha = summary.get("alpha")
    if alpha:
        rows.append((f"fused@{alpha['chosen']:g}", alpha["test"], f"  (alpha chosen on valid {alpha['selection']})"))
    width = max(len(c) for c in METRIC_COLUMNS) + 2
    first = max([6] + [len(r[0]) + 1 for r in rows])
    lines = [f"{'test':<{first}}" + "".join(f"{c:>{width}}" for c in METRIC_COLUMNS)]
    for row, vals, note in rows:
        cells = []
        for c in METRIC_COLUMNS:
            v = vals.get(c)
            cells.append(f"{v:>{width}.4f}" if isinstance(v, (int, float)) else f"{'-':>{width}}")
        lines.append(f"{row:<{first}}" + "".join(cells) + note)
    chosen = f" (selected on valid {metric})" if metric else ""
    lines.append(f"best epoch: {summary.get('best_epoch', '?')}{chosen}")
    lines.append(f"run dir: {run_dir}")
    return "\n".join(lines)


def read_summary(run_dir: Path, fallback: dict | None = None) -> dict:
    """`run_dir/summary.json`, or `fallback` (the summary rank 0 reported through Ray) when the
    file is not visible here (a multi-node cluster whose storage_path is not shared)."""
    path = run_dir / "summary.json"
    if path.is_file():
        return read_json(path)
    if fallback is not None:
        print(f"note: {path} is not on this node; showing the summary rank 0 reported", file=sys.stderr)
        return fallback
    raise RuntimeError(f"{path}: training finished without writing a summary")


# -- launcher: Ray Train ----------------------------------------------------------------------

# Ray streams worker output line by line, so every progress-bar refresh becomes a console line:
# refresh the recipe's tqdm bars at most every few seconds there (tqdm reads TQDM_* at import).
WORKER_ENV = {"TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "5")}


def check_ray_train_v2() -> None:
    """This driver uses the Ray Train V2 API (the default in Ray 2.60: RunConfig.logging_config,
    worker_runtime_env, the V2 report barrier). Same rule as ray.train.v2's env_bool."""
    if os.environ.get("RAY_TRAIN_V2_ENABLED", "1").lower() not in ("1", "true"):
        raise ConfigError("RAY_TRAIN_V2_ENABLED is off: the legacy Ray Train V1 API is not supported; unset it")


def ray_worker(loop_config: dict) -> None:
    """`train_loop_per_worker`: runs in every Ray Train worker, process group already up."""
    import ray.train

    from alterrec_dist import recipe

    _quiet_report_log()
    cfg = Config.from_dict(loop_config["config"])
    if cfg.trainer.use_gpu:
        import ray.train.torch
        import torch

        torch.cuda.set_device(ray.train.torch.get_device())
    summary = recipe.run_worker(cfg, Path(loop_config["run_dir"]), report=_report_to_ray)
    # One last report on every rank (reports are a barrier): the driver gets the summary even
    # when rank 0 ran on another node and run_dir is not shared.
    ray.train.report({"summary": summary})


def _report_to_ray(metrics: dict, checkpoint: Path | None) -> None:
    """`ray.train.report` from every rank (it is a barrier), with the checkpoint directory registered
    where it lies: it is inside Ray's experiment directory (the run directory), so nothing is copied."""
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


def _quiet_report_log() -> None:
    """Ray 2.60 logs every report() at INFO ("Reporting training result N: TrainingReport(...)")
    through `logging.getLogger(__file__)` in ray/train/v2/_internal/execution/context.py: a
    logger outside `ray.train`, so RunConfig's LoggingConfig does not reach it. Raise it here."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # Train V1, or the module moved: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _init_ray(num_workers: int) -> bool:
    """Connect to the cluster in RAY_ADDRESS, or start a private local Ray. True if started here."""
    import logging

    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    common = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    if os.environ.get("RAY_ADDRESS"):
        # `ray job submit` sets RAY_ADDRESS for the entrypoint; ray.init resolves it (also "auto").
        ray.init(**common)
        return False
    # A driver killed without ray.shutdown() would leave Ray's agents running: the watchdog
    # (started first, so it sees every Ray process appear) removes them when this process ends.
    ray_watchdog.start()
    # address="local": never attach to some other cluster found in /tmp/ray by accident.
    # Each CPU worker reserves one CPU: on a small machine oversubscribe rather than wait forever.
    # The dashboard (~2 s) serves the State API that Ray Train V2's placement-group cleaner polls;
    # without it that actor logs a warning every second for the whole run.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_workers),
             include_dashboard=True, **common)
    return True


def launch_ray(cfg: Config, run_dir: Path) -> dict:
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    # Under `python -m`, this module is __main__; hand Ray the importable function instead, so
    # workers import it from the package rather than unpickling a copy of __main__'s globals.
    from alterrec_dist.train import ray_worker as worker_fn

    # Ray's record of the checkpoints reported by an earlier attempt (resumed here) lists directories
    # that checkpoint.prune has removed since, and Ray refuses to start on such a record. The workers
    # find their checkpoint in RUN_DIR/checkpoints, not there, so the record starts afresh.
    (run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).unlink(missing_ok=True)
    started = _init_ray(cfg.trainer.num_workers)
    try:
        trainer = TorchTrainer(
            worker_fn,
            train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir)},
            torch_config=TorchConfig(backend="nccl" if cfg.trainer.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.trainer.num_workers, use_gpu=cfg.trainer.use_gpu),
            # Ray's own files (its run-state snapshot) go into run_dir itself, so the checkpoints the
            # workers write to run_dir/checkpoints are Ray's to register in place. Ray deletes none
            # (CheckpointConfig's num_to_keep stays None): checkpoint.prune is their one owner, under
            # either launcher. After a failure Ray restarts the workers, which resume by themselves.
            run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                                 failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
                                 worker_runtime_env={"env_vars": WORKER_ENV},
                                 # INFO would echo every ray.train.report() dict from every worker
                                 logging_config=LoggingConfig(log_level="WARNING")),
        )
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            raise TrainingError(f"training failed: {e}") from None
        reported = (result.metrics or {}).get("summary")
        return read_summary(run_dir, reported)
    finally:
        if started:
            ray.shutdown()
            ray_watchdog.stop()


class TrainingError(Exception):
    """The workers failed; the message (and Ray's log above it) says how."""


# -- launcher: torchrun -----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_torchrun(cfg: Config, out: str | None, resume_dir: Path | None) -> tuple[dict, Path] | None:
    """Join the torchrun process group (or make one of size 1) and run the recipe in this
    process. Returns (summary, run_dir) on rank 0, None on the others."""
    import torch
    import torch.distributed as dist

    from alterrec_dist import recipe
    from alterrec_dist.sharded import Comm

    standalone = "WORLD_SIZE" not in os.environ
    world = 1 if standalone else int(os.environ["WORLD_SIZE"])
    if cfg.trainer.num_workers != world:
        cfg.trainer.num_workers = world  # the resolved config records the world actually used
        cfg.validate()
    backend = "nccl" if cfg.trainer.use_gpu else "gloo"
    if cfg.trainer.use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if standalone:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    else:
        dist.init_process_group(backend)  # env:// — RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    try:
        comm = Comm()
        # Rank 0 makes the run directory (one timestamp for all); the others learn it or the error.
        run_dir, err = None, None
        if comm.rank == 0:
            try:
                run_dir = str(open_run_dir(cfg, out, resume_dir))
            except (ConfigError, DataError) as e:
                err = e
        run_dir, err = comm.broadcast_object((run_dir, err))
        if err is not None:
            if comm.rank == 0:
                raise err
            raise SystemExit(2)  # rank 0 prints the one line
        run_dir = Path(run_dir)
        summary = recipe.run_worker(cfg, run_dir)
        comm.barrier()
        return (read_summary(run_dir, summary), run_dir) if comm.rank == 0 else None
    finally:
        dist.destroy_process_group()


# -- entry point ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m alterrec_dist.train",
        description="Train an AlterRec session recommender (or a baseline) and print its test metrics.")
    p.add_argument("--config", metavar="FILE",
                   help="TOML config (e.g. configs/default.toml); without it, the embedded default")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable (e.g. --set train.m_max=3)")
    p.add_argument("--out", metavar="RUN_DIR",
                   help="run directory (default: <trainer.storage_path>/<trainer.name or method-timestamp>)")
    p.add_argument("--launcher", choices=("ray", "torchrun"),
                   help="overrides trainer.launcher (default ray)")
    p.add_argument("--resume", metavar="RUN_DIR|auto",
                   help="continue RUN_DIR from its newest intact checkpoint, with its config.toml (--set may "
                        "change e.g. trainer.num_workers); 'auto': continue the run dir of --out or trainer.name "
                        "if one was started there, else start it (for retried jobs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg, resume_dir = load_run_config(args)
    if args.launcher:
        cfg.trainer.launcher = args.launcher
    check_dataset(cfg)
    check_resources(cfg)
    if cfg.trainer.launcher == "torchrun":
        done = launch_torchrun(cfg, args.out, resume_dir)
        if done is None:
            return 0
        summary, run_dir = done
    else:
        check_ray_train_v2()
        run_dir = open_run_dir(cfg, args.out, resume_dir)
        print(f"run dir: {run_dir}", flush=True)
        try:
            summary = launch_ray(cfg, run_dir)
        except TrainingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(format_summary(summary, run_dir, cfg.eval.metric), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
