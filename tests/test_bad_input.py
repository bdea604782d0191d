"""The bad-input matrix: every command against a table of bad inputs (issue 15).

Each case builds its inputs in a fresh directory, runs the command's `main` through `cli.run_cli` in
this process, and asserts the project's promise: exit code 2, exactly one line on stderr of the form
`error: FILE: problem` naming the file (and the row where there is one), and nothing left behind: the
directory holds exactly what it held before (no output, no run directory, no `.OUT.tmp-PID` or
`.OUT.old-PID`, an existing output untouched). No case may start Ray: `training.launch._init_ray` and
`serve.batch_runners.run_ray` fail the case if reached. The export/recommend/batch_score cases use the real
trained run of tests/serve/test_export.py (torchrun launcher, no Ray).
"""
from __future__ import annotations

import datetime
import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alterrec_dist.common.config import PROJECT_ROOT
from tests.commands import run_command
from tests.serve.test_export import trained_run
from tests.test_train import tiny_dataset as dataset_of
from tests.tiny_data import V, tiny_dataset

# The matrix is in the fast tier: reaching Ray fails a case (conftest `no_ray`).
pytestmark = pytest.mark.usefixtures("no_ray")


# -- what every case asserts -----------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in sorted(root.rglob("*"))}


# -- input builders ---------------------------------------------------------------------------------

ITEMS = ["A", "B", "C", "D", "E"]


def log_items(d: Path, ids=ITEMS, parquet=False) -> Path:
    if parquet:
        pq.write_table(pa.table({"item": pa.array(ids)}), d / "items.parquet")
        return d / "items.parquet"
    (d / "items.csv").write_text("item,title\n" + "".join(f"{i},title {i}\n" for i in ids))
    return d / "items.csv"


def log_csv(d: Path, rows: list[str], name="inter.csv") -> Path:
    (d / name).write_bytes(("user,item,ts\n" + "".join(r + "\n" for r in rows)).encode() if all(
        isinstance(r, str) for r in rows) else b"user,item,ts\n" + b"".join(r + b"\n" for r in rows))
    return d / name


GOOD_LOG = [f"u{u},{i},{t}" for u in (1, 2) for t, i in enumerate("ABCD")]


def log_parquet(d: Path, user=None, item=None, ts=None) -> Path:
    users = user if user is not None else pa.array([f"u{u}" for u in (1, 2) for _ in range(4)])
    items = item if item is not None else pa.array(list("ABCD") * 2)
    times = ts if ts is not None else pa.array([float(t) for _ in (1, 2) for t in range(4)])
    pq.write_table(pa.table({"user": users, "item": items, "ts": times}), d / "inter.parquet")
    return d / "inter.parquet"


def log_argv(inter: Path, items: Path, out: Path, *extra) -> list[str]:
    return ["log", "--interactions", str(inter), "--items", str(items), "--user-col", "user", "--item-col", "item",
            "--time-col", "ts", "--out", str(out), "--no-progress", *extra]


def recbole(d: Path) -> Path:
    from tests.data.test_prepare import write_recbole
    return write_recbole(d / "rb")


def m2_parquet(d: Path, prev_items: pa.Array, labels=None) -> list[str]:
    pq.write_table(pa.table({"prev_items": prev_items, "locale": pa.array(["FR"] * len(prev_items))}),
                   d / "sessions.parquet")
    argv = ["amazon-m2", "--sessions", str(d / "sessions.parquet")]
    if labels is not None:
        pq.write_table(pa.table({"next_item": pa.array(labels)}), d / "labels.parquet")
        argv += ["--labels", str(d / "labels.parquet")]
    return argv + ["--out", str(d / "out"), "--no-progress"]


M2_GOOD = [["A", "B"], ["B", "C", "D"], ["A", "C"], ["D", "E", "A"]] * 3


def dataset(d: Path) -> Path:
    return tiny_dataset(d / "ds")


def catalog_of(d: Path, num_items: int) -> Path:
    """A valid dataset of 400 train rows over `num_items` items."""
    return dataset_of(d / "ds", num_items=num_items)


