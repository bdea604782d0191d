"""The saved model: per-rank shards reassemble into the full ID table; corruption is detected."""
from pathlib import Path

import pytest
import torch

from alterrec_dist.common.config import load_config
from alterrec_dist.common.errors import DataError
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.saved import load_model, rank_file_name, save_model
from alterrec_dist.training.checkpoint import checkpoint_name, save_checkpoint
from alterrec_dist.training.recipe import build_run, frozen_item_rows, train_epoch, undo_phase
from alterrec_dist.training.schedule import plan
from tests.dist_harness import run_world
from tests.tiny_data import V, tiny_dataset

pytestmark = pytest.mark.slow


def train_and_save(rank, world, data_path, model_dir):
    cfg = load_config(None, [f"data.path={data_path}", f"trainer.num_workers={world}", "train.global_batch_size=12",
                             "train.k1=2", "train.k2=12", "model.dim=8", "eval.batch_size=6", "train.m_max=2"])
    run = build_run(cfg, Comm())
    for phase in plan(cfg.train.method, 1, 1, 2):  # both networks change from their initialisation
        train_epoch(run, phase, frozen_item_rows(run, phase))
    save_model(run.comm, run.networks, run.table, model_dir, {"epoch": 1})
    full = torch.zeros(V, 8)
    full[run.table.global_ids] = run.table.x.detach()
    full = run.comm.all_reduce(full)  # every row comes from exactly one owner
    return full, {k: {n: p.clone() for n, p in net.state_dict().items()} for k, net in run.networks.items()}


@pytest.mark.parametrize("world", [1, 2])
def test_saved_shards_reassemble_the_table(tmp_path, world):
    data = tiny_dataset(tmp_path / "data")
    results = run_world(train_and_save, world, str(data), str(tmp_path / "model"))
    full, states = results[0]
    manifest, loaded_states, x = load_model(tmp_path / "model")
    assert manifest["world_size"] == world and manifest["epoch"] == 1 and manifest["num_items"] == V
    shards = [rank_file_name("shard", r, world) for r in range(world)]
    assert sorted(manifest["files"]) == sorted(["networks.pt", *shards])
    assert torch.equal(x, full)
    for name, state in states.items():
        for key, value in state.items():
            assert torch.equal(loaded_states[name][key], value), (name, key)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp directory left behind

    shard = tmp_path / "model" / rank_file_name("shard", 0, world)
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    with pytest.raises(DataError, match=shard.name):
        load_model(tmp_path / "model")


def tensors_in(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def test_what_is_saved_is_cpu_tensors_whatever_the_device(tmp_path):
    """A GPU run's model and checkpoints load on a CPU-only machine only if every tensor in them was saved from
    the CPU: publish() moves them (on_cpu) and every load names map_location (tests/common/test_device.py). Loaded here
    without map_location, so a tensor saved from another device would not come back as a CPU one."""
    from alterrec_dist.parallel.saved import on_cpu
    data = tiny_dataset(tmp_path / "data")
    run_world(train_and_save, 2, str(data), str(tmp_path / "model"))
    files = sorted((tmp_path / "model").glob("*.pt"))
    assert len(files) == 3
    for f in files:
        tensors = list(tensors_in(torch.load(f, weights_only=True)))
        assert tensors and all(t.device.type == "cpu" for t in tensors), f.name
    # on_cpu reaches into every container a saved state holds
    nested = {"a": [torch.zeros(2), (torch.ones(1), {"b": torch.arange(3)})], "n": None, "s": "x"}
    assert [t.tolist() for t in tensors_in(on_cpu(nested))] == [[0.0, 0.0], [1.0], [0, 1, 2]]


def train_then_undo(rank, world, data_path, store, damage):
    """Checkpoint, train one ID epoch, then `undo_phase` back to the checkpoint (whose shard of rank 1 is
    cut short first if `damage`): (this rank's rows are back as they were, the error it raised)."""
    cfg = load_config(None, [f"data.path={data_path}", f"trainer.num_workers={world}", "train.global_batch_size=12",
                             "train.k1=2", "train.k2=12", "model.dim=8", "eval.batch_size=6"])
    run = build_run(cfg, Comm())
    rows = run.table.x.detach().clone()
    save_checkpoint(run.comm, Path(store), checkpoint_name(1, 0), run.networks, run.table, run.steppers,
                    {"epoch": 1}, Path(store) / "no-model")
    phase = plan(cfg.train.method, 1, 1, 2)[0]
    train_epoch(run, phase, frozen_item_rows(run, phase))
    assert not torch.equal(run.table.x, rows)
    shard = Path(store) / checkpoint_name(1, 0) / rank_file_name("rank", 1, world)
    if damage and rank == 0:
        shard.write_bytes(shard.read_bytes()[:-10])
    run.comm.barrier()
    try:
        undo_phase(run, Path(store) / checkpoint_name(1, 0))
    except DataError as e:
        return None, str(e)
    return torch.equal(run.table.x, rows), None


def test_undoing_a_phase_restores_its_start_and_refuses_a_damaged_checkpoint(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    assert run_world(train_then_undo, 2, str(data), str(tmp_path / "good"), False) == [(True, None)] * 2
    results = run_world(train_then_undo, 2, str(data), str(tmp_path / "bad"), True)
    assert [rows for rows, _ in results] == [None, None]  # every rank refuses, none is left in a collective
    shard = tmp_path / "bad" / checkpoint_name(1, 0) / rank_file_name("rank", 1, 2)
    assert all(error == f"{shard}: missing or corrupt (sha256 does not match {shard.parent / 'manifest.json'})"
               for _, error in results)


def test_a_manifest_without_what_a_resume_reads_is_passed_over(tmp_path, capsys):
    """A newest checkpoint whose manifest is JSON but lacks a key (or holds "3" for an epoch) was taken as intact
    and failed the resume with a KeyError or TypeError traceback; now it is a warning and the older one is used
    (review finding)."""
    import json
    from alterrec_dist.training.checkpoint import newest_good
    full = {"files": {}, "world_size": 1, "num_items": 30, "epoch": 1, "steps": [], "best": {}, "log_lines": 1}
    for name, manifest in ((checkpoint_name(1, 0), full), (checkpoint_name(2, 0), {"files": {}, "world_size": 1}),
                           (checkpoint_name(3, 0), full | {"epoch": "3"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    found, manifest = newest_good(tmp_path)
    assert found.name == checkpoint_name(1, 0) and manifest == full
    err = capsys.readouterr().err.splitlines()
    assert "epoch is missing or not of type int" in err[0] and "num_items is missing" in err[1]


def test_prune_removes_old_checkpoints_and_their_temp_siblings_and_nothing_else(tmp_path):
    """`checkpoints/` linked to a directory of the user's (or a file put there): a prune that removed every entry
    but the kept checkpoints emptied it (reviewer finding)."""
    from alterrec_dist.training.checkpoint import prune
    names = [checkpoint_name(e, 0) for e in range(4)]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    (tmp_path / f".{checkpoint_name(4, 0)}.tmp-999999").mkdir()  # a killed save
    (tmp_path / checkpoint_name(5, 0)).mkdir()  # an upload cut short: no manifest
    for other in ("thesis.tex", "notes", ".e1.tmp-5", "e00001-s0000000.bak"):
        (tmp_path / other).write_text("mine")
    prune(tmp_path, 2, pinned=names[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names[0], names[2], names[3], "thesis.tex", "notes", ".e1.tmp-5", "e00001-s0000000.bak"])
