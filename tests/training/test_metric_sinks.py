"""The metric sinks: metrics.jsonl, TensorBoard event files and MLflow carry the same values, read
back through TensorBoard's EventAccumulator and the MLflow client (a local file: store)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

from alterrec_dist.common.config import METRICS, Config
from alterrec_dist.common.errors import ConfigError
from alterrec_dist.training.metric_sinks import MetricSinks, check_mlflow, mlflow_env
from tests.e2e.test_train_runs import SMALL, _env
from tests.commands import run_command
from tests.test_train import SCORES, cli, tiny_dataset

F32 = 1e-6  # TensorBoard keeps float32 values


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the event files of `logdir`, by tag and step (a step logged twice fails)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    assert all(len(scalars[tag]) == len(acc.Scalars(tag)) for tag in scalars), "a step logged twice"
    return scalars


def mlflow_metrics(run_dir: Path, uri: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the run directory's MLflow run, by name, as (step, value) in step order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = (run_dir / "mlflow_run_id").read_text()
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
            for name in client.get_run(run_id).data.metrics}


def assert_points(got: dict[int, float], want: dict[int, float]) -> None:
    """The same steps, and at each the same value up to float32 rounding."""
    assert sorted(got) == sorted(want)
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=F32)


@pytest.fixture
def file_store(tmp_path, monkeypatch) -> str:
    """MLflow logging on, to a local file: store (MLflow 3.17 wants the opt-in for one); its URI."""
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def epoch_line(epoch: int, scale: float) -> dict:
    """A metrics.jsonl line of the ID network's epoch as the recipe writes it (values made up)."""
    return {"epoch": epoch, "phase": epoch, "network": "id", "negatives": "random", "augmented": False,
            "loss": scale, "valid": {p: {m: scale * (i + 1) / 10 for i, m in enumerate(METRICS)} for p in SCORES},
            "sessions_per_s": 1000.0 * scale, "train_seconds": 1.5}


