"""Readers for the inputs `prepare` accepts: RecBole atomic files, Amazon-M2 (KDD Cup 2023
task 2) sessions, and any interaction log with an item table.

Each reader validates its whole input before returning, so `prepare` fails fast, before the
slow text encoding. It returns a `Source`: item ids in item_idx order, their texts, and each
split's rows as `Pairs`. Bad input raises `DataError` with one line naming the file; "row N"
in a message is the N-th data row of that file, counting from 1 and not counting the header.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from alterrec_dist.dataset import SPLITS, gather_ranges
from alterrec_dist.errors import DataError

PARQUET_SUFFIXES = (".parquet", ".pq")
TRAIN, VALID, TEST = SPLITS


# -- one table loader for every source --------------------------------------------------------
def read_table(path: str | Path, columns: list[str], optional: list[str] = (), *,
               delimiter: str | None = None, column_names: list[str] | None = None,
               typed_header: bool = False) -> pa.Table:
    """The named columns (and whichever `optional` ones exist) of a CSV/TSV or Parquet file.

    Parquet is recognised by suffix or magic bytes and keeps its column types. Delimited text
    comes back all strings, so ids like "0012" keep their zeros. Delimiter: `,` unless the
    suffix is .tsv/.tab; comma files are quoted (a quoted value may hold newlines), tab files
    are read raw (RecBole writes titles with bare quotes in them). `column_names` is for files
    with no header line; `typed_header` matches RecBole's `name:type` headers by name.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    parquet = _is_parquet(path)
    try:
        if parquet:
            names = pq.read_schema(path).names
            table = pq.read_table(path, columns=_present(path, names, columns, optional))
        else:
            table = _read_delimited(path, columns, optional, delimiter, column_names, typed_header)
    except (pa.ArrowException, OSError, UnicodeDecodeError, csv.Error) as e:
        if not parquet:
            _raise_at_invalid_utf8(path, delimiter, header=column_names is None)
        kind = "Parquet" if parquet else "delimited text"
        raise DataError(f"{path}: cannot read as {kind}: {_one_line(e)}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows")
    return table


def _is_parquet(path: Path) -> bool:
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _present(path: Path, names: list[str], columns: list[str], optional: list[str]) -> list[str]:
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(names)})")
    return list(columns) + [c for c in optional if c in names and c not in columns]


def _read_delimited(path: Path, columns, optional, delimiter, column_names, typed_header) -> pa.Table:
    delimiter = delimiter or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    quoted = delimiter == ","
    if column_names is None:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM is not in a name
            reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
            column_names = next(reader, [])
        skip_rows = 1
    else:
        skip_rows = 0
    names = [n.split(":", 1)[0] for n in column_names] if typed_header else list(column_names)
    wanted = _present(path, names, columns, optional)
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip_rows, block_size=16 << 20),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoted else False,
                                         newlines_in_values=quoted),
        convert_options=pacsv.ConvertOptions(include_columns=wanted, column_types={c: pa.string() for c in wanted},
                                             strings_can_be_null=False, quoted_strings_can_be_null=False),
    )


def _raise_at_invalid_utf8(path: Path, delimiter: str | None, header: bool) -> None:
    """DataError naming the data row (as every other message counts rows) of the first byte that
    is not UTF-8, if there is one; the readers would report a byte offset or a 0-based column.
    Streams the file: the records before the bad line are counted by the csv module (a quoted
    value may span lines)."""
    delimiter = delimiter or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    quoted = delimiter == ","
    quoting = csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE
    bad: dict[str, int] = {}
    quotes = 0  # '"' seen before the bad line: odd means it continues a quoted value

    def decoded_lines(f):
        nonlocal quotes
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                bad.update(line=number, byte=e.start + 1)
                return
            quotes += line.count('"') if quoted else 0
            yield line

    with open(path, "rb") as f:
        records = sum(1 for _ in csv.reader(decoded_lines(f), delimiter=delimiter, quoting=quoting))
    if not bad:
        return
    where = f"line {bad['line']}, byte {bad['byte']} of the line"
    if header and bad["line"] == 1:
        raise DataError(f"{path}: header line: not UTF-8 text ({where})")
    # the bad line starts the next record, or continues the last one read (then counted already)
    row = records + (0 if header else 1) - (quotes % 2)
    raise DataError(f"{path}: row {row}: not UTF-8 text ({where})")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


