"""RecBole atomic files (`.inter`, `.item`, item2index): sessions with their train/valid/test split kept."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alterrec_dist.common.errors import DataError
from alterrec_dist.data.layout import SPLITS, first_duplicate
from alterrec_dist.data.sources.tables import (Pairs, Source, append_targets, check_unique_ids, event_positions,
                                               join_texts, keep_long_sessions, parse_ints, raise_at_first, read_table,
                                               split_tokens, string_column)


# -- RecBole atomic files -----------------------------------------------------------------------------
def read_recbole(path: str | Path, name: str | None = None, drop_short: bool = False) -> Source:
    """`NAME.{train,valid,test}.inter`, `NAME.item2index` and optional `NAME.text` in `path`.

    The dataset's own split is kept, train rows as they are (already prefix-expanded).
    item_idx = the dataset's index, shifted down by one if the indices run 1..V.
    """
    directory = Path(path)
    name = name or _recbole_name(directory)
    *inter_files, item2index, text_file = recbole_files(directory, name)
    item_ids, base = _read_item2index(item2index)
    texts = _read_recbole_text(text_file, item_ids) if text_file.exists() else [None] * len(item_ids)
    inter = dict(zip(SPLITS, inter_files))
    splits = {split: _read_recbole_inter(inter[split], len(item_ids), base, drop_short) for split in SPLITS}
    files = [*inter.values(), item2index] + ([text_file] if text_file.exists() else [])
    return Source("recbole", files, {"path": str(directory), "name": name, "drop_short": drop_short},
                  item_ids, texts, splits, notes={"item_index_base": base})


def recbole_files(path: str | Path, name: str | None = None) -> list[Path]:
    """What `read_recbole` reads in directory `path`: NAME.{train,valid,test}.inter, NAME.item2index and
    NAME.text (read where it exists), in that order; NAME from the one *.train.inter where not given."""
    directory = Path(path)
    name = name or _recbole_name(directory)
    return [*(directory / f"{name}.{split}.inter" for split in SPLITS), directory / f"{name}.item2index",
            directory / f"{name}.text"]


def _recbole_name(directory: Path) -> str:
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    names = sorted(p.name[: -len(".train.inter")] for p in directory.glob("*.train.inter"))
    if len(names) != 1:
        raise DataError(f"{directory}: expected one *.train.inter file, found {len(names)} (pass --name)")
    return names[0]


def _read_item2index(path: Path) -> tuple[pa.Array, int]:
    """Item ids in index order, and the index base (0, or 1 for 1..V indices)."""
    table = read_table(path, ["item_id", "index"], delimiter="\t", column_names=["item_id", "index"])
    ids = string_column(table, "item_id", path)
    check_unique_ids(ids, path, "item_id")
    index = parse_ints(table["index"].combine_chunks(), path, "index")
    dup = first_duplicate(pa.array(index))
    if dup is not None:
        raise DataError(f"{path}: row {dup + 1}, column index: duplicate index {index[dup]}")
    base = int(index.min())
    if base not in (0, 1) or int(index.max()) != base + len(index) - 1:
        raise DataError(f"{path}: item indices run {index.min()}..{index.max()} for {len(index)} items; "
                        f"expected 0..V-1 or 1..V with no gaps")
    return ids.take(pa.array(np.argsort(index))), base


def _read_recbole_text(path: Path, item_ids: pa.Array) -> list[str | None]:
    table = read_table(path, ["item_id", "text"], delimiter="\t", typed_header=True)
    ids = string_column(table, "item_id", path)
    check_unique_ids(ids, path, "item_id")
    idx = pc.index_in(ids, value_set=item_ids)
    raise_at_first(pc.is_null(idx).to_numpy(zero_copy_only=False), path, "item_id", "item not in item2index")
    texts: list[str | None] = [None] * len(item_ids)
    for i, text in zip(idx.to_numpy(), join_texts(table, ["text"], path)):
        texts[i] = text
    return texts


def _read_recbole_inter(path: Path, num_items: int, base: int, drop_short: bool) -> Pairs:
    table = read_table(path, ["item_id_list", "item_id"], optional=["user_id"], delimiter="\t", typed_header=True)
    tokens, counts = split_tokens(_strings_or_empty(table, "item_id_list"))
    rows = np.repeat(np.arange(table.num_rows), counts)
    history = parse_ints(tokens, path, "item_id_list", rows) - base
    target = parse_ints(table["item_id"].combine_chunks(), path, "item_id") - base
    for column, values, where in (("item_id_list", history, rows), ("item_id", target, None)):
        raise_at_first((values < 0) | (values >= num_items), path, column,
                        f"item index outside the {num_items:,} items of item2index", where)
    keep = keep_long_sessions(counts + 1, lambda i: f"{path}: row {i + 1}", drop_short)
    offsets, values = append_targets(counts[keep], history[np.repeat(keep, counts)], target[keep])
    rel, length = event_positions(offsets)
    if "user_id" not in table.column_names:
        return Pairs.where(values, offsets, rel == length - 1)
    # Each row is its own (prefix) session; grouping rows by user makes the manifest count users.
    users = pc.dictionary_encode(string_column(table, "user_id", path).filter(pa.array(keep)))
    return Pairs.where(values, offsets, rel == length - 1, user=users.dictionary,
                       session_group=users.indices.to_numpy().astype(np.int64))


def _strings_or_empty(table: pa.Table, name: str) -> pa.Array:
    """A string column where empty values are data (an empty history), nulls read as empty."""
    return table[name].combine_chunks().cast(pa.string()).fill_null("")
