"""Where rank 0's metrics go: `metrics.jsonl` (one JSON line per epoch), TensorBoard event files in
RUN_DIR/tensorboard, and an MLflow run when MLFLOW_TRACKING_URI is set (the optional `mlflow` extra).

Every scalar is logged at the global step (steps done since the run started): the trained network's
loss every `train.log_every` steps as `loss/<network>`, and at an epoch's last step its validation
metrics as `valid/<id|text|fused>/<metric>` and its throughput as `throughput/sessions_per_s`. One
step axis for all of them lets a resumed run drop what it redoes, as metrics.jsonl is cut back:
TensorBoard discards the earlier attempts' events from the resume point on (`purge_step`).

A run directory in an object store gets the same files: an object cannot be appended to, so
metrics.jsonl is uploaded whole with each line, and the event file is written in a local temp
directory and uploaded at every epoch and at the end.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from alterrec_dist.common import run_layout, storage
from alterrec_dist.common.config import METRICS, Config, to_toml
from alterrec_dist.common.errors import ConfigError, DataError, hide_credentials, one_line
from alterrec_dist.common.files import atomic_write_bytes, writing
from alterrec_dist.common.storage import Location, StorePath

TRACKING_URI = "MLFLOW_TRACKING_URI"
# Handed to the Ray workers: rank 0 may run on a node whose environment lacks them (MLflow 3.17
# refuses a local file: store without MLFLOW_ALLOW_FILE_STORE=true). Credentials (MLFLOW_TRACKING_TOKEN,
# ...) are not: a runtime env is visible on Ray's dashboard.
MLFLOW_ENV = (TRACKING_URI, "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE")


def epoch_scalars(line: dict) -> dict[str, float]:
    """The per-epoch scalars of a metrics.jsonl line, by tag."""
    scalars = {f"valid/{part}/{m}": scores[m] for part, scores in line["valid"].items() for m in METRICS
               if m in scores}
    if line["sessions_per_s"] is not None:  # None: no step of the epoch ran in this attempt
        scalars["throughput/sessions_per_s"] = line["sessions_per_s"]
    return scalars


def loss_scalars(network: str, losses: dict[str, float]) -> dict[str, float]:
    """One step's logged losses by tag: `loss/<network>`, and NFRec's id and text parts (`loss_id`,
    `loss_text`) as `loss/<network>/id` and `loss/<network>/text`."""
    return {f"loss/{network}" + ("" if key == "loss" else "/" + key.removeprefix("loss_")): value
            for key, value in losses.items()}


def mlflow_name(tag: str) -> str:
    """A tag as an MLflow metric name, which may not hold '@': valid/fused/ndcg@10 -> valid/fused/ndcg_at_10."""
    return tag.replace("@", "_at_")


def mlflow_env() -> dict[str, str]:
    """The driver's MLflow settings that the workers need (`MLFLOW_ENV`), those that are set."""
    return {k: os.environ[k] for k in MLFLOW_ENV if os.environ.get(k)}


def import_mlflow():
    """mlflow, for a run that logs to MLFLOW_TRACKING_URI; a one-line error if it is not installed."""
    try:
        import mlflow
    except ImportError:
        raise ConfigError(f"{TRACKING_URI} is set but mlflow is not installed: "
                          "pip install -e '.[mlflow]', or unset it") from None
    return mlflow


def check_mlflow() -> None:
    """On the driver, before anything starts: a run told to log to MLflow can (a refused file store stopped
    the run at its first epoch with MLflow's traceback and a half-made run directory; a tracking server that was
    down, after 4 minutes of MLflow's retries)."""
    uri = os.environ.get(TRACKING_URI)
    if uri:
        shown = hide_credentials(uri)
        mlflow = import_mlflow()
        # MLflow's own rules: which URIs are a local file store ("databricks" is not), which values allow one
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
        from mlflow.exceptions import MlflowException
        from mlflow.utils.uri import is_local_uri

        try:
            if is_local_uri(uri) and not MLFLOW_ALLOW_FILE_STORE.get():  # read only for a file store, as MLflow does
                raise ConfigError(f"{TRACKING_URI}={shown}: MLflow opens a local file store only with "
                                  "MLFLOW_ALLOW_FILE_STORE=true (set it, or use a tracking server)")
        except (MlflowException, ValueError) as e:  # file://otherhost/x; MLFLOW_ALLOW_FILE_STORE=yes
            raise ConfigError(f"{TRACKING_URI}={shown}: {hide_credentials(one_line(e))}") from None
        if urlparse(uri).scheme in ("http", "https"):
            check_server(mlflow, uri)


