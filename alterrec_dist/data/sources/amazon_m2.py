"""Amazon-M2 (KDD Cup 2023) task-2 sessions, their row-aligned labels and the optional products file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alterrec_dist.common.errors import DataError
from alterrec_dist.data.layout import first_duplicate
from alterrec_dist.data.sources.tables import (TEST, TRAIN, VALID, Pairs, Source, append_targets, as_text,
                                               blank_mask, check_unique_ids, counts_to_offsets, decoded_column,
                                               event_positions, join_texts, keep_long_sessions, nan_mask,
                                               raise_at_first, read_table, split_tokens, string_column)


# -- Amazon-M2 (KDD Cup 2023, task 2) --------------------------------------------------------------
# str(np.array([...])), wrapped or not; the ids are then split on whitespace, so an id may not hold any
NUMPY_ID = r"""('[^'\s]*'|"[^"\s]*")"""
NUMPY_LIST = rf"""^\s*\[\s*({NUMPY_ID}(\s+{NUMPY_ID})*)?\s*\]\s*$"""  # ids apart: numpy puts space between them


@dataclass
class _M2Sessions:
    """The kept sessions of one sessions file: items as ASIN strings (the label appended as
    the last item), `global_row` = row number across all sessions files given."""

    tokens: pa.Array
    counts: np.ndarray
    global_row: np.ndarray
    rows_in_file: int
    dropped: int


def read_amazon_m2(sessions: list[str | Path], labels: list[str | Path] = (), products: str | Path | None = None,
                   locale: str | None = None, valid_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0,
                   drop_short: bool = False) -> Source:
    """KDD Cup 2023 task-2 sessions (+ their next_item: a column of the sessions file, as in the release's
    sessions_train.csv, or row-aligned labels files; without either the last item of a session is its
    target), split by session at random (seeded) into train/valid/test.

    Train rows are all prefix→next pairs of a training session; valid/test rows are
    history = prev_items, target = next_item. Items = every ASIN seen (plus products' ids),
    sorted; texts = title. brand. desc from `products` where given.
    """
    sessions, labels = [Path(p) for p in sessions], [Path(p) for p in labels]
    if labels and len(labels) != len(sessions):
        raise DataError(f"{', '.join(map(str, labels))}: give --labels once per --sessions file "
                        f"({len(labels)} labels files for {len(sessions)} sessions files)")
    parts, first_row, locales_seen, dropped = [], 0, set(), 0
    for i, path in enumerate(sessions):
        part, file_locales = _read_m2_file(path, labels[i] if labels else None, locale, first_row, drop_short)
        parts.append(part)
        locales_seen |= file_locales
        first_row += part.rows_in_file
        dropped += part.dropped
    if locale is not None and not sum(len(p.counts) for p in parts):
        raise DataError(f"{', '.join(map(str, sessions))}: no sessions with --locale {locale} "
                        f"(locales present: {', '.join(sorted(locales_seen)) or 'none'})")
    tokens = pa.concat_arrays([p.tokens for p in parts])
    counts = np.concatenate([p.counts for p in parts])
    global_row = np.concatenate([p.global_row for p in parts])

    kept_locales = {locale} if locale else locales_seen or None  # None: sessions carry no locale
    product_ids, product_texts = (_read_products(Path(products), kept_locales)
                                  if products else (pa.array([], pa.string()), []))
    item_ids = pc.unique(pa.concat_arrays([tokens, product_ids]))
    item_ids = item_ids.take(pc.sort_indices(item_ids))
    values = pc.index_in(tokens, value_set=item_ids).to_numpy().astype(np.int64)
    texts: list[str | None] = [None] * len(item_ids)
    for i, text in zip(pc.index_in(product_ids, value_set=item_ids).to_numpy(zero_copy_only=False), product_texts):
        texts[i] = text

    split_of = _random_split(len(counts), valid_frac, test_frac, seed)
    offsets = counts_to_offsets(counts)
    rel, length = event_positions(offsets)
    event_split = np.repeat(split_of, counts)
    session_id = pa.array(global_row.astype(str))
    splits = {
        TRAIN: Pairs.where(values, offsets, (event_split == 0) & (rel >= 1), session=session_id),
        VALID: Pairs.where(values, offsets, (event_split == 1) & (rel == length - 1), session=session_id),
        TEST: Pairs.where(values, offsets, (event_split == 2) & (rel == length - 1), session=session_id),
    }
    params = {"sessions": [str(p) for p in sessions], "labels": [str(p) for p in labels],
              "products": str(products) if products else None, "locale": locale, "valid_frac": valid_frac,
              "test_frac": test_frac, "seed": seed, "drop_short": drop_short}
    # each file once: --labels may name a sessions file (its own next_item column)
    files = list(dict.fromkeys(sessions + labels + ([Path(products)] if products else [])))
    return Source("amazon-m2", files, params, item_ids, texts, splits, notes={"dropped_short_sessions": dropped})


