"""Batch scoring's input: session Parquet files, checked once up front, then streamed in the engine's
global eval batches and cut into its per-rank batches.
"""
from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alterrec_dist.common import storage
from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import resolve_location
from alterrec_dist.common.storage import Location
from alterrec_dist.data.reader import Rows, cut_histories, local_batch, rank_slice


SESSION_COLUMNS = ("history", "target", "user", "session")


# -- reading ----------------------------------------------------------------------------------------

def input_files(paths: list[str]) -> list[Location]:
    """The Parquet files given (local or in a store), a directory standing for its *.parquet files."""
    files = []
    for p in map(resolve_location, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.name.endswith(".parquet"))
            if not found:
                raise DataError(f"{p}: no .parquet files in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: input not found")
    return files


def session_columns(files: list[Location]) -> list[str]:
    """The session columns the files have (the same in every file); `history` is required."""
    cols = None
    for f in files:
        try:
            with storage.open_input(f) as source:
                schema = pq.ParquetFile(source).schema_arrow
        except (OSError, ValueError) as e:
            raise DataError(f"{f}: cannot read Parquet metadata ({e})") from None
        have = [c for c in SESSION_COLUMNS if c in schema.names]
        if "history" not in have:
            raise DataError(f"{f}: no `history` column (session files have history, target, user, session)")
        _check_index_types(f, schema)
        if cols is not None and have != cols:
            raise DataError(f"{f}: session columns {have} differ from {cols} of {files[0]}")
        cols = have
    return cols


LIST_TYPES = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)


def _check_index_types(f: Location, schema: pa.Schema) -> None:
    """`history` and `target` hold item indices, as numbers: ids as strings, or flags as booleans, were cast to
    the indices they spell and scored as other items, exit 0. A float or decimal (SQL exports) is taken when it
    is whole (the cast)."""
    for name in ("history", "target"):
        if name not in schema.names:
            continue
        kind = schema.field(name).type
        if name == "history" and any(is_list(kind) for is_list in LIST_TYPES):
            kind = kind.value_type  # not a list at all: the cast to the session types says so
        if pa.types.is_dictionary(kind):  # pandas' categoricals
            kind = kind.value_type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)):
            raise DataError(f"{f}: column {name} holds {kind}, not item indices (integers 0..V-1: the item_idx "
                            "that the dataset's items.parquet gives each item_id)")


SESSION_TYPES = {"history": pa.list_(pa.int64()), "target": pa.int64(), "user": pa.string(), "session": pa.string()}
CHECK_ROWS = 65_536  # rows read at a time by check_input


def check_input(files: list[Location], columns: list[str], num_items: int) -> int:
    """Every row of the input is a session the engine can score: a non-empty history of item
    indices in 0..V-1 and, where there is a target column, a target in that range; user and
    session read as strings. Read once, every column, streamed, before any scoring (and before
    Ray starts, whose workers' errors are not one line), so bad input is one line naming the
    file and its row (1-based), not a failure after most of the file was scored. Returns the rows."""
    total = 0
    for f in files:
        first = 0
        try:
            for rb in parquet_batches(f, CHECK_ROWS, columns):
                _check_rows(rb, f, first, num_items)
                first += rb.num_rows
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f}: cannot read its sessions ({' '.join(str(e).split())})") from None
        total += first
    if total == 0:
        raise DataError(f"{', '.join(map(str, files))}: no input rows")
    return total


def _check_rows(rb: pa.RecordBatch, f: Location, first: int, num_items: int) -> None:
    def fail_at(mask, what: str, rows: np.ndarray | None = None) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            i = int(np.argmax(mask))
            raise DataError(f"{f}: row {first + 1 + int(rows[i] if rows is not None else i)}: {what}")

    cast = {}
    for name in rb.schema.names:  # the types the scorer casts to, each column once
        try:
            cast[name] = rb.column(name).cast(SESSION_TYPES[name])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"{f}: column {name}: {rb.schema.field(name).type} cannot be read as "
                            f"{SESSION_TYPES[name]} ({' '.join(str(e).split())})") from None
    history, target = cast["history"], cast.get("target")
    fail_at(pc.is_null(history).to_numpy(zero_copy_only=False), "null history")
    fail_at(pc.equal(pc.list_value_length(history), 0).fill_null(False).to_numpy(zero_copy_only=False),
            "empty history")
    items = pc.list_flatten(history)
    parent = pc.list_parent_indices(history).to_numpy()
    fail_at(pc.is_null(items).to_numpy(zero_copy_only=False), "null item in the history", parent)
    values = items.to_numpy(zero_copy_only=False)
    fail_at((values < 0) | (values >= num_items), f"history item outside 0..{num_items - 1}", parent)
    if target is not None:
        fail_at(pc.is_null(target).to_numpy(zero_copy_only=False), "null target")
        t = target.to_numpy(zero_copy_only=False)
        fail_at((t < 0) | (t >= num_items), f"target outside 0..{num_items - 1}")


def iter_tables(files: list[Location], columns: list[str], rows: int):
    """The input as consecutive tables of `rows` rows (the last may be shorter), streamed: at most
    about 2 * `rows` rows are held at a time."""
    schema = pa.schema([(c, SESSION_TYPES[c]) for c in columns])
    pending, held = [], 0
    for f in files:
        for rb in parquet_batches(f, rows, columns):
            try:
                pending.append(pa.Table.from_batches([rb]).select(columns).cast(schema))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(f"{f}: session columns do not have the session types ({e})") from None
            held += rb.num_rows
            while held >= rows:
                table = pa.concat_tables(pending)
                yield table.slice(0, rows)
                pending, held = [table.slice(rows)], held - rows
    if held:
        yield pa.concat_tables(pending)


def table_to_rows(table: pa.Table, first: int, max_len: int, num_items: int, where: str) -> Rows:
    """Session rows, histories cut to their last max_len items (as `reader.read_row_group`)."""
    history = table["history"].combine_chunks()
    if history.null_count or history.flatten().null_count:
        raise DataError(f"{where}: null history or history item")
    offsets, values = cut_histories(history, max_len, where, first)
    if len(values) and (values.min() < 0 or values.max() >= num_items):
        raise DataError(f"{where}: history item outside 0..{num_items - 1}")
    if "target" in table.column_names:
        target = table["target"]
        if target.null_count:
            raise DataError(f"{where}: null target")
        target = target.to_numpy().astype(np.int64)
        if len(target) and (target.min() < 0 or target.max() >= num_items):
            raise DataError(f"{where}: target outside 0..{num_items - 1}")
    else:
        target = np.zeros(len(table), dtype=np.int64)
    return Rows(np.arange(first, first + len(table), dtype=np.int64), offsets, values, target)


def local_batches(rows: Rows, batch_size: int, world: int) -> list:
    """One global eval batch (<= batch_size rows) as the engine's per-rank batches, the reader's way
    (`reader.local_batch`: a short last batch padded, marked invalid)."""
    return [local_batch(rows, rank_slice(r, batch_size, world)) for r in range(world)]


def parquet_batches(path: Location, rows: int, columns: list[str]):
    """The record batches of one Parquet file, local or in a store, read by ranges."""
    with storage.open_input(path) as source:
        yield from pq.ParquetFile(source).iter_batches(batch_size=rows, columns=columns)