def damaged(d: Path, damage) -> Path:
    ds = dataset(d)
    damage(ds)
    return ds


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: (len(data) // 2 if keep is None else keep)])


def edit_manifest(ds: Path, fn) -> None:
    m = json.loads((ds / "manifest.json").read_text())
    fn(m)
    (ds / "manifest.json").write_text(json.dumps(m))


def session_with_item(ds: Path, index: int) -> None:
    """Rewrite the first test session file with one history item replaced (same rows, valid Parquet)."""
    f = ds / "sessions" / "test" / "part-00000.parquet"
    t = pq.read_table(f)
    hist = t["history"].to_pylist()
    hist[5] = hist[5][:-1] + [index]
    pq.write_table(t.set_column(0, "history", pa.array(hist, pa.list_(pa.int32()))), f)


def _test_sessions(ds: Path) -> Path:
    return ds / "sessions" / "test" / "part-00000.parquet"


def _resigned(ds: Path, f: Path, edit) -> None:
    """Rewrite Parquet file `f` of dataset `ds` through `edit` and record its new sha256 in the manifest: damage
    that the checksums no longer see, as a dataset written wrong in the first place would carry."""
    pq.write_table(edit(pq.read_table(f)), f)
    _resign(ds, f)


def _resign(ds: Path, f: Path) -> None:
    from alterrec_dist.common.files import file_sha256
    _edit_json(ds / "manifest.json", lambda m: m["sha256"].update({str(f.relative_to(ds)): file_sha256(f)}))


def _nan_text_feature(ds: Path, row: int) -> Path:
    f = ds / json.loads((ds / "manifest.json").read_text())["text"]["files"][0]["file"]
    x = np.load(f)
    x[row, 3] = np.nan
    np.save(f, x)
    _resign(ds, f)
    return ds


def train_argv(d: Path, *sets: str, data: Path | None = None, extra=()) -> list[str]:
    sets = (*sets, f"data.path={data}") if data else sets
    return [*[a for s in sets for a in ("--set", s)], "--out", str(d / "run"), *extra]


CPUS = os.cpu_count() or 1
TINY_TRAIN = ("train.global_batch_size=8", "eval.batch_size=8", "trainer.num_workers=1")


def run_copy(d: Path, run: Path, damage=None) -> Path:
    copy = d / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    if damage:
        damage(copy)
    return copy


def batch_input(d: Path, histories, targets=None) -> Path:
    cols = {"history": pa.array(histories, pa.list_(pa.int32()))}
    if targets is not None:
        cols["target"] = pa.array(targets, pa.int32())
    pq.write_table(pa.table(cols), d / "in.parquet")
    return d / "in.parquet"


GOOD_HISTORIES = [[1, 2, 3], [4], [5, 6]] * 4


# -- the matrix -------------------------------------------------------------------------------------
# (id, command, setup(d, run) -> argv, (fragments stderr must hold; "{d}" is the case directory))

CASES = [
    # prepare log: NaN or null in a key column, of CSV and Parquet
    ("prepare-no-source", "prepare", lambda d, r: [],
     ["the following arguments are required: {{recbole,amazon-m2,log,verify}}"]),  # named "source", no choices
    ("log-interactions-a-directory", "prepare", lambda d, r: log_argv(_mkdir(d / "logs"), log_items(d), d / "out"),
     ["{d}/logs: a directory, not a file"]),  # "no such file", of a path that is there
    ("log-csv-nan-time", "prepare", lambda d, r: log_argv(
        log_csv(d, [f"u1,{i},{t}.5" for t, i in enumerate("ABC")] + ["u1,D,nan"]), log_items(d), d / "out"),
     ["{d}/inter.csv: column ts: row 4: time is nan (not a finite number)"]),
    ("log-parquet-nan-time", "prepare", lambda d, r: log_argv(
        log_parquet(d, ts=pa.array([0.0, 1.0, float("nan"), 3.0, 0.0, 1.0, 2.0, 3.0])), log_items(d), d / "out"),
     ["{d}/inter.parquet: column ts: row 3: time is nan (not a finite number)"]),
    ("log-parquet-null-time", "prepare", lambda d, r: log_argv(
        log_parquet(d, ts=pa.array([0.0, 1.0, None, 3.0, 0.0, 1.0, 2.0, 3.0])), log_items(d), d / "out"),
     ["{d}/inter.parquet: column ts: row 3: empty time"]),
    ("log-parquet-nan-user", "prepare", lambda d, r: log_argv(
        log_parquet(d, user=pa.array([1.0, 1.0, 1.0, 1.0, float("nan"), 2.0, 2.0, 2.0])), log_items(d), d / "out"),
     ["{d}/inter.parquet: row 5, column user: NaN is not an id"]),
    ("log-parquet-null-user", "prepare", lambda d, r: log_argv(
        log_parquet(d, user=pa.array(["u1"] * 5 + [None] + ["u2"] * 2)), log_items(d), d / "out"),
     ["{d}/inter.parquet: row 6, column user: empty value"]),
    # prepare log: a value with no form the command can use, and an OUT in directories the command made
    ("log-parquet-time-past-2262", "prepare", lambda d, r: log_argv(
        log_parquet(d, ts=pa.array([datetime.datetime(2024, 1, 1 + t) for t in range(7)]
                                   + [datetime.datetime(3000, 1, 1)], pa.timestamp("us"))), log_items(d), d / "out"),
     ["{d}/inter.parquet: column ts: row 8: a time outside the years 1677..2262"]),
    ("log-parquet-list-text", "prepare", lambda d, r: log_argv(
        log_parquet(d), _parquet(d, "items.parquet", item=ITEMS, tags=[["x"]] * len(ITEMS)), d / "out",
        "--text-cols", "tags"),
     ["{d}/items.parquet: column tags: list<", "values cannot be read as text"]),
    ("log-parquet-text-not-utf8", "prepare", lambda d, r: log_argv(
        log_parquet(d), _parquet(d, "items.parquet", item=ITEMS, title=pa.array([b"\xff"] * len(ITEMS), pa.binary())),
        d / "out", "--text-cols", "title"),
     ["{d}/items.parquet: column title: binary values cannot be read as text"]),
    ("log-out-in-new-directories", "prepare", lambda d, r: log_argv(
        log_csv(d, GOOD_LOG + ["u2,Z,9"]), log_items(d), d / "new" / "deeper" / "out"),
     ["{d}/inter.csv: row 9, column item: item not in the item table"]),
    ("log-csv-long-field-and-a-bad-row", "prepare", lambda d, r: log_argv(
        log_csv(d, GOOD_LOG), _raw(d, "items.csv", b"item,title\nA," + b"x" * 200_000 + b"\nB,b,extra\n"), d / "out"),
     ["{d}/items.csv: cannot read as delimited text", "Expected 2 columns, got 3"]),
    ("log-out-holds-its-input", "prepare", lambda d, r: log_argv(
        log_csv(d, GOOD_LOG), log_items(d), d, "--overwrite"),
     ["{d}: holds the input {d}/inter.csv, which writing it would delete"]),
    ("log-parquet-nan-item", "prepare", lambda d, r: log_argv(
        log_parquet(d, item=pa.array([1.0, 2.0, float("nan"), 3.0] * 2)), log_items(d, ["1.0", "2.0", "3.0"]),
        d / "out"), ["{d}/inter.parquet: row 3, column item: NaN is not an id"]),
    ("log-parquet-nan-session", "prepare", lambda d, r: log_argv(
        _with_session(d), log_items(d), d / "out", "--session-col", "sess"),
     ["{d}/inter.parquet: row 2, column sess: NaN is not an id"]),
    ("log-parquet-nan-item-table-id", "prepare", lambda d, r: log_argv(
        log_parquet(d, item=pa.array([1.0, 2.0] * 4)), _float_items(d), d / "out"),
     ["{d}/items.parquet: row 3, column item: NaN is not an id"]),
    ("log-csv-invalid-utf8-row", "prepare", lambda d, r: log_argv(
        log_csv(d, [b"u1,A,0", b"u1,B,1", b"u\xff1,C,2", b"u1,D,3"]), log_items(d), d / "out"),
     ["{d}/inter.csv: row 3: not UTF-8 text"]),
    ("log-csv-invalid-utf8-header", "prepare", lambda d, r: log_argv(
        _raw(d, "inter.csv", b"us\xe9r,item,ts\nu1,A,0\n"), log_items(d), d / "out"),
     ["{d}/inter.csv: header line: not UTF-8 text"]),
    ("log-csv-invalid-utf8-quoted-newline", "prepare", lambda d, r: log_argv(
        log_csv(d, GOOD_LOG[:4]), _raw(d, "items.csv", b'item,title\nA,"two\nlines"\nB,x\nC,\xff\nD,y\n'),
        d / "out", "--text-cols", "title"), ["{d}/items.csv: row 3: not UTF-8 text"]),
    ("log-csv-invalid-utf8-inside-a-quoted-value", "prepare", lambda d, r: log_argv(
        log_csv(d, GOOD_LOG[:4]), _raw(d, "items.csv", b'item,title\nA,x\nB,"two\nli\xffnes"\nC,y\nD,z\n'),
        d / "out", "--text-cols", "title"), ["{d}/items.csv: row 2: not UTF-8 text (line 4"]),
    # files of another format handed over as CSV: gzip was "header line: not UTF-8 text", a JSON array's whole
    # first line (156 kB on a reviewer's 1,506 events) the one column name in "missing column(s) ... (found: ...)"
    ("log-gzip-csv", "prepare", lambda d, r: log_argv(
        _raw(d, "inter.csv.gz", gzip.compress(b"user,item,ts\nu1,A,0\n")), log_items(d), d / "out"),
     ["{d}/inter.csv.gz: gzip file, not CSV/TSV or Parquet (prepare reads those, uncompressed)"]),
    ("log-json-array", "prepare", lambda d, r: log_argv(
        _raw(d, "inter.json", json.dumps([{"user": "u1", "item": "A", "ts": t} for t in range(5000)]).encode()),
        log_items(d), d / "out"), ["{d}/inter.json: JSON file, not CSV/TSV or Parquet"]),
    ("log-feather", "prepare", lambda d, r: log_argv(
        _raw(d, "inter.feather", b"ARROW1\x00\x00" + b"\x00" * 64), log_items(d), d / "out"),
     ["{d}/inter.feather: Arrow/Feather file, not CSV"]),
    ("log-missing-column-of-a-long-header", "prepare", lambda d, r: log_argv(
        _raw(d, "inter.csv", (",".join(f"c{k}" for k in range(500)) + ",user,item," + "x" * 5000 + "\n").encode()),
        log_items(d), d / "out"), ["{d}/inter.csv: missing column(s) ts (found: c0, c1,", ", and 483 more)"]),
    ("log-missing-column", "prepare", lambda d, r: log_argv(
        _raw(d, "inter.csv", b"user,item\nu1,A\n"), log_items(d), d / "out"),
     ["{d}/inter.csv: missing column(s) ts"]),
    ("log-unknown-item", "prepare", lambda d, r: log_argv(
        log_csv(d, GOOD_LOG[:3] + ["u1,Z,9"]), log_items(d), d / "out"),
     ["{d}/inter.csv: row 4, column item: item not in the item table"]),
    ("log-empty-file", "prepare", lambda d, r: log_argv(_raw(d, "inter.csv", b""), log_items(d), d / "out"),
     ["{d}/inter.csv: empty file"]),
    ("log-out-under-a-file", "prepare", lambda d, r: log_argv(
        log_csv(d, GOOD_LOG), log_items(d), _raw(d, "afile", b"x") / "out"),
     ["{d}/afile/out: cannot create its directory"]),
    ("log-out-exists", "prepare", lambda d, r: log_argv(
        log_csv(d, GOOD_LOG), log_items(d), _mkdir(d / "out")), ["{d}/out: output exists"]),
    # prepare recbole
    ("recbole-invalid-utf8-text", "prepare", lambda d, r: ["recbole", "--path", str(_rb_text(
        d, b"item_id:token\ttext:token_seq\nA\tok\nB\tbad \xfe\n")), "--out", str(d / "out"), "--no-progress"],
     ["{d}/rb/X.text: row 2: not UTF-8 text"]),
    ("recbole-index-out-of-range", "prepare", lambda d, r: ["recbole", "--path", str(_rb_edit(
        d, "X.valid.inter", "u1\t0 1 7\t3")), "--out", str(d / "out"), "--no-progress"],
     ["{d}/rb/X.valid.inter: row 1, column item_id_list: item index outside"]),
    ("recbole-not-an-integer", "prepare", lambda d, r: ["recbole", "--path", str(_rb_edit(
        d, "X.test.inter", "u1\t0 1 2 3\t4.0")), "--out", str(d / "out"), "--no-progress"],
     ["{d}/rb/X.test.inter: row 1, column item_id: '4.0' is not a non-negative integer"]),
    ("recbole-no-directory", "prepare", lambda d, r: ["recbole", "--path", str(d / "nowhere"), "--out",
                                                        str(d / "out"), "--no-progress"],
     ["{d}/nowhere: no such directory"]),
    # prepare amazon-m2
    ("m2-parquet-nan-item", "prepare", lambda d, r: m2_parquet(
        d, pa.array([[1.0, 2.0], [2.0, float("nan"), 3.0]] * 6, pa.list_(pa.float64()))),
     ["{d}/sessions.parquet: row 2, column prev_items: NaN is not an item id"]),
    ("m2-parquet-null-list", "prepare", lambda d, r: m2_parquet(
        d, pa.array(M2_GOOD[:2] + [None] + M2_GOOD[3:], pa.list_(pa.string()))),
     ["{d}/sessions.parquet: row 3, column prev_items: null list"]),
    ("m2-parquet-nested-lists", "prepare", lambda d, r: m2_parquet(
        d, pa.array([[[i] for i in items] for items in M2_GOOD], pa.list_(pa.list_(pa.string())))),
     ["{d}/sessions.parquet: column prev_items: list<", "values cannot be read as text"]),
    ("m2-labels-misaligned", "prepare", lambda d, r: m2_parquet(
        d, pa.array(M2_GOOD, pa.list_(pa.string())), labels=["A"] * 5),
     ["{d}/labels.parquet: 5 labels for 12 sessions"]),
    ("m2-parquet-null-label", "prepare", lambda d, r: m2_parquet(
        d, pa.array(M2_GOOD, pa.list_(pa.string())), labels=["A"] * 3 + [None] + ["B"] * 8),
     ["{d}/labels.parquet: row 4, column next_item: empty value"]),
    ("m2-out-holds-its-sessions-and-labels", "prepare", lambda d, r: m2_parquet(
        d, pa.array(M2_GOOD, pa.list_(pa.string())), labels=["A"] * 12)[:-3] + ["--out", str(d), "--overwrite"],
     ["{d}: holds the input {d}/sessions.parquet, which writing it would delete"]),
    ("m2-out-holds-its-labels", "prepare", lambda d, r: m2_parquet(
        d, pa.array(M2_GOOD, pa.list_(pa.string())), labels=["A"] * 12)[:-3] + [
        "--sessions", str(_raw(d, "more.csv", b"prev_items\n")), "--labels", str(_mkdir(d / "l") / "x.parquet"),
        "--out", str(d / "l"), "--overwrite"],
     ["{d}/l: holds the input {d}/l/x.parquet"]),
    ("prepare-out-is-its-text-model", "prepare", lambda d, r: [
        "recbole", "--path", str(recbole(d)), "--text-model", str(_mkdir(d / "model")), "--out", str(d / "model"),
        "--overwrite", "--no-progress"], ["{d}/model: holds the input {d}/model, which writing it would delete"]),
    ("m2-csv-not-a-list", "prepare", lambda d, r: ["amazon-m2", "--sessions", str(_raw(
        d, "s.csv", b"prev_items,locale\n\"['A' 'B']\",FR\nA B,FR\n")), "--out", str(d / "out"), "--no-progress"],
     ["{d}/s.csv: row 2, column prev_items: not a list like"]),
    ("m2-csv-id-with-a-space", "prepare", lambda d, r: ["amazon-m2", "--sessions", str(_raw(
        d, "s.csv", b"prev_items,locale\n\"['A' 'B']\",FR\n\"['A B' 'C' 'D']\",FR\n")), "--out", str(d / "out"),
        "--no-progress"], ["{d}/s.csv: row 2, column prev_items: not a list like", "(ids without spaces)"]),
    ("m2-csv-invalid-utf8", "prepare", lambda d, r: ["amazon-m2", "--sessions", str(_raw(
        d, "s.csv", b"prev_items,locale\n\"['A' 'B']\",FR\n\"['A' 'B']\",F\xffR\n")), "--out", str(d / "out"),
        "--no-progress"], ["{d}/s.csv: row 2: not UTF-8 text"]),
    ("m2-locale-without-column", "prepare", lambda d, r: ["amazon-m2", "--sessions", str(_raw(
        d, "s.csv", b"prev_items\n\"['A' 'B']\"\n")), "--locale", "FR", "--out", str(d / "out"), "--no-progress"],
     ["{d}/s.csv: --locale given but the file has no locale column"]),
    # prepare verify
    ("verify-truncated-features", "prepare", lambda d, r: ["verify", str(damaged(
        d, lambda ds: truncate(ds / "text_features" / "part-00000.npy")))],
     ["{d}/ds/text_features/part-00000.npy: ", "truncated"]),
    ("verify-checksum", "prepare", lambda d, r: ["verify", str(damaged(d, _flip_last_byte))],
     ["{d}/ds/text_features/has_text.npy: sha256 does not match {d}/ds/manifest.json"]),
    ("verify-index-out-of-range", "prepare", lambda d, r: ["verify", str(damaged(
        d, lambda ds: session_with_item(ds, V)))],
     [f"{{d}}/ds/sessions/test/part-00000.parquet: item index {V} outside 0..{V - 1}"]),
    ("verify-target-not-an-index", "prepare", lambda d, r: ["verify", str(damaged(
        d, lambda ds: _resigned(ds, _test_sessions(ds), lambda t: t.set_column(
            1, "target", t["target"].cast(pa.string())))))],
     ["{d}/ds/sessions/test/part-00000.parquet: history list<element: int32>, target string: expected"]),
    ("verify-history-of-strings", "prepare", lambda d, r: ["verify", str(damaged(
        d, lambda ds: _resigned(ds, _test_sessions(ds), lambda t: t.set_column(
            0, "history", t["history"].cast(pa.list_(pa.string()))))))],
     ["{d}/ds/sessions/test/part-00000.parquet: history list<element: string>"]),
    ("verify-empty-history", "prepare", lambda d, r: ["verify", str(damaged(
        d, lambda ds: _resigned(ds, _test_sessions(ds), lambda t: t.set_column(
            0, "history", pa.array([[]] + t["history"].to_pylist()[1:], pa.list_(pa.int32()))))))],
     ["{d}/ds/sessions/test/part-00000.parquet: row 1: empty or null history"]),
    ("verify-items-without-ids", "prepare", lambda d, r: ["verify", str(damaged(
        d, lambda ds: _resigned(ds, ds / "items.parquet", lambda t: t.drop_columns(["item_id"]))))],
     ["{d}/ds/items.parquet: no item_id column of strings"]),
    ("recommend-items-without-text", "recommend", lambda d, r: [  # a KeyError traceback
        "--run", str(r), "--data", str(damaged(d, lambda ds: _resigned(ds, ds / "items.parquet",
                                                                       lambda t: t.drop_columns(["text"])))),
        "--session", "P0001"],
     ["{d}/ds/items.parquet: no text column (the item table has item_idx, item_id, text, popularity)"]),
    ("verify-file-listed-twice", "prepare", lambda d, r: ["verify", str(damaged(
        d, lambda ds: _edit_json(ds / "manifest.json", lambda m: m["session_files"]["train"].append(
            m["session_files"]["test"][0]) or m["splits"].update(train=m["splits"]["train"] + m["splits"]["test"]))))],
     ["{d}/ds/manifest.json: session file sessions/test/part-00000.parquet is listed more than once"]),
    ("verify-file-outside-the-dataset", "prepare", lambda d, r: ["verify", str(damaged(
        d, lambda ds: _edit_json(ds / "manifest.json", lambda m: m["session_files"]["test"][0].update(
            file="sessions/../sessions/test/part-00000.parquet"))))],
     ["{d}/ds/manifest.json: file 'sessions/../sessions/test/part-00000.parquet' is not a path inside the dataset"]),
    ("verify-nan-text-feature", "prepare", lambda d, r: ["verify", str(damaged(d, lambda ds: _nan_text_feature(ds, 7)))],
     ["{d}/ds/text_features/part-00000.npy: row 8 (item_idx 7): a text feature that is not finite"]),
    ("recommend-nan-text-feature", "recommend", lambda d, r: [  # a run trained on it before: a traceback here
        "--run", str(run_copy(d, r, lambda c: (c / "dataset.json").unlink())),
        "--data", str(_nan_text_feature(_run_dataset_copy(d, r), 7)), "--session", "P0001"],
     ["{d}/ds/text_features/part-00000.npy: row 8 (item_idx 7): a text feature that is not finite"]),
    ("verify-num-with-text-wrong", "prepare", lambda d, r: ["verify", str(damaged(
        d, lambda ds: _edit_json(ds / "manifest.json", lambda m: m["text"].update(num_with_text=3))))],
     ["{d}/ds/manifest.json: text.num_with_text is 3, text_features/has_text.npy marks 41 items with text"]),
    ("verify-text-dtype-float32", "prepare", lambda d, r: ["verify", str(damaged(
        d, lambda ds: _edit_json(ds / "manifest.json", lambda m: m["text"].update(dtype="float32"))))],
     ["{d}/ds/manifest.json: text.dtype must be float16, got 'float32'"]),
    ("verify-extra-split", "prepare", lambda d, r: ["verify", str(damaged(
        d, lambda ds: _edit_json(ds / "manifest.json", lambda m: m["splits"].update(extra=0))))],
     ["{d}/ds/manifest.json: splits must be train, valid, test, got test, train, valid, extra"]),
    ("verify-item-without-id", "prepare", lambda d, r: ["verify", str(damaged(
        d, lambda ds: _resigned(ds, ds / "items.parquet", lambda t: t.set_column(
            t.schema.get_field_index("item_id"), "item_id", pa.array([None] + t["item_id"].to_pylist()[1:],
                                                                     pa.string())))))],
     ["{d}/ds/items.parquet: row 1: no item_id (1 of "]),
    ("verify-item-id-twice", "prepare", lambda d, r: ["verify", str(damaged(
        d, lambda ds: _resigned(ds, ds / "items.parquet", lambda t: t.set_column(
            t.schema.get_field_index("item_id"), "item_id", pa.array(t["item_id"].to_pylist()[:1] * 2
                                                                     + t["item_id"].to_pylist()[2:])))))],
     ["names more than one item (1 ids do)"]),
    # synth
    ("synth-out-under-a-file", "synth", lambda d, r: ["--items", "50", "--sessions", "50", "--text-features",
                                                      "random-projection", "--out", str(_raw(d, "f", b"x") / "o"),
                                                      "--no-progress"],
     ["{d}/f/o: cannot create its directory"]),
    ("synth-out-exists", "synth", lambda d, r: ["--items", "50", "--sessions", "50", "--text-features",
                                                "random-projection", "--out", str(_mkdir(d / "o")), "--no-progress"],
     ["{d}/o: output exists"]),
    ("synth-empty-split", "synth", lambda d, r: ["--items", "5", "--sessions", "1", "--text-features",
                                                 "random-projection", "--out", str(d / "o"), "--no-progress"],
     ["{d}/o: split 'train' is empty"]),
    ("synth-features-wider-than-memory", "synth", lambda d, r: [
        "--items", "100", "--sessions", "100", "--text-features", "random-projection", "--text-dim", "1000000000000",
        "--out", str(d / "o"), "--no-progress"], ["out of memory: Unable to allocate 233. TiB"]),
    ("synth-more-items-than-an-index-names", "synth", lambda d, r: [
        "--items", "99999999999999999999", "--sessions", "10", "--out", str(d / "o"), "--no-progress"],
     ["--items must be <= 2,147,483,647"]),  # a traceback from numpy
    # train: config values (driver only, no run directory)
    # every text row zeros: the text network's score one constant, "text hit@10" the tie order by item index
    ("train-text-method-on-a-dataset-without-text", "train", lambda d, r: train_argv(
        d, "train.method=alterrec", data=_without_text(d / "data")),
     ["{d}/data: no item has text, and train.method=alterrec learns from it"]),
    ("train-batch-size-zero", "train", lambda d, r: train_argv(d, "train.global_batch_size=0"),
     ["train.global_batch_size must be >= 1, got 0"]),
    ("train-batch-size-negative", "train", lambda d, r: train_argv(d, "train.global_batch_size=-2"),
     ["train.global_batch_size must be >= 1"]),
    ("train-unknown-option", "train", lambda d, r: ["--bogus"],  # argparse's usage block, then the error
     ["unrecognized arguments: --bogus (see python -m alterrec_dist.train --help)"]),
    ("train-int-past-64-bits", "train", lambda d, r: train_argv(d, "model.dim=99999999999999999999999"),
     ["model.dim: 99999999999999999999999 is out of range (past 64 bits)"]),  # tracebacks from 3 Ray attempts
    ("train-lr-nan", "train", lambda d, r: train_argv(d, "train.lr_id=nan"),
     ["train.lr_id must be a finite number > 0, got nan"]),
    ("train-lr-negative", "train", lambda d, r: train_argv(d, "train.lr_text=-0.01"),
     ["train.lr_text must be a finite number > 0"]),
    ("train-bins-decreasing", "train", lambda d, r: train_argv(d, "eval.longtail_bins=[100,30]"),
     ["eval.longtail_bins must be non-negative and strictly increasing"]),
    ("train-num-workers-zero", "train", lambda d, r: train_argv(d, "trainer.num_workers=0"),
     ["trainer.num_workers must be >= 1, got 0"]),
    ("train-config-is-a-directory", "train", lambda d, r: ["--config", str(_mkdir(d / "cfg")), "--out",
                                                           str(d / "run")],
     ["{d}/cfg: config file is a directory"]),
    ("train-config-not-utf8", "train", lambda d, r: ["--config", str(_raw(d, "c.toml", b"[train]\n# \xff\n")),
                                                     "--out", str(d / "run")],
     ["{d}/c.toml: config file is not UTF-8 text"]),
    # train: dataset damage past the manifest, found on the driver before Ray
    ("train-k1-past-the-catalog", "train", lambda d, r: train_argv(d, *TINY_TRAIN, f"train.k1={V}", f"train.k2={V + 9}",
                                                                   data=dataset(d)),
     [f"train.k1={V}: the negatives' band starts past the {V} items of {{d}}/ds"]),
    ("train-more-workers-than-items", "train", lambda d, r: train_argv(
        d, "train.global_batch_size=8", "eval.batch_size=8", "trainer.num_workers=4", data=catalog_of(d, 3)),
     ["trainer.num_workers=4 is more than the 3 items of {d}/ds"]),
    ("train-more-workers-than-a-private-ray-should-start", "train", lambda d, r: train_argv(  # 64 on 2 CPUs: OOM
        d, *[f"{k}={4 * CPUS + 1}" for k in ("train.global_batch_size", "eval.batch_size", "trainer.num_workers")],
        data=dataset(d)), [f"trainer.num_workers={4 * CPUS + 1} on a private local Ray of this machine's {CPUS} "
                           f"CPUs", f"give at most {4 * CPUS} here"]),
    ("train-truncated-features", "train", lambda d, r: train_argv(d, *TINY_TRAIN, data=damaged(
        d, lambda ds: truncate(ds / "text_features" / "part-00000.npy"))),
     ["{d}/ds/text_features/part-00000.npy: ", "truncated"]),
    ("train-index-out-of-range", "train", lambda d, r: train_argv(d, *TINY_TRAIN, data=damaged(
        d, lambda ds: session_with_item(ds, V + 3))),
     [f"{{d}}/ds/sessions/test/part-00000.parquet: item index {V + 3} outside 0..{V - 1}"]),
    ("train-negative-index", "train", lambda d, r: train_argv(d, *TINY_TRAIN, data=damaged(
        d, lambda ds: session_with_item(ds, -1))),
     [f"{{d}}/ds/sessions/test/part-00000.parquet: item index -1 outside 0..{V - 1}"]),
    ("train-manifest-missing-key", "train", lambda d, r: train_argv(d, *TINY_TRAIN, data=damaged(
        d, lambda ds: edit_manifest(ds, lambda m: m.pop("text")))),
     ["{d}/ds/manifest.json: text is missing"]),
    ("train-manifest-truncated", "train", lambda d, r: train_argv(d, *TINY_TRAIN, data=damaged(
        d, lambda ds: truncate(ds / "manifest.json"))),
     ["{d}/ds/manifest.json: not valid JSON"]),
    ("train-session-file-missing", "train", lambda d, r: train_argv(d, *TINY_TRAIN, data=damaged(
        d, lambda ds: (ds / "sessions" / "valid" / "part-00000.parquet").unlink())),
     ["{d}/ds/sessions/valid/part-00000.parquet: missing"]),
    ("train-session-file-truncated", "train", lambda d, r: train_argv(d, *TINY_TRAIN, data=damaged(
        d, lambda ds: truncate(ds / "sessions" / "train" / "part-00000.parquet"))),
     ["{d}/ds/sessions/train/part-00000.parquet: not a readable Parquet file"]),
    ("train-catalog-softmax-too-large", "train", lambda d, r: train_argv(
        d, "train.random_negatives=catalog", "train.global_batch_size=400", "eval.batch_size=8",
        "trainer.num_workers=1", data=catalog_of(d, 200_000)),
     ["train.random_negatives = catalog: 200000 items of {d}/ds in batches of 400 on 1 workers",
      "use train.random_negatives = sampled"]),
    # torchrun's world, not trainer.num_workers, sets the shard size: at 4 workers this would fit
    ("train-catalog-softmax-too-large-for-torchruns-world", "train", lambda d, r: train_argv(
        d, "train.random_negatives=catalog", "train.global_batch_size=400", "eval.batch_size=8",
        "trainer.num_workers=4", data=catalog_of(d, 200_000), extra=("--launcher", "torchrun")),
     ["train.random_negatives = catalog: 200000 items of {d}/ds in batches of 400 on 1 workers"]),
    ("train-has-text-wrong-shape", "train", lambda d, r: train_argv(d, *TINY_TRAIN, data=damaged(
        d, lambda ds: np.save(ds / "text_features" / "has_text.npy", np.ones(V - 1, dtype=bool)))),
     ["{d}/ds/text_features/has_text.npy: array bool[", "the manifest says bool["]),
    # export
    ("export-truncated-model-manifest", "export", lambda d, r: [
        "--run", str(run_copy(d, r, lambda c: truncate(c / "model" / "manifest.json"))), "--out", str(d / "x")],
     ["{d}/run/model/manifest.json: not valid JSON"]),
    ("export-truncated-summary", "export", lambda d, r: [
        "--run", str(run_copy(d, r, lambda c: truncate(c / "summary.json"))), "--out", str(d / "x")],
     ["{d}/run/summary.json: not valid JSON"]),
    ("export-model-file-corrupt", "export", lambda d, r: [
        "--run", str(run_copy(d, r, lambda c: truncate(c / "model" / "networks.pt"))), "--out", str(d / "x")],
     ["{d}/run/model/networks.pt: missing or corrupt"]),
    ("export-out-exists", "export", lambda d, r: ["--run", str(r), "--out", str(_mkdir(d / "x"))],
     ["{d}/x: output exists"]),
    ("export-out-under-a-file", "export", lambda d, r: ["--run", str(r), "--out", str(_raw(d, "f", b"x") / "x")],
     ["{d}/f/x: cannot create its directory"]),
    # recommend
    ("recommend-truncated-model-manifest", "recommend", lambda d, r: [
        "--run", str(run_copy(d, r, lambda c: truncate(c / "model" / "manifest.json"))), "--session", "P0001"],
     ["{d}/run/model/manifest.json: not valid JSON"]),
    ("recommend-truncated-summary", "recommend", lambda d, r: [
        "--run", str(run_copy(d, r, lambda c: truncate(c / "summary.json"))), "--session", "P0001"],
     ["{d}/run/summary.json: not valid JSON"]),
    ("recommend-model-alpha-not-a-number", "recommend", lambda d, r: [
        "--run", str(run_copy(d, r, lambda c: _edit_json(c / "model" / "manifest.json", lambda m: m.update(
            alpha={"chosen": "0.7"})))), "--session", "P0001"],
     ["{d}/run/model/manifest.json: alpha.chosen is '0.7', not a number (damaged: rerun the run)"]),
    ("recommend-truncated-export-manifest", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: truncate(x / "manifest.json"))), "--session", "P0001"],
     ["{d}/x/manifest.json: not valid JSON"]),
    ("recommend-export-manifest-missing-key", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _edit_json(x / "manifest.json", lambda m: m.pop("scoring")))),
        "--session", "P0001"], ["{d}/x/manifest.json: scoring is missing or not of type dict"]),
    ("recommend-export-manifest-missing-engine-key", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _edit_json(
            x / "manifest.json", lambda m: m["engine"].pop("max_len")))),
        "--session", "P0001"], ["{d}/x/manifest.json: engine.max_len is missing or not of type int"]),
    ("recommend-export-served-not-a-kind", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _edit_json(
            x / "manifest.json", lambda m: m["scoring"].update(served="fused@0.9")))),
        "--session", "P0001"], ["{d}/x/manifest.json: scoring.served 'fused@0.9' is not one of its kinds"]),
    # a crafted or foreign export or model (its checksums signed anew): one line naming the file, before any
    # allocation its numbers ask for (reviewer findings: tracebacks, and 3.3 GB for a 10 kB encoders.pt)
    ("recommend-export-encoders-unknown-setting", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _signed_torch_edit(
            x, "encoders.pt", lambda b: b["model"].update(bogus=1)))), "--session", "P0001"],
     ["{d}/x/encoders.pt: its model settings: config dict: unknown key model.bogus"]),
    ("recommend-export-encoders-text-dim-not-the-features", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _signed_torch_edit(
            x, "encoders.pt", lambda b: b.update(text_dim=12_000_000)))), "--session", "P0001"],
     ["{d}/x/encoders.pt: text_dim 12000000 and max_len", "are not the export's"]),
    ("recommend-export-encoders-unpickles-an-object", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _signed_torch_edit(
            x, "encoders.pt", lambda b: b.update(states=Fraction(1, 2))))), "--session", "P0001"],
     ["{d}/x/encoders.pt: holds objects other than tensors and plain containers, which are never unpickled"]),
    ("recommend-export-world-size-zero", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _edit_json(
            x / "manifest.json", lambda m: m["engine"].update(world_size=0)))), "--session", "P0001"],
     ["{d}/x/manifest.json: engine.world_size 0 is out of range"]),
    ("recommend-export-max-len-past-any-session", "recommend", lambda d, r: [  # the transformer's positions
        "--export", str(_export_copy(d, r, lambda x: _max_len_everywhere(x, 10 ** 12))), "--session", "P0001"],
     ["{d}/x/manifest.json: engine.max_len 1000000000000 is out of range"]),
    ("recommend-export-features-of-objects", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _signed_npy_objects(x, "tables/text_features.npy"))),
        "--session", "P0001"], ["{d}/x/tables/text_features.npy: not a table numpy reads without pickles"]),
    ("recommend-run-shard-items-past-the-catalog", "recommend", lambda d, r: [
        "--run", str(run_copy(d, r, lambda c: _signed_torch_edit(
            c / "model", "shard-00000-of-00001.pt", lambda b: b["items"].add_(1)))), "--session", "P0001"],
     ["{d}/run/model/shard-00000-of-00001.pt: its items are not the", "that rank 0 of 1 holds"]),
    ("recommend-export-encoders-of-an-unknown-method", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _signed_torch_edit(
            x, "encoders.pt", lambda b: b.update(method="alterrec_v9")))), "--session", "P0001"],
     ["{d}/x/encoders.pt: method 'alterrec_v9' is none this version knows"]),
    ("recommend-export-encoders-max-len-not-the-exports", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _signed_torch_edit(
            x, "encoders.pt", lambda b: b.update(max_len=b["max_len"] + 1)))), "--session", "P0001"],
     ["{d}/x/encoders.pt: text_dim", "are not the export's"]),
    ("recommend-export-encoders-a-list", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _torch_save_signed(x, "encoders.pt", [1, 2]))),
        "--session", "P0001"], ["{d}/x/encoders.pt: not an export's encoders file"]),
    ("recommend-export-features-of-ints", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _npy_signed(
            x, "tables/text_features.npy", lambda a: a.astype(np.int16)))), "--session", "P0001"],
     ["{d}/x/tables/text_features.npy: not a float table of one row per item (int16"]),
    ("recommend-export-features-a-row-short", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _npy_signed(
            x, "tables/text_features.npy", lambda a: a[:-1]))), "--session", "P0001"],
     ["{d}/x/tables/text_features.npy: not a float table of one row per item"]),
    ("recommend-export-world-size-past-the-catalog", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _edit_json(
            x / "manifest.json", lambda m: m["engine"].update(world_size=10 ** 6)))), "--session", "P0001"],
     ["{d}/x/manifest.json: engine.world_size 1000000 is out of range"]),
    ("recommend-export-eval-batch-size-zero", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: _edit_json(
            x / "manifest.json", lambda m: m["engine"].update(eval_batch_size=0)))), "--session", "P0001"],
     ["{d}/x/manifest.json: engine.eval_batch_size 0 is out of range"]),
    ("recommend-run-world-size-past-the-catalog", "recommend", lambda d, r: [
        "--run", str(run_copy(d, r, lambda c: _edit_json(
            c / "model" / "manifest.json", lambda m: m.update(world_size=10 ** 6)))), "--session", "P0001"],
     ["{d}/run/model/manifest.json: world_size 1000000 is more than its num_items"]),
    ("recommend-run-shard-without-rows", "recommend", lambda d, r: [
        "--run", str(run_copy(d, r, lambda c: _signed_torch_edit(
            c / "model", "shard-00000-of-00001.pt", lambda b: b.pop("x")))), "--session", "P0001"],
     ["{d}/run/model/shard-00000-of-00001.pt: not a saved model shard"]),
    ("recommend-run-shard-a-row-short", "recommend", lambda d, r: [
        "--run", str(run_copy(d, r, lambda c: _signed_torch_edit(
            c / "model", "shard-00000-of-00001.pt", lambda b: b.update(x=b["x"][:-1])))), "--session", "P0001"],
     ["{d}/run/model/shard-00000-of-00001.pt: its rows are not one per item"]),
    # a directory of another kind where a dataset goes: "num_items is missing (make the dataset again)"
    ("export-data-is-an-export", "export", lambda d, r: [
        "--run", str(r), "--data", str(_export_copy(d, r, lambda x: None)), "--out", str(d / "y")],
     ["{d}/x: an export (python -m alterrec_dist.export), not a dataset: give the dataset directory"]),
    ("export-data-is-a-saved-model", "export", lambda d, r: [
        "--run", str(r), "--data", str(r / "model"), "--out", str(d / "y")],
     ["/model: a saved model or a checkpoint", "not a dataset"]),
    ("batch-ray-actors-without-ray", "batch_score", lambda d, r: [
        "--run", str(r), "--split", "test", "--out", str(d / "o.parquet"), "--no-ray", "--ray-actors", "3"],
     ["--ray-actors needs Ray (--ray, or RAY_ADDRESS set)"]),  # it was ignored, the scores made in-process
    ("batch-ray-workers-without-ray", "batch_score", lambda d, r: [  # the old name still works
        "--run", str(r), "--split", "test", "--out", str(d / "o.parquet"), "--no-ray", "--ray-workers", "3"],
     ["--ray-actors needs Ray"]),
    ("batch-ray-actors-zero", "batch_score", lambda d, r: [
        "--run", str(r), "--split", "test", "--out", str(d / "o.parquet"), "--ray", "--ray-actors", "0"],
     ["--ray-actors must be >= 1, got 0"]),
    ("export-out-is-the-run", "export", lambda d, r: [
        "--run", str(run_copy(d, r)), "--out", str(d / "run"), "--overwrite"],
     ["{d}/run: holds the input {d}/run/config.toml, which writing it would delete"]),
    ("export-out-is-the-runs-model", "export", lambda d, r: [
        "--run", str(run_copy(d, r)), "--out", str(d / "run" / "model"), "--overwrite"],
     ["{d}/run/model: holds the input {d}/run/model, which writing it would delete"]),
    ("batch-out-a-file-of-the-dataset", "batch_score", lambda d, r: [
        "--run", str(r), "--data", str(_run_dataset_copy(d, r)), "--split", "test", "--out",
        str(d / "ds" / "sessions" / "test" / "part-00000.parquet"), "--overwrite", "--no-ray"],
     ["{d}/ds/sessions/test/part-00000.parquet: holds the input {d}/ds/sessions/test/part-00000.parquet"]),
    ("batch-out-a-file-of-its-input-directory", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES).parent), "--out", str(d / "in.parquet"),
        "--overwrite", "--no-ray"], ["{d}/in.parquet: holds the input {d}/in.parquet"]),
    ("batch-out-a-file-of-the-runs-dataset-scoring-input", "batch_score", lambda d, r: [
        "--run", str(_run_on_dataset_copy(d, r)), "--input", str(batch_input(d, GOOD_HISTORIES)),
        "--out", str(d / "ds" / "items.parquet"), "--overwrite", "--no-ray"],
     ["{d}/ds/items.parquet: lies in {d}/ds, which its next --overwrite"]),  # the run's items were replaced
    # an output inside a dataset: its next --overwrite deleted it without a word
    ("train-run-in-its-dataset", "train", lambda d, r: train_argv(d, *TINY_TRAIN, data=dataset(d))[:-2] + [
        "--out", str(d / "ds" / "myrun")], ["{d}/ds/myrun: lies in {d}/ds, which its next --overwrite replaces whole"]),
    # a run handed over with a link in it: the resume wrote through it, outside the run (reviewer findings)
    ("train-resume-through-a-linked-checkpoints", "train", lambda d, r: [
        "--resume", str(_linked(run_copy(d, r), "checkpoints", d / "victim"))],
     ["{d}/run/checkpoints: a symbolic link (to {d}/victim), which this resume would write through"]),
    ("train-resume-through-a-linked-metrics-file", "train", lambda d, r: [
        "--resume", str(_linked(run_copy(d, r), "metrics.jsonl", d / "notes.txt"))],
     ["{d}/run/metrics.jsonl: a symbolic link (to {d}/notes.txt)"]),
    ("train-resume-through-a-linked-tensorboard", "train", lambda d, r: [
        "--resume", str(_linked(run_copy(d, r), "tensorboard", d / "tb"))], ["{d}/run/tensorboard: a symbolic link"]),
    ("train-resume-through-a-dangling-lock-link", "train", lambda d, r: [  # refused before the lock creates it
        "--resume", str(_dangling(run_copy(d, r), ".lock", d / "elsewhere.lock"))], ["{d}/run/.lock: a symbolic link"]),
    ("export-out-in-the-runs-dataset", "export", lambda d, r: [
        "--run", str(_run_on_dataset_copy(d, r)), "--out", str(d / "ds" / "x")], ["{d}/ds/x: lies in {d}/ds"]),
    ("batch-out-in-the-dataset", "batch_score", lambda d, r: [
        "--run", str(r), "--data", str(_run_dataset_copy(d, r)), "--split", "test", "--out",
        str(d / "ds" / "scored.parquet"), "--no-ray"], ["{d}/ds/scored.parquet: lies in {d}/ds"]),
    ("synth-in-another-dataset", "synth", lambda d, r: [  # not one the command reads
        "--items", "50", "--sessions", "50", "--text-features", "random-projection", "--out", str(dataset(d) / "sub"),
        "--no-progress"], ["{d}/ds/sub: lies in {d}/ds, which its next --overwrite replaces whole"]),
    ("export-out-in-another-export", "export", lambda d, r: [
        "--run", str(r), "--out", str(_export_copy(d, r, lambda x: None) / "sub")], ["{d}/x/sub: lies in {d}/x"]),
    ("batch-out-ends-in-a-slash", "batch_score", lambda d, r: [  # wrote a file named "scores"
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES)), "--out", f"{d}/scores/", "--no-ray"],
     ["{d}/scores/: ends in '/', a directory (give a file name)"]),
    ("batch-metrics-out-the-runs-summary", "batch_score", lambda d, r: [
        "--run", str(run_copy(d, r)), "--input", str(batch_input(d, GOOD_HISTORIES)), "--out", str(d / "o.parquet"),
        "--metrics-out", str(d / "run" / "summary.json"), "--no-ray"],
     ["{d}/run/summary.json: holds the input {d}/run/summary.json"]),
    ("batch-out-cannot-be-written", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES)), "--out", "/proc/o.parquet", "--no-ray"],
     ["/proc/o.parquet: cannot write ("]),  # as a read-only or full disk: found only at the first write
    ("export-out-cannot-be-written", "export", lambda d, r: ["--run", str(r), "--out", "/proc/x"],
     ["/proc/x: cannot write beside it ("]),  # a FileNotFoundError traceback
    ("batch-export-data-without-split", "batch_score", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: None)), "--data", str(d), "--input",
        str(batch_input(d, GOOD_HISTORIES)), "--out", str(d / "o.parquet"), "--no-ray"],
     ["--data with --export names the dataset of --split"]),
    ("recommend-export-with-data", "recommend", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: None)), "--data", str(d), "--session", "P0001"],
     ["--data goes with --run: an export holds its own items"]),
    ("batch-metrics-out-is-out", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES)), "--out", str(d / "o.parquet"),
        "--metrics-out", str(d / "o.parquet"), "--no-ray"], ["--metrics-out {d}/o.parquet is or lies in --out"]),
    ("batch-metrics-out-is-out-by-another-path", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES)), "--out", str(d / "o.parquet"),
        "--metrics-out", str(_mkdir(d / "sub") / ".." / "o.parquet"), "--no-ray"], ["is or lies in --out"]),
    ("batch-metrics-out-in-the-out-directory", "batch_score", lambda d, r: [  # refused after scoring (File exists)
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES)), "--out", str(d / "c" / "a"),
        "--metrics-out", str(d / "c" / "a" / "m.json"), "--no-ray"], ["--metrics-out {d}/c/a/m.json is or lies in --out"]),
    ("export-out-holds-the-run", "export", lambda d, r: [
        "--run", str(run_copy(d, r)), "--out", str(d), "--overwrite"],
     ["{d}: holds the input {d}/run"]),
    ("export-out-is-the-dataset", "export", lambda d, r: [
        "--run", str(r), "--data", str(_run_dataset_copy(d, r)), "--out", str(d / "ds"), "--overwrite"],
     ["{d}/ds: holds the input {d}/ds"]),
    # batch_score
    ("batch-out-exists", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES)), "--out", str(_raw(d, "o.parquet", b"keep"))],
     ["{d}/o.parquet: output exists (pass --overwrite"]),
    ("batch-history-item-out-of-range", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES[:7] + [[1, 2000]] + GOOD_HISTORIES[8:])),
        "--out", str(d / "o.parquet")], ["{d}/in.parquet: row 8: history item outside 0..1999"]),
    # item ids where the indices go: "2" was scored as item_idx 2 (another item), exit 0 and its metrics printed
    ("batch-history-of-item-ids", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(_parquet(d, "in.parquet", history=pa.array([["1", "2"], ["3"]]))),
        "--out", str(d / "o.parquet")], ["{d}/in.parquet: column history holds string, not item indices"]),
    ("batch-target-of-item-ids", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(_parquet(d, "in.parquet", history=pa.array([[1, 2], [3]]),
                                                  target=pa.array(["4", "5"]).dictionary_encode())),
        "--out", str(d / "o.parquet")], ["{d}/in.parquet: column target holds string, not item indices"]),
    ("batch-empty-history", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES[:4] + [[]] + GOOD_HISTORIES[5:])),
        "--out", str(d / "o.parquet")], ["{d}/in.parquet: row 5: empty history"]),
    ("batch-target-out-of-range", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES, [1] * 10 + [-4, 1])),
        "--out", str(d / "o.parquet")], ["{d}/in.parquet: row 11: target outside 0..1999"]),
    ("batch-null-target", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES, [1, None] + [1] * 10)),
        "--out", str(d / "o.parquet")], ["{d}/in.parquet: row 2: null target"]),
    ("batch-no-rows", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, [])), "--out", str(d / "o.parquet")],
     ["{d}/in.parquet: no input rows"]),
    ("batch-ray-bad-input", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES[:2] + [[3, -1]] + GOOD_HISTORIES[3:])),
        "--out", str(d / "o.parquet"), "--ray"], ["{d}/in.parquet: row 3: history item outside"]),
    ("batch-metrics-out-under-a-file", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES)), "--out", str(d / "o.parquet"),
        "--metrics-out", str(_raw(d, "f", b"x") / "new" / "m.json")],
     ["{d}/f/new/m.json: {d}/f is not a directory"]),
    ("batch-metrics-out-is-a-directory", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES)), "--out", str(d / "o.parquet"),
        "--metrics-out", str(_mkdir(d / "m")), "--overwrite"], ["{d}/m: is a directory"]),
    ("batch-metrics-out-is-a-directory-without-overwrite", "batch_score", lambda d, r: [  # not "pass --overwrite"
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES)), "--out", str(d / "o.parquet"),
        "--metrics-out", str(_mkdir(d / "m"))], ["{d}/m: is a directory"]),
    ("batch-ray-user-not-text", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(_parquet(d, "in.parquet", history=pa.array(GOOD_HISTORIES),
                                                  user=pa.array([["u"]] * len(GOOD_HISTORIES)))),
        "--out", str(d / "o.parquet"), "--ray"], ["{d}/in.parquet: column user: list<", "cannot be read as string"]),
    ("batch-export-with-other-items", "batch_score", lambda d, r: [
        "--export", str(_export_copy(d, r, lambda x: None)), "--split", "test", "--data", str(_other_items(d, r)),
        "--out", str(d / "o.parquet")], ["{d}/other: not the items of the export {d}/x"]),
    ("batch-out-is-a-pipe", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES)), "--out", str(_fifo(d / "pipe")),
        "--overwrite"], ["{d}/pipe: not a regular file or directory"]),
    ("batch-out-is-its-input", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(batch_input(d, GOOD_HISTORIES)), "--out", str(d / "in.parquet"),
        "--overwrite"], ["{d}/in.parquet: holds the input {d}/in.parquet"]),
    ("batch-input-not-parquet", "batch_score", lambda d, r: [
        "--run", str(r), "--input", str(_raw(d, "in.parquet", b"not parquet")), "--out", str(d / "o.parquet")],
     ["{d}/in.parquet: cannot read Parquet metadata"]),
    ("batch-truncated-summary", "batch_score", lambda d, r: [
        "--run", str(run_copy(d, r, lambda c: truncate(c / "summary.json"))), "--split", "test",
        "--out", str(d / "o.parquet")], ["{d}/run/summary.json: not valid JSON"]),
]