# MLflow's requests, bounded. Its defaults (7 retries with backoff, 120 s a try) held rank 0 up to about 20
# minutes on a server that accepted and never answered, while the other ranks waited in a collective (NCCL's
# default timeout is 10 minutes: reviewer finding). A server asked once at the start: one try. A log: 3 tries of
# at most 15 s, about 50 s in all, before this attempt stops logging to MLflow. Set by the user, theirs decide.
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
LOG_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def check_server(mlflow, uri: str) -> None:
    """The tracking server answers a request (the cheapest: one experiment), or a one-line error."""
    try:
        with bounded_requests(PROBE_ENV):
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # whatever the client raises for a server that is down or not MLflow's
        raise ConfigError(f"{TRACKING_URI}={hide_credentials(uri)}: the MLflow server does not answer "
                          f"({hide_credentials(one_line(e))[:300]}): "
                          f"start it, or unset {TRACKING_URI}") from None


@contextmanager
def bounded_requests(limits: dict[str, str]):
    """MLflow's requests within the block at `limits` (PROBE_ENV, LOG_ENV; and its other settings that it reads at
    each call) where the user set none; the environment as it was after."""
    unset = [k for k in limits if not os.environ.get(k)]
    os.environ.update({k: limits[k] for k in unset})
    try:
        yield
    finally:
        for k in unset:
            del os.environ[k]


class MlflowRun:
    """The run's MLflow run. Its id is kept in RUN_DIR/mlflow_run_id, so that a resumed attempt goes on
    logging into the same MLflow run; the config goes in as parameters when the run is created.

    MLflow is a side channel: a log or the end that fails (a server gone mid-run) is one warning, and this
    attempt logs no more to MLflow, while training goes on (metrics.jsonl and TensorBoard keep the record). It
    had stopped the run with a traceback after MLflow's retries, and under Ray spent the run's restarts on it
    (reviewer finding)."""

    def __init__(self, run_dir: Location, cfg: Config):
        self.mlflow = import_mlflow()
        self.failed = False  # once a call failed: this attempt logs no more to MLflow
        # MLflow prints the run's link when it ends, made from the tracking URI: a URI with a password, not at all
        uri = os.environ[TRACKING_URI]
        self.quiet = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"} if hide_credentials(uri) != uri else {}
        # an attempt after a restart starts here too, with no check on the driver before it: a server down then
        # is one warning as well
        self._call(self._start, run_dir, cfg)

    def _start(self, run_dir: Location, cfg: Config) -> None:
        id_file = run_dir / run_layout.MLFLOW_RUN_ID
        if id_file.is_file():
            self.mlflow.start_run(run_id=id_file.read_text().strip())
            return
        run = self.mlflow.start_run(run_name=run_dir.name, tags={"run_dir": str(run_dir)})
        atomic_write_bytes(id_file, run.info.run_id.encode())
        self.mlflow.log_params({f"{section}.{key}": value for section, table in cfg.to_dict().items()
                                for key, value in table.items()})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._call(self.mlflow.log_metrics, {mlflow_name(tag): value for tag, value in scalars.items()}, step=step)

    def end(self, failed: bool) -> None:
        if not self.failed:
            self._call(self.mlflow.end_run, "FAILED" if failed else "FINISHED")
            return
        # after a failure still ended, as MLflow's client counts its runs in this process, but tried once, quietly
        try:
            with bounded_requests(PROBE_ENV | self.quiet):
                self.mlflow.end_run("FAILED")
        except Exception:
            pass

    def results(self, summary: dict, config_text: str) -> None:
        """The run's results: the test metrics at the best epoch (`test/<kind>/<metric>`), the best epoch and the
        fusion weight chosen, and summary.json and config.toml as artifacts (the config the run ended with: the
        parameters are the creation's, which MLflow does not let a resume change)."""
        metrics = {mlflow_name(f"test/{kind}/{m}"): v for kind, scores in summary["test"].items()
                   for m, v in scores.items() if m in METRICS}
        metrics["best_epoch"] = summary["best_epoch"]
        if "alpha" in summary:
            metrics["alpha_chosen"] = summary["alpha"]["chosen"]
        self._call(self.mlflow.log_metrics, metrics)
        self._call(self.mlflow.log_dict, summary, run_layout.SUMMARY)
        self._call(self.mlflow.log_text, config_text, run_layout.CONFIG)

    def _call(self, fn, *args, **kwargs) -> None:
        if self.failed:
            return
        try:
            with bounded_requests(LOG_ENV | self.quiet):
                fn(*args, **kwargs)
        except Exception as e:  # whatever the client raises: MLflow must not stop the training
            self.failed = True
            print(f"warning: MLflow stopped logging this run ({hide_credentials(one_line(e))[:300]}); "
                  "metrics.jsonl and TensorBoard keep its metrics", file=sys.stderr, flush=True)


