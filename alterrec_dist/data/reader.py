"""Streaming, rank-sliced batches of session rows from the Parquet parts of one split.

The *global* batch sequence of an epoch depends only on (files, seed, epoch, global_batch_size):
rows flow in one stream and are cut into global batches of `global_batch_size` rows; worker
`rank` keeps rows [rank*b, (rank+1)*b) of each, b = global_batch_size // world_size. So W=1 and
W=4 train on the same global batches, ranks are disjoint, and every rank yields the same number
of batches (an uneven count would hang the collectives).

Every rank reads every row group and keeps its slice: simple and exact, and the Parquet decode of
short integer lists is cheap next to a training step. Memory is bounded by the shuffle window
(`shuffle_window_rows` plus one row group), not by the split size.

Shuffling (shuffle=True) guarantees, per epoch:
- each row appears exactly once (drop_last drops only the final partial global batch);
- the order of row groups is a uniform random permutation drawn from (seed, epoch);
- consecutive shuffled row groups are gathered into windows of >= shuffle_window_rows rows and
  the rows of a window are uniformly permuted, so rows from one session (adjacent in the file)
  spread over a whole window; rows of different windows are never mixed.
The same (seed, epoch) gives the same order; different epochs give different orders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from alterrec_dist.common import storage
from alterrec_dist.common.batch_split import rank_positions
from alterrec_dist.common.errors import DataError, one_line
from alterrec_dist.common.storage import Location
from alterrec_dist.data.layout import gather_ranges

PADDING_EXAMPLE = -1  # `example` of the rows that pad the last evaluation batch


@dataclass
class Batch:
    items: torch.Tensor    # (b, L) int64, history item idx, left-aligned oldest first, padded with 0
    mask: torch.Tensor     # (b, L) bool, True at real positions; every row has >= 1 real position
    target: torch.Tensor   # (b,) int64
    example: torch.Tensor  # (b,) int64: the row's global index in the split (file order); -1 on padding rows
    valid: torch.Tensor    # (b,) bool: False for padding rows (only in a padded last batch)

    def to(self, device: torch.device) -> "Batch":
        """This batch on `device`: through pinned host memory with non-blocking copies on a GPU, so the
        copy overlaps the step that is queued before it; the same batch on the CPU."""
        if device.type == "cpu":
            return self
        return Batch(*(t.pin_memory().to(device, non_blocking=True) for t in
                       (self.items, self.mask, self.target, self.example, self.valid)))


@dataclass
class RowGroup:
    file: Location  # a local path, or an object in a store (read by ranges)
    index: int     # row group number within the file
    first: int     # global index of its first row in the split
    rows: int


@dataclass
class Rows:
    """A run of session rows kept ragged: row i's history is values[offsets[i]:offsets[i+1]]."""
    example: np.ndarray   # int64[n]
    offsets: np.ndarray   # int64[n+1]
    values: np.ndarray    # int64[offsets[-1]]
    target: np.ndarray    # int64[n]

    def __len__(self) -> int:
        return len(self.example)

    def take(self, index: np.ndarray) -> "Rows":
        offsets, values = gather_ranges(self.values, self.offsets[index], np.diff(self.offsets)[index])
        return Rows(self.example[index], offsets, values, self.target[index])

    @staticmethod
    def concat(parts: list["Rows"]) -> "Rows":
        shifts = np.cumsum([0] + [p.offsets[-1] for p in parts[:-1]])
        return Rows(
            np.concatenate([p.example for p in parts]),
            np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)]).astype(np.int64),
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.target for p in parts]),
        )


def read_row_group(group: RowGroup, max_len: int, num_items: int | None = None) -> Rows:
    """One row group's rows, histories cut to their most recent max_len items (here, so that a
    shuffle window holds at most max_len items per row); DataError for an item index outside 0..num_items-1
    (damaged pages decode to any number, and the start check reads only the Parquet statistics)."""
    where = f"{group.file}: row group {group.index}"
    try:
        with storage.open_input(group.file) as f:
            table = pq.ParquetFile(f).read_row_group(group.index, columns=["history", "target"])
    except (OSError, pa.ArrowException) as e:  # damaged pages ("Corrupt snappy compressed data"), a failed read
        raise DataError(f"{where}: cannot read ({one_line(e)})") from None
    history, target = table["history"].combine_chunks(), table["target"]
    if target.null_count or history.null_count or history.values.null_count:
        raise DataError(f"{where}: null history, history item or target")
    offsets, values = cut_histories(history, max_len, where, first=1)  # rows counted from 1, as `verify` does
    targets = target.to_numpy().astype(np.int64)
    if num_items is not None:
        for name, items in (("history", values), ("target", targets)):
            if len(items) and not (0 <= items.min() and items.max() < num_items):
                raise DataError(f"{where}: a {name} item index outside 0..{num_items - 1} (damaged: "
                                "`python -m alterrec_dist.prepare verify` checks every file)")
    example = np.arange(group.first, group.first + group.rows, dtype=np.int64)
    return Rows(example, offsets, values, targets)


