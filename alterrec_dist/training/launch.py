"""The two launchers; the same worker code (`recipe.run_worker`) runs under both.

* `launch_ray`: a Ray Train `TorchTrainer` with `trainer.num_workers` workers (gloo on CPU, nccl on
  GPU). With no `RAY_ADDRESS` it starts a private local Ray; under `ray job submit` (which sets
  `RAY_ADDRESS`) it joins that cluster.
* `launch_torchrun`: every process joins the process group from the torchrun environment; without
  `WORLD_SIZE` it runs a group of one.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
from contextlib import ExitStack

from alterrec_dist.common import storage
from alterrec_dist.common.cli import bar_env
from alterrec_dist.common.config import Config
from alterrec_dist.common.errors import ConfigError, DamagedData, DataError
from alterrec_dist.common.ray_local import init_ray, stop_ray
from alterrec_dist.common.storage import Location
from alterrec_dist.training.metric_sinks import mlflow_env
from alterrec_dist.training.run_dir import open_run_dir, read_summary


# -- launcher: Ray Train ----------------------------------------------------------------------

def check_ray_train_v2() -> None:
    """This driver uses the Ray Train V2 API (the default in Ray 2.60: RunConfig.logging_config,
    worker_runtime_env, the V2 report barrier). Same rule as ray.train.v2's env_bool."""
    if os.environ.get("RAY_TRAIN_V2_ENABLED", "1").lower() not in ("1", "true"):
        raise ConfigError("RAY_TRAIN_V2_ENABLED is off: the legacy Ray Train V1 API is not supported; unset it")


def ray_worker(loop_config: dict) -> None:
    """`train_loop_per_worker`: runs in every Ray Train worker, process group already up."""
    import ray.train

    from alterrec_dist.training import recipe

    _quiet_report_log()
    errors = loop_config["errors"]
    if ray.get(errors.refusal.remote()) is not None:
        # Every rank reads the same record (the attempt that made it is over), so all return together
        # and Ray sees a finished run, not another failure to restart.
        if ray.train.get_context().get_world_rank() == 0:
            print("an earlier attempt of this launch was refused (its error ends the run): not training again",
                  file=sys.stderr, flush=True)
        return
    cfg = Config.from_dict(loop_config["config"])
    if cfg.trainer.use_gpu:
        import ray.train.torch
        import torch

        torch.cuda.set_device(ray.train.torch.get_device())
    try:
        summary = recipe.run_worker(cfg, loop_config["run_dir"], report=_report_to_ray)  # a path or a store URI
    except (ConfigError, DataError) as e:
        ray.get(errors.record.remote(e))
        raise
    # One last report on every rank (reports are a barrier): the driver gets the summary even
    # when rank 0 ran on another node and run_dir is not shared.
    ray.train.report({"summary": summary})


def _report_to_ray(metrics: dict, checkpoint: Location) -> None:
    """`ray.train.report` from every rank (it is a barrier), with the checkpoint directory registered
    where it lies: it is inside Ray's experiment directory (the run directory, local or a store URI),
    so nothing is copied."""
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint(str(checkpoint)),
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
    # Each CPU worker reserves one CPU: on a small machine oversubscribe rather than wait forever.
    # The dashboard (~2 s) serves the State API that Ray Train V2's placement-group cleaner polls;
    # without it that actor logs a warning every second for the whole run.
    return init_ray(num_cpus=max(os.cpu_count() or 1, num_workers), dashboard=True, private_env=PRIVATE_RAY_TRAIN_ENV)


# Ray Train's controller looks at its workers every 2 s: the last report and the end of a finished worker group
# each wait for a look. A private Ray's controller looks every 0.2 s: the embedded default ended 6-7 s sooner
# (100-111 s against 106-118 s, side by side, at the same sessions/s), a tiny run 8 s sooner. A look that takes
# longer is no error (that is RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 minutes).
PRIVATE_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def is_refusal(error: Exception) -> bool:
    """Whether a worker's error comes again on every attempt: a ConfigError (a setting the run cannot go on
    with, such as a diverged loss) or DamagedData. Any other DataError may be a file or a store that failed for
    a moment (its read errors are DataErrors too), so Ray restarts it as it does a killed worker."""
    return isinstance(error, (ConfigError, DamagedData))


class WorkerErrors:
    """The one-line errors (ConfigError, DataError) the workers raised in this launch, held by a Ray actor that
    outlives them. A refusal (`is_refusal`) would come again on every attempt, so Ray's restarts
    (`trainer.max_failures`, forever at -1) would each train up to it again: a restarted worker that finds one
    trains nothing. Whichever ends the run is the driver's error, as the torchrun launcher's rank prints it."""

    def __init__(self):
        self._refusal: ConfigError | DamagedData | None = None
        self._last: ConfigError | DataError | None = None

    def record(self, error: ConfigError | DataError) -> None:
        self._last = error
        if self._refusal is None and is_refusal(error):
            self._refusal = error

    def refusal(self) -> ConfigError | DamagedData | None:
        return self._refusal

    def last(self) -> ConfigError | DataError | None:
        return self._last


def launch_ray(cfg: Config, run_dir: Location) -> dict:
    """Train under Ray Train. `TorchTrainer.fit` puts its own SIGINT handler in place of the command's (it aborts
    the run, and fit then raises SystemExit(1)), and a SIGTERM's exit came out of fit as SystemExit(1) too, so a
    Ctrl-C or a SIGTERM ended the command with exit 1 and nothing said. Both end it as they do under torchrun:
    "interrupted" and 130, or 143, the checkpoints kept for --resume."""
    with SignalsSeen() as seen:
        try:
            return _launch_ray(cfg, run_dir)
        except SystemExit:
            if signal.SIGINT in seen:
                raise KeyboardInterrupt from None
            if signal.SIGTERM in seen:
                raise SystemExit(128 + signal.SIGTERM) from None
            raise


