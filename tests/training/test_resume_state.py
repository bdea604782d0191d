"""Resuming, the pure parts (no process group, no run): re-cutting row shards for another world size,
the row optimizer's state, choosing the newest intact checkpoint, pruning, phases, the resumed config.
The real interrupted and resumed runs are in tests/e2e/test_resume.py.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.common.files import atomic_write_json, file_sha256
from alterrec_dist.parallel.saved import rank_file_name
from alterrec_dist.parallel.table import Placement
from alterrec_dist.train import build_parser, load_run_config
from alterrec_dist.training.checkpoint import (KEEP, checkpoint_name, join_row_state, newest_good, prune,
                                               split_row_state)
from alterrec_dist.training.schedule import phase_index, plan


# -- fast: the pure parts ----------------------------------------------------------------------

def shards_of(full: dict[str, torch.Tensor], world: int) -> list[dict]:
    """The row shards of `full` (row i = item i) cut by the modulo rule for `world` ranks."""
    V = len(next(iter(full.values())))
    return [{"items": torch.arange(r, V, world), "rows": {k: v[r::world] for k, v in full.items()}}
            for r in range(world)]


@pytest.mark.parametrize("old", [1, 2, 3, 4])
@pytest.mark.parametrize("new", [1, 2, 3, 5])
def test_repartition_gives_each_rank_its_rows(old, new):
    V = 13
    full = {"x": torch.randn(V, 3), "id.exp_avg": torch.randn(V, 3), "id.exp_avg_sq": torch.rand(V, 3)}
    for rank in range(new):
        mine = Placement(new).repartition(shards_of(full, old), rank)
        assert torch.equal(mine["items"], torch.arange(rank, V, new))
        for k, v in full.items():
            assert torch.equal(mine["rows"][k], v[rank::new]), (k, rank)


def test_repartition_takes_only_the_shards_it_is_given():
    """A rank reads only the old shards that hold its items (W=4 -> W=2: rank 1 needs old 1 and 3)."""
    full = {"x": torch.arange(20.0).view(10, 2)}
    old = shards_of(full, 4)
    mine = Placement(2).repartition([old[1], old[3]], 1)
    assert mine["items"].tolist() == [1, 3, 5, 7, 9]
    assert torch.equal(mine["rows"]["x"], full["x"][1::2])


def test_row_optimizer_state_splits_and_joins():
    x = torch.nn.Parameter(torch.randn(6, 2))
    opt = torch.optim.AdamW([x], lr=0.1)
    assert split_row_state(opt.state_dict())[1] == {}  # before the first step: nothing per row
    x.sum().backward()
    opt.step()
    rest, moments = split_row_state(opt.state_dict())
    assert set(moments) == {"exp_avg", "exp_avg_sq"} and all(v.shape == (6, 2) for v in moments.values())
    assert set(rest["state"][0]) == {"step"}
    again = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(6, 2))], lr=0.1)
    again.load_state_dict(join_row_state(rest, moments))
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(again.state_dict()["state"][0][k], v)


def fake_checkpoint(store: Path, epoch: int, step: int) -> Path:
    """A checkpoint directory with two files and their checksums (the layout `publish` writes)."""
    path = store / checkpoint_name(epoch, step)
    path.mkdir(parents=True)
    files = {}
    for name in (rank_file_name("rank", 0, 1), "networks.pt"):
        (path / name).write_bytes(os.urandom(64))
        files[name] = file_sha256(path / name)
    atomic_write_json(path / "manifest.json", {"epoch": epoch, "step": step, "files": files, "world_size": 1,
                                               "num_items": 30, "steps": [], "best": {}, "log_lines": epoch})
    return path


def test_newest_good_checkpoint_and_fallback(tmp_path, capsys):
    store = tmp_path / "checkpoints"
    assert newest_good(store) is None  # no store yet: a fresh start
    old, new = fake_checkpoint(store, 0, 4), fake_checkpoint(store, 1, 0)
    (store / ".e00002-s0000000.tmp-4194303").mkdir()  # a killed save's  # a save that was killed: never a candidate
    assert newest_good(store)[0] == new and capsys.readouterr().err == ""

    damaged = new / rank_file_name("rank", 0, 1)
    damaged.write_bytes(damaged.read_bytes()[:-1])  # truncated
    found, manifest = newest_good(store)
    assert found == old and manifest["step"] == 4
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {damaged}: missing or corrupt")
    assert "e00000-s0000004" in lines[0]
    assert newest_good(store)[0] == old and capsys.readouterr().err == ""  # asked again (torchrun's rank 0: once)

    (old / "manifest.json").write_text('{"files": {')  # a manifest cut short
    with pytest.raises(DataError) as e:
        newest_good(store)
    assert "none of its 2 checkpoints is intact" in str(e.value) and str(damaged) in str(e.value)
    assert "\n" not in str(e.value)


def test_prune_keeps_the_newest_and_the_pinned_one(tmp_path):
    """The checkpoint the phase in progress began from (pinned by the recipe) is the one a rejected phase
    (train.reject_worse) goes back to: it outlives however many epoch-end and mid-epoch ones came after it."""
    store = tmp_path / "checkpoints"
    made = [fake_checkpoint(store, e, s) for e, s in ((0, 5), (1, 0), (1, 5), (2, 0), (2, 3))]
    (store / ".e00002-s0000000.tmp-4194303").mkdir()  # a killed save's
    prune(store, KEEP, pinned="e00001-s0000000")
    assert sorted(store.iterdir()) == [made[1], *made[-KEEP:]]
    fake_checkpoint(store, 3, 0)
    prune(store, KEEP)  # nothing pinned (the plan's end)
    assert [p.name for p in sorted(store.iterdir())] == ["e00002-s0000003", "e00003-s0000000"]
    # an upload cut short (no manifest) newer than both is not one of the newest: it was kept, and the
    # older intact one removed (review finding)
    (store / "e00003-s0000009").mkdir()
    prune(store, KEEP)
    assert [p.name for p in sorted(store.iterdir())] == ["e00002-s0000003", "e00003-s0000000"]


def test_phase_index_counts_runs_of_one_key():
    phases = plan("alterrec", 1, 2, 5)  # id random, text random, id hard x2, text hard
    assert [phase_index(phases, e) for e in range(6)] == [0, 1, 2, 2, 3, 4]
    assert [phase_index(plan("id_only", 1, 1, 3), e) for e in range(4)] == [0, 0, 0, 1]


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_resume_config_comes_from_the_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('[train]\nm_max = 7\n[trainer]\nnum_workers = 2\n')
    cfg, resume_dir = load_run_config(parse(["--resume", str(run), "--set", "trainer.num_workers=1"]))
    assert resume_dir == run and cfg.train.m_max == 7 and cfg.trainer.num_workers == 1
    with pytest.raises(ConfigError, match="drop --config and --out"):
        load_run_config(parse(["--resume", str(run), "--out", str(run)]))
    with pytest.raises(ConfigError, match="not a run directory"):
        load_run_config(parse(["--resume", str(tmp_path)]))


def test_resume_auto_starts_or_goes_on(tmp_path):
    with pytest.raises(ConfigError, match="--out or trainer.name"):
        load_run_config(parse(["--resume", "auto"]))
    fresh = parse(["--resume", "auto", "--out", str(tmp_path / "run"), "--set", "train.m_max=3"])
    cfg, resume_dir = load_run_config(fresh)
    assert resume_dir is None and cfg.train.m_max == 3  # nothing there yet: a new run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text('[train]\nm_max = 5\n')
    cfg, resume_dir = load_run_config(fresh)  # an attempt started there: go on with its config
    assert resume_dir == tmp_path / "run" and cfg.train.m_max == 3  # --set still applies on top
    # and so does the job's own --config, for what a resume may change: its m_max was dropped (review finding)
    (tmp_path / "job.toml").write_text('[train]\nm_max = 7\n')
    cfg, _ = load_run_config(parse(["--resume", "auto", "--out", str(tmp_path / "run"), "--config",
                                    str(tmp_path / "job.toml")]))
    assert cfg.train.m_max == 7
    named = parse(["--resume", "auto", "--set", f"trainer.storage_path={tmp_path}", "--set", "trainer.name=run"])
    assert load_run_config(named)[1] == tmp_path / "run"