def _read_m2_file(path: Path, labels: Path | None, locale: str | None, first_row: int,
                  drop_short: bool) -> tuple[_M2Sessions, set[str]]:
    """One sessions file (+ its labels: a --labels file, or its own next_item column as in the release's
    sessions_train.csv, which --labels may then name), restricted to `locale`; also the locales it holds."""
    table = read_table(path, ["prev_items"], optional=["locale", "next_item"])
    if locale is not None and "locale" not in table.column_names:
        raise DataError(f"{path}: --locale given but the file has no locale column")
    locales = string_column(table, "locale", path) if "locale" in table.column_names else None
    tokens, counts = _session_items(table["prev_items"].combine_chunks(), path)
    own = _own_labels(table, path)
    if own is not None:
        if labels is not None and labels.resolve() != path.resolve():
            raise DataError(f"{path}: has its own next_item column, and --labels {labels} gives another: give one "
                            f"(--labels {path} names its own)")
        tokens, counts = _append_labels(tokens, counts, own)
    elif labels is not None:
        tokens, counts = _append_labels(tokens, counts, _read_m2_labels(labels, table.num_rows, locales))
    rows = (np.arange(table.num_rows) if locale is None
            else np.nonzero(pc.equal(locales, locale).to_numpy(zero_copy_only=False))[0])
    long = keep_long_sessions(counts[rows], lambda i: f"{path}: row {rows[i] + 1}", drop_short)
    keep = np.zeros(table.num_rows, dtype=bool)
    keep[rows[long]] = True
    part = _M2Sessions(tokens.filter(pa.array(np.repeat(keep, counts))), counts[keep],
                       np.nonzero(keep)[0] + first_row, table.num_rows, int((~long).sum()))
    return part, set(pc.unique(locales).to_pylist()) if locales is not None else set()


def _own_labels(table: pa.Table, path: Path) -> pa.Array | None:
    """The sessions file's own next_item column; None without one, or where it is empty on every row (a header
    only: a file written without labels), which leaves the labels to --labels or the last item."""
    if "next_item" not in table.column_names:
        return None
    if blank_mask(as_text(decoded_column(table, "next_item"), path, "next_item")).all():
        return None
    return string_column(table, "next_item", path)


