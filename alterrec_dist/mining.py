"""Negatives for the band loss: the other network's ranks k1..k2, or uniform random items.

Ranks are global over the whole catalog but no shard ever sees more than its own rows:
1. every shard takes the top-k2 of the frozen network's scores over its own rows, as sorted keys;
2. the keys at global ranks k1 and k2-1 are found by one of two exact merges:
   - "allgather": gather every shard's top-k2 keys and take the global top-k2 (traffic W*G*k2);
   - "threshold": bisection on the key, each round one all-reduce of G counts (traffic ~64*G*2).
3. each shard's band is then a contiguous segment of its own sorted list. No ids move.

A *key* orders items by score (descending) and then by item id (ascending), and is unique:
`(sortable float bits << 32) + (2^32 - 1 - id)`. Ties in score thus have one exact answer,
which a brute-force argsort reproduces.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from alterrec_dist.sharded import Comm

ID_MASK = (1 << 32) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass
class Band:
    """Per query g, this shard's negatives: local rows `rows[g, j]` where `mask[g, j]`."""
    rows: torch.Tensor  # (G, n) int64 local row index
    mask: torch.Tensor  # (G, n) bool

    @staticmethod
    def cat(a: "Band", b: "Band") -> "Band":
        return Band(torch.cat([a.rows, b.rows], 1), torch.cat([a.mask, b.mask], 1))


def score_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys ordering (score desc, id asc). scores (..., n) float, ids (n,) global ids."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 maps -0.0 to +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # monotone in the float value
    return (ordered << 32) + (ID_MASK - ids)


def key_ids(keys: torch.Tensor) -> torch.Tensor:
    return ID_MASK - (keys & ID_MASK)


def local_top_keys(queries: torch.Tensor, item_rows: torch.Tensor, ids: torch.Tensor, k: int,
                   scale: float, tile_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k keys (sorted descending) and local rows of this shard, scored tile by tile."""
    best_keys = torch.empty(len(queries), 0, dtype=torch.long)
    best_rows = torch.empty(len(queries), 0, dtype=torch.long)
    for start in range(0, len(item_rows), tile_rows):
        tile = item_rows[start:start + tile_rows]
        keys = score_keys((queries @ tile.T) * scale, ids[start:start + len(tile)])
        rows = torch.arange(start, start + len(tile)).expand_as(keys)
        keys, rows = torch.cat([best_keys, keys], 1), torch.cat([best_rows, rows], 1)
        best_keys, pos = torch.topk(keys, min(k, keys.shape[1]), dim=1, sorted=True)
        best_rows = torch.gather(rows, 1, pos)
    return best_keys, best_rows


def kth_keys_allgather(comm: Comm, local_keys: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Global key at each 0-based rank in `ks`, for every query: (G, len(ks)). Keys padded with
    INT64_MIN so shards with fewer rows than k2 still send equal shapes."""
    k = max(ks) + 1
    padded = torch.full((len(local_keys), k), INT64_MIN, dtype=torch.long)
    n = min(k, local_keys.shape[1])
    padded[:, :n] = local_keys[:, :n]
    every = comm.all_gather(padded.T.contiguous()).view(comm.world, k, -1).permute(2, 0, 1).reshape(len(local_keys), -1)
    top = torch.topk(every, k, dim=1, sorted=True).values
    return top[:, ks]


def kth_keys_threshold(comm: Comm, local_keys: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Same result by bisection: the largest x with #{keys >= x} >= k+1, for k in ks.

    Counting over the local top-k2 list (not all local rows) is exact for k < k2: a shard whose
    list is capped already holds k2 > k keys above x. 64 rounds cover the int64 range; every rank
    runs the same rounds, so the collectives stay in lockstep.
    """
    ascending = torch.flip(local_keys, [1]).contiguous()
    need = torch.tensor(ks, dtype=torch.long) + 1
    lo = torch.full((len(local_keys), len(ks)), INT64_MIN, dtype=torch.long)
    hi = torch.full_like(lo, INT64_MAX)
    for _ in range(64):
        mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo+hi)/2) without overflow
        at_or_above = ascending.shape[1] - torch.searchsorted(ascending, mid)
        count = comm.all_reduce(at_or_above.int())
        ok = count >= need
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid - 1)
    return lo


def band_from_keys(local_keys: torch.Tensor, local_rows: torch.Tensor, upper: torch.Tensor,
                   lower: torch.Tensor) -> Band:
    """This shard's items with lower <= key <= upper: a segment of its sorted list."""
    mask = (local_keys <= upper[:, None]) & (local_keys >= lower[:, None])
    return Band(local_rows, mask)


def mine_band(comm: Comm, queries: torch.Tensor, item_rows: torch.Tensor, ids: torch.Tensor,
              k1: int, k2: int, num_items: int, scale: float = 1.0, merge: str = "threshold",
              tile_rows: int = 65_536, extra: int = 0) -> tuple[Band, torch.Tensor, torch.Tensor]:
    """The frozen network's ranks k1..k2-1 (0-based) for every query, on this shard.

    queries: (G, d) all gathered queries of the frozen network; item_rows: its (V_local, d) rows.
    Returns (band, local top keys, local top rows); the latter two serve `top_items`.
    `extra` widens the local list so callers can ask for a few more top items (augmentation).
    """
    k2 = min(k2, num_items)
    if k1 >= k2:
        raise ValueError(f"band is empty: k1={k1} >= min(k2, V={num_items})")
    keys, rows = local_top_keys(queries, item_rows, ids, max(k2, extra), scale, tile_rows)
    kth = kth_keys_allgather if merge == "allgather" else kth_keys_threshold
    bounds = kth(comm, keys, [k1, k2 - 1])
    return band_from_keys(keys, rows, bounds[:, 0], bounds[:, 1]), keys, rows


def capped_k2(k2: int, num_items: int) -> int:
    if k2 > num_items:
        warnings.warn(f"k2={k2} is larger than the catalog (V={num_items}); using k2={num_items}", stacklevel=2)
    return min(k2, num_items)


def top_items(comm: Comm, local_keys: torch.Tensor, p: int, exclude: torch.Tensor) -> torch.Tensor:
    """Global top-p item ids per query, skipping `exclude[g]` (the target): (G, p).

    Cheap: every shard sends its top p+1 keys; p is small (augmentation uses p=5).
    """
    top = kth_keys_allgather(comm, local_keys, list(range(p + 1)))
    ids = key_ids(top)
    keep = ids != exclude[:, None]  # ids are unique, so at most one False per row
    keep[keep.all(1), -1] = False   # target not among them: drop the (p+1)-th instead
    return ids[keep].view(len(ids), p)


def random_band(comm: Comm, num_queries: int, count: int, num_items: int, generator: torch.Generator) -> Band:
    """`count` uniform random items per query (with replacement), this shard's share of them.

    Every rank draws the same (G, count) matrix from the same generator, keyed by the global
    batch, so the negatives of a session do not depend on the world size.
    """
    ids = torch.randint(num_items, (num_queries, count), generator=generator)
    mine = ids % comm.world == comm.rank
    return Band(torch.where(mine, ids // comm.world, 0), mine)  # other ranks' items: masked, row 0


def exclude_items(band: Band, global_ids: torch.Tensor, positives: torch.Tensor) -> Band:
    """Remove positives (target, augmented items) from the band: they are never negatives.

    global_ids maps this shard's local rows to item ids; positives (G, P) item ids.
    """
    gid = global_ids[band.rows]
    hit = (gid[:, :, None] == positives[:, None, :]).any(2)
    return Band(band.rows, band.mask & ~hit)
