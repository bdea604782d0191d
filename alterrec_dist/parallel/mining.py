"""Negatives for the band loss: the other network's ranks k1..k2, or uniform random items.

Ranks are global over the whole catalog, by (score desc, id asc), but no shard ever sees more than its own
rows:
1. every shard keeps, per query, its top k2+1 scores (a selection, not a sort) as `Candidates`; of a tie at
   its cut, the lowest ids where ties decide anything (`top_items`, or a tie group across rank k1 or k2);
2. the global scores at ranks k1 and k2, t1 >= t2, are found by one of two exact merges:
   - "allgather": gather every shard's candidate scores and select (traffic W*G*(k2+1) floats);
   - "threshold": bisection on the score, each round one all-reduce of G packed counts. A bracket
     from the shards' own ranks starts it, the counts of both ranks share one int32, and a float32
     has 32 bits, so it sends at most 20 + 33*4 bytes per query whatever V, W or k2;
3. one more all-reduce of packed counts tells whether a tie group at t1 or t2 also holds items ranked
   above k1 or k2. Only then (exact ties: items without text share one text row, and thousands of
   them can tie) the ids decide: a bisection on the (score, id) keys inside the tie group, ceil(log2 V)
   rounds, for the queries it concerns;
4. the band is every item whose key lies in (key at k2, key at k1]: a mask over each shard's own
   candidates. No ids move.

So the band is exactly ranks k1..k2-1, ties included, and every band item is among its shard's
candidates. It is a function of the scores the shards computed: the same set at any world size when every
item scores bit for bit the same on any shard, as exact ties do (integer rows and queries, or identical
rows and one query: exact products and sums). A matmul rounds by its shape, though, so items tied only in
exact arithmetic (twins: bit-identical rows, against a general query), or any item within an ulp of t1 or
t2, can score one ulp apart at another world size and fall on the other side of t1 or t2.
"""
from __future__ import annotations

import warnings
import math
from dataclasses import dataclass

import torch

from alterrec_dist.common.device import tile_rows as resolve_tile_rows
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.table import Placement

ID_MASK = (1 << 32) - 1
INT64_MIN = -(1 << 63)
NEG_INF = float("-inf")


@dataclass
class Band:
    """Per query g, this shard's negatives: local rows `rows[g, j]` where `mask[g, j]`."""
    rows: torch.Tensor  # (G, n) int64 local row index
    mask: torch.Tensor  # (G, n) bool

    @staticmethod
    def cat(a: "Band", b: "Band") -> "Band":
        return Band(torch.cat([a.rows, b.rows], 1), torch.cat([a.mask, b.mask], 1))


@dataclass
class Candidates:
    """Per query, this shard's top-n scores and their local rows: in no particular order, or (`ties_by_id`)
    by (score desc, row asc) in row order. A shard's rows are in global id order, so then ties at its cut go
    to the lower ids, as `top_items` needs."""
    scores: torch.Tensor  # (G, n) float32
    rows: torch.Tensor    # (G, n) int64


def ordered(scores: torch.Tensor) -> torch.Tensor:
    """Monotone map of float32 scores onto integers (int64, so midpoints cannot overflow)."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 maps -0.0 to +0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()


def from_ordered(values: torch.Tensor) -> torch.Tensor:
    bits = values.int()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).view(torch.float32)


def score_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys ordering (score desc, id asc): `(ordered score << 32) + (2^32 - 1 - id)`."""
    return (ordered(scores) << 32) + (ID_MASK - ids)


def key_ids(keys: torch.Tensor) -> torch.Tensor:
    return ID_MASK - (keys & ID_MASK)