def write_attempt(run: Path, first_step: int, last_step: int, scale: float, steps_per_epoch: int = 3) -> list[dict]:
    """One attempt of a run from `first_step` (steps done) to `last_step`: a loss every step, an epoch line at
    each epoch end. Returns the lines."""
    lines = []
    with MetricSinks(run, Config(), first_step) as sinks:
        for step in range(first_step + 1, last_step + 1):
            sinks.step("id", {"loss": scale * step}, step)
            if step % steps_per_epoch == 0:
                lines.append(epoch_line(step // steps_per_epoch - 1, scale))
                sinks.epoch(lines[-1], step)
    return lines


def test_every_sink_gets_the_same_values_and_a_resume_replaces_the_redone_steps(tmp_path, file_store):
    """Two attempts: the first runs 2 epochs of 3 steps, the second resumes after epoch 0 and redoes
    epoch 1 with other values. metrics.jsonl (cut back as `recipe.resume` does), TensorBoard and MLflow
    then hold epoch 0 of the first and epoch 1 of the second, each step once in TensorBoard."""
    from alterrec_dist.training.recipe import keep_lines

    run = tmp_path / "run"
    run.mkdir()
    first = write_attempt(run, 0, 6, scale=1.0)
    keep_lines(run / "metrics.jsonl", 1)
    second = write_attempt(run, 3, 6, scale=2.0)
    lines = [first[0], second[0]]
    assert (run / "metrics.jsonl").read_text() == "".join(json.dumps(ln) + "\n" for ln in lines)  # as before the sinks

    scalars = tensorboard_scalars(run / "tensorboard")
    assert_points(scalars["loss/id"], {s: s * (1.0 if s <= 3 else 2.0) for s in range(1, 7)})
    for part in SCORES:
        for m in METRICS:
            assert_points(scalars[f"valid/{part}/{m}"], {3: lines[0]["valid"][part][m], 6: lines[1]["valid"][part][m]})
    assert_points(scalars["throughput/sessions_per_s"], {3: 1000.0, 6: 2000.0})

    logged = mlflow_metrics(run, file_store)
    assert set(logged) == {t.replace("@", "_at_") for t in scalars}  # one MLflow run for both attempts
    # MLflow keeps every value: the redone epoch's twice
    assert logged["valid/fused/ndcg_at_10"] == [(3, pytest.approx(0.3)), (6, pytest.approx(0.3)),
                                                (6, pytest.approx(0.6))]


def test_mlflow_env_hands_on_what_is_set(monkeypatch):
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:/x")
    assert mlflow_env() == {"MLFLOW_TRACKING_URI": "file:/x"}
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert mlflow_env() == {}


def test_tracking_uri_without_mlflow_is_one_line_before_anything_starts(tmp_path, monkeypatch, capsys, no_ray):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    data = tiny_dataset(tmp_path / "data")
    args = ["--set", f"data.path={data}", "--set", "train.global_batch_size=128", "--out", str(tmp_path / "run")]
    code, err = run_command("train", args, capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: MLFLOW_TRACKING_URI is set but mlflow is not installed: pip install -e '.[mlflow]', or unset it"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("uri", ["file:{d}/mlruns", "{d}/mlruns"])
def test_a_file_store_mlflow_refuses_is_one_line_before_anything_starts(tmp_path, monkeypatch, capsys, no_ray, uri):
    """Without MLFLOW_ALLOW_FILE_STORE=true, MLflow refused the store at the first epoch: a traceback, exit 1,
    and a run directory that made the same --out refused next time."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(d=tmp_path))
    data = tiny_dataset(tmp_path / "data")
    args = ["--set", f"data.path={data}", "--set", "train.global_batch_size=128", "--out", str(tmp_path / "run")]
    code, err = run_command("train", args, capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"error: MLFLOW_TRACKING_URI={uri.format(d=tmp_path)}: MLflow opens a local file store only with "
        "MLFLOW_ALLOW_FILE_STORE=true (set it, or use a tracking server)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_training_run_logs_what_metrics_jsonl_holds(tmp_path, file_store):
    """A real run (torchrun launcher, a group of one, 3 epochs): every step's loss, and each epoch's
    validation metrics and sessions/s, in TensorBoard and MLflow, equal to metrics.jsonl."""
    run = tmp_path / "run"
    data = tiny_dataset(tmp_path / "data")
    args = [*[a for s in SMALL for a in ("--set", s)], "--set", f"data.path={data}", "--out", str(run),
            "--set", "train.global_batch_size=128", "--set", "train.log_every=1", "--launcher", "torchrun"]
    env = {k: v for k, v in _env().items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    r = cli(args, tmp_path, timeout=240, env=env)  # _env(): with file_store's variables
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(run / "tensorboard")
    per_epoch = 400 // 128  # the tiny dataset's 400 train rows, full batches only
    assert len(lines) == 3 and sum(len(v) for t, v in scalars.items() if t.startswith("loss/")) == 3 * per_epoch
    for e, line in enumerate(lines):
        end = (e + 1) * per_epoch
        losses = [v for step, v in scalars[f"loss/{line['network']}"].items() if end - per_epoch < step <= end]
        assert len(losses) == per_epoch and sum(losses) / per_epoch == pytest.approx(line["loss"], rel=1e-5)
        for part in SCORES:
            for m in METRICS:
                assert scalars[f"valid/{part}/{m}"][end] == pytest.approx(line["valid"][part][m], rel=F32)
        assert scalars["throughput/sessions_per_s"][end] == pytest.approx(line["sessions_per_s"], rel=F32)

    logged = mlflow_metrics(run, file_store)
    summary = json.loads((run / "summary.json").read_text())
    results = {f"test/{kind}/{m}".replace("@", "_at_"): v for kind, scores in summary["test"].items()
               for m, v in scores.items() if m in METRICS}
    assert set(logged) == {t.replace("@", "_at_") for t in scalars} | set(results) | {"best_epoch"}
    for tag, points in scalars.items():
        assert_points(dict(logged[tag.replace("@", "_at_")]), points)
    # the run's end: its test metrics and best epoch, and summary.json and config.toml as artifacts
    assert {name: logged[name][0][1] for name in results} == pytest.approx(results, rel=F32)
    assert logged["best_epoch"] == [(0, summary["best_epoch"])]
    from mlflow.tracking import MlflowClient
    artifacts = Path(MlflowClient(file_store).get_run((run / "mlflow_run_id").read_text()).info.artifact_uri
                     .removeprefix("file://"))
    assert json.loads((artifacts / "summary.json").read_text()) == summary
    assert (artifacts / "config.toml").read_text() == (run / "config.toml").read_text()


@pytest.mark.slow
def test_a_resume_at_an_epochs_last_step_logs_its_end_once(tmp_path):
    """A checkpoint at an epoch's last step comes before the epoch's end is logged; a run killed after that
    logging, resumed from it, logged the end again at the same step (TensorBoard showed the step twice, and a
    sessions/s of 0: reviewer finding). Made here by taking away the checkpoints after that one."""
    run = tmp_path / "run"
    data = tiny_dataset(tmp_path / "data")
    per_epoch = 400 // 128  # the tiny dataset's 400 train rows, full batches only
    args = [*[a for s in SMALL for a in ("--set", s)], "--set", f"data.path={data}", "--set", "train.m_max=1",
            "--set", "train.global_batch_size=128", "--set", "train.log_every=1", "--launcher", "torchrun",
            "--set", f"train.checkpoint_every={per_epoch}"]
    env = {k: v for k, v in _env().items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    r = cli([*args, "--out", str(run)], tmp_path, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    last_step = run / "checkpoints" / f"e00000-s{per_epoch:07d}"
    assert last_step.is_dir(), sorted(p.name for p in (run / "checkpoints").iterdir())
    for later in (run / "checkpoints").iterdir():
        if later.name > last_step.name:
            shutil.rmtree(later)
    (run / "summary.json").unlink()  # as a run killed before its end
    r = cli(["--resume", str(run), "--launcher", "torchrun"], tmp_path, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"resuming from {last_step}: epoch 0, {per_epoch} steps done" in r.stdout + r.stderr
    scalars = tensorboard_scalars(run / "tensorboard")  # fails on a step logged twice
    assert sorted(scalars["loss/id"]) == list(range(1, per_epoch + 1))  # the epoch's last loss kept
    assert sorted(scalars["valid/fused/ndcg@10"]) == [per_epoch]
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["sessions_per_s"] for ln in lines] == [None]  # no step of the epoch ran in this attempt: not 0
    assert not scalars.get("throughput/sessions_per_s"), scalars.get("throughput/sessions_per_s")
    assert "epoch   0 id" in r.stdout + r.stderr and "resumed after its last step" in r.stdout + r.stderr


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("userinfo, shown", [("", ""), ("alice:s3cret@", "***@"), ("alice:s3@cret@", "***@")])
def test_a_tracking_server_that_does_not_answer_is_one_line_before_anything_starts(tmp_path, monkeypatch, capsys,
                                                                                    no_ray, userinfo, shown):
    """A server that was down stalled the run 4 minutes in MLflow's retries, then a traceback, exit 1, and a run
    directory that made the same --out refused next time (reviewer finding). Now one request, at the start. A
    password in the URI (basic auth) was in that line twice, MLflow's own error repeating the URI."""
    port = closed_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{userinfo}127.0.0.1:{port}")
    data = tiny_dataset(tmp_path / "data")
    args = ["--set", f"data.path={data}", "--set", "train.global_batch_size=128", "--out", str(tmp_path / "run")]
    code, err = run_command("train", args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(
        f"error: MLFLOW_TRACKING_URI=http://{shown}127.0.0.1:{port}: the MLflow server does not answer ("), lines
    assert lines[0].endswith("): start it, or unset MLFLOW_TRACKING_URI")
    assert "cret" not in err and f"http://{shown}127.0.0.1:{port}/api/" in err  # MLflow's part: the URI shown too
    assert not (tmp_path / "run").exists() and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_a_server_lost_mid_run_is_a_warning_without_the_uris_password(tmp_path, monkeypatch, capsys):
    """The warning carries MLflow's error, which repeats the tracking URI whole, basic-auth password included."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's setting: no backoff to wait through
    run = tmp_path / "run"
    run.mkdir()
    with MetricSinks(run, Config(), 0) as sinks:
        sinks.step("id", {"loss": 1.0}, 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: MLflow stopped logging this run ("), err
    assert "s3cret" not in err[0] and "http://***@127.0.0.1:" in err[0], err


def test_mlflow_failing_mid_run_is_one_warning_and_training_goes_on(tmp_path, file_store, capsys):
    """The store goes away after the run started (as a server that dies): one warning line, no more MLflow
    calls in this attempt, and the other sinks keep every value."""
    run = tmp_path / "run"
    run.mkdir()
    with MetricSinks(run, Config(), 0) as sinks:
        sinks.step("id", {"loss": 1.0}, 1)
        shutil.rmtree(tmp_path / "mlruns")
        (tmp_path / "mlruns").write_text("not a store")  # every later MLflow call fails
        for step in (2, 3):
            sinks.step("id", {"loss": float(step)}, step)
        sinks.epoch(epoch_line(0, 1.0), 3)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: MLflow stopped logging this run ("), err
    assert_points(tensorboard_scalars(run / "tensorboard")["loss/id"], {1: 1.0, 2: 2.0, 3: 3.0})
    assert json.loads((run / "metrics.jsonl").read_text())["epoch"] == 0
    import mlflow
    assert mlflow.active_run() is None  # ended all the same: MLflow's client counts its runs in the process


def test_an_attempt_that_starts_while_mlflow_is_down_is_one_warning(tmp_path, file_store, capsys):
    """A Ray restart's attempt starts its MLflow run with no check on the driver before it: a store (or server)
    down then killed the attempt, and the next, until the restarts ran out (reviewer finding)."""
    run = tmp_path / "run"
    run.mkdir()
    write_attempt(run, 0, 3, scale=1.0)
    shutil.rmtree(tmp_path / "mlruns")
    (tmp_path / "mlruns").write_text("not a store")
    write_attempt(run, 3, 6, scale=2.0)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: MLflow stopped logging this run ("), err
    assert sorted(tensorboard_scalars(run / "tensorboard")["loss/id"]) == [1, 2, 3, 4, 5, 6]


def test_mlflow_requests_are_bounded_unless_the_user_bounds_them(tmp_path, file_store, monkeypatch):
    """MLflow's defaults (7 retries with backoff, 120 s a try) held rank 0 up to about 20 minutes on a server that
    accepted and never answered, the other ranks waiting in a collective (reviewer finding)."""
    from alterrec_dist.training.metric_sinks import MlflowRun

    seen = []

    def request():
        seen.append((os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"), os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")))
    run = tmp_path / "run"
    run.mkdir()
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    mlflow_run = MlflowRun(run, Config())
    mlflow_run._call(request)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    mlflow_run._call(request)
    mlflow_run.end(failed=False)
    assert seen == [("2", "15"), ("2", "300")]
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # as it was


def test_a_uri_with_a_password_keeps_mlflow_from_printing_the_runs_link(tmp_path, monkeypatch):
    """MLflow 3.17 prints "View run NAME at: URL" as a run ends, the URL made from the tracking URI, password
    included (reviewer finding). MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT, which it reads at each call, turns that
    off for such a URI alone; a user's own setting stands."""
    from alterrec_dist.training.metric_sinks import MlflowRun

    key, seen = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", []
    monkeypatch.setattr(MlflowRun, "_start", lambda self, run_dir, cfg: None)  # no server: the calls are recorded
    monkeypatch.delenv(key, raising=False)
    for uri in ("http://alice:s3cret@127.0.0.1:1", "http://127.0.0.1:1"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        MlflowRun(tmp_path, Config())._call(lambda: seen.append(os.environ.get(key)))
    monkeypatch.setenv(key, "false")
    MlflowRun(tmp_path, Config())._call(lambda: seen.append(os.environ.get(key)))
    assert seen == ["true", None, "false"]


@pytest.mark.parametrize("uri, allow, refused", [
    ("file:{d}/mlruns", "1", None),  # MLflow takes 1 as true; only "true" was accepted
    ("databricks", None, None),  # a tracking URI, not a path (it was refused as a file store)
    ("{d}/mlruns", "yes", "MLFLOW_ALLOW_FILE_STORE value must be one of"),
    ("http://127.0.0.1:{port}", "yes", "the MLflow server does not answer"),  # a server: never the variable
    ("file://otherhost/x", None, r"MLFLOW_TRACKING_URI=file://otherhost/x: .*"),  # MLflow's exception, one line
])
def test_mlflow_settings_are_judged_by_mlflows_rules(tmp_path, monkeypatch, uri, allow, refused):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(d=tmp_path, port=closed_port()))
    if allow is None:
        monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", allow)
    if refused:
        with pytest.raises(ConfigError, match=refused):
            check_mlflow()
    else:
        check_mlflow()


@pytest.mark.slow
def test_a_store_that_fails_mid_run_leaves_no_local_events_and_its_own_error_stands(bucket, file_store):
    """The run's store went away: leaving the sinks tried to upload the events again, raised the upload's
    error instead of the run's, and left the local temp events (and the MLflow run open)."""
    import boto3

    from alterrec_dist.common.storage import StorePath

    run, name = StorePath(f"{bucket}/run"), bucket.removeprefix("s3://")
    with pytest.raises(RuntimeError, match="the run's own failure"):
        with MetricSinks(run, Config(), 0) as sinks:
            sinks.epoch(epoch_line(0, 1.0), 3)
            local = sinks.local_events
            s3 = boto3.resource("s3")
            s3.Bucket(name).objects.all().delete()
            s3.Bucket(name).delete()  # every later upload fails
            raise RuntimeError("the run's own failure")
    assert not local.exists()
    import mlflow
    assert mlflow.active_run() is None
