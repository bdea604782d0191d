"""The train command: run directory, summary table, one-line CLI errors (fast; the real runs are
in tests/e2e/test_train_runs.py)."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from alterrec_dist.common import run_layout
from alterrec_dist.common.config import METRICS, PROJECT_ROOT, Config, load_config
from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.data.layout import DatasetWriter
from alterrec_dist.train import build_parser, format_summary, load_run_config
from alterrec_dist.training.checkpoint import checkpoint_name
from alterrec_dist.training.run_dir import (WORKERS_PER_CPU, check_resources, default_run_dir, hold, make_run_dir,
                                            read_summary, reopen_run_dir)
from tests.commands import run_command

PY = sys.executable
SCORES = ("id", "text", "fused")


def tiny_dataset(out: Path, num_items: int = 60, dim: int = 16, seed: int = 0) -> Path:
    """A small valid dataset: random walks over V items, random text features."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(out) as w:
        for split, n in (("train", 400), ("valid", 50), ("test", 50)):
            hist = [rng.integers(0, num_items, rng.integers(1, 8)).tolist() for _ in range(n)]
            w.add_sessions(split, hist, rng.integers(0, num_items, n))
        w.set_items([f"item{i}" for i in range(num_items)], [f"text {i}" for i in range(num_items)])
        w.add_text_features(rng.standard_normal((num_items, dim)))
        w.commit(source={"kind": "test"}, text_model=None, command=["tiny_dataset"])
    return out


def fake_summary(best_epoch: int = 2) -> dict:
    block = {s: {m: 0.1 * (i + 1) for i, m in enumerate(METRICS)} for s in SCORES}
    return {"best_epoch": best_epoch, "valid": block, "test": block, "longtail": {}}


def made_run_dir(cfg, out: str | None) -> Path:
    """A new run directory as `train` makes it, no longer held (its train has ended)."""
    with ExitStack() as held:
        return make_run_dir(cfg, out, held)


