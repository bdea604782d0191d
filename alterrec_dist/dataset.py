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

from alterrec_dist.errors import DataError, one_line
from alterrec_dist.files import Staged, atomic_write_json, check_keys, check_out, file_sha256, read_manifest

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
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
            (self.tmp / "text_features").mkdir(parents=True)
            for split in SPLITS:
                (self.tmp / "sessions" / split).mkdir(parents=True)
        except OSError as e:
            self.staged.abort()
            raise DataError(f"{self.out}: cannot write beside it ({e.strerror or e})") from None
        self.rows_per_part = rows_per_part
        self.feature_rows_per_part = feature_rows_per_part
        self._pending = {s: [] for s in SPLITS}  # buffered pyarrow tables not yet written
        self._pending_rows = {s: 0 for s in SPLITS}
        self._parts = {s: [] for s in SPLITS}
        self._rows = {s: 0 for s in SPLITS}
        self._train_target_counts = np.zeros(0, dtype=np.int64)
        self._feature_parts: list[dict] = []
        self._feature_rows = 0
        self._feature_buffer: list[np.ndarray] = []
        self._text_dim: int | None = None
        self._num_items: int | None = None
        self._has_text: np.ndarray | None = None

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
        table = pa.Table.from_arrays(
            [
                hist.cast(pa.list_(pa.int32())),
                pa.array(np.asarray(target, dtype=np.int32)),
                pa.array(user, type=pa.string()) if user is not None else pa.nulls(n, pa.string()),
                pa.array(session, type=pa.string()) if session is not None else pa.nulls(n, pa.string()),
            ],
            schema=SESSION_SCHEMA,
        )
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
        """item_id[i] is the original id of item_idx i; text[i] may be None (no text)."""
        n = len(item_id)
        ids = pa.array(item_id, type=pa.string())
        if ids.null_count:
            raise DataError("item table: null item id")
        self._num_items = n
        self._item_ids = ids
        self._item_text = pa.array(text, type=pa.string()) if text is not None else pa.nulls(n, pa.string())

    def add_text_features(self, block: np.ndarray) -> None:
        """Append rows (in item_idx order) of the frozen text features; stored as float16."""
        block = np.asarray(block, dtype=np.float16)
        if block.ndim != 2:
            raise ValueError("text feature block must be 2-D")
        if self._text_dim is None:
            self._text_dim = block.shape[1]
        elif block.shape[1] != self._text_dim:
            raise ValueError(f"text feature dim changed from {self._text_dim} to {block.shape[1]}")
        self._feature_buffer.append(block)
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
        has_text = self._has_text if self._has_text is not None else np.ones(V, dtype=bool)
        if len(has_text) != V:
            raise ValueError("has_text mask length differs from the item count")
        np.save(self.tmp / "text_features" / "has_text.npy", has_text)
        if len(self._train_target_counts) > V:
            raise DataError(f"{self.out}: a train target is >= V={V}")
        popularity = np.zeros(V, dtype=np.int64)
        popularity[: len(self._train_target_counts)] = self._train_target_counts
        items = pa.Table.from_arrays(
            [pa.array(np.arange(V, dtype=np.int32)), self._item_ids, self._item_text, pa.array(popularity)],
            schema=ITEM_SCHEMA,
        )
        pq.write_table(items, self.tmp / "items.parquet")
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
        atomic_write_json(self.tmp / "manifest.json", manifest)
        return self.staged.commit()  # replacing only with overwrite=True (checked at start)

    def abort(self) -> None:
        self.staged.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self.tmp.exists():
            self.abort()
        return False


def data_files(manifest: dict) -> list[str]:
    """Every file a dataset manifest names, relative to the dataset directory."""
    text = manifest["text"]
    return (["items.parquet", text["has_text"]] + [p["file"] for p in text["files"]]
            + [p["file"] for s in SPLITS for p in manifest["session_files"][s]])


# The manifest's shape: key -> type, and the keys of its sub-tables (what the read side relies on).
MANIFEST_KEYS = {"format_version": int, "num_items": int, "splits": dict, "session_files": dict, "text": dict}
TEXT_KEYS = {"dim": int, "files": list, "has_text": str}
INCOMPLETE = "an incomplete manifest: make the dataset again"