class MetricSinks:
    """Rank 0's metric writers for one attempt of a run, which resumes after `steps_done` global steps.
    A context manager: leaving it closes the event file and ends the MLflow run (FAILED on an error)."""

    def __init__(self, run_dir: Location, cfg: Config, steps_done: int, end_redone: bool = False):
        from torch.utils.tensorboard import SummaryWriter  # here: the other ranks never load it

        self.jsonl = run_dir / run_layout.METRICS
        self.events = run_dir / run_layout.TENSORBOARD
        # in a store, this attempt's event file is written here and uploaded (`_upload_events`)
        self.local_events = Path(tempfile.mkdtemp(prefix="alterrec-tensorboard-")) \
            if isinstance(self.events, StorePath) else self.events
        # events at steps >= purge_step in the earlier attempts' files are the redone steps': dropped, and those
        # of step `steps_done` too when the attempt logs it again (`end_redone`: an epoch end not yet logged)
        with writing(self.local_events):
            self.tensorboard = SummaryWriter(str(self.local_events), purge_step=steps_done + (not end_redone))
        self.mlflow = MlflowRun(run_dir, cfg) if os.environ.get(TRACKING_URI) else None

    def step(self, network: str, losses: dict[str, float], step: int) -> None:
        """The losses of global step `step` (as floats), `network` being the one trained."""
        self._scalars(loss_scalars(network, losses), step)

    def epoch(self, line: dict, step: int) -> None:
        """An epoch's metrics.jsonl line, at the global step that ended it."""
        with writing(self.jsonl):
            append_line(self.jsonl, json.dumps(line))
        self._scalars(epoch_scalars(line), step)
        with writing(self.local_events):
            self.tensorboard.flush()  # an epoch's events are on disk with its line, not up to 2 minutes later
        self._upload_events()

    def _upload_events(self) -> None:
        if self.local_events != self.events:
            for name in storage.files_under(self.local_events):
                storage.copy_file(self.local_events / name, self.events / name)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        with writing(self.local_events):  # a full disk: one line, not TensorBoard's traceback (MLflow's are its own)
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.mlflow is not None:
            self.mlflow.log(scalars, step)

    def summary(self, summary: dict, cfg: Config) -> None:
        """The run's end: its results go to MLflow (metrics.jsonl and TensorBoard hold epochs, summary.json all)."""
        if self.mlflow is not None:
            self.mlflow.results(summary, to_toml(cfg))

    def __enter__(self) -> MetricSinks:
        return self

    def __exit__(self, exc_type, *_) -> None:
        # The local temp events go, and MLflow's run ends, whatever the upload does; and when the run is already
        # failing (a store that went away), its own error is the one raised, not the upload's that followed.
        try:
            self.tensorboard.close()
            self._upload_events()
        except DataError:
            if exc_type is None:
                raise
        finally:
            if self.local_events != self.events:
                storage.remove_tree(self.local_events)
            if self.mlflow is not None:
                self.mlflow.end(failed=exc_type is not None)


def append_line(path: Location, line: str) -> None:
    """One line at the end of a text file; in a store, whose objects cannot be appended to, the file is
    uploaded again whole (metrics.jsonl: one line an epoch)."""
    if isinstance(path, StorePath):
        path.write_text((path.read_text() if path.is_file() else "") + line + "\n")
        return
    with open(path, "a") as f:
        f.write(line + "\n")
