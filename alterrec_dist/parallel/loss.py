"""Band loss: softmax cross-entropy over {positive} ∪ band, computed where the items live.

Vocab-parallel, as in Megatron's cross-entropy: each shard scores all G gathered queries against
its own rows, reduces its band to a max and a sum of exponentials, and two all-reduces of G floats
give the log-sum-exp over the whole band. Positive logits come from the shards that own them.
No negative row ever leaves its shard.

The training step never forms the (G, V_local) logits (40 GB at V = 10M, G = 1024): `BandLogits`
scores the shard's rows one tile at a time and keeps only the band's and the positives' logits,
(G, n) and (G, P); its backward rebuilds each tile's sparse gradient and multiplies it out, so peak
memory is O(G x tile). `band_loss` takes ready logits (tests, small catalogs); both end in `_finish`.

Gradients: rank r's loss covers only its own queries (its slice of G). The autograd all-reduce
sums the grads of every rank's loss w.r.t. the reduced values, which is exactly d(total)/d(value),
so item-row grads stay on their shard and query grads return to their owners.
"""
from __future__ import annotations

import torch

from alterrec_dist.common.batch_split import rank_positions
from alterrec_dist.common.device import tile_rows as resolve_tile_rows
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.mining import Band


class Tiling:
    """Where each (G, m) index lies in tiles of `tile_rows` of the shard's `num_rows` rows: its tile and its
    column there, computed once; a tile's entries are then one comparison and one gather away. One tile
    (a GPU's default, or a small shard) needs neither."""

    def __init__(self, index: torch.Tensor, tile_rows: int, num_rows: int):
        self.one = num_rows <= tile_rows
        self.tile_rows = tile_rows
        self.tile = None if self.one else index.div(tile_rows, rounding_mode="floor")
        self.col = index if self.one else index.remainder(tile_rows)

    def at(self, k: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(columns, clamped into a tile of `width` columns: the last one may be narrower; whether each entry
        lies in tile k, None when every entry does)."""
        if self.one:
            return self.col, None
        return self.col.clamp(max=width - 1) if width < self.tile_rows else self.col, self.tile == k


class BandLogits(torch.autograd.Function):
    """scale * queries @ rows.T at the band's entries (-inf off the band) and at the positives, tile by tile:
    what gathering from the full logits gives, holding one (G, tile) score tile at a time. Backward
    recomputes nothing: the gradient w.r.t. the full logits is zero but at the (G, n + P) gathered entries,
    so each tile's is scattered from the incoming gradients and multiplied into both inputs' gradients."""

    @staticmethod
    def forward(ctx, queries: torch.Tensor, rows: torch.Tensor, band_rows: torch.Tensor, band_mask: torch.Tensor,
                pos_rows: torch.Tensor, scale: float, tile_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        tilings = (Tiling(band_rows, tile_rows, len(rows)), Tiling(pos_rows, tile_rows, len(rows)))
        out = [torch.full(band_rows.shape, float("-inf"), device=queries.device),
               torch.zeros(pos_rows.shape, device=queries.device)]  # (neg, pos)
        for k, start in enumerate(range(0, len(rows), tile_rows)):
            stop = min(start + tile_rows, len(rows))
            logits = (queries @ rows[start:stop].T).float()
            if scale != 1.0:  # x * 1.0 == x: skip a pass over the tile
                logits.mul_(scale)
            for j, (tiling, keep) in enumerate(zip(tilings, (band_mask, None))):
                cols, inside = tiling.at(k, stop - start)
                take = keep if inside is None else inside if keep is None else inside & keep
                values = torch.gather(logits, 1, cols)
                out[j] = values if take is None else torch.where(take, values, out[j])
        neg, pos = out
        ctx.save_for_backward(queries, rows, band_mask)
        ctx.tilings, ctx.scale, ctx.tile_rows = tilings, scale, tile_rows
        return neg, pos

    @staticmethod
    def backward(ctx, grad_neg: torch.Tensor, grad_pos: torch.Tensor):
        queries, rows, band_mask = ctx.saved_tensors
        grad_neg = grad_neg.masked_fill(~band_mask, 0.0)  # off the band the output is a constant -inf
        grad_q = torch.zeros_like(queries) if ctx.needs_input_grad[0] else None
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[1] else None
        for k, start in enumerate(range(0, len(rows), ctx.tile_rows)):
            stop = min(start + ctx.tile_rows, len(rows))
            tile = torch.zeros(len(queries), stop - start, dtype=grad_neg.dtype, device=grad_neg.device)
            for tiling, grad in zip(ctx.tilings, (grad_neg, grad_pos)):
                cols, inside = tiling.at(k, stop - start)
                tile.scatter_add_(1, cols, grad if inside is None else grad * inside)
            if ctx.scale != 1.0:
                tile.mul_(ctx.scale)
            tile = tile.to(queries.dtype)
            if grad_q is not None:
                grad_q.addmm_(tile, rows[start:stop])
            if grad_rows is not None:
                torch.mm(tile.T, queries, out=grad_rows[start:stop])
        return grad_q, grad_rows, None, None, None, None, None


def tiled_band_loss(comm: Comm, queries: torch.Tensor, rows: torch.Tensor, scale: float, band: Band,
                    pos_rows: torch.Tensor, pos_owned: torch.Tensor, pos_weight: torch.Tensor, global_batch: int,
                    tile_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`band_loss` of the logits scale * queries @ rows.T, scored `tile_rows` rows at a time (see the module
    docstring): equal in value and gradient, without the (G, V_local) matrix. tile_rows 0: the device's
    default (`device.tile_rows`)."""
    tile_rows = resolve_tile_rows(tile_rows, queries.device, len(queries))
    neg, pos = BandLogits.apply(queries, rows, band.rows, band.mask, pos_rows, scale, tile_rows)
    return _finish(comm, neg, pos, pos_owned, pos_weight, global_batch)


def band_loss(comm: Comm, logits: torch.Tensor, band: Band, pos_rows: torch.Tensor, pos_owned: torch.Tensor,
              pos_weight: torch.Tensor, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the loss, and the per-query loss for all G queries (detached).

    logits: (G, V_local) scores of every gathered query against this shard's rows (autograd).
    band: this shard's negatives per query. pos_rows/pos_owned: (G, P) local rows of the P positives
    (target first, then augmented items) and whether this shard owns them. pos_weight: (G, P), e.g.
    [1, beta, ..., beta] with 0 where a positive is absent or the query is padding.
    Returns (loss_r summed over this rank's queries / global_batch, per-query loss (G,)).
    """
    neg = torch.gather(logits, 1, band.rows).masked_fill(~band.mask, float("-inf"))
    return _finish(comm, neg, torch.gather(logits, 1, pos_rows), pos_owned, pos_weight, global_batch)


def _finish(comm: Comm, neg: torch.Tensor, pos: torch.Tensor, pos_owned: torch.Tensor, pos_weight: torch.Tensor,
            global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss from this shard's band logits neg (G, n), -inf off the band, and positive logits pos (G, P)."""
    G = neg.shape[0]
    shift = comm.all_reduce(neg.detach().max(1).values, op=torch.distributed.ReduceOp.MAX)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # empty band: any shift
    local_sum = torch.exp(neg - shift[:, None]).sum(1)  # exp(-inf) = 0 off the band
    owned_logits = torch.where(pos_owned, pos, torch.zeros((), dtype=pos.dtype, device=pos.device))
    pos = comm.all_reduce(owned_logits, autograd=True)  # (G, P): only the owner contributed
    total = comm.all_reduce(local_sum, autograd=True)
    # clamp keeps the gradient finite where a query's band is empty (its LSE is -inf, loss = 0)
    lse_neg = torch.where(total > 0, shift + torch.log(total.clamp_min(1e-30)), torch.full_like(total, float("-inf")))

    per_positive = torch.logaddexp(pos, lse_neg[:, None]) - pos  # (G, P)
    per_query = (per_positive * pos_weight).sum(1)
    mine = rank_positions(comm.rank, G, comm.world)
    return per_query[mine].sum() / global_batch, per_query.detach()
