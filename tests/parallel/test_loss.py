"""The vocab-parallel band loss equals dense masked cross-entropy, in value and in gradient."""
import pytest
import torch

from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.loss import band_loss, tiled_band_loss
from alterrec_dist.parallel.mining import Band, catalog_band, exclude_items
from tests.dist_harness import run_world

pytestmark = pytest.mark.slow
G, V, D, P, BETA = 8, 29, 5, 3, 0.5


def problem():
    g = torch.Generator().manual_seed(11)
    queries = torch.randn(G, D, generator=g)
    items = torch.randn(V, D, generator=g)
    positives = torch.stack([torch.randperm(V, generator=g)[:P] for _ in range(G)])
    in_band = torch.rand(G, V, generator=g) < 0.4
    in_band[torch.arange(G)[:, None], positives] = False
    in_band[3] = False  # a query with an empty band: its loss is 0, its grads finite
    return queries, items, positives, in_band


def dense_loss(queries, items, positives, in_band):
    logits = queries @ items.T
    lse = torch.logsumexp(logits.masked_fill(~in_band, float("-inf")), 1)
    pos = torch.gather(logits, 1, positives)
    per = torch.logaddexp(pos, lse[:, None]) - pos
    weight = torch.tensor([1.0] + [BETA] * (P - 1))
    return (per * weight).sum(1).mean()


def sharded_loss(rank, world):
    queries, items, positives, in_band = problem()
    comm = Comm()
    ids = torch.arange(rank, V, world)
    b = G // world
    q_local = queries[rank * b:(rank + 1) * b].clone().requires_grad_()
    rows = items[ids].clone().requires_grad_()
    q_all = comm.all_gather(q_local, autograd=True)
    band = Band(torch.arange(len(ids)).expand(G, -1), in_band[:, ids])
    owned = positives % world == rank
    weight = torch.tensor([1.0] + [BETA] * (P - 1)).expand(G, P)
    loss, per_query = band_loss(comm, q_all @ rows.T, band, torch.where(owned, positives // world, 0), owned, weight, G)
    loss.backward()
    return loss.detach(), per_query, q_local.grad, rows.grad, ids


@pytest.mark.parametrize("world", [1, 2, 4])
def test_band_loss_matches_dense_cross_entropy(world):
    queries, items, positives, in_band = problem()
    q = queries.clone().requires_grad_()
    it = items.clone().requires_grad_()
    expected = dense_loss(q, it, positives, in_band)
    expected.backward()
    results = run_world(sharded_loss, world)
    total = sum(r[0] for r in results)
    torch.testing.assert_close(total, expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1].mean(), expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[2] for r in results]), q.grad, rtol=1e-5, atol=1e-6)
    row_grads = torch.zeros_like(items)
    for r in results:
        row_grads[r[4]] = r[3]
    torch.testing.assert_close(row_grads, it.grad, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(q.grad).all()


def tiled_and_untiled(rank, world, tile_rows, scale):
    """Both losses on the same shard problem: (loss, per-query loss, query grad, row grad) of each."""
    queries, items, positives, in_band = problem()
    comm = Comm()
    ids = torch.arange(rank, V, world)
    band = Band(torch.arange(len(ids)).expand(G, -1), in_band[:, ids])
    owned = positives % world == rank
    weight = torch.tensor([1.0] + [BETA] * (P - 1)).expand(G, P)
    out = []
    for tiled in (False, True):
        q = queries.clone().requires_grad_()
        rows = items[ids].clone().requires_grad_()
        args = (band, torch.where(owned, positives // world, 0), owned, weight, G)
        if tiled:
            loss, per_query = tiled_band_loss(comm, q, rows, scale, *args, tile_rows=tile_rows)
        else:
            loss, per_query = band_loss(comm, (q @ rows.T) * scale, *args)
        loss.backward()
        out.append((loss.detach(), per_query, q.grad, rows.grad))
    return out


@pytest.mark.parametrize("world, tile_rows, scale", [(1, 4, 1.0), (1, 29, 2.5), (2, 3, 1.0), (2, 100, 1 / 0.07)])
def test_tiled_band_loss_equals_the_untiled_one_in_value_and_gradient(world, tile_rows, scale):
    """Tiles narrower than the shard, not dividing it, and one tile wider than it; with a logit scale."""
    for untiled, tiled in run_world(tiled_and_untiled, world, tile_rows, scale):
        for a, b in zip(untiled, tiled):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        assert untiled[3].abs().sum() > 0 and untiled[2].abs().sum() > 0  # the gradients are not trivially zero


def catalog_loss(rank, world):
    """`train.random_negatives = catalog` on this shard: the tiled band loss of the catalog band, positives
    excluded, for the target alone; (per-query loss, query grad, row grad, the shard's ids)."""
    queries, items, positives, _ = problem()
    comm = Comm()
    ids = torch.arange(rank, V, world)
    target = positives[:, :1]
    owned = target % world == rank
    pos_rows = torch.where(owned, target // world, 0)
    band = exclude_items(catalog_band(G, len(ids), queries.device), pos_rows, owned)
    q, rows = queries.clone().requires_grad_(), items[ids].clone().requires_grad_()
    loss, per_query = tiled_band_loss(comm, q, rows, 1 / 0.07, band, pos_rows, owned, torch.ones(G, 1), G, 4)
    loss.backward()
    return per_query, q.grad, rows.grad, ids


@pytest.mark.parametrize("world", [1, 2])
def test_the_catalog_band_is_a_softmax_over_the_whole_catalog(world):
    """Every item but the target is a negative: the loss is plain cross-entropy over all V logits."""
    queries, items, positives, _ = problem()
    q, it = queries.clone().requires_grad_(), items.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy((q @ it.T) / 0.07, positives[:, 0], reduction="none")
    expected.mean().backward()
    results = run_world(catalog_loss, world)
    for per_query, *_ in results:
        torch.testing.assert_close(per_query, expected.detach(), rtol=1e-5, atol=1e-5)
    # each rank's query grad covers the whole batch through the all-reduce: summed over ranks it is the total
    torch.testing.assert_close(sum(r[1] for r in results), q.grad, rtol=1e-5, atol=1e-6)
    row_grads = torch.zeros_like(items)
    for r in results:
        row_grads[r[3]] = r[2]
    torch.testing.assert_close(row_grads, it.grad, rtol=1e-5, atol=1e-6)
