"""The read side of the dataset layout (`layout.py`): `Dataset` opens a dataset by its manifest
and checks its files against it, cheaply at every training start (`check`) or in full (`verify`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alterrec_dist.common import storage
from alterrec_dist.common.errors import DamagedData, DataError, one_line
from alterrec_dist.common.files import check_keys, file_sha256, read_json, read_manifest, resolve_location
from alterrec_dist.common.storage import MANIFEST, Location
from alterrec_dist.data.layout import (FORMAT_VERSION, INCOMPLETE, ITEM_SCHEMA, ITEMS, MANIFEST_KEYS, SESSION_SCHEMA,
                                       SPLITS, TEXT_KEYS, data_files, empty_history_rows, first_non_finite_row,
                                       item_files, nonzero_rows)


def refuse_other_kind(manifest_path: Location) -> None:
    """DataError saying what the directory is, when its manifest is an export's or a saved model's (or a
    checkpoint's): "num_items is missing (make the dataset again)" sent users to remake a dataset they had."""
    try:
        manifest = read_json(manifest_path)
    except DataError:
        return
    if not isinstance(manifest, dict):
        return
    if {"scoring", "engine"} <= manifest.keys():
        kind = "an export (python -m alterrec_dist.export)"
    elif {"world_size", "files"} <= manifest.keys():
        kind = "a saved model or a checkpoint (RUN/model, RUN/checkpoints/...)"
    else:
        return
    raise DataError(f"{manifest_path.parent}: {kind}, not a dataset: give the dataset directory")


class Dataset:
    """Read side of the layout. Cheap to open: only the manifest is read eagerly (and checked for
    the keys the readers use). `check()` is the cheap always-on check of the files against it,
    `verify()` the full one (checksums, every item index). The dataset may be in an object store
    (`path` an s3:// or gs:// URI): every file is then read through the store, Parquet by ranges."""

    def __init__(self, path: str | Location):
        self.path = storage.location(path)
        self.mpath = self.path / MANIFEST
        try:
            self.manifest = read_manifest(self.path, "no dataset manifest (make one with `python -m "
                                          "alterrec_dist.prepare` or `synth`)", MANIFEST_KEYS, FORMAT_VERSION,
                                          INCOMPLETE)
        except DataError:
            refuse_other_kind(self.mpath)
            raise
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
        if set(m["splits"]) != set(SPLITS):
            raise DataError(f"{self.mpath}: splits must be {', '.join(SPLITS)}, got {', '.join(m['splits'])}")
        if m["text"].get("dtype", "float16") != "float16":  # what every reader takes the feature files to hold
            raise DataError(f"{self.mpath}: text.dtype must be float16, got {m['text']['dtype']!r}")
        for name in data_files(m):  # read locally it would leave the dataset; in a store it is refused as a key
            if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                raise DataError(f"{self.mpath}: file {name!r} is not a path inside the dataset")

    @property
    def file_digests(self) -> dict[str, str] | None:
        """File name -> sha256 from the manifest: what the dataset holds, wherever it lives (None for a dataset
        made before checksums were recorded)."""
        digests = self.manifest.get("sha256")
        return digests if isinstance(digests, dict) else None

    def identity(self) -> dict:
        """What a run records of the data it trains on: where it is, its item count, its files' sha256 and its
        item ids' (`item_ids_sha256`)."""
        return {"path": str(self.path), "num_items": self.num_items, "sha256": self.file_digests,
                "item_ids_sha256": self.item_ids_sha256()}

    def files(self) -> list[Location]:
        """Every file reading the dataset reads: its manifest and the files that names. No output goes in the
        directory at all (`files.check_outside`): the dataset's next --overwrite replaces it whole."""
        return [self.mpath, *(self.path / name for name in data_files(self.manifest))]

    def item_ids_sha256(self) -> str:
        """sha256 of the item ids in item_idx order: which item each row is. items.parquet's own sha256 also
        covers the popularity, which moves with the train sessions."""
        return hashlib.sha256(json.dumps(self.item_ids()).encode()).hexdigest()

    def item_ids(self) -> list[str]:
        """The item ids in item_idx order (items.parquet's id column alone, not its texts)."""
        return self._item_id_column().to_pylist()

    def _item_id_column(self) -> pa.Array:
        return read_parquet(self.items_path, columns=["item_id"])["item_id"].combine_chunks()

    def unlike(self, record: Location, items_only: bool = False) -> str | None:
        """How this dataset differs from the `identity()` a run recorded in `record` (RUN/dataset.json), in
        words; None if it holds the same data. Where it lives is not compared: a moved copy is the same data.
        `items_only` compares what a trained model's item rows belong to, whatever the sessions: the item ids
        and the text features (`layout.item_files`). Nothing to compare (None) without a record (a run made
        before it), or when it has no checksums (its dataset was made before them)."""
        if not record.is_file():
            return None
        identity = read_json(record)
        if identity.get("sha256") is None:
            return None
        was, now = dict(identity["sha256"]), dict(self.file_digests or {})
        names = set(item_files(self.manifest)) if items_only else was.keys() | now.keys()
        if items_only and "item_ids_sha256" in identity:  # the ids, not items.parquet's popularity
            names = names - {ITEMS} | {"item ids"}
            was["item ids"], now["item ids"] = identity["item_ids_sha256"], self.item_ids_sha256()
        differ = sorted(name for name in names if was.get(name) != now.get(name))
        if differ:
            more = f", ... ({len(differ)} in all)" if len(differ) > 2 else ""
            return f"not the same {', '.join(differ[:2])}{more}"
        if identity["num_items"] != self.num_items:
            return f"{identity['num_items']} items, not {self.num_items}"
        return None

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
        names = [p["file"] for split in SPLITS for p in m["session_files"][split]]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # its rows would be trained (or scored) twice, or in two splits
            raise DataError(f"{self.mpath}: session file {twice[0]} is listed more than once")
        for split in SPLITS:
            if m["splits"][split] == 0:  # the writer refuses one; an empty valid chose epoch 0 on scores of 0.0
                raise DataError(f"{self.mpath}: the {split} split has no rows (a dataset has rows in every split)")
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
        digests = self.file_digests
        if digests is None:
            notes.append(f"{self.mpath}: no sha256 recorded (made before checksums were); sizes, shapes "
                         "and item indices checked")
        else:
            for name in data_files(self.manifest):
                if digests.get(name) != file_sha256(self.path / name):
                    raise DataError(f"{self.path / name}: sha256 does not match {self.mpath}")
        for split in SPLITS:
            for part in self.manifest["session_files"][split]:
                self._check_sessions(part["file"], part["rows"], full=True)
        self._check_item_values()
        return notes

    def _check_item_values(self) -> None:
        """What a checksum cannot tell (it signs whatever the writer wrote): every item has an id and no id
        is there twice (serving maps an id to one row), the count of items with text is the has_text file's,
        and every text feature is finite (one NaN row makes every score NaN, training's loss included)."""
        path = self.items_path
        ids = self._item_id_column()
        if ids.null_count:
            row = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{path}: row {row + 1}: no item_id ({ids.null_count:,} of {len(ids):,} items have none)")
        counts = pc.value_counts(ids)
        twice = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(twice):
            raise DataError(f"{path}: item_id {twice[0].as_py()!r} names more than one item ({len(twice):,} ids do)")
        has_text = self.has_text()
        with_text = int(has_text.sum())
        if self.manifest["text"].get("num_with_text", with_text) != with_text:
            raise DataError(f"{self.mpath}: text.num_with_text is {self.manifest['text']['num_with_text']}, "
                            f"{self.manifest['text']['has_text']} marks {with_text:,} items with text")
        start = 0
        for part in self.manifest["text"]["files"]:  # memory-mapped, a block at a time: flat memory at any V
            rows = storage.load_npy(self.path / part["file"], mmap=True)
            items = np.arange(start, start + len(rows))
            self._refuse_damaged(part["file"], start, rows, has_text[items], items)
            start += part["rows"]

    def _refuse_damaged(self, name: str, part_start: int, got: np.ndarray, marked: np.ndarray,
                        items: np.ndarray) -> None:
        """DamagedData at the first of the rows `got` (of items `items`, from the feature part `name` that starts
        at item `part_start`) that is not finite, or all zeros for an item `marked` as having text."""
        bad = first_non_finite_row(got)
        if bad is not None:
            raise self._not_finite(name, part_start, int(items[bad]) - part_start)
        zero = np.flatnonzero(marked & ~nonzero_rows(got))
        if len(zero):
            raise self._marked_zero(name, int(items[zero[0]]))

    def _not_finite(self, name: str, part_start: int, row: int) -> DamagedData:
        """Row `row` of the feature part `name` (item_idx part_start + row) holds a NaN or an infinity."""
        return DamagedData(f"{self.path / name}: row {row + 1} (item_idx {part_start + row}): a text feature that is "
                         "not finite (NaN or inf): make the dataset again")

    def _marked_zero(self, name: str, item: int) -> DamagedData:
        """Item `item` is marked as having text while its row of the feature part `name` is all zeros (the writer
        before 71399e4 marked every item when given no mask): a text method would train on zeros as text."""
        return DamagedData(f"{self.path / self.manifest['text']['has_text']}: item_idx {item} is marked as having "
                           f"text, but its row of {name} is all zeros: make the dataset again")

    def _file(self, name: str) -> Location:
        path = self.path / name
        if not path.is_file():
            raise DataError(f"{path}: missing (named in {self.mpath})")
        return path

    def _parquet_metadata(self, path: Location):
        try:
            with storage.open_input(path) as f:
                return pq.ParquetFile(f).metadata
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file (truncated?) ({one_line(e)})") from None

    def _check_items_parquet(self) -> None:
        path = self._file(ITEMS)
        meta = self._parquet_metadata(path)
        if meta.num_rows != self.num_items:
            raise DataError(f"{path}: {meta.num_rows:,} rows, the manifest says {self.num_items:,} items")
        id_type = meta.schema.to_arrow_schema().field("item_id").type if "item_id" in meta.schema.names else None
        if id_type is None or not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            raise DataError(f"{path}: no item_id column of strings ({id_type or 'none'})")
        missing = [name for name in ITEM_SCHEMA.names if name not in meta.schema.names]
        if missing:  # serving reads them all (a KeyError traceback in recommend, export and batch_score)
            raise DataError(f"{path}: no {', '.join(missing)} column (the item table has "
                            f"{', '.join(ITEM_SCHEMA.names)})")

    def _check_npy(self, name: str, shape: tuple, dtype: np.dtype) -> None:
        path = self._file(name)
        try:
            with storage.open_input(path) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                got_shape, fortran, got_dtype = read_header(f)
                header = f.tell()
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a .npy file (truncated?) ({one_line(e)})") from None
        if got_shape != shape or got_dtype != dtype or fortran:
            raise DataError(f"{path}: array {got_dtype}{list(got_shape)}, the manifest says {dtype}{list(shape)}")
        size, want = storage.size_of(path), header + int(np.prod(shape)) * dtype.itemsize
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
        schema = meta.schema.to_arrow_schema()
        history, target = schema.field("history").type, schema.field("target").type
        if not (pa.types.is_list(history) and pa.types.is_integer(history.value_type) and pa.types.is_integer(target)):
            raise DataError(f"{path}: history {history}, target {target}: expected lists of item indices (integers) "
                            "and an item index")
        lo, hi = (self._read_index_range(path) if full else self._stats_index_range(path, meta, columns))
        if lo is not None and (lo < 0 or hi >= self.num_items):
            bad = lo if lo < 0 else hi
            raise DataError(f"{path}: item index {bad} outside 0..{self.num_items - 1} (V = {self.num_items:,})")

    def _stats_index_range(self, path: Location, meta, columns: dict) -> tuple:
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

    def _read_index_range(self, path: Location) -> tuple:
        try:
            table = read_parquet(path, columns=["history", "target"])
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read ({one_line(e)})") from None
        history = table["history"].combine_chunks()
        empty = empty_history_rows(history)
        if len(empty):  # training would stop there, mid-run
            raise DataError(f"{path}: row {empty[0] + 1}: empty or null history")
        values = [history.flatten(), table["target"].combine_chunks()]
        if any(v.null_count for v in values):
            raise DataError(f"{path}: null item index")
        mins = [pc.min(v).as_py() for v in values if len(v)]
        maxs = [pc.max(v).as_py() for v in values if len(v)]
        return (min(mins), max(maxs)) if mins else (None, None)

    def num_rows(self, split: str) -> int:
        return self.manifest["splits"][split]

    def session_files(self, split: str) -> list[Location]:
        return [self.path / p["file"] for p in self.manifest["session_files"][split]]

    def read_sessions(self, split: str) -> pa.Table:
        """The whole split as one table (tests and small data; training streams with reader.py)."""
        return pa.concat_tables(read_parquet(f, schema=SESSION_SCHEMA) for f in self.session_files(split))

    @property
    def items_path(self) -> Location:
        return self.path / ITEMS

    def items(self) -> pa.Table:
        return read_parquet(self.items_path)

    def popularity(self) -> np.ndarray:
        return read_parquet(self.items_path, columns=["popularity"])["popularity"].to_numpy()

    def has_text(self) -> np.ndarray:
        return storage.load_npy(self.path / self.manifest["text"]["has_text"])

    def text_features(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float16 rows `rows` (item_idx, any order) of the text features; all rows if None. A row that is not
        finite, or all zeros for an item marked as having text, is refused (DamagedData).

        Local parts are memory-mapped, so a worker that owns rows r, r+W, ... reads only those; from a
        store each part is read once, whole, and only the wanted rows kept (memory: one part).
        """
        parts = self.manifest["text"]["files"]
        rows = np.arange(self.num_items) if rows is None else np.asarray(rows, dtype=np.int64)
        marked = self.has_text()[rows]
        out = np.empty((len(rows), self.text_dim), dtype=np.float16)
        start = 0
        for p in parts:
            stop = start + p["rows"]
            sel = np.nonzero((rows >= start) & (rows < stop))[0]
            if len(sel):
                got = storage.load_npy(self.path / p["file"], mmap=True)[rows[sel] - start]
                # training and serving read their rows here: refused before use
                self._refuse_damaged(p["file"], start, got, marked[sel], rows[sel])
                out[sel] = got
            start = stop
        return out


def read_parquet(path: Location, **kwargs) -> pa.Table:
    """A whole Parquet file, local or in a store (`kwargs` as for `pq.read_table`)."""
    with storage.open_input(path) as f:
        return pq.read_table(f, **kwargs)


def dataset_files(path: str | Location | None) -> list[Location]:
    """`Dataset(path).files()`, or the directory itself where its manifest cannot be read (nothing in it may
    then be replaced: which files it would read is not known); none for no dataset (None, or "" as an unset
    shell variable gives)."""
    if not path:
        return []
    try:
        return Dataset(path).files()
    except DataError:
        return [resolve_location(path)]