# -- small helpers used by the table -----------------------------------------------------------------

def _parquet(d: Path, name: str, **columns) -> Path:
    pq.write_table(pa.table(columns), d / name)
    return d / name


def _without_text(out: Path) -> Path:
    from alterrec_dist.data.layout import DatasetWriter

    rng = np.random.default_rng(0)
    with DatasetWriter(out) as w:
        for split in ("train", "valid", "test"):
            w.add_sessions(split, [[1, 2], [3]] * 8, rng.integers(0, V, 16))
        w.set_items([f"item{i}" for i in range(V)], [None] * V)  # as `prepare log` without --text-cols
        w.add_text_features(np.zeros((V, 8)))
        w.commit(source={"kind": "test"}, text_model=None)
    return out


def _raw(d: Path, name: str, data: bytes) -> Path:
    (d / name).write_bytes(data)
    return d / name


def _linked(run: Path, name: str, target: Path) -> Path:
    """`run` with RUN/name a symbolic link to `target`, a directory holding a file or a file of two lines."""
    if name == "checkpoints":
        target.mkdir()
        (target / "thesis.tex").write_text("mine")
    else:
        target.write_text("line1\nline2\n")
    entry = run / name
    if entry.is_dir():
        shutil.rmtree(entry)
    entry.unlink(missing_ok=True)
    entry.symlink_to(target)
    return run


