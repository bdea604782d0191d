"""Data and runs in an object store, end to end, against a real S3 server on 127.0.0.1 (moto's, see
tests/object_store.py): prepare → train (Ray, 2 workers, one SIGKILLed mid-run) → resume → export →
batch_score, with every path an s3:// URI and nothing written to the local disk in their place. The
killed run ends with the summary.json and metrics.jsonl of an uninterrupted run under torchrun (dropout
on: the RNG state comes back too).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from alterrec_dist.common.storage import StorePath, files_under
from alterrec_dist.data.dataset import Dataset, read_parquet
from alterrec_dist.training.checkpoint import checkpoints
from tests.e2e.test_resume import PY, assert_same_run, clean_env, sets, torchrun
from tests.e2e.test_train_runs import check_run_dir

V = 41
# 3 epochs of 20 steps on 400 train rows, a checkpoint every 5: the kill lands well before the end
SETTINGS = ["train.m_max=3", "train.m_random=1", "train.m_gap=1", "train.k1=5", "train.k2=30",
            "train.global_batch_size=20", "eval.batch_size=50", "model.dim=16", "model.dropout=0.1",
            "train.checkpoint_every=5", "train.seed=5", "trainer.max_failures=1", "trainer.num_workers=2"]


def write_recbole_source(directory: Path) -> Path:
    """A RecBole-format source of V items with titles, and 400/40/40 rows drawn with a fixed seed."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    (directory / "S.item2index").write_text("".join(f"item{i}\t{i}\n" for i in range(V)))
    (directory / "S.text").write_text("item_id:token\ttext:token_seq\n" + "".join(
        f"item{i}\t{['red', 'blue', 'green'][i % 3]} lab flask number {i}\n" for i in range(V)))
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    for split, n in (("train", 400), ("valid", 40), ("test", 40)):
        rows = "".join(f"u{r}\t{' '.join(map(str, rng.integers(0, V, rng.integers(1, 6))))}\t{rng.integers(0, V)}\n"
                       for r in range(n))
        (directory / f"S.{split}.inter").write_text(header + rows)
    return directory


def ray_train(args: list[str], cwd: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "alterrec_dist.train", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL, env=clean_env(**env),
                            start_new_session=True)


def train_workers(driver: subprocess.Popen) -> list[psutil.Process]:
    """This run's Ray Train worker processes (descendants of its driver: other Ray instances on the
    machine are not touched)."""
    found = []
    for p in psutil.Process(driver.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def kill_a_worker_after_a_mid_epoch_checkpoint(driver: subprocess.Popen, store) -> tuple[str, int]:
    """Once `store` (local or a store URI's StorePath) holds a complete mid-epoch checkpoint of a run of
    20-step epochs checkpointed every 5 steps, SIGKILL one of the driver's 2 Ray Train workers; then
    (the driver's output, the killed pid) when the driver ends."""
    try:
        deadline = time.monotonic() + 300
        while not any(c.name.endswith(("-s0000005", "-s0000010", "-s0000015")) and (c / "manifest.json").is_file()
                      for c in checkpoints(store)):
            assert driver.poll() is None and time.monotonic() < deadline, "no mid-epoch checkpoint appeared"
            time.sleep(0.1)
        workers = train_workers(driver)
        assert len(workers) == 2, workers
        os.kill(workers[-1].pid, signal.SIGKILL)
        out, _ = driver.communicate(timeout=500)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    return out, workers[-1].pid


def command(module: str, args: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([PY, "-m", f"alterrec_dist.{module}", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{module}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_prepare_train_kill_resume_export_score_in_the_store(s3_server, bucket, tmp_path):
    env_extra = {**s3_server.env, "ALTERREC_CACHE": str(tmp_path / "text-cache"), "TQDM_DISABLE": "1"}
    env = clean_env(**env_extra)
    data, run, export = f"{bucket}/data/s", f"{bucket}/runs/killed", f"{bucket}/exports/s"
    work = tmp_path / "cwd"  # every command runs here: a URI taken as a local path would show up in it
    work.mkdir()

    command("prepare", ["recbole", "--path", str(write_recbole_source(tmp_path / "src")), "--name", "S",
                        "--out", data, "--no-progress"], work, env)
    dataset = Dataset(data)
    assert dataset.verify() == [] and dataset.num_items == V and dataset.manifest["splits"]["train"] == 400
    assert dataset.has_text().all() and dataset.text_dim == 384  # MiniLM, encoded and uploaded

    settings = sets(SETTINGS + [f"data.path={data}"])
    # The uninterrupted reference: the same 2 workers under torchrun, into a local run dir (so the killed Ray
    # run below must also end where the other launcher does, at a quarter of a second Ray run's start-up).
    torchrun(2, ["--out", str(tmp_path / "whole"), *settings], work, **env_extra)

    driver = ray_train(["--out", run, *settings], work, **env_extra)
    out, killed = kill_a_worker_after_a_mid_epoch_checkpoint(driver, StorePath(run) / "checkpoints")
    assert driver.returncode == 0, out[-4000:]
    print(f"killed worker {killed}")  # shown with pytest -rP
    assert f"resuming from {run}/checkpoints/" in out, out[-4000:]  # Ray restarted the workers, they resumed
    run_dir = StorePath(run)
    check_run_dir(run_dir, 3, out, 2)
    assert_same_run(run_dir, tmp_path / "whole", rel=1e-6, abs_=1e-6)
    names = files_under(run_dir)
    assert "model/manifest.json" in names and any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    assert [c.name for c in checkpoints(run_dir / "checkpoints")] == ["e00002-s0000020", "e00003-s0000000"]

    # A checkpoint whose upload was cut short (files, no manifest) is never taken as the newest
    half = run_dir / "checkpoints" / "e00009-s0000000"
    (half / "rank-00000-of-00002.pt").write_bytes(b"half")
    resumed = subprocess.run([PY, "-m", "alterrec_dist.train", "--resume", run, "--launcher", "torchrun"], cwd=work,
                             env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"warning: {half}/manifest.json: missing; resuming from the older checkpoint e00003-s0000000" \
        in resumed.stderr, resumed.stderr
    assert f"resuming from {run}/checkpoints/e00003-s0000000" in resumed.stdout + resumed.stderr

    command("export", ["--run", run, "--out", export], work, env)
    scored = command("batch_score", ["--export", export, "--split", "test", "--out", f"{bucket}/scores/test.parquet",
                                     "--metrics-out", f"{bucket}/scores/metrics.json", "--no-ray"], work, env)
    assert f"equal to {run}/summary.json test metrics" in scored.stdout, scored.stdout
    report = json.loads(StorePath(f"{bucket}/scores/metrics.json").read_text())
    assert report["summary_equal"] and report["sessions"] == 40 and report["out"] == f"{bucket}/scores/test.parquet"
    assert {"manifest.json", "items.parquet", "encoders.pt"} <= set(files_under(StorePath(export)))
    # the same sessions given as a directory of Parquet files in the store, scored from the run itself
    command("batch_score", ["--run", run, "--input", f"{data}/sessions/test", "--out", f"{bucket}/scores/input.parquet",
                            "--no-ray"], work, env)
    assert read_parquet(StorePath(f"{bucket}/scores/input.parquet")).equals(
        read_parquet(StorePath(f"{bucket}/scores/test.parquet")))
    assert list(work.iterdir()) == []  # nothing landed on the local disk in place of the bucket
