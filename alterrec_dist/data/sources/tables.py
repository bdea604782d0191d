"""What every reader of an input format shares: one table loader for CSV/TSV and Parquet, the column
checks, and the `Source` (item ids in item_idx order, their texts, each split's rows as `Pairs`)
that each reader (recbole.py, amazon_m2.py, log.py) returns.

Each reader validates its whole input before returning, so `prepare` fails fast, before the
slow text encoding. Bad input raises `DataError` with one line naming the file; "row N" in a
message is the N-th data row of that file, counting from 1 and not counting the header.
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

from alterrec_dist.common.errors import DataError, one_line
from alterrec_dist.data.layout import SPLITS, first_duplicate, gather_ranges


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
        raise DataError(f"{path}: {'a directory, not a file' if path.is_dir() else 'no such file'}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    parquet = _is_parquet(path)
    if not parquet:
        _refuse_other_formats(path, BINARY_FORMATS)
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
        raise DataError(f"{path}: cannot read as {kind}: {one_line(e)}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows")
    return table


def _is_parquet(path: Path) -> bool:
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


# Leading bytes of formats a user may hand over for a CSV: read as text, a gzip file was "header line: not UTF-8
# text" and a JSON array's whole first line (156 kB) came back as its one column name. The binary ones are refused
# up front; text that starts like JSON may still be a CSV (a header `[user],item`), so that is said only when
# its header lacks a column.
BINARY_FORMATS = ((b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"), (b"ARROW1", "Arrow/Feather"))
JSON_STARTS = ((b"[", "JSON"), (b"{", "JSON"))


def _refuse_other_formats(path: Path, formats: tuple[tuple[bytes, str], ...]) -> None:
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    for magic, kind in formats:
        if head.startswith(magic):
            raise DataError(f"{path}: {kind} file, not CSV/TSV or Parquet (prepare reads those, uncompressed)")


MAX_SHOWN_NAMES, MAX_NAME_CHARS = 20, 40


def _present(path: Path, names: list[str], columns: list[str], optional: list[str]) -> list[str]:
    missing = [c for c in columns if c not in names]
    if missing:
        shown = [n if len(n) <= MAX_NAME_CHARS else n[:MAX_NAME_CHARS] + "..." for n in names[:MAX_SHOWN_NAMES]]
        more = f", and {len(names) - MAX_SHOWN_NAMES} more" if len(names) > MAX_SHOWN_NAMES else ""
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(shown)}{more})")
    wanted = list(dict.fromkeys(columns))  # a column two roles name (the item id as text too) is read once
    return wanted + [c for c in optional if c in names and c not in wanted]


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
    try:
        wanted = _present(path, names, columns, optional)
    except DataError:
        _refuse_other_formats(path, JSON_STARTS)
        raise
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
        try:
            records = sum(1 for _ in csv.reader(decoded_lines(f), delimiter=delimiter, quoting=quoting))
        except csv.Error:  # a line csv cannot read either (a field over its size limit): not this check's to name
            return
    if not bad:
        return
    where = f"line {bad['line']}, byte {bad['byte']} of the line"
    if header and bad["line"] == 1:
        raise DataError(f"{path}: header line: not UTF-8 text ({where})")
    # the bad line starts the next record, or continues the last one read (then counted already)
    row = records + (0 if header else 1) - (quotes % 2)
    raise DataError(f"{path}: row {row}: not UTF-8 text ({where})")


# -- column checks ------------------------------------------------------------------------------
def decoded_column(table: pa.Table, name: str) -> pa.Array:
    """Column `name` in one chunk, a dictionary-encoded one decoded."""
    col = table[name].combine_chunks()
    return col.dictionary_decode() if pa.types.is_dictionary(col.type) else col


def as_text(col: pa.Array, path: Path, name: str) -> pa.Array:
    """`col` as strings: Parquet numbers as their digits, a float NaN as null (cast, it would be the text "nan").
    DataError for a type with no text form (a list, a struct) or bytes that are not UTF-8."""
    nan = nan_mask(col)
    if nan.any():
        col = pc.if_else(pa.array(nan), pa.scalar(None, col.type), col)
    try:
        return col.cast(pa.string())
    except pa.ArrowException as e:
        raise DataError(f"{path}: column {name}: {col.type} values cannot be read as text ({one_line(e)})") from None


def string_column(table: pa.Table, name: str, path: Path) -> pa.Array:
    """A non-null, non-empty string column (ids): Parquet numbers are turned into strings."""
    col = decoded_column(table, name)
    raise_at_first(nan_mask(col), path, name, "NaN is not an id")
    col = as_text(col, path, name)
    raise_at_first(blank_mask(col), path, name, "empty value")
    return col


def blank_mask(col: pa.Array) -> np.ndarray:
    """True where a text column is null, empty or only whitespace."""
    blank = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), "")).fill_null(True)
    return blank.to_numpy(zero_copy_only=False)


def nan_mask(col: pa.Array) -> np.ndarray:
    """True where a float value is NaN (a float column cast to string would make it the id "nan";
    sorted, a NaN time goes last)."""
    if not pa.types.is_floating(col.type):
        return np.zeros(len(col), dtype=bool)
    return pc.is_nan(col).fill_null(False).to_numpy(zero_copy_only=False)


def raise_at_first(mask, path: Path, column: str, what: str, rows: np.ndarray | None = None) -> None:
    """DataError at the first True of `mask`; `rows[i]` maps mask entry i to its table row."""
    mask = np.asarray(mask, dtype=bool)
    if mask.any():
        i = int(np.argmax(mask))
        row = int(rows[i]) if rows is not None else i
        raise DataError(f"{path}: row {row + 1}, column {column}: {what}")


def check_unique_ids(ids: pa.Array, path: Path, column: str) -> None:
    i = first_duplicate(ids)
    if i is not None:
        raise DataError(f"{path}: row {i + 1}, column {column}: duplicate item id {ids[i].as_py()!r}")


def parse_ints(strings: pa.Array, path: Path, column: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Non-negative decimal integers; `rows` maps each entry to its table row for errors."""
    if pa.types.is_integer(strings.type):
        values = strings.to_numpy(zero_copy_only=False)
        raise_at_first(values < 0, path, column, "negative index", rows)
        return values.astype(np.int64)
    ok = pc.match_substring_regex(strings, r"^\s*\d{1,18}\s*$").fill_null(False).to_numpy(zero_copy_only=False)
    if not ok.all():
        i = int(np.argmax(~ok))
        row = int(rows[i]) if rows is not None else i
        raise DataError(f"{path}: row {row + 1}, column {column}: {strings[i].as_py()!r} is not a non-negative integer")
    return pc.cast(pc.utf8_trim_whitespace(strings), pa.int64()).to_numpy()


