"""The training driver end to end: torchrun with 2 workers and with none (which end with the same metrics), and
the embedded default's AlterRec effect (Ray Train's path is tests/e2e/test_job_submit.py's)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from alterrec_dist.common.code_version import source_sha256
from alterrec_dist.common.config import METRICS, PROJECT_ROOT, Config, load_config
from alterrec_dist.data.dataset import Dataset
from tests.e2e.test_resume import results
from tests.test_train import PY, SCORES, cli, tiny_dataset


# -- end to end ---------------------------------------------------------------------------------

# 3 epochs that cover the schedule's phases: ID on random negatives, text on random, ID on hard
# negatives mined by the frozen text network. Large batches keep an epoch of shards/default short.
SMALL = ["train.m_max=3", "train.m_random=1", "train.m_gap=1", "train.k1=5", "train.k2=100",
         "train.global_batch_size=1024", "eval.batch_size=1024", "model.dim=32"]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a private local Ray, whatever the caller's shell has
    return env


def _no_torchrun_env() -> dict:
    """For a run that starts its own group of one: no torchrun world of the caller's shell."""
    return {k: v for k, v in _env().items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}


def check_run_dir(run: Path, epochs: int, stdout: str, workers: int) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert isinstance(summary["best_epoch"], int) and 0 <= summary["best_epoch"] < epochs
    assert (summary["epochs_trained"], summary["stopped_by"]) == (epochs, "m_max")  # no patience: the budget
    for part in ("valid", "test"):
        assert set(summary[part]) <= set(SCORES) and "fused" in summary[part], summary[part]
        for scores in summary[part].values():
            assert set(METRICS) <= set(scores)
            assert all(0.0 <= scores[m] <= 1.0 for m in METRICS)
    assert "longtail" in summary
    # the code that made it, also where it ran from an uploaded copy without .git (`ray job submit`)
    assert summary["code"] == {"source_sha256": source_sha256(), "torch": torch.__version__}
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == list(range(epochs))
    assert [(ln["network"], ln["negatives"]) for ln in lines] == [("id", "random"), ("text", "random"), ("id", "hard")]
    cfg = load_config(run / "config.toml")
    assert cfg.train.m_max == epochs and cfg.trainer.num_workers == workers
    assert f"run dir: {run}" in stdout and "fused" in stdout and f"best epoch: {summary['best_epoch']}" in stdout