def top_columns(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k highest scores and their columns, (G, k) each, in column order; of a tie group at the
    cut, the leftmost columns (`torch.topk` keeps any of them).

    One entry more than kept tells which rows the cut splits a tie group in; only those are scanned again
    (`leftmost_at_cut`). Finding them costs a host read (a stall on a GPU), far less than a pass over every
    row of a wide tile: in float scores an exact tie at the cut is rare (measured on a CPU: 1 row of 256
    over 65,536-column tiles of random-normal scores, none of 1,024 rows over one tile of 262,144)."""
    top = torch.topk(scores, k + 1, dim=1, sorted=False)
    low = torch.topk(top.values, 2, dim=1, largest=False)  # ranks k and k - 1 (0-based) and where they are
    cols = top.indices.scatter(1, low.indices[:, :1], scores.shape[1])  # rank k dropped: sorts last
    cut = low.values[:, 1:]
    split = torch.nonzero(low.values[:, 0] == cut[:, 0])[:, 0]
    if len(split):
        cols[split] = leftmost_at_cut(scores[split], cut[split], top.values[split], cols[split])
    # column order: merged with the next tile's columns, they stay in row order
    cols, order = cols.sort(1)
    return torch.gather(top.values, 1, order[:, :k]), cols[:, :k]


def leftmost_at_cut(scores: torch.Tensor, cut: torch.Tensor, values: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`cols` (scoring `values`; past the last column: dropped) with those scoring `cut`, (G, 1), swapped
    for the leftmost columns of `scores` that score it: one running count over the row, O(n), no sort of
    it (for the rows `top_columns` found split: as many as a whole tile only where every score ties)."""
    at_cut = (values == cut) & (cols < scores.shape[1])
    tied = torch.cumsum(scores == cut, 1, dtype=torch.int32)
    # the j-th column scoring `cut` is the first whose running count reaches j
    return torch.where(at_cut, torch.searchsorted(tied, at_cut.cumsum(1, dtype=torch.int32)), cols)


def local_candidates(queries: torch.Tensor, item_rows: torch.Tensor, k: int, scale: float,
                     tile_rows: int, ties_by_id: bool = False, only: torch.Tensor | None = None) -> Candidates:
    """This shard's top-k scores per query, scored tile by tile (a selection: no row of scores is sorted);
    tile_rows 0: the device's default (`device.tile_rows`). `ties_by_id`: of a tie at the cut, the lowest
    rows (`top_columns`: a host read per tile, so only where `top_items` or a tie group across a band's edge
    needs it). `only`: the candidates of those queries (indices) alone; every tile is still scored for all of
    them, as a matmul of fewer rows may round otherwise, but only theirs are selected."""
    device = queries.device
    tile_rows = resolve_tile_rows(tile_rows, device, len(queries))
    selected = len(queries) if only is None else len(only)
    best = Candidates(torch.empty(selected, 0, device=device),
                      torch.empty(selected, 0, dtype=torch.long, device=device))
    for start in range(0, len(item_rows), tile_rows):
        scores = torch.mm(queries, item_rows[start:start + tile_rows].T).mul_(scale)
        if only is not None:
            scores = scores[only]
        rows = torch.arange(start, start + scores.shape[1], device=device).expand_as(scores)
        merged = best.scores.shape[1] > 0
        if merged:  # the kept rows all come before this tile's: in row order if they were
            scores, rows = torch.cat([best.scores, scores], 1), torch.cat([best.rows, rows], 1)
        if scores.shape[1] > k:
            if ties_by_id:
                scores, cols = top_columns(scores, k)
            else:
                top = torch.topk(scores, k, dim=1, sorted=False)
                scores, cols = top.values, top.indices
            # the first tile's column j is row j: no gather over the (G, k) columns needed
            rows = torch.gather(rows, 1, cols) if merged else cols
        best = Candidates(scores, rows)
    return best


def packed_left(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the columns where `keep` holds, packed to the left: (columns, valid), both
    (G, most kept in a row); invalid slots hold column 0. A scatter by running count, not `nonzero`
    (about twice as slow on wide rows)."""
    counts = keep.sum(1)
    width = int(counts.max()) if len(keep) else 0  # a host read: the output's shape
    slot = torch.where(keep, keep.cumsum(1) - 1, width)  # dropped columns all land in a spare slot
    cols = torch.zeros((len(keep), width + 1), dtype=torch.long, device=keep.device)
    cols.scatter_(1, slot, torch.arange(keep.shape[1], device=keep.device).expand_as(slot))
    valid = torch.arange(width, device=keep.device) < counts[:, None]
    return cols[:, :width].masked_fill_(~valid, 0), valid


def packs_left(t: torch.Tensor) -> bool:
    """Whether narrowing a selection pays for its host read: on the CPU the read is free and narrower rows
    make every later pass cheaper; on a GPU the read stalls the stream, and a full pass over the unpacked
    columns costs microseconds."""
    return t.device.type == "cpu"


def kept_columns(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns to visit for the entries where `keep` holds, as (columns, valid): packed to the left
    where that pays (`packs_left`), else every column, valid where kept (no host read)."""
    if packs_left(keep):
        return packed_left(keep)
    return torch.arange(keep.shape[1], device=keep.device).expand_as(keep), keep


def local_rank_score(scores: torch.Tensor, k: int, lowest: torch.Tensor) -> torch.Tensor:
    """This shard's score at 0-based rank k among `scores` (its top list, whose minimum is `lowest`),
    -inf if it has no rank k."""
    n = scores.shape[1]
    if k >= n:
        return torch.full((len(scores),), NEG_INF, device=scores.device)
    return lowest if k == n - 1 else torch.kthvalue(scores, n - k, dim=1).values


def bracket(comm: Comm, cand: Candidates, k1: int, k2: int, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds lower <= t <= upper, (G, 2) each, on the global scores t1, t2 at ranks k1 and k2, from the
    shards' own ranks, in one all-reduce of 5 floats per query:
    - a shard's rank-k score is a lower bound: that shard alone has k+1 items at or above it;
      so is the lowest score anywhere (every item is at or above it);
    - some shard holds ceil((k+1)/W) of the global top k+1, so the highest local rank ceil((k+1)/W)-1
      is an upper bound. At W = 1 the bounds meet and no bisection round is needed.
    """
    s, W = cand.scores, comm.world
    few = min(k1 + 1, s.shape[1])
    top = torch.topk(s, few, dim=1).values if few else s  # sorted: both of t1's ranks from one small selection
    lowest = s.min(1).values if s.shape[1] else torch.full((len(s),), float("inf"), device=s.device)
    top_lowest = top[:, -1] if few else lowest
    local = torch.stack([local_rank_score(top, k1, top_lowest), local_rank_score(s, k2, lowest), -lowest,
                         local_rank_score(top, -(-(k1 + 1) // W) - 1, top_lowest),
                         local_rank_score(s, -(-(k2 + 1) // W) - 1, lowest)], 1)
    best = comm.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
    lower = torch.stack([best[:, 0], torch.maximum(best[:, 1], -best[:, 2])], 1)
    upper = best[:, 3:].clone()
    if k2 >= num_items:  # no rank k2: every item below t1 is in the band
        lower[:, 1] = upper[:, 1] = NEG_INF
    return lower, upper


class CountPacker:
    """The counts of several ranks in one integer per query: count j is clamped to need_j (all a
    round asks is whether the global count reaches need_j, and a sum of clamped counts reaches it
    exactly when the true sum does) and stored in base W*need_j + 1. int32 when it fits. Its constants
    are host integers, so packing and unpacking never copy to or read from the device."""

    def __init__(self, need, world: int):
        self.need = [int(n) for n in need]
        self.radix = [world * n + 1 for n in self.need]
        self.base = [math.prod(self.radix[:j]) for j in range(len(self.radix))]
        self.dtype = torch.int32 if math.prod(self.radix) <= 2**31 else torch.int64

    def pack(self, counts: torch.Tensor) -> torch.Tensor:
        return sum(counts[:, j].clamp(max=n) * b for j, (n, b) in enumerate(zip(self.need, self.base))).to(self.dtype)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        packed = packed.long()
        return torch.stack([packed // b % r for b, r in zip(self.base, self.radix)], 1)

    def reached(self, packed: torch.Tensor) -> torch.Tensor:
        """(G, J) bool: whether each packed sum of counts reaches its need."""
        counts = self.unpack(packed)
        return torch.stack([counts[:, j] >= n for j, n in enumerate(self.need)], 1)


class Shrinking:
    """The scores still inside one query's bisection interval, and how many lie above it: a round
    counts only these, and each round drops about half of them (repacked once half are gone)."""

    def __init__(self, scores: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
        self.above = (scores > upper[:, None]).sum(1)
        cols, valid = kept_columns((scores >= lower[:, None]) & (scores <= upper[:, None]))
        self.inside = torch.gather(scores, 1, cols).masked_fill_(~valid, float("nan"))  # NaN: never counted
        self.live = valid.sum(1)

    def count_at_or_above(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(which inside scores are >= x, how many of them are)."""
        at_or_above = self.inside >= x[:, None]
        return at_or_above, at_or_above.sum(1)

    def narrow(self, at_or_above: torch.Tensor, n: torch.Tensor, went_up: torch.Tensor) -> None:
        """went_up: the interval is now [x, hi] (drop what lies below x), else [lo, x) (the n inside
        scores at or above x move to `above`)."""
        self.above += torch.where(went_up, 0, n)
        self.live = torch.where(went_up, n, self.live - n)
        keep = torch.where(went_up[:, None], at_or_above, ~at_or_above)
        self.inside.masked_fill_(~keep, float("nan"))
        if packs_left(self.inside) and len(self.live) and int(self.live.max()) <= self.inside.shape[1] // 2:
            cols, valid = packed_left(~torch.isnan(self.inside))
            self.inside = torch.gather(self.inside, 1, cols).masked_fill_(~valid, float("nan"))


def thresholds_by_bisection(comm: Comm, cand: Candidates, k1: int, k2: int, num_items: int) -> torch.Tensor:
    """(G, 2) global scores at ranks k1 and k2: for each, the largest x with #{score >= x} >= k+1.

    Bisection on the ordered integer image of x inside the bracket, every rank running the same
    number of rounds (from the all-reduced bracket), so the collectives stay in lockstep. Counting
    over the local top-(k2+1) list is exact for ranks <= k2: a shard whose list is capped already
    holds k2+1 scores at or above any x in the bracket.
    """
    lower, upper = bracket(comm, cand, k1, k2, num_items)
    lo, hi = ordered(lower), ordered(upper)
    # each round halves every interval; the one host read of the merge (it spares every round at W = 1)
    rounds = int((hi - lo).max()).bit_length() if lo.numel() else 0
    packer = CountPacker([k1 + 1, k2 + 1], comm.world)
    sets = [Shrinking(cand.scores, lower[:, j], upper[:, j]) for j in range(2)] if rounds else []
    for _ in range(rounds):
        mid = lo + (hi - lo + 1) // 2
        x = from_ordered(mid)
        counted = [s.count_at_or_above(x[:, j]) for j, s in enumerate(sets)]
        local = torch.stack([s.above + n for s, (_, n) in zip(sets, counted)], 1)
        ok = packer.reached(comm.all_reduce(packer.pack(local)))
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid - 1)
        for j, (s, (at_or_above, n)) in enumerate(zip(sets, counted)):
            s.narrow(at_or_above, n, ok[:, j])
    return from_ordered(lo)


def gather_padded(comm: Comm, values: torch.Tensor, width: int, fill) -> torch.Tensor:
    """Every shard's (G, <= width) values per query, padded with `fill` to equal shapes: (G, W * width)."""
    padded = torch.full((len(values), width), fill, dtype=values.dtype, device=values.device)
    padded[:, :values.shape[1]] = values
    every = comm.all_gather(padded.T.contiguous())  # (W * width, G)
    return every.view(comm.world, width, -1).permute(2, 0, 1).reshape(len(values), -1)


def thresholds_by_allgather(comm: Comm, cand: Candidates, k1: int, k2: int, num_items: int) -> torch.Tensor:
    """Same result from every shard's top-(k2+1) scores, padded with -inf."""
    n = k2 + 1
    scores = cand.scores if cand.scores.shape[1] <= n else torch.topk(cand.scores, n, dim=1, sorted=False).values
    every = gather_padded(comm, scores, n, NEG_INF)
    t1 = torch.topk(every, k1 + 1, dim=1, sorted=False).values.min(1).values
    t2 = torch.kthvalue(every, every.shape[1] - k2, dim=1).values if k2 < num_items else torch.full_like(t1, NEG_INF)
    return torch.stack([t1, t2], 1)


def mine_band(comm: Comm, queries: torch.Tensor, item_rows: torch.Tensor, item_ids: torch.Tensor, k1: int, k2: int,
              num_items: int, scale: float, merge: str, tile_rows: int, extra: int = 0) -> tuple[Band, Candidates]:
    """The frozen network's ranks k1..k2-1 (0-based, by score desc then id asc) for every query, on this shard.

    queries: (G, d) all gathered queries of the frozen network; item_rows: its (V_local, d) rows, whose
    global ids are `item_ids`. Returns (band, candidates). `extra` > 0 (augmentation) makes the candidates
    also serve `top_items`: the local list is at least that long and keeps the lowest ids of a tie at its cut.
    """
    k2 = min(k2, num_items)
    if k1 >= k2:
        raise ValueError(f"band is empty: k1={k1} >= min(k2, V={num_items})")
    width = max(k2 + 1, extra)
    cand = local_candidates(queries, item_rows, width, scale, tile_rows, ties_by_id=extra > 0)
    find = thresholds_by_allgather if merge == "allgather" else thresholds_by_bisection
    t = find(comm, cand, k1, k2, num_items)
    above_k2, within_k1 = cand.scores > t[:, 1:], cand.scores <= t[:, :1]
    band = Band(cand.rows, above_k2 & within_k1)  # exact unless a tie group crosses an edge (`tie_splits`)
    split = tie_splits(comm, torch.stack([(~within_k1).sum(1), above_k2.sum(1)], 1), k1, k2, num_items)
    if bool(split.any()):  # a host read, after an all-reduce: every rank takes the same branch
        at = split.any(1).nonzero()[:, 0]
        if extra == 0:  # `topk` kept any of a tie at the cut: keep the lowest ids, as the keys need. Every query
            # is scored again, not the split ones alone: a matmul of fewer rows rounds otherwise, and twins
            # (identical rows) tied in the first pass would not tie in the second. Only the split ones are
            # selected again (on Scientific, 3-4 queries of 512 at every hard ID step)
            lowest = local_candidates(queries, item_rows, width, scale, tile_rows, ties_by_id=True, only=at)
            cand = Candidates(cand.scores.index_put((at,), lowest.scores), cand.rows.index_put((at,), lowest.rows))
            band = Band(cand.rows, band.mask)
        keys = score_keys(cand.scores[at], item_ids[cand.rows[at]])
        # the keys at ranks k1 and k2: a side whose tie group starts at its rank keeps the highest key of its
        # score (the whole group on the band's side of it); a split side bisects the group's ids
        top = (ordered(t[at]) << 32) + ID_MASK
        if k2 == num_items:  # no rank k2: the band runs to the bottom
            top[:, 1] = INT64_MIN
        lo = torch.where(split[at], top - (num_items - 1), top)
        bounds = keys_by_bisection(comm, keys, lo, top, [k1, k2], num_items)
        band.mask[at] = (keys > bounds[:, 1:]) & (keys <= bounds[:, :1])
    return band, cand


def tie_splits(comm: Comm, above: torch.Tensor, k1: int, k2: int, num_items: int) -> torch.Tensor:
    """(G, 2) bool: whether fewer than k items score above t, the score at rank k (k1, then k2), given this
    shard's counts of them, `above` (G, 2): then the tie group at t starts above rank k, and its ids decide
    which of it rank k1..k2-1. One all-reduce of G packed counts; a capped list counts exactly, as in the
    bisection (it holds k2+1 scores at or above t)."""
    packer = CountPacker([k1, k2], comm.world)
    split = ~packer.reached(comm.all_reduce(packer.pack(above)))
    if k2 == num_items:
        split[:, 1] = False
    return split


def keys_by_bisection(comm: Comm, keys: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ks: list[int],
                      num_items: int) -> torch.Tensor:
    """(G, len(ks)) global keys at 0-based ranks `ks`: for each, the largest x in [lo, hi] with
    #{key >= x} >= k+1. Inside one score's tie group the keys span at most `num_items` values, so
    ceil(log2 V) rounds, the same on every rank. `keys` are this shard's candidates' (a capped list
    counts exactly: it keeps the lowest ids of a tie at its cut)."""
    packer = CountPacker([k + 1 for k in ks], comm.world)
    for _ in range((num_items - 1).bit_length()):
        mid = lo + (hi - lo + 1) // 2
        local = torch.stack([(keys >= mid[:, j:j + 1]).sum(1) for j in range(len(ks))], 1)
        ok = packer.reached(comm.all_reduce(packer.pack(local)))
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid - 1)
    return lo


def capped_k2(k2: int, num_items: int) -> int:
    if k2 > num_items:
        warnings.warn(f"k2={k2} is larger than the catalog (V={num_items}); using k2={num_items}", stacklevel=2)
    return min(k2, num_items)


def kth_keys_allgather(comm: Comm, local_keys: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Global key at each 0-based rank in `ks`, for every query: (G, len(ks)). Keys padded with
    INT64_MIN so shards with fewer rows than the ranks still send equal shapes."""
    k = max(ks) + 1
    every = gather_padded(comm, local_keys[:, :k], k, INT64_MIN)
    top = torch.topk(every, k, dim=1, sorted=True).values
    return top[:, ks]


def top_items(comm: Comm, cand: Candidates, global_ids: torch.Tensor, p: int, exclude: torch.Tensor) -> torch.Tensor:
    """Global top-p item ids per query by (score desc, id asc), skipping `exclude[g]` (the target): (G, p).

    Cheap: every shard sends its top p+1 keys; p is small (augmentation uses p=5). Keys are made only
    for the candidates at or above the local (p+1)-th score, ties included, so ties go to the lower id
    (`mine_band` with `extra` keeps the lowest ids of a tie at each shard's own cut).
    """
    s = cand.scores
    few = min(p + 1, s.shape[1])
    cut = torch.topk(s, few, dim=1, sorted=False).values.min(1, keepdim=True).values if few else s[:, :1]
    cols, valid = kept_columns(s >= cut)
    keys = score_keys(torch.gather(s, 1, cols), global_ids[torch.gather(cand.rows, 1, cols)])
    keys = torch.topk(keys.masked_fill_(~valid, INT64_MIN), few, dim=1).values
    ids = key_ids(kth_keys_allgather(comm, keys, list(range(p + 1))))
    # ids are unique, so the target is in at most one column; without it, drop the (p+1)-th instead
    is_target = ids == exclude[:, None]
    dropped = torch.where(is_target.any(1), is_target.int().argmax(1), p)
    cols = torch.arange(p, device=ids.device)
    return torch.gather(ids, 1, cols + (cols >= dropped[:, None]))


def random_band(comm: Comm, num_queries: int, count: int, num_items: int, generator: torch.Generator) -> Band:
    """`count` uniform random items per query (with replacement), this shard's share of them.

    Every rank draws the same (G, count) matrix from the same generator, keyed by the global
    batch, so the negatives of a session do not depend on the world size. The draws happen on the
    generator's device (a CUDA generator draws other numbers than a CPU one from the same seed).
    """
    ids = torch.randint(num_items, (num_queries, count), generator=generator, device=generator.device)
    return Band(*Placement(comm.world).owned_rows(ids, comm.rank))  # other ranks' items: masked, row 0


# `catalog_band` holds G x V_local entries per rank (their row, mask, logit and gradient: ~25 bytes each);
# past this many, `train.random_negatives = "catalog"` is refused before training starts.
CATALOG_BAND_ENTRIES = 1 << 26


def catalog_band(num_queries: int, num_local: int, device: torch.device) -> Band:
    """Every row of this shard for every query: with the positives excluded (`exclude_items`), the band of a
    softmax over the whole catalog (`train.random_negatives = "catalog"`)."""
    rows = torch.arange(num_local, device=device).expand(num_queries, num_local)
    return Band(rows, torch.ones(num_queries, num_local, dtype=torch.bool, device=device))


def catalog_band_entries(global_batch: int, num_items: int, world: int) -> int:
    """The entries of the largest shard's `catalog_band`: the global batch times its rows."""
    return global_batch * Placement(world).largest_shard(num_items)


def exclude_items(band: Band, pos_rows: torch.Tensor, pos_owned: torch.Tensor) -> Band:
    """Remove positives (target, augmented items) from the band: they are never negatives.

    pos_rows/pos_owned: (G, P) local rows of the positives and whether this shard owns them.
    """
    rows = torch.where(pos_owned, pos_rows, -1)  # -1 matches no row
    hit = band.rows == rows[:, :1]
    for j in range(1, rows.shape[1]):
        hit |= band.rows == rows[:, j:j + 1]
    return Band(band.rows, band.mask & ~hit)