def cut_histories(history: pa.ListArray, max_len: int, where: str, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of the histories, each cut to its most recent max_len items; DataError naming
    the first empty one (its row counted from `first`)."""
    offsets = history.offsets.to_numpy().astype(np.int64)
    lens = np.diff(offsets)
    if (lens == 0).any():
        raise DataError(f"{where}, row {first + int(np.argmax(lens == 0))}: empty history")
    keep = np.minimum(lens, max_len)  # the most recent `keep` items end where the row ends
    values = history.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return gather_ranges(values, offsets[1:] - keep, keep)


def to_batch(rows: Rows, valid: np.ndarray) -> Batch:
    """Left-aligned (b, L) tensors, L = the longest history among these rows."""
    lens = np.diff(rows.offsets)
    width = int(lens.max())
    pos = np.arange(width)
    mask = pos[None, :] < lens[:, None]
    index = np.minimum(rows.offsets[:-1, None] + pos[None, :], len(rows.values) - 1)
    items = np.where(mask, rows.values[index], 0)
    return Batch(items=torch.from_numpy(items), mask=torch.from_numpy(mask), target=torch.from_numpy(rows.target),
                 example=torch.from_numpy(rows.example), valid=torch.from_numpy(valid))


def rank_slice(rank: int, global_batch_size: int, world_size: int) -> np.ndarray:
    """The positions in a global batch that `rank` keeps (`common.batch_split`), as indices."""
    return np.arange(global_batch_size)[rank_positions(rank, global_batch_size, world_size)]


def local_batch(rows: Rows, mine: np.ndarray) -> Batch:
    """A rank's slice `mine` (`rank_slice`) of one global batch's rows; a short (last) batch is filled up
    with copies of its first row, marked invalid."""
    valid = mine < len(rows)
    part = rows.take(np.where(valid, mine, 0))
    part.example[~valid] = PADDING_EXAMPLE
    return to_batch(part, valid)


class SessionReader:
    """This rank's slices of the global batches of one split; see the module docstring."""

    def __init__(self, files: list[str | Location], *, rank: int, world_size: int, global_batch_size: int,
                 max_len: int, seed: int, shuffle: bool, drop_last: bool, shuffle_window_rows: int = 262_144,
                 num_items: int | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of world_size={world_size}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.rank, self.world_size = rank, world_size
        self.global_batch_size, self.local_batch_size = global_batch_size, global_batch_size // world_size
        self.max_len, self.seed, self.shuffle, self.drop_last = max_len, seed, shuffle, drop_last
        self.shuffle_window_rows, self.num_items = shuffle_window_rows, num_items
        self.groups = self._row_groups([storage.location(f) for f in files])
        self.num_rows = sum(g.rows for g in self.groups)

    @staticmethod
    def _row_groups(files: list[Location]) -> list[RowGroup]:
        groups, first = [], 0
        for f in files:
            try:
                with storage.open_input(f) as source:
                    meta = pq.ParquetFile(source).metadata
            except (OSError, ValueError) as e:
                raise DataError(f"{f}: cannot read Parquet metadata ({e})") from None
            for i in range(meta.num_row_groups):
                n = meta.row_group(i).num_rows
                if n:
                    groups.append(RowGroup(f, i, first, n))
                first += n
        return groups

    def steps_per_epoch(self) -> int:
        B = self.global_batch_size
        return self.num_rows // B if self.drop_last else -(-self.num_rows // B)

    def _windows(self, epoch: int) -> Iterator[Rows]:
        """The epoch's row stream in pieces: row groups in file order, or shuffled windows."""
        if not self.shuffle:
            for g in self.groups:
                yield read_row_group(g, self.max_len, self.num_items)
            return
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.groups))
        window: list[Rows] = []
        for k, g in enumerate(order):
            window.append(read_row_group(self.groups[g], self.max_len, self.num_items))
            if sum(len(w) for w in window) >= self.shuffle_window_rows or k == len(order) - 1:
                rows = Rows.concat(window)
                yield rows.take(rng.permutation(len(rows)))
                window = []

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Exactly steps_per_epoch() batches of local_batch_size rows each."""
        if epoch < 0:  # checked here, not at the first next(): the RNG key must be >= 0
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        B, b = self.global_batch_size, self.local_batch_size
        mine = rank_slice(self.rank, B, self.world_size)
        pending: Rows | None = None  # rows of the stream not yet in a global batch (< B of them)
        for piece in self._windows(epoch):
            stream = piece if pending is None else Rows.concat([pending, piece])
            full = len(stream) // B
            for k in range(full):
                yield to_batch(stream.take(k * B + mine), np.ones(b, dtype=bool))
            pending = stream.take(np.arange(full * B, len(stream)))
        if pending is not None and len(pending) and not self.drop_last:
            yield local_batch(pending, mine)  # the final partial global batch, padded
