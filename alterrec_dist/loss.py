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
    owned_logits = torch.where(pos_owned, torch.gather(logits, 1, pos_rows), torch.zeros((), dtype=logits.dtype))
    pos = comm.all_reduce(owned_logits, autograd=True)  # (G, P): only the owner contributed

    neg = torch.gather(logits, 1, band.rows).masked_fill(~band.mask, float("-inf"))
    local_max = neg.detach().max(1).values
    shift = comm.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # empty band: any shift
    local_sum = torch.exp(neg - shift[:, None]).sum(1)
    total = comm.all_reduce(local_sum, autograd=True)
    # clamp keeps the gradient finite where a query's band is empty (its LSE is -inf, loss = 0)
    lse_neg = torch.where(total > 0, shift + torch.log(total.clamp_min(1e-30)), torch.full_like(total, float("-inf")))

    per_positive = torch.logaddexp(pos, lse_neg[:, None]) - pos  # (G, P)
    per_query = (per_positive * pos_weight).sum(1)
    b = G // comm.world
    mine = slice(comm.rank * b, (comm.rank + 1) * b)
    return per_query[mine].sum() / global_batch, per_query.detach()
