"""Training checkpoints and resume in real runs (the pure parts: tests/training/test_resume_state.py).

Slow tests (real processes, no mocks; a Ray Train worker SIGKILLed mid-run is in
tests/e2e/test_object_store.py, whose killed run keeps its run directory in an object store):
* resuming a W=2 run at W=1 and a W=1 run at W=2 (torchrun) continues with the same losses;
* a damaged newest checkpoint is named in a warning and the older one is used; all damaged is a
  one-line error;
* `train.patience` stops a run, and a resumed one at the same epoch;
* `train.reject_worse` undoes a phase that leaves its network worse, at W=1 and W=2, and a run SIGKILLed
  inside such a phase resumes and undoes it the same way.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alterrec_dist.common.config import load_config
from alterrec_dist.parallel.saved import rank_file_name
from alterrec_dist.training.checkpoint import checkpoint_name, checkpoints, newest_good
from tests.test_train import tiny_dataset


PY = sys.executable

# -- slow: real runs ---------------------------------------------------------------------------

# 3 epochs (ID random, text random, ID hard: 3 phases) of 10 steps; a checkpoint every 7 steps,
# so the two kept at the end are e00002-s0000008 (mid-epoch, 2 steps to go) and e00003-s0000000.
SMALL = ["train.m_max=3", "train.m_random=1", "train.m_gap=1", "train.k1=5", "train.k2=30",
         "train.global_batch_size=40", "eval.batch_size=50", "model.dim=16", "model.dropout=0.0",
         "train.checkpoint_every=7", "train.seed=5"]
LAST, MID = "e00003-s0000000", "e00002-s0000008"


def sets(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    return env | extra


def torchrun(workers: int, args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    launch = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}"]
    r = subprocess.run([*launch, "-m", "alterrec_dist.train", "--launcher", "torchrun", *args], cwd=cwd,
                       capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL, env=clean_env(**env))
    assert r.returncode == 0, "\n".join(ln for ln in (r.stdout + r.stderr).splitlines() if "\r" not in ln)[-6000:]
    return r


def results(run: Path) -> tuple[dict, list[dict]]:
    return (json.loads((run / "summary.json").read_text()),
            [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()])


def assert_same_run(got: Path, want: Path, rel: float = 1e-5, abs_: float = 1e-6) -> None:
    (summary, log), (want_summary, want_log) = results(got), results(want)
    assert [e["epoch"] for e in log] == [e["epoch"] for e in want_log]  # metrics.jsonl was cut back
    for a, b in zip(log, want_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=rel), a["epoch"]
    assert summary["best_epoch"] == want_summary["best_epoch"]
    for split in ("valid", "test"):
        for kind, metrics in want_summary[split].items():
            for m, v in metrics.items():
                assert summary[split][kind][m] == pytest.approx(v, abs=abs_), (split, kind, m)
    model = json.loads((got / "model" / "manifest.json").read_text())
    assert model["epoch"] == summary["best_epoch"]  # the best model went back with the `best` record


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, Path]:
    """The same run, uninterrupted, at W=1 and W=2 (torchrun)."""
    base = tmp_path_factory.mktemp("resume")
    data = tiny_dataset(base / "data")
    runs = {}
    for workers in (1, 2):
        runs[workers] = base / f"w{workers}"
        torchrun(workers, ["--out", str(runs[workers]), *sets(SMALL + [f"data.path={data}"])], base)
        assert sorted(p.name for p in (runs[workers] / "checkpoints").iterdir()) == [MID, LAST]
    return runs


def interrupted_copy(run: Path, to: Path) -> Path:
    """The run as if it had died just before its last checkpoint: the newest is gone, and
    metrics.jsonl and model/ are ahead of the newest left (they must be brought back)."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "checkpoints" / LAST)
    return to


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("old,new", [(2, 1), (1, 2)])
def test_resume_at_another_world_size(uninterrupted, tmp_path, old, new):
    run = interrupted_copy(uninterrupted[old], tmp_path / "run")
    r = torchrun(new, ["--resume", str(run)], tmp_path)
    assert f"resuming from {run / 'checkpoints' / MID}: epoch 2, 8 steps done" in r.stdout + r.stderr
    assert load_config(run / "config.toml").trainer.num_workers == new
    assert_same_run(run, uninterrupted[new])
    assert_same_run(run, uninterrupted[old])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_damaged_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted[1], run)
    damaged = run / "checkpoints" / LAST / rank_file_name("rank", 0, 1)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # truncated
    r = torchrun(1, ["--resume", str(run)], tmp_path)
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert warnings and all(str(damaged) in w and MID in w for w in warnings), r.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / MID}" in r.stdout + r.stderr
    assert_same_run(run, uninterrupted[1])
    assert newest_good(run / "checkpoints")[0].name == LAST  # taken again, intact this time


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_no_intact_checkpoint_is_a_one_line_error(uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted[2], run)
    (run / "checkpoints" / LAST / "networks.pt").write_bytes(b"not a checkpoint")
    flipped = run / "checkpoints" / MID / rank_file_name("rank", 1, 2)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    shadow = tmp_path / "shadow" / "ray"  # the check runs on the driver: Ray never starts
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('ray must not be imported on this path')\n")
    r = subprocess.run([PY, "-m", "alterrec_dist.train", "--resume", str(run)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL,
                       env=clean_env(PYTHONPATH=str(shadow.parent)))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run / 'checkpoints'}: none of its 2 checkpoints"), lines
    assert "networks.pt" in lines[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_patience_stops_and_a_resumed_run_stops_at_the_same_epoch(tmp_path):
    """With nothing to learn (lr 1e-30: no update survives fp32 rounding) validation never improves on epoch 0:
    patience 2 stops the run after epoch 2 of 6. A lone network's run is one phase, yet every epoch ended with a
    checkpoint; a copy cut back to the one before the last resumes and stops there too."""
    data = tiny_dataset(tmp_path / "data")
    settings = ["train.method=id_only", "train.m_max=6", "train.patience=2", "train.lr_id=1e-30", "train.lr_text=1e-30",
                "train.global_batch_size=40", "eval.batch_size=50", "model.dim=8", "model.dropout=0.0",
                f"data.path={data}"]
    whole = tmp_path / "whole"
    r = torchrun(1, ["--out", str(whole), *sets(settings)], tmp_path)
    summary, log = results(whole)
    assert (summary["best_epoch"], summary["epochs_trained"], summary["stopped_by"], len(log)) == (0, 3, "patience", 3)
    assert "early stop: no better valid id/ndcg@10 in the 2 epochs after epoch 0" in r.stdout + r.stderr
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    newest, older = sorted((cut / "checkpoints").iterdir(), reverse=True)
    assert (newest.name, older.name) == ("e00003-s0000000", "e00002-s0000000")
    shutil.rmtree(newest)
    r = torchrun(1, ["--resume", str(cut)], tmp_path)
    assert f"resuming from {older}" in r.stdout + r.stderr
    assert_same_run(cut, whole)
    assert results(cut)[0]["epochs_trained"] == 3


# train.reject_worse at an lr (0.3) whose hard phases overshoot on the tiny data, a checkpoint every step:
# 2 warm-up epochs, then phases of 2 epochs (ID 2-3, text 4-5, ID 6-7) of 16 steps each.
REJECTING = ["train.m_max=8", "train.m_random=1", "train.m_gap=2", "train.k1=2", "train.k2=20",
             "train.global_batch_size=24", "eval.batch_size=24", "model.dim=16", "model.dropout=0.0",
             "train.lr_id=0.3", "train.lr_text=0.3", "train.checkpoint_every=1", "train.reject_worse=true"]


@pytest.fixture(scope="module")
def rejecting(tmp_path_factory) -> tuple[list[str], Path, str]:
    """(its settings, the uninterrupted W=1 run, its output) of the REJECTING run."""
    base = tmp_path_factory.mktemp("reject")
    settings = REJECTING + [f"data.path={tiny_dataset(base / 'data')}"]
    r = torchrun(1, ["--out", str(base / "w1"), *sets(settings)], base)
    return settings, base / "w1", r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_phase_that_leaves_its_network_worse_is_undone(rejecting, tmp_path):
    """A phase whose network ends below its own validation score at the phase's start is undone, so the next
    epoch scores that network exactly as before the phase; the checkpoint it goes back to outlives the
    mid-epoch ones (a checkpoint every step); and two workers reject what one rejects."""
    settings, w1, out = rejecting
    torchrun(2, ["--out", str(tmp_path / "w2"), *sets(settings + ["trainer.num_workers=2"])], tmp_path)
    log, log2 = results(w1)[1], results(tmp_path / "w2")[1]
    rejected = [e for e in log if e["rejected"]]
    assert rejected and "phase rejected: valid " in out
    for e in log:
        net, epoch = e["network"], e["epoch"]
        start = epoch - 1 if epoch % 2 else epoch  # phases of 2 epochs after the 2 warm-up epochs
        before = log[start - 1]["valid"][net]["ndcg@10"]
        worse = e["valid"][net]["ndcg@10"] < before
        assert e["rejected"] == (epoch >= 2 and epoch % 2 == 1 and worse), epoch
        if e["rejected"] and epoch + 1 < len(log):
            assert log[epoch + 1]["valid"][net]["ndcg@10"] == before  # back at the phase's start, exactly
    assert [e["rejected"] for e in log2] == [e["rejected"] for e in log]
    for a, b in zip(log, log2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_finished_run_given_a_longer_plan_can_still_undo_its_last_phase(rejecting, tmp_path):
    """A run that ended inside a phase the longer run rejects, resumed with a larger train.m_max, goes on with
    that phase and undoes it from its start checkpoint (it was pruned at the end: every later resume failed on
    it). Not the longer run's numbers: the shorter plan ended that phase at its own last epoch and judged it
    there. A smaller train.m_max than the epochs done is refused, config.toml untouched."""
    settings, whole, _ = rejecting
    log = results(whole)[1]
    epoch = next(e["epoch"] for e in log if e["rejected"])  # the second epoch of its phase
    run = tmp_path / "run"
    torchrun(1, ["--out", str(run), *sets(settings + [f"train.m_max={epoch}"])], tmp_path)
    r = torchrun(1, ["--resume", str(run), "--set", "train.m_max=8"], tmp_path)
    assert f"phase rejected: valid {log[epoch]['network']}/ndcg@10" in r.stdout + r.stderr
    summary, resumed = results(run)
    assert summary["epochs_trained"] == 8 and [e["epoch"] for e in resumed] == list(range(8))
    config = (run / "config.toml").read_text()
    r = subprocess.run([PY, "-m", "alterrec_dist.train", "--launcher", "torchrun", "--resume", str(run), "--set",
                        "train.m_max=2"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL, env=clean_env())
    assert r.returncode == 2 and "the run has trained 8 epochs, train.m_max=2 is fewer" in r.stderr, r.stderr[-2000:]
    assert (run / "config.toml").read_text() == config


def kill_at(launch: list[str], cwd: Path, checkpoint: Path) -> None:
    """Start `launch` in its own process group and SIGKILL the group once `checkpoint` is complete (its
    directory appears by an atomic rename, manifest included)."""
    proc = subprocess.Popen(launch, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env=clean_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (checkpoint / "manifest.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, f"{checkpoint.name} never appeared"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_run_killed_inside_a_phase_it_rejects_resumes_and_rejects_it_the_same_way(rejecting, tmp_path):
    """SIGKILLed in the second epoch of a phase the uninterrupted run rejects, the run resumes from its
    mid-epoch checkpoint, with the phase's starting score from that checkpoint and the phase-start
    checkpoint still there to go back to: it rejects the phase and ends as the uninterrupted run did."""
    settings, whole, _ = rejecting
    log = results(whole)[1]
    epoch = next(e["epoch"] for e in log if e["rejected"] and e["epoch"] > 3)  # not the first phase after warm-up
    run = tmp_path / "run"
    # one process (no WORLD_SIZE: world size 1 in the process itself), so the kill reaches the trainer
    launch = [PY, "-m", "alterrec_dist.train", "--launcher", "torchrun", "--out", str(run), *sets(settings)]
    kill_at(launch, tmp_path, run / "checkpoints" / checkpoint_name(epoch, 8))
    newest = checkpoints(run / "checkpoints")[-1].name
    assert checkpoint_name(epoch, 8) <= newest < checkpoint_name(epoch + 1, 0), newest  # killed inside the phase
    r = torchrun(1, ["--resume", str(run)], tmp_path)
    assert f"resuming from {run / 'checkpoints' / newest}: epoch {epoch}" in r.stdout + r.stderr
    assert f"phase rejected: valid {log[epoch]['network']}/ndcg@10" in r.stdout + r.stderr
    resumed = results(run)[1]
    assert [e["rejected"] for e in resumed] == [e["rejected"] for e in log]
    assert_same_run(run, whole)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("checkpoint_every, log_every", [(1, 10), (0, 0), (0, 1)])
def test_a_diverged_run_stops_in_one_line_and_saves_no_model(tmp_path, checkpoint_every, log_every):
    """lr 1e30: the loss is NaN from the first epoch. The NaN target scores ranked first, so validation read 1.0
    on every metric, epoch 0 was saved as the best model and the run exited 0 (reviewer finding). And with a
    checkpoint every step, the rest of the epoch trained on NaN weights and saved them, pruning the checkpoints
    from before the divergence (reviewer finding): now the run stops at the step whose loss is NaN. Without
    checkpoints or logs within the epoch, at its end; logging every step, before a NaN reaches TensorBoard."""
    from tests.training.test_metric_sinks import tensorboard_scalars

    data = tiny_dataset(tmp_path / "data")
    settings = ["train.method=alterrec", "train.m_max=3", "train.m_random=1", "train.m_gap=1", "train.k1=5",
                "train.k2=30", "train.global_batch_size=40", "eval.batch_size=50", "model.dim=8",
                "train.lr_id=1e30", "train.lr_text=1e30", f"train.checkpoint_every={checkpoint_every}",
                f"train.log_every={log_every}", f"data.path={data}"]
    run = tmp_path / "run"
    r = subprocess.run([PY, "-m", "alterrec_dist.train", "--launcher", "torchrun", "--out", str(run), *sets(settings)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
                       env=clean_env())
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == ("error: epoch 0, step 1: the id network's training loss is nan: "
                                                 "the run diverged (lower train.lr_id / train.lr_text)")
    assert not (run / "model").exists() and not (run / "summary.json").exists()
    logged = tensorboard_scalars(run / "tensorboard")
    assert all(math.isfinite(v) for series in logged.values() for v in series.values()), logged
    if not checkpoint_every:  # the epoch's end refused before its checkpoint
        assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
        return
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == [checkpoint_name(0, 1)]  # the step before the NaN loss; its weights are finite (huge)
    for f in (run / "checkpoints" / saved[0]).rglob("*.pt"):
        for value in flat_tensors(torch.load(f, weights_only=True)):
            assert torch.isfinite(value.float()).all(), f


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_loss_that_turns_nan_between_checkpoints_stops_every_rank_alike(tmp_path):
    """At a log step (every step here, no checkpoint) rank 0 alone looked at the losses: it stopped in one line,
    and rank 1 died in its next collective with a gloo traceback, which torchrun reported (reviewer finding)."""
    data = tiny_dataset(tmp_path / "data")
    settings = ["train.method=id_only", "train.m_max=2", "train.global_batch_size=40", "eval.batch_size=50",
                "model.dim=8", "train.lr_id=1e30", "train.log_every=1", "train.checkpoint_every=0",
                f"data.path={data}"]
    launch = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run([*launch, "-m", "alterrec_dist.train", "--launcher", "torchrun", "--out", str(tmp_path / "run"),
                        *sets(settings)], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                       stdin=subprocess.DEVNULL, env=clean_env())
    assert r.returncode != 0  # torchrun's own, whatever its ranks' codes
    assert ("error: epoch 0, step 1: the id network's training loss is nan: the run diverged (lower train.lr_id / "
            "train.lr_text)") in r.stderr, r.stderr[-3000:]  # (the ranks' lines may share one: no lock on stderr)
    assert "gloo" not in r.stderr and "exitcode  : 1 " not in r.stderr, r.stderr[-3000:]  # no rank failed otherwise


def flat_tensors(blob) -> list:
    if torch.is_tensor(blob):
        return [blob]
    items = blob.values() if isinstance(blob, dict) else blob if isinstance(blob, (list, tuple)) else []
    return [t for item in items for t in flat_tensors(item)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_longer_resume_killed_midway_leaves_no_summary_of_the_shorter_run(tmp_path):
    """A finished run resumed with a larger train.m_max kept its old summary.json until the new end: killed
    midway, the run showed that summary (best epoch and alpha of the short run) beside a newer model/ and
    metrics.jsonl, and serving used it (reviewer finding). Now the summary goes when the attempt starts."""
    data = tiny_dataset(tmp_path / "data")
    settings = ["train.method=id_only", "train.m_max=2", "train.global_batch_size=40", "eval.batch_size=50",
                "model.dim=8", "train.checkpoint_every=5", f"data.path={data}"]
    run = tmp_path / "run"
    torchrun(1, ["--out", str(run), *sets(settings)], tmp_path)
    assert results(run)[0]["epochs_trained"] == 2
    resume = [PY, "-m", "alterrec_dist.train", "--launcher", "torchrun", "--resume", str(run), "--set", "train.m_max=6"]
    kill_at(resume, tmp_path, run / "checkpoints" / checkpoint_name(3, 0))  # epoch 3 done, 3 to go
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3 and (run / "model").is_dir()
    assert not (run / "summary.json").exists()
