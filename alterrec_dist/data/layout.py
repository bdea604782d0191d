"""The on-disk dataset layout: the one contract between `prepare`/`synth` and training.

    OUT/manifest.json                      format version, V, split sizes, text model/dim, sources, command
    OUT/items.parquet                      item_idx (0..V-1), item_id, text, popularity (train targets)
    OUT/text_features/part-NNNNN.npy       float16 rows of the frozen text features, row = item_idx
    OUT/text_features/has_text.npy         bool[V]: False where the item had no text (its row is zeros)
    OUT/sessions/{train,valid,test}/part-NNNNN.parquet
                                           history list<int32> (oldest first), target int32, user, session

Writers build everything in a hidden sibling directory and rename it into place only in
`commit`, so a crash or a bad input never leaves a half-written OUT behind.
"""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import Staged, atomic_write_json, cannot_write, check_out, file_sha256
from alterrec_dist.common.storage import MANIFEST


FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
ITEMS = "items.parquet"  # OUT/items.parquet, above
MAX_ITEMS = 2**31 - 1  # an item index is an int32 in every session file
SESSION_SCHEMA = pa.schema(
    [
        ("history", pa.list_(pa.int32())),
        ("target", pa.int32()),
        ("user", pa.string()),
        ("session", pa.string()),
    ]
)
ITEM_SCHEMA = pa.schema(
    [
        ("item_idx", pa.int32()),
        ("item_id", pa.string()),
        ("text", pa.string()),
        ("popularity", pa.int64()),
    ]
)


