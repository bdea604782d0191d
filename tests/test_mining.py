"""Band mining across shards equals a brute-force argsort of the dense score matrix."""
import pytest
import torch

from alterrec_dist.mining import exclude_items, key_ids, mine_band, random_band, score_keys, top_items
from alterrec_dist.sharded import Comm
from tests.dist_harness import run_world

pytestmark = pytest.mark.slow


def brute_force_band(scores: torch.Tensor, k1: int, k2: int, exclude: torch.Tensor) -> list[set[int]]:
    """Sort by (score desc, id asc) with Python's stable sort and take ranks k1..k2-1."""
    out = []
    for g, row in enumerate(scores.tolist()):
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        out.append(set(order[k1:k2]) - set(exclude[g].tolist()))
    return out


def problem(seed: int, G=6, V=37, d=4):
    g = torch.Generator().manual_seed(seed)
    # integer-valued rows and queries: many exact ties in the scores
    q = torch.randint(-2, 3, (G, d), generator=g).float()
    items = torch.randint(-2, 3, (V, d), generator=g).float()
    target = torch.randint(V, (G,), generator=g)
    return q, items, target


def mine_on_shard(rank, world, seed, k1, k2, merge, p):
    q, items, target = problem(seed)
    comm = Comm()
    ids = torch.arange(rank, len(items), world)
    band, keys, _ = mine_band(comm, q, items[ids], ids, k1, k2, len(items), merge=merge, tile_rows=5, extra=p + 1)
    aug = top_items(comm, keys, p, target)
    band = exclude_items(band, ids, torch.cat([target[:, None], aug], 1))
    chosen = [set(ids[band.rows[g][band.mask[g]]].tolist()) for g in range(len(q))]
    return chosen, aug


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("merge", ["threshold", "allgather"])
def test_band_equals_brute_force_with_ties_and_short_shards(world, merge):
    seed, k1, k2, p = 3, 4, 20, 2  # k2=20 exceeds a shard's 12-19 rows at W=2,3
    results = run_world(mine_on_shard, world, seed, k1, k2, merge, p)
    q, items, target = problem(seed)
    scores = q @ items.T
    assert len(set(scores.flatten().tolist())) < scores.numel() / 3, "the case must contain ties"
    aug = results[0][1]
    for g in range(len(q)):
        order = sorted(range(len(items)), key=lambda i: (-scores[g, i].item(), i))
        expected_aug = [i for i in order if i != target[g].item()][:p]
        assert aug[g].tolist() == expected_aug
    expected = brute_force_band(scores, k1, k2, torch.cat([target[:, None], aug], 1))
    union = [set().union(*(r[0][g] for r in results)) for g in range(len(q))]
    assert union == expected
    for g in range(len(q)):  # shards are disjoint
        assert sum(len(r[0][g]) for r in results) == len(expected[g])


def test_score_keys_order_matches_score_then_id():
    scores = torch.tensor([[1.5, -0.0, 0.0, -2.0, 1.5, float("-inf")]])
    ids = torch.arange(6)
    order = torch.argsort(score_keys(scores, ids), descending=True)[0].tolist()
    assert order == [0, 4, 1, 2, 3, 5]  # ties (1.5, 0.0/-0.0) broken by the smaller id
    assert key_ids(score_keys(scores, ids)).tolist() == [[0, 1, 2, 3, 4, 5]]


def random_on_shard(rank, world):
    g = torch.Generator().manual_seed(7)
    band = random_band(Comm(), 4, 50, 23, g)
    ids = torch.arange(rank, 23, world)
    return [sorted(ids[band.rows[i][band.mask[i]]].tolist()) for i in range(4)]


def test_random_negatives_do_not_depend_on_world_size():
    one = run_world(random_on_shard, 1)[0]
    two = run_world(random_on_shard, 2)
    assert [sorted(a + b) for a, b in zip(*two)] == one
    assert all(len(row) == 50 for row in one)


@pytest.mark.parametrize("k2, expected", [(50, 37), (37, 37), (20, 20)])
def test_k2_above_the_catalog_is_capped_with_a_warning(k2, expected, recwarn):
    from alterrec_dist.mining import capped_k2
    assert capped_k2(k2, 37) == expected
    assert len(recwarn) == (1 if k2 > 37 else 0)
    if k2 > 37:
        assert "larger than the catalog" in str(recwarn[0].message)
