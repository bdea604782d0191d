"""How a global batch is split over the ranks: rank r holds positions [r*b, (r+1)*b), b = batch // world.

One rule, asked by the reader that hands each rank its sessions (`data.reader`) and by the loss that sums
only its own rank's queries of the gathered batch (`parallel.loss`): if they disagreed, a rank would train
on another rank's sessions.
"""
from __future__ import annotations


def rank_positions(rank: int, global_batch_size: int, world_size: int) -> slice:
    """The positions in a global batch that `rank` of `world_size` keeps."""
    b = global_batch_size // world_size
    return slice(rank * b, (rank + 1) * b)
