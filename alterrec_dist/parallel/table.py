"""The row-sharded item table and the one placement rule.

Item i lives on rank `i mod W` at local row `i div W` (`Placement`, the one place that rule is
written); its learnable ID row and its frozen text features are co-located. Queries travel, items
stay: workers all-gather session embeddings and every shard scores them against its own rows
(through `comm.Comm`). World size 1 runs exactly the same code.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from alterrec_dist.common.seeds import derived_seed
from alterrec_dist.parallel.comm import Comm


@dataclass(frozen=True)
class Placement:
    """Where every item lives at world size `world`: item i on rank `i mod world`, at local row `i div
    world`. The only code that knows the rule; the table, mining, evaluation, checkpoints and serving ask it."""
    world: int

    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        return ids % self.world

    def local_row(self, ids: torch.Tensor) -> torch.Tensor:
        return ids // self.world

    def owned_rows(self, ids: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(local rows of `ids` on `rank`, 0 where another rank owns the item; whether `rank` owns it)."""
        mine = self.owner(ids) == rank
        return torch.where(mine, self.local_row(ids), 0), mine

    def largest_shard(self, num_items: int) -> int:
        """The rows of the rank that holds the most (rank 0's)."""
        return -(-num_items // self.world)

    def rows_of(self, rank: int, num_items: int) -> int:
        """How many rows `rank` holds (no tensor made: a count to check a file against before allocating)."""
        return len(range(rank, num_items, self.world))

    def ids_of(self, rank: int, num_items: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The global ids of `rank`'s rows, in local row order."""
        return torch.arange(rank, num_items, self.world, device=device)

    def shard_major(self, num_items: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Every global id, rank 0's rows first, then rank 1's, ...: the rows as the ranks hold them."""
        return torch.cat([self.ids_of(r, num_items, device) for r in range(self.world)])

    def repartition(self, shards: list[dict], rank: int) -> dict:
        """`rank`'s rows at this placement, gathered from row shards cut for any world size.

        Each shard is {"items": (n,) global ids, "rows": {key: (n, ...) tensor}}, rows aligned with
        items; the result has the same form, in local row order. Pure, no process group."""
        picks = [self.owner(s["items"]) == rank for s in shards]
        items = torch.cat([s["items"][p] for s, p in zip(shards, picks)])
        order = torch.argsort(items)
        rows = {k: torch.cat([s["rows"][k][p] for s, p in zip(shards, picks)])[order] for k in shards[0]["rows"]}
        return {"items": items[order], "rows": rows}


def init_id_rows(num_rows: int, dim: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """Fresh ID table rows ~ N(0, std); the caller's generator decides which rows they are."""
    return torch.randn(num_rows, dim, generator=generator, device=generator.device) * std


class ShardedItemTable(nn.Module):
    """This rank's rows of the item tables: learnable ID rows `x` and frozen text features `f`.

    Not part of any data-parallel engine: `x` gets exact per-row gradients through the
    collectives and has its own optimizer; no other rank ever holds a copy of it. Everything lives on
    `device` (buffers included, so `Module.to` moves `global_ids` too).
    """

    def __init__(self, num_items: int, dim: int, comm: Comm, text_features: np.ndarray | None,
                 init_std: float, seed: int, with_id: bool = True, device: torch.device | str = "cpu"):
        super().__init__()
        self.num_items, self.comm = num_items, comm
        self.placement = Placement(comm.world)
        # global id of each local row
        self.register_buffer("global_ids", self.placement.ids_of(comm.rank, num_items, device), persistent=False)
        self.num_local = len(self.global_ids)
        self.x = nn.Parameter(self._init_rows(dim, init_std, seed).to(device)) if with_id else None
        f = torch.zeros(self.num_local, 0, dtype=torch.float16, device=device) if text_features is None else \
            torch.from_numpy(np.ascontiguousarray(text_features)).to(device)
        if len(f) != self.num_local:
            raise ValueError(f"{len(f)} text feature rows for {self.num_local} local items")
        self.register_buffer("features", f, persistent=False)  # float16 at rest: half the memory (`f` is float32)

    def _init_rows(self, dim: int, std: float, seed: int, block: int = 1 << 16) -> torch.Tensor:
        """Rows drawn per block of *global* ids, so every world size initialises item i alike; drawn by a
        CPU generator whatever the device, so a GPU run starts from the CPU run's rows."""
        rows = torch.empty(self.num_local, dim, device="cpu")
        ids = self.global_ids.cpu()
        for start in range(0, self.num_items, block):
            g = torch.Generator(device="cpu").manual_seed(derived_seed(seed, start // block))
            full = init_id_rows(min(block, self.num_items - start), dim, std, g)
            mine = ids[(ids >= start) & (ids < start + block)]
            rows[self.placement.local_row(mine)] = full[mine - start]
        return rows

    @property
    def f(self) -> torch.Tensor:
        return self.features.float()

    def fetch(self, ids: torch.Tensor, need_x: bool, need_f: bool):
        """Rows of the distinct `ids` from their owners: (x rows with autograd, f rows as float32,
        inverse) with `rows[inverse]` lining up with `ids`.

        Distinct rows only, so callers run item-side layers (the text MLP) once per item, not once
        per padded history position. Requests are grouped by owner, exchanged all-to-all, answered
        from the local rows and sent back; the backward of the x exchange returns row gradients to
        their owners, where they accumulate into `x.grad`.
        """
        W = self.comm.world
        uniq, inverse = torch.unique(ids, return_inverse=True)
        owners = self.placement.owner(uniq)
        order = torch.argsort(owners, stable=True)
        send_counts = torch.bincount(owners, minlength=W)
        recv_counts = torch.cat(self.comm.all_to_all(list(send_counts.view(W, 1)), [1] * W))
        # all-to-all split sizes are host integers: the one host read of a lookup, both counts at once
        send_counts, recv_counts = torch.stack([send_counts, recv_counts]).tolist()
        requests = self.comm.all_to_all(list(uniq[order].split(send_counts)), recv_counts)
        local = [self.placement.local_row(r) for r in requests]
        position = torch.empty_like(order)
        # where each distinct id sits in the by-owner order
        position[order] = torch.arange(len(order), device=order.device)

        def exchange(table: torch.Tensor, autograd: bool) -> torch.Tensor:
            answers = self.comm.all_to_all([table[r] for r in local], send_counts, autograd=autograd)
            return torch.cat(answers)[position]

        x = exchange(self.x, autograd=True) if need_x else None
        f = exchange(self.features, autograd=False).float() if need_f else None
        return x, f, inverse