class Dataset:
    """Read side of the layout. Cheap to open: only the manifest is read eagerly (and checked for
    the keys the readers use). `check()` is the cheap always-on check of the files against it,
    `verify()` the full one (checksums, every item index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.mpath = self.path / "manifest.json"
        self.manifest = read_manifest(self.path, "no dataset manifest (make one with `python -m alterrec_dist.prepare` "
                                      "or `synth`)", MANIFEST_KEYS, FORMAT_VERSION, INCOMPLETE)
        self._check_keys()
        self.num_items: int = self.manifest["num_items"]
        self.text_dim: int = self.manifest["text"]["dim"]

    def _check_keys(self) -> None:
        m = self.manifest
        check_keys(self.mpath, m["text"], TEXT_KEYS, INCOMPLETE, prefix="text.")
        for split in SPLITS:
            parts = m["session_files"].get(split)
            if not isinstance(m["splits"].get(split), int) or not isinstance(parts, list) or not all(
                    isinstance(p, dict) and isinstance(p.get("file"), str) and isinstance(p.get("rows"), int)
                    for p in parts):
                raise DataError(f"{self.mpath}: splits/session_files of {split!r} missing or malformed")
        if not all(isinstance(p, dict) and isinstance(p.get("file"), str) and isinstance(p.get("rows"), int)
                   for p in m["text"]["files"]):
            raise DataError(f"{self.mpath}: text.files entries need a file and rows")
        if m["num_items"] < 1 or m["text"]["dim"] < 1:
            raise DataError(f"{self.mpath}: num_items and text.dim must be >= 1")

    # -- checks ---------------------------------------------------------------------------------
    def check(self) -> None:
        """The cheap check run at every training start: every file the manifest names is there
        with the size, shape and row count it says, and every item index is in 0..V-1 by the
        Parquet statistics (min/max per row group; a file without them is read). DataError naming
        the file otherwise. Reads metadata and .npy headers only: milliseconds at V = 1M."""
        V, m = self.num_items, self.manifest
        self._check_items_parquet()
        self._check_npy(m["text"]["has_text"], (V,), np.dtype(bool))
        rows = 0
        for part in m["text"]["files"]:
            self._check_npy(part["file"], (part["rows"], self.text_dim), np.dtype(np.float16))
            rows += part["rows"]
        if rows != V:
            raise DataError(f"{self.mpath}: text.files hold {rows:,} rows for {V:,} items")
        for split in SPLITS:
            parts = m["session_files"][split]
            if sum(p["rows"] for p in parts) != m["splits"][split]:
                raise DataError(f"{self.mpath}: the {split} files hold {sum(p['rows'] for p in parts):,} rows, "
                                f"splits.{split} says {m['splits'][split]:,}")
            for part in parts:
                self._check_sessions(part["file"], part["rows"], full=False)

    def verify(self) -> list[str]:
        """`check()`, then every file's sha256 against the manifest and every item index read in
        full. Returns notes (e.g. a dataset made before checksums were recorded); DataError on damage."""
        self.check()
        notes = []
        digests = self.manifest.get("sha256")
        if not isinstance(digests, dict):
            notes.append(f"{self.mpath}: no sha256 recorded (made before checksums were); sizes, shapes "
                         "and item indices checked")
        else:
            for name in data_files(self.manifest):
                if digests.get(name) != file_sha256(self.path / name):
                    raise DataError(f"{self.path / name}: sha256 does not match {self.mpath}")
        for split in SPLITS:
            for part in self.manifest["session_files"][split]:
                self._check_sessions(part["file"], part["rows"], full=True)
        return notes

    def _file(self, name: str) -> Path:
        path = self.path / name
        if not path.is_file():
            raise DataError(f"{path}: missing (named in {self.mpath})")
        return path

    def _parquet_metadata(self, path: Path):
        try:
            return pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file (truncated?) ({one_line(e)})") from None

    def _check_items_parquet(self) -> None:
        path = self._file("items.parquet")
        meta = self._parquet_metadata(path)
        if meta.num_rows != self.num_items:
            raise DataError(f"{path}: {meta.num_rows:,} rows, the manifest says {self.num_items:,} items")

    def _check_npy(self, name: str, shape: tuple, dtype: np.dtype) -> None:
        path = self._file(name)
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                got_shape, fortran, got_dtype = read_header(f)
                header = f.tell()
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a .npy file (truncated?) ({one_line(e)})") from None
        if got_shape != shape or got_dtype != dtype or fortran:
            raise DataError(f"{path}: array {got_dtype}{list(got_shape)}, the manifest says {dtype}{list(shape)}")
        size, want = path.stat().st_size, header + int(np.prod(shape)) * dtype.itemsize
        if size != want:
            raise DataError(f"{path}: {size:,} bytes, a {dtype}{list(shape)} array takes {want:,} (truncated?)")

    def _check_sessions(self, name: str, rows: int, full: bool) -> None:
        path = self._file(name)
        meta = self._parquet_metadata(path)
        if meta.num_rows != rows:
            raise DataError(f"{path}: {meta.num_rows:,} rows, the manifest says {rows:,}")
        columns = {meta.schema.column(j).path.split(".")[0]: j for j in range(meta.num_columns)}
        if "history" not in columns or "target" not in columns:
            raise DataError(f"{path}: no history/target column (not a session file)")
        lo, hi = (self._read_index_range(path) if full else self._stats_index_range(path, meta, columns))
        if lo is not None and (lo < 0 or hi >= self.num_items):
            bad = lo if lo < 0 else hi
            raise DataError(f"{path}: item index {bad} outside 0..{self.num_items - 1} (V = {self.num_items:,})")

    def _stats_index_range(self, path: Path, meta, columns: dict) -> tuple:
        lo, hi = None, None
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for name in ("history", "target"):
                stats = group.column(columns[name]).statistics
                if group.num_rows and (stats is None or not stats.has_min_max):
                    return self._read_index_range(path)  # no statistics: read the indices
                if group.num_rows:
                    lo = stats.min if lo is None else min(lo, stats.min)
                    hi = stats.max if hi is None else max(hi, stats.max)
        return lo, hi

    def _read_index_range(self, path: Path) -> tuple:
        try:
            table = pq.read_table(path, columns=["history", "target"])
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read ({one_line(e)})") from None
        values = [table["history"].combine_chunks().flatten(), table["target"].combine_chunks()]
        if any(v.null_count for v in values):
            raise DataError(f"{path}: null item index")
        mins = [pc.min(v).as_py() for v in values if len(v)]
        maxs = [pc.max(v).as_py() for v in values if len(v)]
        return (min(mins), max(maxs)) if mins else (None, None)

    def num_rows(self, split: str) -> int:
        return self.manifest["splits"][split]

    def session_files(self, split: str) -> list[Path]:
        return [self.path / p["file"] for p in self.manifest["session_files"][split]]

    def read_sessions(self, split: str) -> pa.Table:
        """The whole split as one table (tests and small data; training streams with reader.py)."""
        return pa.concat_tables(pq.read_table(f, schema=SESSION_SCHEMA) for f in self.session_files(split))

    def items(self) -> pa.Table:
        return pq.read_table(self.path / "items.parquet")

    def popularity(self) -> np.ndarray:
        return pq.read_table(self.path / "items.parquet", columns=["popularity"])["popularity"].to_numpy()

    def has_text(self) -> np.ndarray:
        return np.load(self.path / self.manifest["text"]["has_text"])

    def text_features(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float16 rows `rows` (item_idx, any order) of the text features; all rows if None.

        Parts are memory-mapped, so a worker that owns rows r, r+W, ... reads only those.
        """
        parts = self.manifest["text"]["files"]
        if rows is None:
            return np.concatenate([np.load(self.path / p["file"]) for p in parts])
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.text_dim), dtype=np.float16)
        start = 0
        for p in parts:
            stop = start + p["rows"]
            sel = np.nonzero((rows >= start) & (rows < stop))[0]
            if len(sel):
                out[sel] = np.load(self.path / p["file"], mmap_mode="r")[rows[sel] - start]
            start = stop
        return out
