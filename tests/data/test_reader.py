"""SessionReader on real Parquet files: W-independent global batches, shuffling, padding, truncation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from alterrec_dist.common.config import PROJECT_ROOT
from alterrec_dist.common.errors import DataError
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.data.layout import SESSION_SCHEMA
from alterrec_dist.data.reader import PADDING_EXAMPLE, SessionReader

ROWS_PER_FILE = (130, 0, 97, 200)  # an empty file too: it must not shift the global row indices
ROW_GROUP = 23                     # small row groups: many chunks, several per shuffle window
N = sum(ROWS_PER_FILE)


def history_of(g: int) -> list[int]:
    """Row g's history encodes g: 1..9 items g*100, g*100+1, ... (oldest first)."""
    return [g * 100 + k for k in range(g % 9 + 1)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    d, first, out = tmp_path_factory.mktemp("reader"), 0, []
    for i, n in enumerate(ROWS_PER_FILE):
        g = range(first, first + n)
        table = pa.Table.from_pydict({"history": [history_of(x) for x in g], "target": [x for x in g],
                                      "user": [None] * n, "session": [str(x) for x in g]}, schema=SESSION_SCHEMA)
        pq.write_table(table, d / f"part-{i:05d}.parquet", row_group_size=ROW_GROUP)
        out.append(d / f"part-{i:05d}.parquet")
        first += n
    return out


def reader(files, *, world=1, rank=0, gbs=24, max_len=50, seed=0, shuffle=True, drop_last=True, window=60):
    return SessionReader(files, rank=rank, world_size=world, global_batch_size=gbs, max_len=max_len, seed=seed,
                         shuffle=shuffle, drop_last=drop_last, shuffle_window_rows=window)


def examples(r: SessionReader, epoch: int = 0, only_valid: bool = False) -> list[list[int]]:
    return [b.example[b.valid].tolist() if only_valid else b.example.tolist() for b in r.epoch(epoch)]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_slice_the_same_global_batches_for_any_world_size(files, shuffle, drop_last):
    gbs = 24
    global_batches = examples(reader(files, shuffle=shuffle, drop_last=drop_last))
    for world in (1, 2, 3, 4):
        per_rank = [examples(reader(files, world=world, rank=r, shuffle=shuffle, drop_last=drop_last))
                    for r in range(world)]
        steps = reader(files, world=world, shuffle=shuffle, drop_last=drop_last).steps_per_epoch()
        assert all(len(p) == steps for p in per_rank)  # uneven counts would hang collectives
        assert all(len(batch) == gbs // world for p in per_rank for batch in p)
        joined = [sum((p[s] for p in per_rank), []) for s in range(steps)]  # rank order = slice order
        assert joined == global_batches


def test_rows_are_the_files_rows(files):
    seen = 0
    for batch in reader(files, gbs=16, world=2, rank=1, drop_last=False).epoch(3):
        for items, mask, target, ex, ok in zip(batch.items, batch.mask, batch.target, batch.example, batch.valid):
            if ok:
                assert items[mask].tolist() == history_of(int(ex)) and int(target) == int(ex)
                seen += 1
        assert batch.items.dtype == batch.target.dtype == batch.example.dtype == torch.int64
        assert batch.mask.dtype == batch.valid.dtype == torch.bool
        # left-aligned, width = the longest history in this worker's batch
        lens = batch.mask.sum(1)
        assert (batch.mask == (torch.arange(batch.mask.shape[1]) < lens[:, None])).all()
        assert batch.items.shape[1] == int(lens.max()) and (batch.items[~batch.mask] == 0).all()
        assert (lens >= 1).all()
    assert seen > 0


def test_epoch_is_a_permutation_and_reshuffles_per_epoch(files):
    r = reader(files, drop_last=False)
    e0, e0_again, e1 = examples(r, 0, True), examples(reader(files, drop_last=False), 0, True), examples(r, 1, True)
    assert sorted(sum(e0, [])) == list(range(N)) == sorted(sum(e1, []))
    assert e0 == e0_again and e0 != e1
    assert examples(reader(files, seed=1), 0) != examples(reader(files), 0)
    # rows of one file region do not stay together: the first global batch mixes far-apart rows
    assert np.ptp(e0[0]) > 100
    # no shuffle: file order, every epoch
    plain = reader(files, shuffle=False, drop_last=False)
    assert sum(examples(plain, 0, True), []) == list(range(N)) == sum(examples(plain, 5, True), [])


def test_shuffle_reorders_the_rows_inside_each_row_group(files):
    """Shuffling only the order of the row groups (23 rows here) kept every group's rows in file order, side
    by side in one global batch: sessions written together (one user's, one day's) trained together every
    epoch. With shuffle on, the rows of a window are permuted too: hardly a row is followed by the next one
    of its file."""
    flat = sum(examples(reader(files, drop_last=False), 0, True), [])
    assert sorted(flat) == list(range(N))
    in_file_order = sum(b == a + 1 for a, b in zip(flat, flat[1:]))
    assert in_file_order < N // 20  # a row group kept in order gives 22 of its 23 rows; about N / 69 by chance


def test_drop_last_drops_only_the_final_partial_batch(files):
    r = reader(files, gbs=24, world=2)
    assert r.steps_per_epoch() == N // 24
    ex = sum((examples(reader(files, gbs=24, world=2, rank=k)) for k in range(2)), [])
    flat = sum(ex, [])
    assert len(flat) == len(set(flat)) == (N // 24) * 24


def test_last_batch_is_padded_with_invalid_rows(files):
    gbs, world = 40, 4  # N % 40 = 27: ranks 0-1 full, rank 2 partly padded, rank 3 all padding
    last = [list(reader(files, gbs=gbs, world=world, rank=k, shuffle=False, drop_last=False).epoch(0))[-1]
            for k in range(world)]
    assert reader(files, gbs=gbs, drop_last=False).steps_per_epoch() == -(-N // gbs)
    assert [int(b.valid.sum()) for b in last] == [10, 10, 7, 0]
    real = torch.cat([b.example[b.valid] for b in last]).tolist()
    assert real == list(range(N - N % gbs, N))
    for b in last:
        assert (b.example[~b.valid] == PADDING_EXAMPLE).all()
        assert (b.mask.sum(1) >= 1).all()  # padding rows are copies of a real row: safe to encode
        assert (b.target[~b.valid] == real[0]).all()


def test_long_histories_keep_the_most_recent_max_len_items(files):
    for batch in reader(files, gbs=8, max_len=3, shuffle=False).epoch(0):
        assert batch.items.shape[1] <= 3
        for items, mask, ex in zip(batch.items, batch.mask, batch.example):
            assert items[mask].tolist() == history_of(int(ex))[-3:]


def test_bad_arguments_and_bad_rows(files, tmp_path):
    with pytest.raises(ValueError, match="multiple of world_size"):
        reader(files, gbs=10, world=4)
    with pytest.raises(ValueError):
        reader(files, world=2, rank=2)
    with pytest.raises(ValueError):
        reader(files).epoch(-1)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pydict({"history": [[1], []], "target": [1, 2], "user": [None, None],
                                         "session": ["a", "b"]}, schema=SESSION_SCHEMA), bad)
    with pytest.raises(DataError, match="row group 0, row 2: empty history"):  # the second row, as verify says
        list(reader([bad], gbs=2).epoch(0))


def test_the_embedded_default_is_readable():
    ds = Dataset(PROJECT_ROOT / "shards" / "default")
    for split in ("train", "valid", "test"):
        r = SessionReader(ds.session_files(split), rank=1, world_size=2, global_batch_size=256, max_len=50,
                          seed=0, shuffle=split == "train", drop_last=split == "train")
        batches = list(r.epoch(0))
        assert len(batches) == r.steps_per_epoch() > 0
        assert all(int(b.target.max()) < ds.num_items and int(b.items.max()) < ds.num_items for b in batches)


@pytest.mark.parametrize("column, bad", [("history", [3, 2_054_817_167]), ("target", -1),
                                         ("history", [3, 10]), ("target", 10)])  # 10 = V: one past the last item
def test_an_item_index_outside_the_catalog_is_one_line(tmp_path, column, bad):
    """Damaged pages decode to any number, and the start check reads only the Parquet statistics: training
    indexed its item table with 2054817167 (an IndexError traceback, exit 1)."""
    rows = {"history": [[1, 2], [2, 3]], "target": [3, 4], "user": [None, None], "session": ["a", "b"]}
    rows[column] = [rows[column][0], bad]
    pq.write_table(pa.Table.from_pydict(rows, schema=SESSION_SCHEMA), tmp_path / "p.parquet")
    r = SessionReader([tmp_path / "p.parquet"], rank=0, world_size=1, global_batch_size=2, max_len=50, seed=0,
                      shuffle=False, drop_last=True, num_items=10)
    with pytest.raises(DataError, match=rf"p.parquet: row group 0: a {column} item index outside 0..9 \(damaged"):
        list(r.epoch(0))


def test_a_page_that_does_not_decode_is_one_line(tmp_path):
    """Damaged compressed pages failed inside pyarrow ("Corrupt snappy compressed data"): an OSError traceback."""
    n, rng = 2000, np.random.default_rng(0)
    rows = {"history": rng.integers(0, 7, (n, 3)).tolist(), "target": rng.integers(0, 7, n).tolist(),
            "user": [None] * n, "session": [str(i) for i in range(n)]}
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pydict(rows, schema=SESSION_SCHEMA), path, compression="snappy")
    damage_at = pq.ParquetFile(path).metadata.row_group(0).column(0).data_page_offset + 52  # in its compressed data
    data = bytearray(path.read_bytes())
    data[damage_at:damage_at + 2] = b"\xff\x7f"
    path.write_bytes(bytes(data))
    r = SessionReader([path], rank=0, world_size=1, global_batch_size=10, max_len=50, seed=0, shuffle=False,
                      drop_last=True, num_items=7)
    with pytest.raises(DataError, match=r"p.parquet: row group 0: cannot read \(.*\)$"):
        list(r.epoch(0))