def gather_ranges(values: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ragged rows values[starts[i] : starts[i] + lens[i]] laid end to end: (offsets, values).

    One vectorised gather for every history-building path (readers, prepare, synth)."""
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return offsets, values[np.arange(offsets[-1]) + np.repeat(starts - offsets[:-1], lens)]


def _part_name(i: int, ext: str) -> str:
    return f"part-{i:05d}.{ext}"


def first_duplicate(values: pa.Array) -> int | None:
    """Index of the first value that repeats an earlier one, or None."""
    codes = pc.dictionary_encode(values).indices.to_numpy()
    is_first = np.zeros(len(codes), dtype=bool)
    is_first[np.unique(codes, return_index=True)[1]] = True
    dups = np.nonzero(~is_first)[0]
    return int(dups[0]) if len(dups) else None


def first_non_finite_row(rows: np.ndarray, block: int = 65_536) -> int | None:
    """Index of the first row of a 2-D array holding a NaN or an infinity, or None; a block of rows at a time,
    so memory stays flat whatever the array (a memory map included). One such text feature row makes its
    item's every score NaN: it would never be ranked, or recommended, and its training loss goes NaN."""
    for lo in range(0, len(rows), block):
        bad = np.flatnonzero(~np.isfinite(rows[lo:lo + block]).all(axis=1))
        if len(bad):
            return lo + int(bad[0])
    return None


def nonzero_rows(rows: np.ndarray, block: int = 65_536) -> np.ndarray:
    """Which rows of a 2-D array are not all zeros, a block at a time (flat memory, a memory map included): an
    item has text where its feature row is one, the rule the model reads the rows by (`text_init_rows`)."""
    return np.concatenate([(rows[lo:lo + block] != 0).any(axis=1) for lo in range(0, len(rows), block)]
                          or [np.zeros(0, dtype=bool)])


class DatasetWriter:
    """Streams a dataset into a temp directory; `commit` renames it to `out`.

    Use as a context manager: an exception inside the block removes the temp directory.
    Sessions and text features are appended in blocks and flushed in parts, so memory stays
    bounded by one part however large the dataset.
    """

    def __init__(self, out: str | Path, overwrite: bool = False, rows_per_part: int = 1_000_000,
                 feature_rows_per_part: int = 262_144):
        self.out = check_out(out, overwrite).resolve()
        self.overwrite = overwrite
        self.staged = Staged(self.out)
        self.tmp = self.staged.tmp
        try:
            self.staged.make_dirs("text_features", *(f"sessions/{split}" for split in SPLITS))
        except DataError:
            self.staged.abort()
            raise
        self.rows_per_part = rows_per_part
        self.feature_rows_per_part = feature_rows_per_part
        self._pending = {s: [] for s in SPLITS}  # buffered pyarrow tables not yet written
        self._pending_rows = {s: 0 for s in SPLITS}
        self._parts = {s: [] for s in SPLITS}
        self._rows = {s: 0 for s in SPLITS}
        self._train_target_counts = np.zeros(0, dtype=np.int64)
        self._largest_index = -1  # of every session row added
        self._feature_parts: list[dict] = []
        self._feature_rows = 0
        self._feature_buffer: list[np.ndarray] = []
        self._text_dim: int | None = None
        self._num_items: int | None = None
        self._has_text: np.ndarray | None = None
        self._nonzero_rows: list[np.ndarray] = []  # per feature block: which rows are not all zeros

    # -- sessions -----------------------------------------------------------------------
    def add_sessions(self, split: str, history, target, user=None, session=None) -> None:
        """Append rows. `history` is a list of int lists or a pyarrow list array."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        n = len(target)
        if n == 0:
            return
        hist = history if isinstance(history, (pa.Array, pa.ChunkedArray)) else pa.array(
            history, type=pa.list_(pa.int32()))
        empty = empty_history_rows(hist)
        if len(empty):  # the start-of-training check cannot see it (Parquet keeps no list lengths)
            raise ValueError(f"{split} row {self._rows[split] + int(empty[0]) + 1}: empty or null history (a row "
                             "needs at least one item before its target)")
        table = pa.Table.from_arrays(
            [
                hist.cast(pa.list_(pa.int32())),
                pa.array(np.asarray(target, dtype=np.int32)),
                pa.array(user, type=pa.string()) if user is not None else pa.nulls(n, pa.string()),
                pa.array(session, type=pa.string()) if session is not None else pa.nulls(n, pa.string()),
            ],
            schema=SESSION_SCHEMA,
        )
        self._check_indices(split, table)
        if split == "train":
            t = np.asarray(target, dtype=np.int64)
            counts = np.bincount(t, minlength=len(self._train_target_counts))
            counts[: len(self._train_target_counts)] += self._train_target_counts
            self._train_target_counts = counts
        self._pending[split].append(table)
        self._pending_rows[split] += n
        self._rows[split] += n
        while self._pending_rows[split] >= self.rows_per_part:
            self._flush_sessions(split, self.rows_per_part)

    def _check_indices(self, split: str, table: pa.Table) -> None:
        """Item indices are not negative (checked here, naming the row) nor V or more (at commit, when V is
        known): the writer took both and wrote a dataset that only `verify` or training refused."""
        history = table.column("history").combine_chunks()
        target = table.column("target").to_numpy()
        items, parents = pc.list_flatten(history).to_numpy(), pc.list_parent_indices(history).to_numpy()
        for what, values, rows in (("history item", items, parents), ("target", target, np.arange(len(target)))):
            negative = np.flatnonzero(values < 0)
            if len(negative):
                raise DataError(f"{split} row {self._rows[split] + int(rows[negative[0]]) + 1}: {what} "
                                f"{int(values[negative[0]])} is negative (item indices are 0..V-1)")
        self._largest_index = max(self._largest_index, int(items.max(initial=-1)), int(target.max(initial=-1)))

    def _flush_sessions(self, split: str, max_rows: int) -> None:
        table = pa.concat_tables(self._pending[split])
        head, rest = table.slice(0, max_rows), table.slice(max_rows)
        name = _part_name(len(self._parts[split]), "parquet")
        pq.write_table(head, self.tmp / "sessions" / split / name, row_group_size=65_536)
        self._parts[split].append({"file": f"sessions/{split}/{name}", "rows": head.num_rows})
        self._pending[split] = [rest] if rest.num_rows else []
        self._pending_rows[split] = rest.num_rows

    # -- items and text features ---------------------------------------------------------
    def set_items(self, item_id, text=None) -> None:
        """item_id[i] is the original id of item_idx i, each once; text[i] may be None (no text)."""
        n = len(item_id)
        if n > MAX_ITEMS:
            raise DataError(f"item table: {n:,} items, more than the {MAX_ITEMS:,} an int32 item index can name")
        ids = pa.array(item_id, type=pa.string())
        if ids.null_count:
            raise DataError("item table: null item id")
        dup = first_duplicate(ids)
        if dup is not None:  # serving finds an item by its id: one of the two would never be found
            raise DataError(f"item table: item {dup} repeats the id {ids[dup].as_py()!r} of an earlier item")
        self._num_items = n
        self._item_ids = ids
        self._item_text = pa.array(text, type=pa.string()) if text is not None else pa.nulls(n, pa.string())

    def add_text_features(self, block: np.ndarray) -> None:
        """Append rows (in item_idx order) of the frozen text features; stored as float16."""
        with np.errstate(over="ignore"):  # an overflow is an inf, refused below
            block = np.asarray(block, dtype=np.float16)
        if block.ndim != 2:
            raise ValueError("text feature block must be 2-D")
        bad = first_non_finite_row(block)
        if bad is not None:  # a NaN, or a value past float16's +-65504 (inf once cast)
            raise DataError(f"text features: item_idx {self._feature_rows + bad}: a value that is not finite as "
                            "float16 (NaN, inf, or beyond +-65504)")
        if self._text_dim is None:
            self._text_dim = block.shape[1]
        elif block.shape[1] != self._text_dim:
            raise ValueError(f"text feature dim changed from {self._text_dim} to {block.shape[1]}")
        self._feature_buffer.append(block)
        self._nonzero_rows.append(nonzero_rows(block))
        self._feature_rows += len(block)
        while sum(len(b) for b in self._feature_buffer) >= self.feature_rows_per_part:
            self._flush_features(self.feature_rows_per_part)

    def _flush_features(self, max_rows: int) -> None:
        data = np.concatenate(self._feature_buffer) if len(self._feature_buffer) > 1 else self._feature_buffer[0]
        head, rest = data[:max_rows], data[max_rows:]
        name = _part_name(len(self._feature_parts), "npy")
        np.save(self.tmp / "text_features" / name, head)
        self._feature_parts.append({"file": f"text_features/{name}", "rows": len(head)})
        self._feature_buffer = [rest] if len(rest) else []

    def set_has_text(self, mask: np.ndarray) -> None:
        self._has_text = np.asarray(mask, dtype=bool)

    def _text_mask(self, num_items: int) -> np.ndarray:
        """has_text: an item has text where its feature row is not all zeros (`nonzero_rows`), which the text
        encoder writes too (a zero row for no text). Without a mask it is that rule (every item was marked as
        having text); a mask that marks a zero row is refused."""
        nonzero = np.concatenate(self._nonzero_rows) if self._nonzero_rows else np.zeros(0, dtype=bool)
        if self._has_text is None:
            return nonzero
        if len(self._has_text) != num_items:
            raise ValueError("has_text mask length differs from the item count")
        marked_zero = np.flatnonzero(self._has_text & ~nonzero)
        if len(marked_zero):
            raise DataError(f"text features: item_idx {marked_zero[0]} is marked as having text, but its feature "
                            "row is all zeros")
        return self._has_text

    # -- commit ---------------------------------------------------------------------------
    def commit(self, *, source: dict, text_model: str | None, command: list[str] | None = None,
               extra: dict | None = None) -> Path:
        """Check the pieces agree, write items + manifest, and rename into place."""
        if self._num_items is None:
            raise ValueError("set_items was never called")
        V = self._num_items
        for split in SPLITS:
            if self._pending_rows[split]:
                self._flush_sessions(split, self._pending_rows[split])
            if not self._rows[split]:
                raise DataError(f"{self.out}: split {split!r} is empty")
        if self._feature_buffer:
            self._flush_features(sum(len(b) for b in self._feature_buffer))
        if self._feature_rows != V:
            raise ValueError(f"{self._feature_rows} text feature rows for {V} items")
        has_text = self._text_mask(V)
        np.save(self.tmp / "text_features" / "has_text.npy", has_text)
        if self._largest_index >= V:
            raise DataError(f"{self.out}: item index {self._largest_index} in the sessions, for {V} items (0..{V - 1})")
        popularity = np.zeros(V, dtype=np.int64)
        popularity[: len(self._train_target_counts)] = self._train_target_counts
        items = pa.Table.from_arrays(
            [pa.array(np.arange(V, dtype=np.int32)), self._item_ids, self._item_text, pa.array(popularity)],
            schema=ITEM_SCHEMA,
        )
        pq.write_table(items, self.tmp / ITEMS)
        manifest = {
            "format_version": FORMAT_VERSION,
            "num_items": V,
            "splits": {s: self._rows[s] for s in SPLITS},
            "session_files": {s: self._parts[s] for s in SPLITS},
            "text": {
                "model": text_model,
                "dim": self._text_dim,
                "dtype": "float16",
                "files": self._feature_parts,
                "has_text": "text_features/has_text.npy",
                "num_with_text": int(has_text.sum()),
            },
            "source": source,
            "command": command if command is not None else [sys.executable, *sys.argv],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(extra or {}),
        }
        manifest["sha256"] = {name: file_sha256(self.tmp / name) for name in data_files(manifest)}
        atomic_write_json(self.tmp / MANIFEST, manifest)
        return self.staged.commit()  # replacing only with overwrite=True (checked at start)

    def abort(self) -> None:
        self.staged.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self.tmp.exists():
            self.abort()
        if isinstance(exc, OSError):  # a write that failed (a full disk): said of the dataset
            raise cannot_write(self.out, exc) from None
        return False


def item_files(manifest: dict) -> list[str]:
    """The item side of a dataset (items table, text features), relative to its directory: what a trained
    model's item rows belong to, whatever sessions it is given."""
    text = manifest["text"]
    return [ITEMS, text["has_text"]] + [p["file"] for p in text["files"]]


def empty_history_rows(history: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The rows (0-based) whose history is empty or null: no session row may be, training would stop at it."""
    return np.flatnonzero(pc.fill_null(pc.list_value_length(history), 0).to_numpy() == 0)


def data_files(manifest: dict) -> list[str]:
    """Every file a dataset manifest names, relative to the dataset directory."""
    return item_files(manifest) + [p["file"] for s in SPLITS for p in manifest["session_files"][s]]


# The manifest's shape: key -> type, and the keys of its sub-tables (what the read side relies on).
MANIFEST_KEYS = {"format_version": int, "num_items": int, "splits": dict, "session_files": dict, "text": dict}
TEXT_KEYS = {"dim": int, "files": list, "has_text": str}
INCOMPLETE = "an incomplete manifest: make the dataset again"