@pytest.mark.slow
def test_no_progress_draws_no_bars_and_keeps_the_epoch_lines(tmp_path):
    """A group of one under the torchrun launcher: tqdm was imported before --no-progress was parsed."""
    data = tiny_dataset(tmp_path / "data")
    args = [*[a for s in SMALL for a in ("--set", s)], "--set", f"data.path={data}", "--set",
            "train.global_batch_size=128", "--launcher", "torchrun", "--no-progress", "--out", str(tmp_path / "run")]
    r = cli(args, tmp_path, timeout=240, env=_no_torchrun_env())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "it/s" not in r.stderr and "s/it" not in r.stderr, r.stderr[-2000:]
    assert [ln[:9] for ln in r.stdout.splitlines() if ln.startswith("epoch")] == ["epoch   0", "epoch   1",
                                                                                 "epoch   2"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchrun_two_workers_end_with_the_metrics_of_one(tmp_path):
    """On shards/default, without Ray: `torchrun --nproc_per_node 2 -m alterrec_dist.train --launcher torchrun`,
    and `python -m alterrec_dist.train --launcher torchrun` without torchrun (a group of one). Each run directory
    is whole, and 2 workers end where 1 does: the same loss every epoch, the same best epoch, the same metrics
    up to ties (dropout off: the ranks draw their own masks)."""
    args = [a for s in [*SMALL, "model.dropout=0.0", "train.seed=3"] for a in ("--set", s)]
    one_run, two_run = tmp_path / "w1", tmp_path / "w2"
    r = cli([*args, "--launcher", "torchrun", "--out", str(one_run)], tmp_path, timeout=400, env=_no_torchrun_env())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    check_run_dir(one_run, 3, r.stdout, workers=1)
    torchrun = str(Path(PY).with_name("torchrun"))
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "alterrec_dist.train",
                        "--launcher", "torchrun", *args, "--out", str(two_run)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=400, stdin=subprocess.DEVNULL, env=_env())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    check_run_dir(two_run, 3, r.stdout, workers=2)
    assert r.stdout.count("run dir:") == 1  # only rank 0 prints
    # the bars refresh every 5 s into a pipe: 57 lines of stderr here, against 305 at tqdm's 0.1 s
    assert len(r.stderr.splitlines()) < 120, r.stderr[-2000:]
    assert load_config(two_run / "config.toml").trainer.launcher == "torchrun"

    (one, one_log), (two, two_log) = (results(run) for run in (one_run, two_run))
    assert two["best_epoch"] == one["best_epoch"]
    for a, b in zip(one_log, two_log, strict=True):  # the computation is the same, to float precision
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    # Two workers sum each gradient in another order than one, so the last bits of the weights differ and a
    # session whose target is tied with another item to those bits may rank one place apart. Each such
    # session moves a hit/MRR/NDCG mean by at most 1/n; allow two of them, nothing more.
    data = Dataset(PROJECT_ROOT / "shards/default")
    for split in ("valid", "test"):
        two_sessions = 2 / data.num_rows(split)
        for kind in ("id", "text", "fused"):
            for metric, value in one[split][kind].items():
                assert abs(two[split][kind][metric] - value) <= two_sessions, (split, kind, metric)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_default_data_shows_alterrecs_effect(tmp_path):
    """The embedded default on shards/default, cut to 6 epochs (ID, text warm-up, then ID on the text
    network's hard negatives), one process: validation picks an epoch past the warm-up, and there
    the fused score beats both networks on test. Before the generator had product lines and the
    default its item LayerNorm, the best epoch was 0 and fused fell below ID (issue 14)."""
    run = tmp_path / "run"
    r = cli(["--launcher", "torchrun", "--set", "train.m_max=6", "--out", str(run)], tmp_path, timeout=840,
            env=_no_torchrun_env())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    cfg = Config()
    assert summary["best_epoch"] >= 2 * cfg.train.m_random, summary["best_epoch"]
    test = {k: v["ndcg@10"] for k, v in summary["test"].items()}
    assert test["fused"] > test["id"] and test["fused"] > test["text"], test
    warmup_best = max(json.loads(ln)["valid"]["fused"]["ndcg@10"]
                      for ln in (run / "metrics.jsonl").read_text().splitlines()[:2 * cfg.train.m_random])
    assert summary["valid"]["fused"]["ndcg@10"] > warmup_best


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("max_failures,workers", [(0, 1), (-1, 2)])
def test_a_diverged_run_under_ray_is_the_workers_one_line(tmp_path, max_failures, workers):
    """The worker's refusal (a NaN loss) reached the driver inside Ray's failure text: a traceback and exit 1. The
    driver now prints the worker's one line, exit 2, as the torchrun launcher does. And Ray restarted the workers
    to train up to the same refusal again, forever with trainer.max_failures = -1: now the restarted workers
    find it recorded and stop at once, so the run ends after one restart."""
    data = tiny_dataset(tmp_path / "data")
    args = ["--config", "configs/default.toml", *[a for s in SMALL for a in ("--set", s)], "--set", f"data.path={data}",
            "--set", "train.global_batch_size=40", "--set", "eval.batch_size=50", "--set", "train.lr_id=1e30",
            "--set", "train.lr_text=1e30", "--set", f"trainer.num_workers={workers}",
            "--set", f"trainer.max_failures={max_failures}", "--out", str(tmp_path / "run")]
    r = subprocess.run([PY, "-m", "alterrec_dist.train", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                       timeout=280, env=_env())
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == ("error: epoch 0, step 1: the id network's training loss is nan: "
                                                 "the run diverged (lower train.lr_id / train.lr_text)")
    # (Ray may echo a worker's line twice, so its presence is what counts)
    restart_stopped = "an earlier attempt of this launch was refused" in r.stderr
    assert restart_stopped == (max_failures != 0), r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_ends_a_torchrun_rank_waiting_for_its_group(tmp_path):
    """torchrun stops the ranks with SIGTERM when one fails. run_cli's SIGTERM-as-exit handler is Python code,
    which cannot run while a rank waits inside gloo (here: the rendezvous, for a rank 1 that never comes), so
    the rank stayed until that call timed out; it now ends where it stands."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tiny_dataset(tmp_path / "data")
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    proc = subprocess.Popen([PY, "-m", "alterrec_dist.train", "--launcher", "torchrun", "--set", f"data.path={data}",
                             "--set", "train.global_batch_size=40", "--out", str(tmp_path / "run")], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _listening(port) and time.monotonic() < deadline:  # rank 0 serves the group's store
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        time.sleep(1.0)  # inside the rendezvous's wait for rank 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig,moment,rc,last_line", [("SIGINT", "an epoch done", 130, "interrupted"),
                                                     ("SIGTERM", "an epoch done", 143, None),
                                                     ("SIGTERM", "Ray starting", 143, None)])
def test_a_signal_under_ray_stops_the_run_as_under_torchrun(tmp_path, sig, moment, rc, last_line):
    """Ctrl-C (SIGINT to the terminal's process group) under the Ray launcher ended the command with exit 1 and
    nothing said: TorchTrainer.fit's own SIGINT handler aborts the run and fit then raises SystemExit(1). A
    scheduler's SIGTERM ended it with exit 1 too, or aborted it (134) with a crash dump from Ray's C++ handler,
    and while Ray started (ray.init's own handler) with exit 15. Each is now what it is under torchrun:
    "interrupted" and 130, or 143; the checkpoints kept for --resume."""
    import signal
    import time

    run = tmp_path / "run"
    data = tiny_dataset(tmp_path / "data")
    args = ["--config", "configs/default.toml", *[a for s in SMALL for a in ("--set", s)], "--set", f"data.path={data}",
            "--set", "train.global_batch_size=40", "--set", "eval.batch_size=50", "--set", "train.m_max=10000",
            "--out", str(run)]
    log = tmp_path / "stderr.txt"  # a file, not a pipe: the command's own exit is what is timed, not its children's
    with open(log, "w") as err:
        proc = subprocess.Popen([PY, "-m", "alterrec_dist.train", *args], cwd=PROJECT_ROOT, env=_env(), text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 200
        marker = run / ("metrics.jsonl" if moment == "an epoch done" else "config.toml")  # the latter: Ray next
        while not marker.is_file() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        if moment == "Ray starting":
            time.sleep(4.0)  # inside ray.init here (the import of Ray, then its start-up: 5-10 s)
        if sig == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)  # as the terminal sends it
        else:
            proc.send_signal(signal.SIGTERM)  # as a scheduler or `kill` sends it
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert proc.returncode == rc, stderr[-3000:]
    if last_line:
        assert stderr.strip().splitlines()[-1] == last_line
    assert "SIGTERM received" not in stderr  # Ray's crash dump
    if moment == "an epoch done":
        assert any((run / "checkpoints").iterdir())