def split_tokens(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Whitespace-separated tokens of each string: (all tokens in order, tokens per row)."""
    lists = pc.split_pattern_regex(pc.utf8_trim_whitespace(col), r"\s+")
    tokens = pc.list_flatten(lists)
    parent = pc.list_parent_indices(lists).to_numpy()
    keep = pc.not_equal(tokens, "").to_numpy(zero_copy_only=False)  # "" splits to [""]
    return tokens.filter(keep), np.bincount(parent[keep], minlength=len(col)).astype(np.int64)


def join_texts(table: pa.Table, columns: list[str], path: Path) -> list[str | None]:
    """Per row, the non-blank values of `columns` joined by ". "; None where all are blank (null or NaN too)."""
    # Plain Python on purpose: pyarrow 26's binary_join_element_wise(null_handling="skip")
    # drops rows whose values are all null instead of returning null for them.
    cols = [pc.utf8_trim_whitespace(as_text(decoded_column(table, name), path, name)).to_pylist() for name in columns]
    return [". ".join(v for v in values if v) or None for values in zip(*cols)] if cols else [None] * table.num_rows


def counts_to_offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def keep_long_sessions(lengths: np.ndarray, describe: Callable[[int], str], drop_short: bool) -> np.ndarray:
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


def append_targets(history_counts: np.ndarray, history: np.ndarray, targets: np.ndarray):
    """Sessions = each history followed by its target: (offsets, values)."""
    offsets = counts_to_offsets(history_counts + 1)
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