# -- column checks ------------------------------------------------------------------------------
def _string_column(table: pa.Table, name: str, path: Path) -> pa.Array:
    """A non-null, non-empty string column (ids): Parquet numbers are turned into strings."""
    col = table[name].combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    _raise_at_first(_nan_mask(col), path, name, "NaN is not an id")
    col = col.cast(pa.string())
    bad = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), "")).fill_null(True)
    _raise_at_first(bad, path, name, "empty value")
    return col


def _nan_mask(col: pa.Array) -> np.ndarray:
    """True where a float value is NaN (a float column cast to string would make it the id "nan";
    sorted, a NaN time goes last)."""
    if not pa.types.is_floating(col.type):
        return np.zeros(len(col), dtype=bool)
    return pc.is_nan(col).fill_null(False).to_numpy(zero_copy_only=False)


def _raise_at_first(mask, path: Path, column: str, what: str, rows: np.ndarray | None = None) -> None:
    """DataError at the first True of `mask`; `rows[i]` maps mask entry i to its table row."""
    mask = np.asarray(mask, dtype=bool)
    if mask.any():
        i = int(np.argmax(mask))
        row = int(rows[i]) if rows is not None else i
        raise DataError(f"{path}: row {row + 1}, column {column}: {what}")


def _first_duplicate(values: pa.Array) -> int | None:
    """Index of the first value that repeats an earlier one, or None."""
    codes = pc.dictionary_encode(values).indices.to_numpy()
    is_first = np.zeros(len(codes), dtype=bool)
    is_first[np.unique(codes, return_index=True)[1]] = True
    dups = np.nonzero(~is_first)[0]
    return int(dups[0]) if len(dups) else None


def _check_unique_ids(ids: pa.Array, path: Path, column: str) -> None:
    i = _first_duplicate(ids)
    if i is not None:
        raise DataError(f"{path}: row {i + 1}, column {column}: duplicate item id {ids[i].as_py()!r}")