def _dangling(run: Path, name: str, target: Path) -> Path:
    """`run` with RUN/name a symbolic link to `target`, which does not exist."""
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(target)
    return run


def _mkdir(p: Path) -> Path:
    p.mkdir()
    (p / "kept").write_text("x")
    return p


def _with_session(d: Path) -> Path:
    pq.write_table(pa.table({"user": pa.array(["u1"] * 8), "item": pa.array(list("ABCD") * 2),
                             "ts": pa.array([float(t) for t in range(8)]),
                             "sess": pa.array([1.0, float("nan")] + [1.0] * 2 + [2.0] * 4)}), d / "inter.parquet")
    return d / "inter.parquet"


def _float_items(d: Path) -> Path:
    pq.write_table(pa.table({"item": pa.array([1.0, 2.0, float("nan")])}), d / "items.parquet")
    return d / "items.parquet"


def _rb_text(d: Path, text: bytes) -> Path:
    rb = recbole(d)
    (rb / "X.text").write_bytes(text)
    return rb


def _rb_edit(d: Path, name: str, first_row: str) -> Path:
    rb = recbole(d)
    lines = (rb / name).read_text().splitlines()
    (rb / name).write_text("\n".join([lines[0], first_row, *lines[2:]]) + "\n")
    return rb


def _flip_last_byte(ds: Path) -> None:
    f = ds / "text_features" / "has_text.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _run_dataset(run: Path) -> Path:
    return Path(json.loads((run / "dataset.json").read_text())["path"])