def cli(args: list[str], tmp_path: Path, timeout: float = 120, env: dict | None = None):
    return subprocess.run([PY, "-m", "alterrec_dist.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


# -- run directory and summary (in-process) ----------------------------------------------------

def test_default_run_dir_name():
    import datetime

    cfg = load_config(None, ["train.method=id_only"])
    d = default_run_dir(cfg, datetime.datetime(2024, 5, 6, 7, 8, 9))
    assert d == PROJECT_ROOT / "runs" / "id_only-20240506-070809"
    cfg = load_config(None, ["trainer.name=exp1", "trainer.storage_path=/abs/runs"])
    assert default_run_dir(cfg) == Path("/abs/runs/exp1")


@pytest.mark.parametrize("launcher, use_gpu, workers, address", [
    ("ray", False, WORKERS_PER_CPU * 2, None),  # the limit itself
    ("torchrun", False, 32, None),  # torchrun's workers may be on other nodes
    ("ray", True, 16, None),  # GPU workers: the GPU count decides
    ("ray", False, 64, "http://127.0.0.1:8265")])  # a cluster's workers are the cluster's
def test_the_private_ray_worker_limit_leaves_other_launches_alone(monkeypatch, launcher, use_gpu, workers, address):
    import torch

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 16)
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = Config()
    cfg.trainer.launcher, cfg.trainer.use_gpu, cfg.trainer.num_workers = launcher, use_gpu, workers
    check_resources(cfg)


def test_make_run_dir_writes_config_and_refuses_nonempty(tmp_path):
    cfg = load_config(None, ["train.m_max=3", "model.dim=8"])
    run = made_run_dir(cfg, str(tmp_path / "a" / "run"))
    assert run.is_absolute() and run.is_dir()
    assert load_config(run / "config.toml") == cfg
    with pytest.raises(ConfigError, match="exists and is not empty") as e:
        made_run_dir(cfg, str(run))
    assert str(run) in str(e.value)
    (tmp_path / "empty").mkdir()
    assert made_run_dir(cfg, str(tmp_path / "empty")) == tmp_path / "empty"  # an empty dir is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        made_run_dir(cfg, str(tmp_path / "file"))


def test_make_run_dir_named_and_auto(tmp_path):
    cfg = load_config(None, [f"trainer.storage_path={tmp_path}", "trainer.name=exp"])
    assert made_run_dir(cfg, None) == tmp_path / "exp"
    with pytest.raises(ConfigError, match="exists and is not empty"):
        made_run_dir(cfg, None)  # a chosen name is never silently changed
    cfg = load_config(None, [f"trainer.storage_path={tmp_path}"])
    a, b = made_run_dir(cfg, None), made_run_dir(cfg, None)  # same second: b gets a suffix
    assert a != b and a.name.startswith("alterrec-") and b.name.startswith(a.name[:len("alterrec-")])


def test_an_auto_named_run_under_a_storage_path_that_is_a_file_is_refused_at_once(tmp_path):
    """Claiming an auto name tried a million suffixes (10 s), each failing as its parent could not be made, and
    then said a million runs of that name existed."""
    (tmp_path / "runs").write_text("a file, not a directory")
    cfg = load_config(None, [f"trainer.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'runs'}: trainer.storage_path is not a directory$"):
        made_run_dir(cfg, None)


def test_make_run_dir_relative_out_is_cwd_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert made_run_dir(Config(), "rel/run") == tmp_path / "rel" / "run"


def test_a_second_train_on_a_run_directory_is_refused_while_the_first_writes_it(tmp_path, no_ray_env):
    """Two `train --resume RUN` at once both trained to exit 0: RUN/metrics.jsonl read epochs 0-4, 4, 5, 5, 6, 6 and
    the summary was whichever ended last. The train writing a run holds it; a second one, in another process, is
    one line, exit 2, before Ray, and writes nothing. Once the first has ended the run is free again."""
    data = tiny_dataset(tmp_path / "data")
    cfg = load_config(None, [f"data.path={data}", "train.global_batch_size=16"])
    with ExitStack() as held:
        run = make_run_dir(cfg, str(tmp_path / "run"), held)  # the first train, under way
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        for args in (["--resume", str(run)], ["--resume", "auto", "--out", str(run)]):
            out = cli([*args, "--set", f"data.path={data}", "--set", "train.global_batch_size=16"], tmp_path,
                      env=no_ray_env)
            assert out.returncode == 2 and out.stderr.splitlines() == [
                f"error: {run}: another train is writing this run directory now (it holds .lock): let it end, "
                "or pick another --out"], out.stderr
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
        # a new run into an empty directory another train holds: refused too, not started beside it
        (tmp_path / "empty").mkdir()
        with ExitStack() as first:
            hold(tmp_path / "empty", first)
            with pytest.raises(ConfigError, match="another train is writing this run directory now"):
                make_run_dir(cfg, str(tmp_path / "empty"), ExitStack())
            assert [p.name for p in (tmp_path / "empty").iterdir()] == [".lock"]
    with ExitStack() as held:
        assert reopen_run_dir(cfg, run, held) == run


def test_a_run_directory_on_a_file_system_without_locks_trains_unguarded_and_says_so(tmp_path, monkeypatch, capsys):
    """An NFS mount with `nolock` refuses every flock (ENOLCK): the run lock's OSError was a traceback before any
    training. The run goes on without its guard, with a warning that says what is lost."""
    import errno

    from alterrec_dist.common import files

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    run = made_run_dir(load_config(None, ["train.m_max=3"]), str(tmp_path / "run"))
    assert (run / "config.toml").is_file()
    assert capsys.readouterr().err == (f"warning: {run}/.lock: cannot lock it (No locks available): a second train "
                                       "on this run directory would not be refused\n")


def test_a_run_directory_that_cannot_be_written_is_one_line_and_starts_again_once_it_can(tmp_path):
    """A full disk as the run directory was made: a traceback, and the directory kept the config.toml it had
    written, so the same --out was then refused as "not empty"."""
    cfg = load_config(None, ["train.m_max=3"])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed rather than told
    resource.setrlimit(resource.RLIMIT_FSIZE, (500, hard))  # config.toml is longer
    try:
        with pytest.raises(DataError, match=rf"^{tmp_path / 'run' / 'config.toml'}: cannot write \(.*too large"):
            made_run_dir(cfg, str(tmp_path / "run"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]
    assert made_run_dir(cfg, str(tmp_path / "run")) == tmp_path / "run"


def test_format_summary_table():
    # an ID-only run is chosen on its own score, whatever eval.metric names: the line says the run's selection
    text = format_summary(fake_summary(best_epoch=7) | {"selection": "id/ndcg@10"}, Path("/r/x"))
    lines = text.splitlines()
    assert lines[0].split() == ["test", *METRICS]
    assert [ln.split()[0] for ln in lines[1:4]] == ["id", "text", "fused"]
    assert lines[1].split()[1:] == ["0.1000", "0.2000", "0.3000", "0.4000", "0.5000"]
    assert lines[-2] == "best epoch: 7 (selected on valid id/ndcg@10)" and lines[-1] == "run dir: /r/x"
    # a method that has no text side (id_only) just leaves that row out; missing cells show "-"
    s = fake_summary()
    del s["test"]["text"]
    del s["test"]["fused"]["mrr@20"]
    out = format_summary(s, Path("/r")).splitlines()
    assert [ln.split()[0] for ln in out[1:-2]] == ["id", "fused"] and out[2].split()[-1] == "-"
    # with eval.alpha_sweep, the weight chosen on validation gets its own row
    s = fake_summary()
    s["alpha"] = {"chosen": 0.3, "selection": "fused/ndcg@10", "valid": {}, "test": dict(s["test"]["fused"])}
    row = format_summary(s, Path("/r")).splitlines()[4]
    assert row.split()[0] == "fused@0.3" and row.endswith("(alpha chosen on valid fused/ndcg@10: the model serves it)")


def test_read_summary(tmp_path):
    with pytest.raises(RuntimeError, match="without writing a summary"):
        read_summary(tmp_path)
    assert read_summary(tmp_path, {"best_epoch": 1}) == {"best_epoch": 1}
    (tmp_path / "summary.json").write_text(json.dumps(fake_summary(3)))
    assert read_summary(tmp_path, {"best_epoch": 1})["best_epoch"] == 3


# -- CLI errors: one line, exit 2, Ray never imported -----------------------------------------

@pytest.fixture
def no_ray_env(tmp_path):
    """An environment in which importing ray fails loudly: proves the error path never starts it."""
    shadow = tmp_path / "shadow"
    (shadow / "ray").mkdir(parents=True)
    (shadow / "ray" / "__init__.py").write_text("raise ImportError('ray must not be imported on this path')\n")
    env = dict(os.environ, PYTHONPATH=str(shadow))
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.parametrize("case", ["missing_config", "invalid_toml", "bad_set_key", "bad_set_value",
                                  "missing_dataset", "not_a_dataset", "run_dir_exists", "bad_launcher",
                                  "batch_over_data"])
def test_cli_one_line_errors(tmp_path, monkeypatch, capsys, no_ray, case):
    """In this process, with Ray refused: the subprocess tests below show the same path in a real
    process whose `import ray` fails."""
    monkeypatch.chdir(tmp_path)
    data = tiny_dataset(tmp_path / "data")
    (tmp_path / "bad.toml").write_text("[model\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notdata").mkdir()
    ok = ["--set", f"data.path={data}", "--out", str(tmp_path / "run")]
    args, fragment = {
        "missing_config": (["--config", "nope.toml"], "nope.toml: config file not found"),
        "invalid_toml": (["--config", "bad.toml"], "bad.toml: not valid TOML"),
        "bad_set_key": ([*ok, "--set", "model.nosuch=1"], "unknown key model.nosuch"),
        "bad_set_value": ([*ok, "--set", "train.m_max=three"], "train.m_max: expected int"),
        "missing_dataset": (["--set", f"data.path={tmp_path}/gone"], f"{tmp_path}/gone: dataset not found"),
        "not_a_dataset": (["--set", f"data.path={tmp_path}/notdata"], "no dataset manifest"),
        "run_dir_exists": ([*ok[:2], "--set", "train.global_batch_size=16", "--out", "taken"], "exists and is not empty"),
        "bad_launcher": ([*ok, "--set", "trainer.launcher=mpi"], "trainer.launcher"),
        "batch_over_data": ([*ok, "--set", "train.global_batch_size=1024"], "more than the 400 train rows"),
    }[case]
    capsys.readouterr()
    code, err = run_command("train", args, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "run").exists()  # nothing was created before the error


@pytest.mark.parametrize("case", ["changed_setting", "changed_retry_config", "data_remade_in_place",
                                  "zero_at_another_world_size", "zero_at_another_torchrun_world"])
def test_cli_resume_refuses_another_run(tmp_path, monkeypatch, capsys, no_ray, case):
    """A resume that would train another model or on other data than its checkpoints hold, or that its workers
    could not load (a ZeRO state split among another number of them), is one line, exit 2, before Ray, and leaves
    the run directory as it was."""
    monkeypatch.chdir(tmp_path)
    data = tiny_dataset(tmp_path / "data")
    zero = ["trainer.engine=deepspeed", "trainer.zero_stage=1", "trainer.num_workers=2"]
    run = made_run_dir(load_config(None, [f"data.path={data}", "train.global_batch_size=16",
                                          *(zero if case.startswith("zero") else [])]), str(tmp_path / "run"))
    if case.startswith("zero"):  # a checkpoint the two workers saved (its manifest: what the driver reads of it)
        checkpoint = run / run_layout.CHECKPOINTS / checkpoint_name(1, 0)
        checkpoint.mkdir(parents=True)
        (checkpoint / "manifest.json").write_text(json.dumps(
            {"files": {}, "world_size": 2, "num_items": 30, "epoch": 1, "steps": [], "best": {}, "log_lines": 1}))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    args, fragment = {
        "changed_setting": (["--resume", str(run), "--set", "model.dim=32"],
                            "a resumed run keeps its settings, but model.dim would change (model.dim: 64 -> 32)"),
        "changed_retry_config": (["--resume", "auto", "--out", str(run), "--set", f"data.path={data}",
                                  "--set", "train.global_batch_size=16", "--set", "train.seed=1"],
                                 "but train.seed would change"),
        "data_remade_in_place": (["--resume", str(run)], "not the data this run started on"),
        "zero_at_another_world_size": (["--resume", str(run), "--set", "trainer.num_workers=1"],
                                       "saved by 2 workers under ZeRO stage 1, which splits the optimizer state "
                                       "among them; resume with trainer.num_workers=2"),
        # torchrun's world, not trainer.num_workers, is the world size there
        "zero_at_another_torchrun_world": (["--resume", str(run), "--launcher", "torchrun"],
                                           "resume with torchrun --nproc_per_node 2"),
    }[case]
    if case == "data_remade_in_place":
        shutil.rmtree(data)
        tiny_dataset(data, seed=1)
    code, err = run_command("train", args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_takes_the_same_data_elsewhere_and_resumable_settings(tmp_path):
    """What a resume may change: where the same files live (data.path), the world size, the epoch budget."""
    data = tiny_dataset(tmp_path / "data")
    run = made_run_dir(load_config(None, [f"data.path={data}"]), str(tmp_path / "run"))
    assert json.loads((run / run_layout.DATASET).read_text())["sha256"] == Dataset(data).file_digests
    shutil.copytree(data, tmp_path / "moved")
    changes = [f"data.path={tmp_path / 'moved'}", "trainer.num_workers=1", "train.m_max=20", "train.patience=3"]
    args = build_parser().parse_args(["--resume", str(run), *[a for c in changes for a in ("--set", c)]])
    cfg, resume_dir = load_run_config(args)
    (run / run_layout.SUMMARY).write_text(json.dumps(fake_summary()))  # it had finished, on train.m_max=10
    with ExitStack() as held:
        assert resume_dir == run and reopen_run_dir(cfg, run, held) == run
    assert load_config(run / "config.toml") == cfg  # the config it now runs with, and where its data is now
    # the old end's summary went with the old config: a resume stopped before its workers removed it left a
    # run that looked finished under a config.toml that did not make it
    assert not (run / run_layout.SUMMARY).exists()
    assert json.loads((run / run_layout.DATASET).read_text())["path"] == str(tmp_path / "moved")


@pytest.mark.parametrize("case", ["missing_dataset", "missing_bucket", "other_scheme", "bucket_root"])
def test_cli_store_paths_one_line_errors(tmp_path, monkeypatch, capsys, no_ray, bucket, case):
    """Store URIs are paths in the store, never local folders named `s3:`: what is not there is one line."""
    monkeypatch.chdir(tmp_path)
    data = tiny_dataset(f"{bucket}/data")
    args, fragment = {
        "missing_dataset": (["--set", f"data.path={bucket}/gone"], f"{bucket}/gone: dataset not found"),
        "missing_bucket": (["--set", f"data.path={data}", "--set", "trainer.storage_path=s3://no-such-bucket/runs",
                            "--set", "train.global_batch_size=16"], "bucket s3://no-such-bucket not found"),
        "other_scheme": (["--set", "data.path=hdfs://nn/data"], "hdfs://nn/data: unsupported URI scheme"),
        # Ray Train keeps a run under its parent: every checkpoint of a run at a bucket's root was refused
        "bucket_root": (["--set", f"data.path={data}", "--set", "train.global_batch_size=16", "--out", bucket],
                        f"{bucket}: a run directory goes under a key in the bucket"),
    }[case]
    code, err = run_command("train", args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(120)
def test_cli_relative_dataset_resolves_against_project_root(tmp_path, no_ray_env):
    """data.path is relative to the repository root, not the current directory; the error names it."""
    r = cli(["--set", "data.path=shards/nosuch"], tmp_path, env=no_ray_env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"{PROJECT_ROOT / 'shards' / 'nosuch'}: dataset not found" in r.stderr


@pytest.mark.timeout(120)
def test_cli_refuses_ray_train_v1(tmp_path, no_ray_env):
    r = cli(["--out", str(tmp_path / "run")], tmp_path, env=dict(no_ray_env, RAY_TRAIN_V2_ENABLED="0"))
    assert r.returncode == 2 and "RAY_TRAIN_V2_ENABLED" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()




def test_k1_past_the_catalog_is_refused_only_where_k1_is_read(tmp_path):
    """k1 at or past the catalog leaves no band to mine nor k2 - k1 random draws, so it is refused; but ID only
    with catalog negatives reads neither, and a small catalog's run of it was refused too."""
    from alterrec_dist.training.run_dir import check_dataset

    data = tiny_dataset(tmp_path / "ds", num_items=15)
    base = [f"data.path={data}", "train.global_batch_size=40", "train.k1=20", "train.k2=30"]
    check_dataset(load_config(None, [*base, "train.method=id_only", "train.random_negatives=catalog"]))
    for refused in (["train.method=id_only"], ["train.method=alterrec", "train.random_negatives=catalog"]):
        with pytest.raises(ConfigError, match="train.k1=20: the negatives' band starts past the 15 items"):
            check_dataset(load_config(None, [*base, *refused]))


def test_torchruns_world_is_the_config_checked(monkeypatch):
    """Under torchrun the config was checked against trainer.num_workers (default 2) before torchrun's world size
    replaced it: a global batch of 999 was refused on a world of 1."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = build_parser().parse_args(["--launcher", "torchrun", "--set", "train.global_batch_size=999"])
    cfg, _ = load_run_config(args)
    assert (cfg.trainer.launcher, cfg.trainer.num_workers, cfg.train.global_batch_size) == ("torchrun", 1, 999)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train.global_batch_size=999 must be divisible by trainer.num_workers=2"):
        load_run_config(args)
    monkeypatch.setenv("WORLD_SIZE", "3")  # launched with trainer.num_workers = 2 in its config: torchrun's 3 count
    assert load_run_config(build_parser().parse_args(["--launcher", "torchrun", "--set", "train.global_batch_size=999",
                                                      "--set", "eval.batch_size=999", "--set", "trainer.num_workers=2"])
                           )[0].trainer.num_workers == 3


def test_a_resume_stays_in_its_directory_and_says_so(tmp_path):
    """`--resume RUN --set trainer.name=X` was accepted, the run went on in RUN, and its config.toml then named X.
    An empty trainer.storage_path (an unset shell variable) put new runs in the project root."""
    run = made_run_dir(load_config(None, ["train.method=id_only"]), str(tmp_path / "run"))
    for key, value in (("trainer.name", "elsewhere"), ("trainer.storage_path", str(tmp_path / "other"))):
        with pytest.raises(ConfigError, match=rf"run/config.toml: the run goes on in its own directory, so {key} "):
            load_run_config(build_parser().parse_args(["--resume", str(run), "--set", f"{key}={value}"]))
    assert load_config(run / "config.toml").trainer.name == ""
    # and what else may change says so: not those two (a reviewer saw one message allow what the next refused)
    with pytest.raises(ConfigError, match=r"model.dim would change .*only trainer.num_workers, trainer.use_gpu, "
                                          r"trainer.launcher, trainer.max_failures,"):
        load_run_config(build_parser().parse_args(["--resume", str(run), "--set", "model.dim=8"]))
    with pytest.raises(ConfigError, match="trainer.storage_path is empty: give the directory runs go in, or --out"):
        default_run_dir(load_config(None, ["trainer.storage_path= "]))
    # a run made with --out and an empty storage path (its config.toml says so) still loads, to serve or resume
    assert load_config(None, ["trainer.storage_path="]).trainer.storage_path == ""
