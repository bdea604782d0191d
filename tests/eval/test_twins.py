"""Items whose rows equal the target's are ordered by id, whatever the rounding of the target's own score.

The engine scores a target by its own row's dot product and the catalog by a matmul; the two can round apart by
an ulp, which would let float luck order a target among items of the same text (Scientific has 17 such pairs)."""
import pytest
import torch

from alterrec_dist.eval.evaluate import Scorer, count_above_target, rank_tiles, row_keys
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.table import Placement
from tests.dist_harness import run_world

ULP = 1e-6


def counts_for(target: int, nudge: float) -> torch.Tensor:
    """Kinds id / text / fused over 4 items whose text rows 1 and 2 are equal (their id rows are not); the target's
    scores are taken from the same matmul and moved by `nudge`, as a row dot product can round."""
    g = torch.Generator().manual_seed(0)
    id_rows, text_rows = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    text_rows[2] = text_rows[1]
    q = [torch.randn(1, 3, generator=g), torch.randn(1, 3, generator=g)]
    mats, weights = [id_rows, text_rows], {"id": [1.0, 0.0], "text": [0.0, 1.0], "fused": [0.5, 0.5]}
    parts = torch.stack([(qc @ m.T)[0] for qc, m in zip(q, mats)], 1)          # (4, C)
    w = torch.tensor(list(weights.values()))
    target_scores = (parts[target] @ w.T)[None, :] + nudge
    keys = row_keys(mats)
    return rank_tiles(q, mats, [1.0, 1.0], weights, [(0, 4)], torch.arange(4), torch.tensor([target]),
                      target_scores, keys=keys, target_keys=keys[[target]])[0]


def test_a_text_twin_goes_by_id_whatever_the_rounding():
    exact = counts_for(2, 0.0)
    # target 2's text twin is item 1 (smaller id): before it on the text score, however the target's score rounds
    assert counts_for(2, +ULP)[1] == counts_for(2, -ULP)[1] == exact[1]
    assert counts_for(1, +ULP)[1] == counts_for(1, -ULP)[1] == counts_for(1, 0.0)[1]
    assert exact[1] - counts_for(1, 0.0)[1] == 1  # the same items above both, and item 1 before 2


def test_row_keys_match_equal_rows_only():
    m = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0000002], [-0.0, 2.0]])
    k = row_keys([m])[:, 0]
    assert k[0] == k[1] and k[0] != k[2] and len(set(k.tolist())) == 3


def twin_counts(rank, world):
    """count_above_target on this rank's shard of 8 items whose text rows 1 and 2 are equal (at W = 2 they live on
    ranks 1 and 0): 32 sessions each asked with target 1, then with target 2. d = 64, so that a target's own score
    (a row dot product) and its twin's (the catalog's matmul) round apart for some sessions."""
    V, d, G = 8, 64, 32
    g = torch.Generator().manual_seed(0)
    id_rows, text_rows = torch.randn(V, d, generator=g), torch.randn(V, d, generator=g)
    text_rows[2] = text_rows[1]
    q = [torch.randn(G, d, generator=g), torch.randn(G, d, generator=g)]
    queries = [torch.cat([qc, qc]) for qc in q]
    target = torch.tensor([1] * G + [2] * G)
    ids = Placement(world).ids_of(rank, V)
    scorer = Scorer([id_rows[ids], text_rows[ids]], [1.0, 1.0], {"id": [1.0, 0.0], "text": [0.0, 1.0],
                                                                 "fused": [0.5, 0.5]})
    return count_above_target(Comm(), scorer, queries, target, ids, 0)


@pytest.mark.slow  # gloo processes
def test_a_text_twin_on_another_rank_goes_by_id_as_at_one_worker():
    """The twin rule needs the target's row keys on every rank, but only the target's owner holds its row: the
    others compare their items with keys all-reduced from it. Without them, a twin on another rank than the
    target was ordered by float luck, and W = 2 ranked targets otherwise than W = 1."""
    G = 32
    [one] = run_world(twin_counts, 1)
    two = run_world(twin_counts, 2)
    text = 1  # the kinds' order: id, text, fused
    # the same sessions: the same items above targets 1 and 2, and item 1 before its twin 2
    assert torch.equal(one[G:, text], one[:G, text] + 1)
    for counts in two:
        assert torch.equal(counts, one)
