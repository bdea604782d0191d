"""A trained model ready to score (serve/scoring_model.py): its top-N in the engine's tie order, and candidates
that a search could not fill."""
import numpy as np
import torch

from alterrec_dist.common.config import ModelConfig
from alterrec_dist.serve.scoring_model import ScoringModel, TopN, _order_desc


def test_top_n_breaks_score_ties_by_the_smaller_item_id_whatever_the_column_order():
    """Serving's top-N must order items as the engine's evaluation does, (score desc, item id asc): the items it
    keeps from shard-major tiles (ids 0, 2 from shard 0, then 1, 3 from shard 1) come in another order than their
    ids, and a tie broken by column would serve item 2 before item 1, and another item at the cut than the
    run's metrics counted."""
    assert _order_desc(torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([[7, 3, 9]])).tolist() == [[2, 1, 0]]
    best = TopN(2, 1, 1, torch.device("cpu"))
    for scores, ids in (([0.0, 5.0], [0, 2]), ([5.0, 1.0], [1, 3])):  # items 1 and 2 tie at 5.0
        best.add(torch.tensor([scores]), torch.tensor(ids), [torch.tensor([scores])])
    assert best.items.tolist() == [[1, 2]] and best.scores.tolist() == [[5.0, 5.0]]


def test_a_missing_candidate_is_ranked_last_never_served_as_an_item():
    """faiss pads with -1 when it finds fewer candidates than asked. The re-rank reads -1 as item 0's row (a
    clamp), so without its -inf score the padding ranked by item 0's score: here ahead of every real candidate,
    and then shown as an item."""
    V = 5
    rows = torch.tensor([[10.0, 0.0], [1.0, 0.0], [4.0, 0.0], [2.0, 0.0], [3.0, 0.0]])  # item 0 scores highest
    bundle = ScoringModel("id_only", ModelConfig(), {}, rows, torch.zeros(V, 2, dtype=torch.float16), [rows], [1.0],
                          {"id": [1.0], "fused": [1.0]}, 1, 0, 8, 50, [], [f"i{i}" for i in range(V)], [None] * V,
                          np.zeros(V))
    scores, items, _ = bundle.scoring().rescore([torch.tensor([[1.0, 0.0]])], torch.tensor([[3, -1, 1, 4]]), 4)
    assert items.tolist() == [[4, 3, 1, -1]]
    assert scores[0, :3].tolist() == [3.0, 2.0, 1.0] and scores[0, 3] == float("-inf")