def _parse_ints(strings: pa.Array, path: Path, column: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Non-negative decimal integers; `rows` maps each entry to its table row for errors."""
    if pa.types.is_integer(strings.type):
        values = strings.to_numpy(zero_copy_only=False)
        _raise_at_first(values < 0, path, column, "negative index", rows)
        return values.astype(np.int64)
    ok = pc.match_substring_regex(strings, r"^\s*\d{1,18}\s*$").fill_null(False).to_numpy(zero_copy_only=False)
    if not ok.all():
        i = int(np.argmax(~ok))
        row = int(rows[i]) if rows is not None else i
        raise DataError(f"{path}: row {row + 1}, column {column}: {strings[i].as_py()!r} is not a non-negative integer")
    return pc.cast(pc.utf8_trim_whitespace(strings), pa.int64()).to_numpy()


def _split_tokens(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Whitespace-separated tokens of each string: (all tokens in order, tokens per row)."""
    lists = pc.split_pattern_regex(pc.utf8_trim_whitespace(col), r"\s+")
    tokens = pc.list_flatten(lists)
    parent = pc.list_parent_indices(lists).to_numpy()
    keep = pc.not_equal(tokens, "").to_numpy(zero_copy_only=False)  # "" splits to [""]
    return tokens.filter(keep), np.bincount(parent[keep], minlength=len(col)).astype(np.int64)


def _join_texts(table: pa.Table, columns: list[str]) -> list[str | None]:
    """Per row, the non-blank values of `columns` joined by ". "; None where all are blank."""
    # Plain Python on purpose: pyarrow 26's binary_join_element_wise(null_handling="skip")
    # drops rows whose values are all null instead of returning null for them.
    cols = [pc.utf8_trim_whitespace(table[name].combine_chunks().cast(pa.string())).to_pylist() for name in columns]
    return [". ".join(v for v in values if v) or None for values in zip(*cols)] if cols else [None] * table.num_rows


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def _keep_long_sessions(lengths: np.ndarray, describe: Callable[[int], str], drop_short: bool) -> np.ndarray:
    """Mask of sessions with at least 2 events; shorter ones are an error unless dropped."""
    short = lengths < 2
    if short.any():
        first = int(np.argmax(short))
        if not drop_short:
            raise DataError(f"{describe(first)}: session shorter than 2 events "
                            f"(pass --drop-short to skip such sessions)")
        print(f"warning: dropped {int(short.sum()):,} sessions shorter than 2 events, "
              f"the first at {describe(first)}", file=sys.stderr)
    return ~short


# -- rows of a split ------------------------------------------------------------------------------
@dataclass
class Pairs:
    """One split's rows without materialising histories: row r is history =
    values[start[r]:pos[r]], target = values[pos[r]]. Sessions lie end to end in `values`, so
    all prefix pairs of a session share its storage. `group[r]` indexes `user`/`session`."""

    values: np.ndarray
    start: np.ndarray
    pos: np.ndarray
    group: np.ndarray
    user: pa.Array | None = None
    session: pa.Array | None = None

    @classmethod
    def where(cls, values: np.ndarray, offsets: np.ndarray, mask: np.ndarray, user: pa.Array | None = None,
              session: pa.Array | None = None, session_group: np.ndarray | None = None) -> "Pairs":
        """Rows for the event positions where `mask` is True, each with its whole session
        before it. `session_group` maps sessions to groups (default: each its own)."""
        of_event = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        pos = np.nonzero(mask)[0]
        group = of_event[pos] if session_group is None else session_group[of_event[pos]]
        return cls(values, offsets[of_event[pos]], pos, group, user, session)

    def __len__(self) -> int:
        return len(self.pos)

    @property
    def num_sessions(self) -> int:
        return len(np.unique(self.group))

    def blocks(self, max_history_items: int = 1 << 22) -> Iterator[tuple[pa.Array, np.ndarray, pa.Array | None, pa.Array | None]]:
        """(history, target, user, session) blocks for `DatasetWriter.add_sessions`, each
        holding at most ~max_history_items history entries so memory stays bounded."""
        ends = np.cumsum(self.pos - self.start)
        r = 0
        while r < len(self):
            before = ends[r - 1] if r else 0
            stop = max(r + 1, int(np.searchsorted(ends, before + max_history_items, side="right")))
            yield self._block(r, stop)
            r = stop

    def _block(self, lo: int, hi: int):
        start, pos, group = self.start[lo:hi], self.pos[lo:hi], self.group[lo:hi]
        offsets, items = gather_ranges(self.values, start, pos - start)
        history = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(items.astype(np.int32)))
        take = pa.array(group)
        return (history, self.values[pos].astype(np.int32),
                self.user.take(take) if self.user is not None else None,
                self.session.take(take) if self.session is not None else None)


