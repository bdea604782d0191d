"""Full-ranking evaluation over all V items, sharded: ranks come from all-reduced counts.

The rank of a target is 1 + the number of other items that order before it (higher score, or an
equal score and a smaller id: the same order mining uses). Each shard counts its own rows, one
tile of the score matrix at a time, and an all-reduce of G counts per score kind gives the ranks.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from alterrec_dist.common.cli import progress_bar
from alterrec_dist.common.device import exact_fp32_matmuls
from alterrec_dist.common.device import tile_rows as resolve_tile_rows
from alterrec_dist.common.methods import method, sweep_kind
from alterrec_dist.data.reader import Batch
from alterrec_dist.eval.metrics import MetricSums, popularity_groups
from alterrec_dist.model.networks import Network
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.table import Placement, ShardedItemTable

# The score components, in the order of every per-component list (matrices, scales, weights, queries):
# AlterRec's two networks, or NFRec's two parts.
COMPONENTS = ("id", "text")
KEY_ROWS = 1 << 16


@torch.no_grad()
def item_matrix(net: Network, table: ShardedItemTable, tile_rows: int, parts: bool = False):
    """This shard's item rows of `net` (or its (id, text) part rows for NFRec), without grad; tile_rows rows
    at a time (0: the device's default, `device.tile_rows`)."""
    tile_rows = resolve_tile_rows(tile_rows, table.features.device, 1)
    out = []
    for s in range(0, table.num_local, tile_rows):
        x = table.x[s:s + tile_rows] if net.uses_id else None
        f = table.features[s:s + tile_rows].float() if net.uses_text else None
        out.append(net.part_rows(x, f) if parts else (net.item_rows(x, f),))
    return tuple(torch.cat(cols) for cols in zip(*out))


def row_keys(matrices: list[torch.Tensor]) -> torch.Tensor:
    """(V_local, C) int64: per component, a hash of the exact bits of each item's row (the same on every rank and
    device for the same row). Items with identical rows score the same in exact arithmetic, but a target's own
    score (a row dot product) and the catalog's (a matmul) round differently, so without these keys float luck, not
    the id rule, would order a target among its twins (Scientific: 17 same-text pairs; one training command's text
    NDCG@10 came out 1.2 % apart on two CPUs). `rank_tiles` orders twins by id."""
    keys = []
    for m in matrices:
        # drawn on the CPU whatever the device: every rank and every loader gets the same multipliers
        g = torch.Generator(device="cpu").manual_seed(m.shape[1])
        mult = (torch.randint(1, 2 ** 62, (m.shape[1],), generator=g, device="cpu") | 1).to(m.device)
        # int64 arithmetic wraps: a 64-bit hash; KEY_ROWS rows at a time bounds the (rows, d) int64 temporary
        keys.append(torch.cat([(m[s:s + KEY_ROWS].float().contiguous().view(torch.int32).long() * mult).sum(1)
                               for s in range(0, len(m), KEY_ROWS)]) if len(m) else m.new_zeros(0, dtype=torch.long))
    return torch.stack(keys, 1)


@dataclass
class Scorer:
    """Score components per kind: score_kind = sum_c weight[kind][c] * scale_c * Q_c @ M_c^T."""
    matrices: list[torch.Tensor]            # per component, (V_local, d_c)
    scales: list[float]
    weights: dict[str, list[float]]         # kind -> weight per component

    @functools.cached_property
    def keys(self) -> torch.Tensor:
        """(V_local, C) `row_keys`: rows that are twins rank by id (`rank_tiles`). Made on first ranking only:
        serving's loader builds Scorers for their rows and scores, and its `Scoring` keys the whole table itself."""
        return row_keys(self.matrices)

    @staticmethod
    def build(networks: dict[str, Network], table: ShardedItemTable, weights: dict[str, list[float]],
              tile_rows: int) -> "Scorer":
        """This shard's component rows of `networks`, scored as `weights` (`kind_weights`) says."""
        if "fused" in networks:  # NFRec: y = y_id + y_text (paper App. B), one network's two parts
            return Scorer(list(item_matrix(networks["fused"], table, tile_rows, parts=True)), [1.0, 1.0], weights)
        mats = [item_matrix(networks[n], table, tile_rows)[0] for n in COMPONENTS]
        return Scorer(mats, [networks[n].logit_scale for n in COMPONENTS], weights)


def kind_weights(method_name: str, alpha: float, alpha_sweep: tuple[float, ...] = ()) -> dict[str, list[float]]:
    """The kinds a run of `method_name` is scored on, kind -> weight per component (id, text). "fused" is the
    score the method serves (recommend, export, batch scoring rank by it): AlterRec's alpha-weighted sum, with
    "fused@<a>" for each a of `alpha_sweep`; NFRec's plain sum. A lone network (ID or text only) has just its
    own kind, and serves it as "fused": its other network is never trained, so any score over it is noise."""
    parts = {"id": [1.0, 0.0], "text": [0.0, 1.0]}  # each component alone, in COMPONENTS order
    m = method(method_name)
    if m.judged_on:
        return {m.judged_on: parts[m.judged_on], "fused": parts[m.judged_on]}
    if m.fused:
        return {**parts, "fused": [1.0, 1.0]}
    return {**parts, "fused": [alpha, 1 - alpha], **{sweep_kind(a): [a, 1 - a] for a in alpha_sweep}}


@torch.no_grad()
def session_queries(networks: dict[str, Network], table: ShardedItemTable, batch: Batch) -> list[torch.Tensor]:
    """Per score component, the local queries (b, d_c) of this worker's sessions."""
    need_x = any(n.uses_id for n in networks.values())
    need_f = any(n.uses_text for n in networks.values())
    x, f, inverse = table.fetch(batch.items.flatten(), need_x, need_f)

    def encode(net: Network) -> torch.Tensor:
        rows = net.item_rows(x if net.uses_id else None, f if net.uses_text else None)
        return net.encode(rows[inverse].view(*batch.items.shape, -1), batch.mask)

    if "fused" in networks:
        return list(networks["fused"].part_queries(encode(networks["fused"])))
    return [encode(networks[n]) for n in COMPONENTS]


@torch.no_grad()
@exact_fp32_matmuls()
def evaluate(comm: Comm, networks: dict[str, Network], table: ShardedItemTable, batches, num_batches: int,
             popularity: np.ndarray, weights: dict[str, list[float]], bins: list[int], tile_rows: int,
             desc: str = "eval") -> dict:
    """Metrics for each kind of `weights` (`kind_weights`) over the batches of one split, with long-tail groups;
    in exact fp32 (`exact_fp32_matmuls`), as the saved model scores."""
    for net in networks.values():
        net.eval()
    scorer = Scorer.build(networks, table, weights, tile_rows)
    kinds = list(scorer.weights)
    group_of_item, labels = popularity_groups(popularity, bins)
    ids = table.global_ids
    group_of_item = torch.from_numpy(group_of_item).to("cpu")  # where the sums are (`MetricSums`)
    sums = {k: MetricSums(labels) for k in kinds}
    for batch in tqdm(batches, total=num_batches, desc=desc, leave=False, **progress_bar(comm.rank)):
        queries = [comm.all_gather(q) for q in session_queries(networks, table, batch)]
        target = comm.all_gather(batch.target)
        valid = comm.all_gather(batch.valid)
        counts = count_above_target(comm, scorer, queries, target, ids, tile_rows)
        ranks, valid, target = (1 + counts).cpu(), valid.cpu(), target.cpu()  # one copy a batch, not one a kind
        for i, kind in enumerate(kinds):
            sums[kind].add(ranks[:, i], valid, group_of_item[target])
    return {k: {**sums[k].result(), "longtail": sums[k].group_results()} for k in kinds}


def count_above_target(comm: Comm, scorer: Scorer, queries: list[torch.Tensor], target: torch.Tensor,
                       ids: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """(G, K): for each of the scorer's K kinds, how many items order before the target, over all shards;
    tile_rows rows at a time (0: the device's default, `device.tile_rows`)."""
    tile_rows = resolve_tile_rows(tile_rows, target.device, len(target))
    row, owned = Placement(comm.world).owned_rows(target, comm.rank)
    target_parts = torch.where(owned[:, None], component_scores(queries, scorer.matrices, scorer.scales, row), 0.0)
    target_parts = comm.all_reduce(target_parts)  # (G, C): only the owner contributed
    target_keys = comm.all_reduce(torch.where(owned[:, None], scorer.keys[row], 0))
    counts = rank_tiles(queries, scorer.matrices, scorer.scales, scorer.weights, tiles(len(ids), tile_rows), ids,
                        target, kind_scores(target_parts, scorer.weights), keys=scorer.keys, target_keys=target_keys)
    return comm.all_reduce(counts)


# -- the ranking loop, shared with serving (`serve`'s exact scoring runs it over every shard) --------------

def tiles(n: int, tile_rows: int, offset: int = 0) -> list[tuple[int, int]]:
    """(start, stop) row ranges of at most `tile_rows` over rows offset .. offset + n: one shard's tiles, the
    order `rank_tiles` adds them in (training's evaluation and serving must cut them alike to agree exactly)."""
    return [(offset + s, offset + min(s + tile_rows, n)) for s in range(0, n, tile_rows)]


def component_scores(queries: list[torch.Tensor], matrices: list[torch.Tensor], scales: list[float],
                     rows: torch.Tensor) -> torch.Tensor:
    """(G, C): each session's score of its own item row `rows[g]`, per component: (q_c . M_c[row]) * s_c."""
    return torch.stack([(q * m[rows]).sum(1) * s for q, m, s in zip(queries, matrices, scales)], 1)


def kind_scores(parts: torch.Tensor, weights: dict[str, list[float]]) -> torch.Tensor:
    """(G, K) scores of every kind from (G, C) component scores: `parts @ W.T`."""
    w = torch.tensor([weights[k] for k in weights], dtype=parts.dtype, device=parts.device)
    return parts @ w.T


def orders_before(scores: torch.Tensor, target_scores: torch.Tensor, before_by_id: torch.Tensor,
                  nan_targets: bool = True) -> torch.Tensor:
    """The engine's one order of items: an item comes before the target if it scores higher, or scores the
    same and has a smaller id (`before_by_id`): the order mining and serving use, the same on any machine. A
    tie thus counts against a target of the larger id and for one of the smaller (README, Metrics). A target
    scored NaN (a diverged model) comes after every item: no comparison with NaN holds, which ranked it first.
    `nan_targets` False: the caller knows that no target is NaN, and that pass over the scores is skipped."""
    before = (scores > target_scores) | ((scores == target_scores) & before_by_id)
    return before | target_scores.isnan() if nan_targets else before


def weighted_sum(weights: list[float], parts: list[torch.Tensor]) -> torch.Tensor:
    """sum(w * part for w, part if w), without the passes that change no bit: 0 + x and 1.0 * x."""
    terms = [p if w == 1.0 else w * p for w, p in zip(weights, parts) if w]
    return functools.reduce(torch.add, terms)


def rank_tiles(queries: list[torch.Tensor], matrices: list[torch.Tensor], scales: list[float],
               weights: dict[str, list[float]], tiles: list[tuple[int, int]], ids: torch.Tensor,
               target: torch.Tensor | None = None, target_scores: torch.Tensor | None = None,
               top_kind: str | None = None, on_top=None, keys: torch.Tensor | None = None,
               target_keys: torch.Tensor | None = None) -> torch.Tensor | None:
    """The engine's ranking loop over item rows [start, stop) of each tile (ids: their global ids):
    part_c = (q_c @ M_c[tile].T) * s_c, a kind's score = sum(w * part for w, part if w). With a target:
    (G, K) counts per kind of the items that order before it (higher score, or an equal score and a
    smaller id; an item whose rows equal the target's in every component the kind weighs (`row_keys`: `keys` per
    row, `target_keys` (G, C)) scores the same, so it goes by id whatever the rounding), else None.
    `on_top(scores, tile_ids, parts)` sees each tile's `top_kind` scores."""
    # The passes over (G, tile) scores, not the matmuls, are most of this loop's time on the CPU (and on a GPU
    # at catalog scale): bools are combined with & and | (torch.where on bools is about 10x slower here),
    # counted through uint8 to int32 (a bool sum goes through int64, about 7x slower), and the twin masks are
    # made once a tile for each set of components the kinds weigh. Same counts, bit for bit.
    kinds = list(weights)
    counts = None if target is None else torch.zeros(len(target), len(kinds), dtype=torch.long,
                                                     device=target.device)
    nan_targets = target is not None and bool(target_scores.isnan().any())  # one host read a batch
    for s, e in tiles:
        tile_ids = ids[s:e]
        parts = [q @ m[s:e].T if sc == 1.0 else (q @ m[s:e].T) * sc for q, m, sc in zip(queries, matrices, scales)]
        if target is not None:
            before_by_id = tile_ids[None, :] < target[:, None]
            same_row = [keys[s:e, c][None, :] == target_keys[:, c:c + 1] for c in range(len(matrices))]
            twins = {}  # weighed components -> (a twin before the target by id, not a twin)
        for i, kind in enumerate(kinds):
            if target is None and kind != top_kind:
                continue
            scores = weighted_sum(weights[kind], parts)
            if target is not None:
                used = tuple(bool(w) for w in weights[kind])
                if used not in twins:
                    twin = functools.reduce(torch.logical_and, [t for u, t in zip(used, same_row) if u])
                    twins[used] = (twin & before_by_id, ~twin)
                twin_before, not_twin = twins[used]
                # a twin goes by id whatever the rounding; the target is its own twin, so it never counts
                before = orders_before(scores, target_scores[:, i:i + 1], before_by_id, nan_targets)
                before = (before & not_twin) | twin_before
                counts[:, i] += before.view(torch.uint8).sum(1, dtype=torch.int32)
            if kind == top_kind:
                on_top(scores, tile_ids, parts)
    return counts
