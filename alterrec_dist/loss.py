"""Band loss: softmax cross-entropy over {positive} ∪ band, computed where the items live.

Vocab-parallel, as in Megatron's cross-entropy: each shard scores all G gathered queries against
its own rows, reduces its band to a max and a sum of exponentials, and two all-reduces of G floats
give the log-sum-exp over the whole band. Positive logits come from the shards that own them.
No negative row ever leaves its shard.

Gradients: rank r's loss covers only its own queries (its slice of G). The autograd all-reduce
sums the grads of every rank's loss w.r.t. the reduced values, which is exactly d(total)/d(value),
so item-row grads stay on their shard and query grads return to their owners.
"""
from __future__ import annotations

import torch

from alterrec_dist.mining import Band
from alterrec_dist.sharded import Comm


class BandTerms(torch.autograd.Function):
    """From the (G, n) logits, per query: the logits of its positives (G, P), and the sum over its band
    of exp(logit - shift) (G,). What gather / exp / sum would give, without autograd's (G, n)
    temporaries and its dense zero gradient per gather: the band's logits are gathered once (for the
    max, by the caller) and turned into weights in place, and backward builds one gradient. On CPU
    each pass over a wide band costs about as much as the arithmetic."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, gathered: torch.Tensor, rows: torch.Tensor, shift: torch.Tensor,
                pos_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gathered: logits at rows, -inf off the band (consumed); shift: (G,)."""
        weights = gathered.sub_(shift[:, None]).exp_()  # exp(-inf) = 0 off the band
        ctx.save_for_backward(rows, weights, pos_rows)
        ctx.columns = logits.shape[1]
        return torch.gather(logits, 1, pos_rows), weights.sum(1)

    @staticmethod
    def backward(ctx, grad_pos: torch.Tensor, grad_sum: torch.Tensor):
        rows, weights, pos_rows = ctx.saved_tensors
        grad = torch.zeros(len(rows), ctx.columns, dtype=weights.dtype, device=weights.device)
        # d sum / d logit = its weight; backward runs once, so the saved weights take the product in place
        grad.scatter_add_(1, rows, weights.mul_(grad_sum[:, None]))
        return grad.scatter_add_(1, pos_rows, grad_pos), None, None, None, None


def band_loss(comm: Comm, logits: torch.Tensor, band: Band, pos_rows: torch.Tensor, pos_owned: torch.Tensor,
              pos_weight: torch.Tensor, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the loss, and the per-query loss for all G queries (detached).

    logits: (G, V_local) scores of every gathered query against this shard's rows (autograd).
    band: this shard's negatives per query. pos_rows/pos_owned: (G, P) local rows of the P positives
    (target first, then augmented items) and whether this shard owns them. pos_weight: (G, P), e.g.
    [1, beta, ..., beta] with 0 where a positive is absent or the query is padding.
    Returns (loss_r summed over this rank's queries / global_batch, per-query loss (G,)).
    """
    G = logits.shape[0]
    with torch.no_grad():
        neg = torch.gather(logits, 1, band.rows).masked_fill_(~band.mask, float("-inf"))
    shift = comm.all_reduce(neg.max(1).values, op=torch.distributed.ReduceOp.MAX)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # empty band: any shift
    pos, local_sum = BandTerms.apply(logits, neg, band.rows, shift, pos_rows)
    owned_logits = torch.where(pos_owned, pos, torch.zeros((), dtype=logits.dtype))
    pos = comm.all_reduce(owned_logits, autograd=True)  # (G, P): only the owner contributed
    total = comm.all_reduce(local_sum, autograd=True)
    # clamp keeps the gradient finite where a query's band is empty (its LSE is -inf, loss = 0)
    lse_neg = torch.where(total > 0, shift + torch.log(total.clamp_min(1e-30)), torch.full_like(total, float("-inf")))

    per_positive = torch.logaddexp(pos, lse_neg[:, None]) - pos  # (G, P)
    per_query = (per_positive * pos_weight).sum(1)
    b = G // comm.world
    mine = slice(comm.rank * b, (comm.rank + 1) * b)
    return per_query[mine].sum() / global_batch, per_query.detach()