def event_positions(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per event: its index inside its session and its session's length."""
    lengths = np.diff(offsets)
    session_start = np.repeat(offsets[:-1], lengths)
    return np.arange(offsets[-1]) - session_start, np.repeat(lengths, lengths)


def _append_targets(history_counts: np.ndarray, history: np.ndarray, targets: np.ndarray):
    """Sessions = each history followed by its target: (offsets, values)."""
    offsets = _offsets(history_counts + 1)
    is_target = np.zeros(offsets[-1], dtype=bool)
    is_target[offsets[1:] - 1] = True
    values = np.empty(offsets[-1], dtype=np.int64)
    values[is_target] = targets
    values[~is_target] = history
    return offsets, values


@dataclass
class Source:
    """What a reader hands `prepare`."""

    kind: str
    files: list[Path]
    params: dict                      # the reader's arguments, recorded in the manifest
    item_ids: pa.Array                # strings; position = item_idx
    texts: list[str | None]           # per item; None where it has no text
    splits: dict[str, Pairs]
    notes: dict = field(default_factory=dict)  # facts the manifest should carry

    def __post_init__(self):
        for split, pairs in self.splits.items():
            if not len(pairs):
                raise DataError(f"{', '.join(map(str, self.files))}: no rows for the {split} split")


# -- RecBole atomic files -----------------------------------------------------------------------------
def read_recbole(path: str | Path, name: str | None = None, drop_short: bool = False) -> Source:
    """`NAME.{train,valid,test}.inter`, `NAME.item2index` and optional `NAME.text` in `path`.

    The dataset's own split is kept, train rows as they are (already prefix-expanded).
    item_idx = the dataset's index, shifted down by one if the indices run 1..V.
    """
    directory = Path(path)
    name = name or _recbole_name(directory)
    item2index = directory / f"{name}.item2index"
    text_file = directory / f"{name}.text"
    item_ids, base = _read_item2index(item2index)
    texts = _read_recbole_text(text_file, item_ids) if text_file.exists() else [None] * len(item_ids)
    inter = {split: directory / f"{name}.{split}.inter" for split in SPLITS}
    splits = {split: _read_recbole_inter(inter[split], len(item_ids), base, drop_short) for split in SPLITS}
    files = [*inter.values(), item2index] + ([text_file] if text_file.exists() else [])
    return Source("recbole", files, {"path": str(directory), "name": name, "drop_short": drop_short},
                  item_ids, texts, splits, notes={"item_index_base": base})


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
    ids = _string_column(table, "item_id", path)
    _check_unique_ids(ids, path, "item_id")
    index = _parse_ints(table["index"].combine_chunks(), path, "index")
    dup = _first_duplicate(pa.array(index))
    if dup is not None:
        raise DataError(f"{path}: row {dup + 1}, column index: duplicate index {index[dup]}")
    base = int(index.min())
    if base not in (0, 1) or int(index.max()) != base + len(index) - 1:
        raise DataError(f"{path}: item indices run {index.min()}..{index.max()} for {len(index)} items; "
                        f"expected 0..V-1 or 1..V with no gaps")
    return ids.take(pa.array(np.argsort(index))), base


def _read_recbole_text(path: Path, item_ids: pa.Array) -> list[str | None]:
    table = read_table(path, ["item_id", "text"], delimiter="\t", typed_header=True)
    ids = _string_column(table, "item_id", path)
    _check_unique_ids(ids, path, "item_id")
    idx = pc.index_in(ids, value_set=item_ids)
    _raise_at_first(pc.is_null(idx).to_numpy(zero_copy_only=False), path, "item_id", "item not in item2index")
    texts: list[str | None] = [None] * len(item_ids)
    for i, text in zip(idx.to_numpy(), _join_texts(table, ["text"])):
        texts[i] = text
    return texts


def _read_recbole_inter(path: Path, num_items: int, base: int, drop_short: bool) -> Pairs:
    table = read_table(path, ["item_id_list", "item_id"], optional=["user_id"], delimiter="\t", typed_header=True)
    tokens, counts = _split_tokens(_strings_or_empty(table, "item_id_list"))
    rows = np.repeat(np.arange(table.num_rows), counts)
    history = _parse_ints(tokens, path, "item_id_list", rows) - base
    target = _parse_ints(table["item_id"].combine_chunks(), path, "item_id") - base
    for column, values, where in (("item_id_list", history, rows), ("item_id", target, None)):
        _raise_at_first((values < 0) | (values >= num_items), path, column,
                        f"item index outside the {num_items:,} items of item2index", where)
    keep = _keep_long_sessions(counts + 1, lambda i: f"{path}: row {i + 1}", drop_short)
    offsets, values = _append_targets(counts[keep], history[np.repeat(keep, counts)], target[keep])
    rel, length = event_positions(offsets)
    if "user_id" not in table.column_names:
        return Pairs.where(values, offsets, rel == length - 1)
    # Each row is its own (prefix) session; grouping rows by user makes the manifest count users.
    users = pc.dictionary_encode(_string_column(table, "user_id", path).filter(pa.array(keep)))
    return Pairs.where(values, offsets, rel == length - 1, user=users.dictionary,
                       session_group=users.indices.to_numpy().astype(np.int64))


def _strings_or_empty(table: pa.Table, name: str) -> pa.Array:
    """A string column where empty values are data (an empty history), nulls read as empty."""
    return table[name].combine_chunks().cast(pa.string()).fill_null("")


# -- Amazon-M2 (KDD Cup 2023, task 2) --------------------------------------------------------------
NUMPY_LIST = r"""^\s*\[(\s*('[^']*'|"[^"]*"))*\s*\]\s*$"""  # str(np.array([...])), wrapped or not


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
    """KDD Cup 2023 task-2 sessions (+ row-aligned labels; without labels the last item of a
    session is its target), split by session at random (seeded) into train/valid/test.

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
    offsets = _offsets(counts)
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
    files = sessions + labels + ([Path(products)] if products else [])
    return Source("amazon-m2", files, params, item_ids, texts, splits, notes={"dropped_short_sessions": dropped})


def _read_m2_file(path: Path, labels: Path | None, locale: str | None, first_row: int,
                  drop_short: bool) -> tuple[_M2Sessions, set[str]]:
    """One sessions file (+ its labels), restricted to `locale`; also the locales it holds."""
    table = read_table(path, ["prev_items"], optional=["locale"])
    if locale is not None and "locale" not in table.column_names:
        raise DataError(f"{path}: --locale given but the file has no locale column")
    locales = _string_column(table, "locale", path) if "locale" in table.column_names else None
    tokens, counts = _session_items(table["prev_items"].combine_chunks(), path)
    if labels is not None:
        tokens, counts = _append_labels(tokens, counts, _read_m2_labels(labels, table.num_rows, locales))
    rows = (np.arange(table.num_rows) if locale is None
            else np.nonzero(pc.equal(locales, locale).to_numpy(zero_copy_only=False))[0])
    long = _keep_long_sessions(counts[rows], lambda i: f"{path}: row {rows[i] + 1}", drop_short)
    keep = np.zeros(table.num_rows, dtype=bool)
    keep[rows[long]] = True
    part = _M2Sessions(tokens.filter(pa.array(np.repeat(keep, counts))), counts[keep],
                       np.nonzero(keep)[0] + first_row, table.num_rows, int((~long).sum()))
    return part, set(pc.unique(locales).to_pylist()) if locales is not None else set()


def _session_items(col: pa.Array, path: Path) -> tuple[pa.Array, np.ndarray]:
    """prev_items as (all ASINs in order, count per row), from a Parquet list column or the
    numpy-style string the CSV release stores ("['B09W9FND7K' 'B09JSPLN1M']")."""
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        _raise_at_first(pc.is_null(col).to_numpy(zero_copy_only=False), path, "prev_items", "null list")
        flat = pc.list_flatten(col)
        rows = pc.list_parent_indices(col).to_numpy()
        _raise_at_first(_nan_mask(flat), path, "prev_items", "NaN is not an item id", rows)
        tokens = flat.cast(pa.string())
        bad = pc.or_kleene(pc.is_null(tokens), pc.equal(tokens, "")).fill_null(True)
        _raise_at_first(bad, path, "prev_items", "null or empty item id", rows)
        return tokens, pc.list_value_length(col).to_numpy().astype(np.int64)
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        raise DataError(f"{path}: column prev_items: expected a list of ASINs, got {col.type}")
    col = col.cast(pa.string())
    ok = pc.match_substring_regex(col, NUMPY_LIST).fill_null(False)
    _raise_at_first(pc.invert(ok).to_numpy(zero_copy_only=False), path, "prev_items",
                    "not a list like \"['B09W9FND7K' 'B09JSPLN1M']\"")
    return _split_tokens(pc.replace_substring_regex(col, r"""[\[\]'"]""", " "))


def _read_m2_labels(path: Path, num_sessions: int, session_locales: pa.Array | None) -> pa.Array:
    table = read_table(path, ["next_item"], optional=["locale"])
    if table.num_rows != num_sessions:
        raise DataError(f"{path}: {table.num_rows:,} labels for {num_sessions:,} sessions (files must be row-aligned)")
    if session_locales is not None and "locale" in table.column_names:
        differs = pc.not_equal(_string_column(table, "locale", path), session_locales)
        _raise_at_first(differs.to_numpy(zero_copy_only=False), path, "locale", "locale differs from the sessions file")
    return _string_column(table, "next_item", path)


def _append_labels(tokens: pa.Array, counts: np.ndarray, labels: pa.Array) -> tuple[pa.Array, np.ndarray]:
    offsets, order = _append_targets(counts, np.arange(len(tokens)), len(tokens) + np.arange(len(labels)))
    return pa.concat_arrays([tokens, labels]).take(pa.array(order)), counts + 1


def _read_products(path: Path, locales: set[str] | None) -> tuple[pa.Array, list[str | None]]:
    """Product ids and texts (title. brand. desc) of the given locales (None: all), first row
    per id. The release repeats an id once per locale, so ids are unique per (id, locale)."""
    table = read_table(path, ["id"], optional=["locale", "title", "brand", "desc"])
    ids = _string_column(table, "id", path)
    if "locale" in table.column_names:
        locale = _string_column(table, "locale", path)
        dup = _first_duplicate(pc.binary_join_element_wise(ids, locale, "\x00"))
        if dup is not None:
            raise DataError(f"{path}: row {dup + 1}, column id: duplicate item id {ids[dup].as_py()!r} "
                            f"in locale {locale[dup].as_py()!r}")
        if locales is not None:
            wanted = pc.is_in(locale, value_set=pa.array(sorted(locales), pa.string()))
            table, ids = table.filter(wanted), ids.filter(wanted)
    else:
        _check_unique_ids(ids, path, "id")
    first = np.unique(pc.dictionary_encode(ids).indices.to_numpy(), return_index=True)[1]
    texts = _join_texts(table, [c for c in ("title", "brand", "desc") if c in table.column_names])
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


# -- any interaction log + item table ---------------------------------------------------------------
def read_log(interactions: str | Path, items: str | Path, user_col: str, item_col: str, time_col: str,
             text_cols: list[str], session_col: str | None = None, item_id_col: str | None = None,
             split: str = "leave-last-out", cutoff: str | None = None, valid_cutoff: str | None = None,
             drop_short: bool = False) -> Source:
    """Sessions from `session_col`, else each user's events; ordered by time (file order on ties).

    leave-last-out: per session the last event is the test target, the second last the valid
    target, the rest train prefix pairs. A 2-event session gives a test row only, a 3-event
    one test + valid: short sessions fill test first, then valid, then train.
    time: a row (history = all earlier events of its session) goes to train if its target
    time is before `valid_cutoff`, valid if before `cutoff`, else test.
    Items are the item table's rows in file order.
    """
    interactions, items = Path(interactions), Path(items)
    item_id_col = item_id_col or item_col
    item_table = read_table(items, [item_id_col, *text_cols])
    item_ids = _string_column(item_table, item_id_col, items)
    _check_unique_ids(item_ids, items, item_id_col)
    texts = _join_texts(item_table, text_cols)

    table = read_table(interactions, [user_col, item_col, time_col] + ([session_col] if session_col else []))
    users = _string_column(table, user_col, interactions)
    idx = pc.index_in(_string_column(table, item_col, interactions), value_set=item_ids)
    _raise_at_first(pc.is_null(idx).to_numpy(zero_copy_only=False), interactions, item_col,
                    f"item not in the item table {items}")
    times, time_kind = _time_numbers(table[time_col].combine_chunks(), f"{interactions}: column {time_col}")
    key_col = session_col or user_col
    keys = pc.dictionary_encode(users if session_col is None else _string_column(table, session_col, interactions))
    codes = keys.indices.to_numpy().astype(np.int64)  # codes follow first appearance: a stable session order
    order = np.lexsort((np.arange(len(codes)), times, codes))
    counts = np.bincount(codes, minlength=len(keys.dictionary))
    first_row = order[_offsets(counts)[:-1]]

    def describe(g: int) -> str:
        kind = "session" if session_col else "user"
        return f"{interactions}: {kind} {keys.dictionary[g].as_py()!r} (row {first_row[g] + 1}, column {key_col})"

    keep = _keep_long_sessions(counts, describe, drop_short)
    order = order[np.repeat(keep, counts)]
    offsets = _offsets(counts[keep])
    values, times = idx.to_numpy().astype(np.int64)[order], times[order]
    user = users.take(pa.array(first_row[keep]))
    session = keys.dictionary.filter(pa.array(keep)) if session_col else None
    rel, length = event_positions(offsets)
    if split == "leave-last-out":
        masks = {TRAIN: (rel >= 1) & (rel <= length - 3), VALID: (rel == length - 2) & (length >= 3),
                 TEST: rel == length - 1}
    elif split == "time":
        valid_at = _cutoff(valid_cutoff, "--valid-cutoff", time_kind)
        test_at = _cutoff(cutoff, "--cutoff", time_kind)
        if valid_at > test_at:
            raise DataError(f"--valid-cutoff {valid_cutoff} is after --cutoff {cutoff}")
        masks = {TRAIN: (rel >= 1) & (times < valid_at), VALID: (rel >= 1) & (times >= valid_at) & (times < test_at),
                 TEST: (rel >= 1) & (times >= test_at)}
    else:
        raise DataError(f"--split {split}: expected leave-last-out or time")
    params = {"interactions": str(interactions), "items": str(items), "user_col": user_col, "item_col": item_col,
              "time_col": time_col, "session_col": session_col, "item_id_col": item_id_col, "text_cols": text_cols,
              "split": split, "cutoff": cutoff, "valid_cutoff": valid_cutoff, "drop_short": drop_short}
    splits = {s: Pairs.where(values, offsets, masks[s], user=user, session=session) for s in SPLITS}
    return Source("log", [interactions, items], params, item_ids, texts, splits,
                  notes={"dropped_short_sessions": int((~keep).sum())})


TIME_FORMATS = ((pa.int64(), "number"), (pa.float64(), "number"),
                (pa.timestamp("ns"), "time"), (pa.timestamp("ns", "UTC"), "time"))


def _time_numbers(col: pa.Array, where: str) -> tuple[np.ndarray, str]:
    """Times as sortable numbers, and their kind ("number" or "time": ISO-8601 in ns).

    Delimited files give strings: the first format that reads the first value must read all."""
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        values, kind = col, "number"
    elif pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        values, kind = pc.cast(col, pa.timestamp("ns", getattr(col.type, "tz", None))).cast(pa.int64()), "time"
    else:
        values, kind = _parse_times(col.cast(pa.string()), where)
    if values.null_count:
        raise DataError(f"{where}: row {int(np.argmax(pc.is_null(values).to_numpy(zero_copy_only=False))) + 1}: empty time")
    nan = _nan_mask(values)
    if nan.any():
        raise DataError(f"{where}: row {int(np.argmax(nan)) + 1}: time is NaN")
    return values.to_numpy(), kind


def _parse_times(col: pa.Array, where: str) -> tuple[pa.Array, str]:
    for target, kind in TIME_FORMATS:
        try:
            pc.cast(col.slice(0, 1), target)
        except pa.ArrowInvalid:
            continue
        try:
            values = pc.cast(col, target)
        except pa.ArrowInvalid:
            bad = next(i for i, v in enumerate(col.to_pylist()) if not _casts(v, target))
            raise DataError(f"{where}: row {bad + 1}: {col[bad].as_py()!r} is not in the format of row 1 "
                            f"({col[0].as_py()!r})") from None
        return (values.cast(pa.int64()) if kind == "time" else values), kind
    raise DataError(f"{where}: row 1: {col[0].as_py()!r} is neither a number nor an ISO-8601 time")


def _casts(value, target: pa.DataType) -> bool:
    try:
        pc.cast(pa.array([value], pa.string()), target)
        return True
    except pa.ArrowInvalid:
        return False


def _cutoff(value: str | None, flag: str, kind: str):
    if value is None:
        raise DataError(f"{flag} is required with --split time")
    (number,), value_kind = _time_numbers(pa.array([value]), flag)
    if value_kind != kind:
        raise DataError(f"{flag} {value}: a {value_kind}, but the time column holds {kind}s")
    return number