def _session_items(col: pa.Array, path: Path) -> tuple[pa.Array, np.ndarray]:
    """prev_items as (all ASINs in order, count per row), from a Parquet list column or the
    numpy-style string the CSV release stores ("['B09W9FND7K' 'B09JSPLN1M']")."""
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        raise_at_first(pc.is_null(col).to_numpy(zero_copy_only=False), path, "prev_items", "null list")
        flat = pc.list_flatten(col)
        rows = pc.list_parent_indices(col).to_numpy()
        raise_at_first(nan_mask(flat), path, "prev_items", "NaN is not an item id", rows)
        tokens = as_text(flat, path, "prev_items")
        bad = pc.or_kleene(pc.is_null(tokens), pc.equal(tokens, "")).fill_null(True)
        raise_at_first(bad, path, "prev_items", "null or empty item id", rows)
        return tokens, pc.list_value_length(col).to_numpy().astype(np.int64)
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        raise DataError(f"{path}: column prev_items: expected a list of ASINs, got {col.type}")
    col = col.cast(pa.string())
    ok = pc.match_substring_regex(col, NUMPY_LIST).fill_null(False)
    raise_at_first(pc.invert(ok).to_numpy(zero_copy_only=False), path, "prev_items",
                    "not a list like \"['B09W9FND7K' 'B09JSPLN1M']\" (ids without spaces)")
    # the list's brackets off, split on whitespace, then each id's own quotes off (numpy quotes an id holding
    # an apostrophe with double quotes: "A'B" is one id, which stripping every quote character split in two)
    tokens, counts = split_tokens(pc.replace_substring_regex(col, r"^\s*\[|\]\s*$", " "))
    tokens = pc.replace_substring_regex(tokens, r"""^'(.*)'$|^"(.*)"$""", r"\1\2")
    raise_at_first(pc.equal(tokens, "").to_numpy(zero_copy_only=False), path, "prev_items", "empty item id ('')",
                   np.repeat(np.arange(len(counts)), counts))
    return tokens, counts


def _read_m2_labels(path: Path, num_sessions: int, session_locales: pa.Array | None) -> pa.Array:
    table = read_table(path, ["next_item"], optional=["locale"])
    if table.num_rows != num_sessions:
        raise DataError(f"{path}: {table.num_rows:,} labels for {num_sessions:,} sessions (files must be row-aligned)")
    if session_locales is not None and "locale" in table.column_names:
        differs = pc.not_equal(string_column(table, "locale", path), session_locales)
        raise_at_first(differs.to_numpy(zero_copy_only=False), path, "locale", "locale differs from the sessions file")
    return string_column(table, "next_item", path)


def _append_labels(tokens: pa.Array, counts: np.ndarray, labels: pa.Array) -> tuple[pa.Array, np.ndarray]:
    offsets, order = append_targets(counts, np.arange(len(tokens)), len(tokens) + np.arange(len(labels)))
    return pa.concat_arrays([tokens, labels]).take(pa.array(order)), counts + 1


def _read_products(path: Path, locales: set[str] | None) -> tuple[pa.Array, list[str | None]]:
    """Product ids and texts (title. brand. desc) of the given locales (None: all), first row
    per id. The release repeats an id once per locale, so ids are unique per (id, locale)."""
    table = read_table(path, ["id"], optional=["locale", "title", "brand", "desc"])
    ids = string_column(table, "id", path)
    if "locale" in table.column_names:
        locale = string_column(table, "locale", path)
        dup = first_duplicate(pc.binary_join_element_wise(ids, locale, "\x00"))
        if dup is not None:
            raise DataError(f"{path}: row {dup + 1}, column id: duplicate item id {ids[dup].as_py()!r} "
                            f"in locale {locale[dup].as_py()!r}")
        if locales is not None:
            wanted = pc.is_in(locale, value_set=pa.array(sorted(locales), pa.string()))
            table, ids = table.filter(wanted), ids.filter(wanted)
    else:
        check_unique_ids(ids, path, "id")
    first = np.unique(pc.dictionary_encode(ids).indices.to_numpy(), return_index=True)[1]
    texts = join_texts(table, [c for c in ("title", "brand", "desc") if c in table.column_names], path)
    return ids.take(pa.array(first)), [texts[i] for i in first]


def _random_split(n: int, valid_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """0/1/2 (train/valid/test) per session; each held-out split gets at least one session."""
    if not (0 < valid_frac and 0 < test_frac and valid_frac + test_frac < 1):
        raise DataError(f"--valid-frac {valid_frac} / --test-frac {test_frac}: need both > 0 and a sum < 1")
    n_valid, n_test = max(1, round(n * valid_frac)), max(1, round(n * test_frac))
    split = np.zeros(n, dtype=np.int8)
    order = np.random.default_rng(seed).permutation(n)
    split[order[:n_valid]] = 1
    split[order[n_valid: n_valid + n_test]] = 2
    return split
