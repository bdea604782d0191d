"""The row-sharded item table: modulo placement, W-independent init, fetch with autograd."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from alterrec_dist.parallel.comm import Comm, sum_dense_grads
from alterrec_dist.parallel.table import Placement, ShardedItemTable
from tests.dist_harness import run_world

V, D, F = 23, 4, 3


def features():
    return np.arange(V * F, dtype=np.float16).reshape(V, F) / 8


def fetch_on_shard(rank, world):
    comm = Comm()
    table = ShardedItemTable(V, D, comm, features()[rank::world], init_std=0.5, seed=1)
    ids = torch.tensor([[5, 0, 22, 5], [7, 7, 1, 13]])[rank % 2]  # duplicates, any owner
    x, f, inverse = table.fetch(ids, need_x=True, need_f=True)
    assert len(x) == len(torch.unique(ids)), "each distinct item travels once"
    x, f = x[inverse], f[inverse]
    (x * torch.arange(1.0, D + 1)).sum().backward()
    return table.global_ids, table.x.detach(), table.x.grad, x.detach(), f, ids


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_fetch_returns_owner_rows_and_sends_grads_back(world):
    results = run_world(fetch_on_shard, world)
    full_x = torch.zeros(V, D)
    full_grad = torch.zeros(V, D)
    for gids, x_local, grad, *_ in results:
        assert (gids % world == gids[0] % world).all(), "item i lives on rank i mod W"
        full_x[gids] = x_local
        full_grad[gids] = grad
    single = run_world(fetch_on_shard, 1)[0]
    torch.testing.assert_close(full_x, single[1])  # same init whatever W
    expected_grad = torch.zeros(V, D)
    for *_, x, f, ids in results:
        torch.testing.assert_close(x, full_x[ids])
        torch.testing.assert_close(f, torch.from_numpy(features()).float()[ids])
        expected_grad.index_add_(0, ids, torch.arange(1.0, D + 1).expand(len(ids), D))
    torch.testing.assert_close(full_grad, expected_grad)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_placement_is_the_modulo_rule(world):
    p, ids = Placement(world), torch.arange(V)
    assert torch.equal(p.owner(ids), ids % world) and torch.equal(p.local_row(ids), ids // world)
    for rank in range(world):
        mine = p.ids_of(rank, V)
        assert torch.equal(mine, torch.arange(rank, V, world))
        assert torch.equal(p.local_row(mine), torch.arange(len(mine))), "local rows are 0..n-1 in id order"
        rows, owned = p.owned_rows(ids, rank)
        assert torch.equal(owned, ids % world == rank)
        assert torch.equal(rows, torch.where(owned, ids // world, 0))
    assert sorted(p.shard_major(V).tolist()) == list(range(V))
    assert torch.equal(p.shard_major(V)[:len(p.ids_of(0, V))], p.ids_of(0, V)), "rank 0's rows first"


def objects_on_shard(rank, world):
    comm = Comm()
    gathered = comm.all_gather_object(("rank", rank))
    told = comm.broadcast_object({"from": rank})
    return gathered, told, dict(comm.bytes)


@pytest.mark.slow
def test_object_collectives_go_through_comm_and_are_counted():
    for rank, (gathered, told, sent) in enumerate(run_world(objects_on_shard, 2)):
        assert gathered == [("rank", 0), ("rank", 1)] and told == {"from": 0}
        assert sent["all_gather_object"] > 0
        assert ("broadcast_object" in sent) == (rank == 0), "counted where it is sent from"


def grads_on_shard(rank, world):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(rank + 1))
    q = torch.nn.Parameter(torch.zeros(2))  # unused this step: no grad
    sum_dense_grads(Comm(), [p, q])
    return p.grad, q.grad


@pytest.mark.slow
def test_dense_grads_are_summed_not_averaged():
    for p_grad, q_grad in run_world(grads_on_shard, 3):
        torch.testing.assert_close(p_grad, torch.full((3,), 6.0))
        torch.testing.assert_close(q_grad, torch.zeros(2))


def test_model_layer_never_imports_distributed():
    """Layering: only sharded.py (and what builds on it) talks to torch.distributed."""
    pkg = Path(__file__).resolve().parents[2] / "alterrec_dist"
    for name in ("model/networks.py", "eval/metrics.py", "training/schedule.py", "data/dataset.py", "data/reader.py"):
        tree = ast.parse((pkg / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.startswith("torch.distributed") for m in imported), name


def test_the_largest_shard_is_rank_0s_at_every_world():
    for num_items in (9, 10, 16, 17, 100):
        for world in (1, 2, 3, 8, 9):
            sizes = [len(Placement(world).ids_of(r, num_items)) for r in range(world)]
            assert Placement(world).largest_shard(num_items) == max(sizes) == sizes[0]
