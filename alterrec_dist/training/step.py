"""One global batch of Algorithm 1's inner loop: the trained network's queries travel to every rank, the
negatives (the frozen network's ranks k1..k2, mined per shard and merged, or uniform random items, or
every item: `train.random_negatives`) and the positives are fixed, and the band loss is computed on each
rank's shard of the item rows."""
from __future__ import annotations

import torch

from alterrec_dist.common.config import Config
from alterrec_dist.common.device import trained_autocast
from alterrec_dist.common.seeds import derived_seed
from alterrec_dist.data.reader import Batch
from alterrec_dist.model.networks import Network
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.loss import tiled_band_loss
from alterrec_dist.parallel.mining import (Band, catalog_band, exclude_items, local_candidates, mine_band, random_band,
                                          top_items)
from alterrec_dist.parallel.table import ShardedItemTable
from alterrec_dist.training.schedule import Phase


def train_step(comm: Comm, cfg: Config, phase: Phase, trained: Network, frozen: Network | None,
               frozen_rows: torch.Tensor | None, table: ShardedItemTable, batch: Batch, step: int,
               k2: int) -> tuple[torch.Tensor, dict]:
    """One global batch: this rank's share of the loss (to backward) and the logged global losses (0-dim
    tensors on the device: reading them here would wait for the step). The batch is on the table's device.

    The trained network's layers compute under `trained_autocast` (the ddp engine's bf16); their outputs,
    the scores and the band loss are fp32."""
    t = cfg.train
    device = table.global_ids.device
    compute = trained_autocast(device, cfg.trainer.engine, cfg.trainer.precision)
    nets = [trained] + ([frozen] if frozen else [])
    x, f, inverse = table.fetch(batch.items.flatten(), any(n.uses_id for n in nets), any(n.uses_text for n in nets))

    def history_rows(net: Network, x_rows) -> torch.Tensor:
        rows = net.item_rows(x_rows if net.uses_id else None, f if net.uses_text else None)
        return rows[inverse].view(*batch.items.shape, -1)

    with compute:
        q = trained.encode(history_rows(trained, x), batch.mask).float()
    queries = comm.all_gather(q, autograd=True)  # (G, d): queries travel, items stay
    target = comm.all_gather(batch.target)
    positives = target[:, None]

    num_neg = k2 - t.k1
    num_hard = round(t.hard_fraction * num_neg) if frozen else 0
    bands = []
    if num_hard or phase.augmented:
        with torch.no_grad():
            frozen_queries = comm.all_gather(frozen.encode(history_rows(frozen, x.detach() if x is not None else None),
                                                           batch.mask))
            if num_hard:
                band, candidates = mine_band(comm, frozen_queries, frozen_rows, table.global_ids, t.k1, t.k1 + num_hard,
                                             table.num_items, frozen.logit_scale, t.merge, cfg.eval.tile_rows,
                                             extra=t.p + 1 if phase.augmented else 0)
                bands.append(band)
            else:  # no band to mine (hard_fraction rounds to no hard negative): the top-p still come from here
                candidates = local_candidates(frozen_queries, frozen_rows, t.p + 1, frozen.logit_scale,
                                              cfg.eval.tile_rows, ties_by_id=True)
            if phase.augmented:
                positives = torch.cat([positives, top_items(comm, candidates, table.global_ids, t.p, target)], 1)
    if phase.negatives == "random" and t.random_negatives == "catalog":
        bands.append(catalog_band(len(target), table.num_local, device))
    elif num_neg - num_hard:
        # keyed by (seed, epoch, step): the same draws for a global batch whatever the world size
        g = torch.Generator(device=device).manual_seed(derived_seed(t.seed, phase.epoch, step))
        bands.append(random_band(comm, len(target), num_neg - num_hard, table.num_items, g))
    pos_rows, owned = table.placement.owned_rows(positives, comm.rank)
    band = exclude_items(bands[0] if len(bands) == 1 else Band.cat(*bands), pos_rows, owned)

    with compute:
        if trained.fused:  # parts kept: the imbalance diagnostic below scores them without recomputing the MLP
            parts = [p.float() for p in trained.part_rows(table.x, table.f)]
            rows = trained.join_parts(*parts)
        else:
            rows = trained.item_rows(table.x if trained.uses_id else None,
                                     table.f if trained.uses_text else None).float()
    weight = torch.full(positives.shape, t.beta, device=device)  # filled on the device: no host copy
    weight[:, 0] = 1.0

    def loss_of(qq: torch.Tensor, rr: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        # the (G, V_local) logits on this shard only, one tile at a time
        return tiled_band_loss(comm, qq, rr, scale, band, pos_rows, owned, weight, t.global_batch_size,
                               cfg.eval.tile_rows)

    loss, per_query = loss_of(queries, rows, trained.logit_scale)
    logged = {"loss": per_query.mean()}
    if trained.fused:  # the imbalance diagnostic: y = y_id + y_text, the loss of each part alone
        with torch.no_grad():
            q_id, q_text = trained.part_queries(queries)
            for name, qq, rr in (("loss_id", q_id, parts[0]), ("loss_text", q_text, parts[1])):
                logged[name] = loss_of(qq, rr, trained.logit_scale)[1].mean()  # on the fused loss's scale
    return loss, logged