def _run_dataset_copy(d: Path, run: Path) -> Path:
    return Path(shutil.copytree(_run_dataset(run), d / "ds"))


def _run_on_dataset_copy(d: Path, run: Path) -> Path:
    """A copy of the run whose model names a copy of its dataset (d/ds), as a run trained on it would."""
    data, copy = _run_dataset_copy(d, run), run_copy(d, run)
    manifest = json.loads((copy / "model" / "manifest.json").read_text())
    (copy / "model" / "manifest.json").write_text(json.dumps({**manifest, "dataset": str(data)}))
    return copy


def _other_items(d: Path, run: Path) -> Path:
    """The run's dataset with every item renamed: the same shapes, other items."""
    from tests.serve.test_export import copy_dataset
    data = _run_dataset(run)
    from alterrec_dist.data.dataset import Dataset
    return copy_dataset(data, d / "other", item_ids=[f"other-{i}" for i in range(Dataset(data).num_items)])


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _signed_torch_edit(directory: Path, name: str, edit) -> None:
    """directory/name (a torch file) through `edit`, its sha256 recorded anew in directory/manifest.json."""
    import torch
    blob = torch.load(directory / name, weights_only=True)
    edit(blob)
    torch.save(blob, directory / name)
    _sign(directory, name)


def _max_len_everywhere(directory: Path, max_len: int) -> None:
    """An export whose manifest and encoders.pt agree on `max_len`, its networks' encoder a transformer (whose
    position table that many rows would be)."""
    _signed_torch_edit(directory, "encoders.pt", lambda b: b.update(max_len=max_len) or b["model"].update(
        encoder="transformer"))
    _edit_json(directory / "manifest.json", lambda m: m["engine"].update(max_len=max_len))


