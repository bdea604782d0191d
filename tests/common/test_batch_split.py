"""The split of a global batch over ranks: the reader and the loss both ask it, so it must tile the batch."""
import pytest

from alterrec_dist.common.batch_split import rank_positions
from alterrec_dist.data.reader import rank_slice


@pytest.mark.parametrize("batch, world", [(8, 1), (8, 2), (12, 3), (7, 2)])
def test_ranks_hold_consecutive_equal_parts_in_rank_order(batch, world):
    parts = [list(range(batch))[rank_positions(r, batch, world)] for r in range(world)]
    b = batch // world
    assert parts == [list(range(r * b, (r + 1) * b)) for r in range(world)]  # 7 over 2: the 7th is nobody's
    assert [rank_slice(r, batch, world).tolist() for r in range(world)] == parts  # the reader's indices agree