def _launch_ray(cfg: Config, run_dir: Location) -> dict:
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    # Ray's record of the checkpoints reported by an earlier attempt (resumed here) lists directories
    # that checkpoint.prune has removed since, and Ray refuses to start on such a record. The workers
    # find their checkpoint in RUN_DIR/checkpoints, not there, so the record starts afresh.
    (run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).unlink(missing_ok=True)
    started = _init_ray(cfg.trainer.num_workers)
    try:
        errors = ray.remote(num_cpus=0)(WorkerErrors).remote()  # no CPU: the workers may hold every one
        trainer = TorchTrainer(
            ray_worker,
            train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir), "errors": errors},
            torch_config=TorchConfig(backend="nccl" if cfg.trainer.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.trainer.num_workers, use_gpu=cfg.trainer.use_gpu),
            # Ray's own files (its run-state snapshot) go into run_dir itself, so the checkpoints the
            # workers write to run_dir/checkpoints are Ray's to register in place. Ray deletes none
            # (CheckpointConfig's num_to_keep stays None): checkpoint.prune is their one owner, under
            # either launcher. After a failure Ray restarts the workers, which resume by themselves.
            run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                                 failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
                                 worker_runtime_env={"env_vars": mlflow_env() | bar_env()},
                                 # INFO would echo every ray.train.report() dict from every worker
                                 logging_config=LoggingConfig(log_level="WARNING")),
        )
        result, failure = None, None
        sigint = signal.getsignal(signal.SIGINT)
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            failure = e
        finally:  # fit leaves its handler, which would swallow a Ctrl-C from here on (its run is over)
            signal.signal(signal.SIGINT, sigint)
        # a refusal ends the run whether Ray gave up on it (no restart left) or the restarted workers stopped at
        # once (a finished fit); a worker's last error ends it where Ray's failure is that error: its one line,
        # not Ray's traceback
        refused, last = ray.get([errors.refusal.remote(), errors.last.remote()])
        if refused is not None:
            raise refused from None
        if failure is not None:
            raise (last if last is not None and str(last) in str(failure) else
                   TrainingError(f"training failed: {failure}")) from None
        reported = (result.metrics or {}).get("summary")
        return read_summary(run_dir, reported)
    finally:
        if started:
            stop_ray()


class SignalsSeen:
    """Which signals reached this process while open, whoever's Python handler took them: the interpreter writes
    each one's number to the wakeup descriptor before any handler runs. Outside the main thread it sees none."""

    def __enter__(self) -> "SignalsSeen":
        self._seen: set[int] = set()
        self._reader, self._writer = socket.socketpair()
        for end in (self._reader, self._writer):
            end.setblocking(False)  # the interpreter's write must never block; reading drains what is there
        try:
            self._previous = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        except ValueError:
            self._previous = None
        return self

    def __contains__(self, signum: int) -> bool:
        try:
            while chunk := self._reader.recv(256):
                self._seen.update(chunk)
        except BlockingIOError:
            pass
        return signum in self._seen

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.set_wakeup_fd(self._previous)
        self._reader.close()
        self._writer.close()


class TrainingError(Exception):
    """The workers failed; the message (and Ray's log above it) says how."""


# -- launcher: torchrun -----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adopt_torchrun_world(cfg: Config) -> None:
    """Under torchrun the world is torchrun's WORLD_SIZE (1 without it), whatever trainer.num_workers says: set
    before the config is validated (a global batch divisible by torchrun's world, not by the default 2 workers),
    the driver's checks (the catalog softmax's size depends on it) and the resolved config."""
    cfg.trainer.num_workers = int(os.environ.get("WORLD_SIZE", 1))


def launch_torchrun(cfg: Config, out: str | None, resume_dir: Location | None) -> tuple[dict, Location] | None:
    """Join the torchrun process group (or make one of size 1) and run the recipe in this process; `cfg` has been
    through `adopt_torchrun_world` (`train.load_run_config`). Returns (summary, run_dir) on rank 0, None on the
    others."""
    import torch
    import torch.distributed as dist

    from alterrec_dist.parallel.comm import Comm
    from alterrec_dist.training import recipe

    standalone = "WORLD_SIZE" not in os.environ
    if not standalone:
        # A rank waits in gloo/nccl calls (the rendezvous, a collective) that a Python signal handler cannot
        # interrupt: run_cli's SIGTERM-as-exit would keep it there until the call times out. torchrun stops the
        # ranks with SIGTERM when one fails, so it ends a rank where it stands (checkpoints are atomic; its
        # MLflow run is left RUNNING). A group of one keeps the handler: it waits on no other rank.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    backend = "nccl" if cfg.trainer.use_gpu else "gloo"
    if cfg.trainer.use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if standalone:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    else:
        dist.init_process_group(backend)  # env:// — RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    held = ExitStack()  # rank 0's hold on the run directory, until its training ends
    try:
        comm = Comm()
        # Rank 0 makes the run directory (one timestamp for all) and holds it; the others learn it or the error.
        run_dir, err = None, None
        if comm.rank == 0:
            try:
                run_dir = str(open_run_dir(cfg, out, resume_dir, held))
            except (ConfigError, DataError) as e:
                err = e
        run_dir, err = comm.broadcast_object((run_dir, err))
        if err is not None:
            if comm.rank == 0:
                raise err
            raise SystemExit(2)  # rank 0 prints the one line
        run_dir = storage.location(run_dir)
        summary = recipe.run_worker(cfg, run_dir)
        comm.barrier()
        return (read_summary(run_dir, summary), run_dir) if comm.rank == 0 else None
    finally:
        held.close()
        dist.destroy_process_group()