def _signed_npy_objects(directory: Path, name: str) -> None:
    np.save(directory / name, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    _sign(directory, name)


def _torch_save_signed(directory: Path, name: str, obj) -> None:
    import torch
    torch.save(obj, directory / name)
    _sign(directory, name)


def _npy_signed(directory: Path, name: str, edit) -> None:
    np.save(directory / name, edit(np.load(directory / name)))
    _sign(directory, name)


def _sign(directory: Path, name: str) -> None:
    from alterrec_dist.common.files import file_sha256
    _edit_json(directory / "manifest.json", lambda m: m["files"].update({name: file_sha256(directory / name)}))


def _export_copy(d: Path, run: Path, damage) -> Path:
    from alterrec_dist import export
    export.main(["--run", str(run), "--out", str(d / "x")])
    damage(d / "x")
    return d / "x"


# -- the test ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory, "alterrec")


def test_matrix_has_the_cases_the_issue_asks_for():
    commands = {c[1] for c in CASES}
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    assert commands == {"prepare", "synth", "train", "export", "recommend", "batch_score"}
    assert {c[0].split("-")[0] for c in CASES if c[1] == "prepare"} >= {"log", "recbole", "m2"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, capsys, request):
    name, command, setup, fragments = case
    needs_run = command in ("export", "recommend", "batch_score") or name.startswith("train-resume")
    trained = request.getfixturevalue("run") if needs_run else None
    d = tmp_path / "case"
    d.mkdir()
    argv = setup(d, trained)
    capsys.readouterr()  # what the set-up printed
    before = snapshot(tmp_path)
    code, err = run_command(command, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code!r}; stderr: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment.format(d=d) in lines[0], lines[0]
    after = snapshot(tmp_path)
    assert after == before, f"left behind or changed: {sorted(set(after.items()) ^ set(before.items()))[:5]}"


def test_metrics_that_cannot_be_written_say_the_scores_were(run, tmp_path, capsys):
    """--metrics-out is written after the scores are in place: a failure there was a traceback after them."""
    out = tmp_path / "o.parquet"
    code, err = run_command("batch_score", ["--run", str(run), "--input", str(batch_input(tmp_path, GOOD_HISTORIES)),
                                            "--out", str(out), "--metrics-out", "/proc/m.json", "--no-ray"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: /proc/m.json: cannot write (") and f"the scores are in {out}" in lines[0]
    assert pq.read_table(out).num_rows == len(GOOD_HISTORIES)


@pytest.mark.parametrize("command", ["synth", "export", "batch_score"])
def test_an_empty_out_is_refused_not_the_current_directory(command, run, tmp_path, monkeypatch, capsys):
    """`--out "$UNSET" --overwrite` resolved to the current directory and replaced it with the output: a user's
    files there were deleted (exit 0)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "thesis.tex").write_text("keep")
    monkeypatch.chdir(cwd)
    argv = {"synth": ["--items", "50", "--sessions", "200", "--text-features", "random-projection"],
            "export": ["--run", str(run)],
            "batch_score": ["--run", str(run), "--split", "test", "--no-ray"]}[command]
    code, err = run_command(command, [*argv, "--out", "", "--overwrite"], capsys)
    assert code == 2
    assert err.strip() == "error: an output path is empty (an unset variable?): give --out (or --metrics-out) a path"
    assert [p.name for p in cwd.iterdir()] == ["thesis.tex"]


def test_metrics_out_replaces_a_file_only_with_overwrite(run, tmp_path, capsys):
    """--metrics-out replaced any file there without --overwrite: a run's metrics.jsonl became this report."""
    kept = tmp_path / "metrics.jsonl"
    kept.write_text("the run's log\n")
    argv = ["--run", str(run), "--split", "test", "--out", str(tmp_path / "o.parquet"), "--metrics-out", str(kept),
            "--no-ray"]
    code, err = run_command("batch_score", argv, capsys)
    assert code == 2 and f"{kept}: output exists (pass --overwrite to replace it)" in err
    assert kept.read_text() == "the run's log\n" and not (tmp_path / "o.parquet").exists()
    assert run_command("batch_score", [*argv, "--overwrite"], capsys)[0] == 0
    assert json.loads(kept.read_text())["summary_equal"]


# -- the fixed behaviours that are not errors -----------------------------------------------------------

def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_leftovers(out: Path) -> list[Path]:
    """What a SIGKILLed writer of `out` leaves: its temp directory or file and an old copy."""
    pid = dead_pid()
    tmp_dir, old_file = out.parent / f".{out.name}.tmp-{pid}", out.parent / f".{out.name}.old-{pid}"
    tmp_dir.mkdir(parents=True)
    (tmp_dir / "part").write_text("half")
    old_file.write_text("old")
    return [tmp_dir, old_file]


def test_every_writer_sweeps_the_leftovers_of_dead_processes(run, tmp_path, capsys):
    """export, batch_score, prepare and synth (and atomic_write_json, e.g. --metrics-out) remove the
    `.OUT.tmp-PID` / `.OUT.old-PID` of processes that are gone, and leave none of their own."""
    from alterrec_dist import batch_score, export, prepare, synth
    from alterrec_dist.common.files import atomic_write_json

    outs = {"export": tmp_path / "x", "batch": tmp_path / "o.parquet", "prepare": tmp_path / "p",
            "synth": tmp_path / "s", "json": tmp_path / "m.json"}
    planted = [p for out in outs.values() for p in plant_leftovers(out)]
    assert export.main(["--run", str(run), "--out", str(outs["export"])]) == 0
    assert batch_score.main(["--run", str(run), "--input", str(batch_input(tmp_path, GOOD_HISTORIES)),
                             "--out", str(outs["batch"])]) == 0
    assert prepare.main(log_argv(log_csv(tmp_path, GOOD_LOG), log_items(tmp_path), outs["prepare"])) == 0
    assert synth.main(["--items", "50", "--sessions", "50", "--text-features", "random-projection",
                       "--out", str(outs["synth"]), "--no-progress"]) == 0
    atomic_write_json(outs["json"], {"a": 1})
    assert [p for p in planted if p.exists()] == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_overwrite_replaces_a_regular_file_and_leaves_no_old_copy(run, tmp_path):
    """prepare, export and batch_score --overwrite over a file: replaced; no `.OUT.old-PID` stays
    (prepare failed with exit 1 after renaming the dataset into place; export left the old file)."""
    from alterrec_dist import batch_score, export, prepare
    from alterrec_dist.data.dataset import Dataset

    outs = [tmp_path / "p", tmp_path / "x", tmp_path / "o.parquet"]
    for out in outs:
        out.write_text("a file")
    assert prepare.main(log_argv(log_csv(tmp_path, GOOD_LOG), log_items(tmp_path), outs[0], "--overwrite")) == 0
    assert export.main(["--run", str(run), "--out", str(outs[1]), "--overwrite"]) == 0
    assert batch_score.main(["--run", str(run), "--input", str(batch_input(tmp_path, GOOD_HISTORIES)),
                             "--out", str(outs[2]), "--overwrite"]) == 0
    assert Dataset(outs[0]).num_items == 5 and (outs[1] / "manifest.json").is_file()
    assert pq.read_table(outs[2]).num_rows == len(GOOD_HISTORIES)
    assert [p.name for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name] == []


def test_synth_of_one_item(tmp_path):
    from alterrec_dist import synth
    from alterrec_dist.data.dataset import Dataset

    assert synth.main(["--items", "1", "--sessions", "40", "--text-features", "random-projection",
                       "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    Dataset(tmp_path / "one").verify()


def test_datasets_carry_checksums_that_verify(tmp_path, capsys):
    from alterrec_dist import prepare
    from alterrec_dist.common.files import file_sha256
    from alterrec_dist.data.dataset import Dataset
    from alterrec_dist.data.layout import data_files

    ds = Dataset(dataset(tmp_path))
    assert sorted(ds.manifest["sha256"]) == sorted(data_files(ds.manifest))
    assert all(file_sha256(ds.path / f) == h for f, h in ds.manifest["sha256"].items())
    assert ds.verify() == []
    assert prepare.main(["verify", str(ds.path)]) == 0
    assert f"verified {ds.path}: {V} items" in capsys.readouterr().out


def file_size_limited(limit: int):
    """For a child process: every file it writes stops at `limit` bytes, as on a full disk (the OS's RLIMIT_FSIZE
    fails the write with EFBIG where a full disk fails it with ENOSPC; filling a disk needs root)."""
    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed rather than told
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_writes


@pytest.mark.slow  # a command's process each (its imports alone take seconds)
@pytest.mark.parametrize("command", ["synth", "export", "batch_score", "train"])
def test_a_write_that_fails_is_one_line_naming_the_output(command, tmp_path, request):
    """A full disk was pyarrow's or torch's traceback ("unexpected pos 16960 vs 16848"), exit 1, naming no file,
    and train left its half-written model directory behind. Now: one line naming the output, exit 2, nothing of
    it left."""
    out = tmp_path / {"synth": "ds", "export": "exp", "batch_score": "bs.parquet", "train": "run"}[command]
    run = request.getfixturevalue("run") if command in ("export", "batch_score") else None
    argv = {"synth": ["--items", "5000", "--sessions", "20000", "--text-features", "random-projection",
                      "--no-progress"],  # (MiniLM would encode 5000 titles first, and write its cache on the limit)
            "export": ["--run", str(run)],
            "batch_score": ["--run", str(run), "--split", "test", "--no-ray"],
            "train": ["--launcher", "torchrun", "--set", "train.m_max=2", "--set", "trainer.num_workers=1"]}[command]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WORLD_SIZE", "RANK", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-m", f"alterrec_dist.{command}", *argv, "--out", str(out)],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, preexec_fn=file_size_limited(20_000))
    written = out / "model" if command == "train" else out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error") or "Traceback" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: {written}: cannot write ("), errors[0]
    assert ("a write fell short: a full disk?" if command == "train" else "File too large") in errors[0], errors[0]
    left = sorted(p.name for p in (out if command == "train" else tmp_path).iterdir())
    assert left == ([".lock", "config.toml", "dataset.json", "tensorboard"] if command == "train" else []), left
