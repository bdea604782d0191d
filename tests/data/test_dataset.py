"""A dataset's identity (what a run records of its data) and `unlike`, which resume and serving compare it with."""
import json
import re
import shutil

import numpy as np
import pytest

from alterrec_dist.common.errors import DamagedData, DataError
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.data.layout import DatasetWriter

V = 30


def dataset(out, train_seed: int = 0, test_seed: int = 0, features_seed: int = 0, id_prefix: str = "item"):
    """A small dataset whose parts are drawn from their own seeds (the valid split is fixed)."""
    train, test = np.random.default_rng(train_seed), np.random.default_rng(test_seed)
    with DatasetWriter(out) as w:
        w.add_sessions("train", [train.integers(0, V, 3).tolist() for _ in range(40)], train.integers(0, V, 40))
        w.add_sessions("valid", [[1, 2]] * 5, np.arange(5))
        w.add_sessions("test", [test.integers(0, V, 3).tolist() for _ in range(5)], test.integers(0, V, 5))
        w.set_items([f"{id_prefix}{i}" for i in range(V)], [f"text {i}" for i in range(V)])
        w.add_text_features(np.random.default_rng(features_seed).standard_normal((V, 8)))
        w.commit(source={"kind": "test"}, text_model=None)
    return Dataset(out)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_the_start_check_refuses_an_empty_split(tmp_path, split):
    """A dataset whose valid split was emptied (its file and manifest made to agree) passed every check; training
    then scored valid 0.0 every epoch, chose epoch 0 and exited 0."""
    import pyarrow.parquet as pq

    from alterrec_dist.data.layout import SESSION_SCHEMA

    data = dataset(tmp_path / "data")
    manifest = json.loads(data.mpath.read_text())
    [part] = manifest["session_files"][split]
    pq.write_table(SESSION_SCHEMA.empty_table(), data.path / part["file"])
    part["rows"], manifest["splits"][split] = 0, 0
    data.mpath.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"the {split} split has no rows"):
        Dataset(data.path).check()


def test_the_writer_refuses_an_id_twice(tmp_path):
    """Two items with one id trained, and serving answered for the second whenever the first was asked for."""
    with pytest.raises(DataError, match="item table: item 7 repeats the id 'i3' of an earlier item"):
        with DatasetWriter(tmp_path / "data") as w:
            w.set_items([f"i{i}" if i != 7 else "i3" for i in range(V)])
    assert not (tmp_path / "data").exists()


def record(data: Dataset, path, **drop):
    path.write_text(json.dumps({k: v for k, v in data.identity().items() if k not in drop}))
    return path


def test_unlike_compares_content_not_place(tmp_path):
    data = dataset(tmp_path / "data")
    rec = record(data, tmp_path / "dataset.json")
    assert json.loads(rec.read_text())["sha256"] == data.manifest["sha256"]
    assert data.unlike(rec) is None and data.unlike(rec, items_only=True) is None
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    assert Dataset(tmp_path / "moved").unlike(rec) is None  # the same files elsewhere
    assert data.unlike(tmp_path / "no-record.json") is None  # a run made before the record: nothing to compare


def test_unlike_names_what_differs(tmp_path):
    rec = record(dataset(tmp_path / "data"), tmp_path / "dataset.json")
    other_sessions = dataset(tmp_path / "other-sessions", train_seed=1, test_seed=1)
    # other train targets: another popularity column, so items.parquet differs too, but not the items
    assert other_sessions.unlike(rec) == "not the same items.parquet, sessions/test/part-00000.parquet, ... (3 in all)"
    assert other_sessions.unlike(rec, items_only=True) is None  # a model's items are all there: sessions may change
    other_features = dataset(tmp_path / "other-features", features_seed=1)
    assert other_features.unlike(rec, items_only=True) == "not the same text_features/part-00000.npy"
    other_ids = dataset(tmp_path / "other-ids", id_prefix="sku")
    assert other_ids.unlike(rec, items_only=True) == "not the same item ids"


def test_a_record_without_item_ids_compares_the_items_file(tmp_path):
    """dataset.json as runs wrote it before item_ids_sha256: the items file stands in for the ids."""
    rec = record(dataset(tmp_path / "data"), tmp_path / "dataset.json", item_ids_sha256=None)
    other_sessions = dataset(tmp_path / "other-sessions", train_seed=1)
    assert other_sessions.unlike(rec, items_only=True) == "not the same items.parquet"


def test_the_writer_refuses_an_empty_history_and_leaves_nothing(tmp_path):
    """A row without history passed the writer and the start-of-training check (Parquet keeps no list lengths),
    then stopped training at that row mid-epoch (review finding)."""
    import pytest
    with pytest.raises(ValueError, match=r"train row 42: empty or null history"):
        with DatasetWriter(tmp_path / "out") as w:
            w.add_sessions("train", [[1, 2]] * 40, np.arange(40))
            w.add_sessions("train", [[3], [], [4]], [1, 2, 3])
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary beside it


@pytest.mark.parametrize("history, target, error", [
    ([[0, 1], [2]], [3, -4], "train row 2: target -4 is negative"),  # numpy's bincount traceback
    ([[0, 1], [2, -1]], [3, 4], "train row 2: history item -1 is negative"),
    ([[0, 1], [2, 300]], [3, 4], "item index 300 in the sessions, for 20 items (0..19)"),  # written, exit 0
])
def test_the_writer_refuses_an_item_index_outside_the_catalog(tmp_path, history, target, error):
    with pytest.raises(DataError, match=re.escape(error)):
        with DatasetWriter(tmp_path / "data") as w:
            w.add_sessions("train", history, target)
            for split in ("valid", "test"):
                w.add_sessions(split, [[0]], [1])
            w.set_items([f"i{i}" for i in range(20)])
            w.add_text_features(np.ones((20, 8)))
            w.commit(source={"kind": "test"}, text_model=None)
    assert not (tmp_path / "data").exists()


def test_has_text_is_where_the_feature_rows_are_not_zeros(tmp_path):
    """Without a mask the writer marked every item as having text (200 of 200 on a reviewer's catalog of 188
    texts), and `prepare verify` passed it; the model tells text by a row that is not all zeros. A mask that marks
    a zero row is refused: a text method would train on it as if it were text."""
    features = np.ones((4, 8))
    features[:2] = 0  # items a and b: no text, as the text encoder writes them

    def write(out, mask=None):
        with DatasetWriter(out) as w:
            for split in ("train", "valid", "test"):
                w.add_sessions(split, [[0, 1]], [2])
            w.set_items(["a", "b", "c", "d"])
            w.add_text_features(features)
            if mask is not None:
                w.set_has_text(mask)
            w.commit(source={"kind": "test"}, text_model=None)

    write(tmp_path / "data")
    data = Dataset(tmp_path / "data")
    assert data.has_text().tolist() == [False, False, True, True]
    assert data.manifest["text"]["num_with_text"] == 2
    with pytest.raises(DataError, match="item_idx 1 is marked as having text, but its feature row is all zeros"):
        write(tmp_path / "marked", np.array([False, True, True, True]))
    assert not (tmp_path / "marked").exists()


def test_a_mask_over_zero_rows_as_an_earlier_writer_signed_it_is_refused(tmp_path):
    """The writer marked every item as having text when given no mask, zero feature rows included, and signed
    that: `prepare verify` passed it and a text method trained on zeros. Its rows are checked against the mask,
    by verify and where training and serving read them."""
    from alterrec_dist.common.files import file_sha256

    data = dataset(tmp_path / "data")
    part = data.path / data.manifest["text"]["files"][0]["file"]
    x = np.load(part)
    x[4] = 0  # item 4's row, as the encoder writes it for no text, while the mask says it has one
    np.save(part, x)
    manifest = json.loads(data.mpath.read_text())
    manifest["sha256"][data.manifest["text"]["files"][0]["file"]] = file_sha256(part)
    data.mpath.write_text(json.dumps(manifest))
    message = r"has_text.npy: item_idx 4 is marked as having text, but its row of text_features/part-00000.npy is " \
              r"all zeros: make the dataset again"
    with pytest.raises(DataError, match=message):
        Dataset(data.path).verify()
    # the start check reads the mask, not the rows: the rows a worker or a server reads are checked as read
    assert Dataset(data.path).text_features(np.array([3, 5])).shape == (2, 8)
    for rows in (np.array([2, 4]), None):
        with pytest.raises(DamagedData, match=message):
            Dataset(data.path).text_features(rows)


@pytest.mark.parametrize("bad, value", [("NaN", np.nan), ("past float16's range", 1e6)])
def test_the_writer_refuses_a_text_feature_that_is_not_finite_and_leaves_nothing(tmp_path, bad, value):
    """A NaN row (or one that float16 turns into inf) trained to exit 0, then broke every recommendation."""
    features = np.random.default_rng(0).standard_normal((V, 8))
    features[12, 3] = value
    with pytest.raises(DataError, match="text features: item_idx 12: a value that is not finite as float16"):
        with DatasetWriter(tmp_path / "data") as w:
            w.set_items([f"i{i}" for i in range(V)])
            w.add_text_features(features[:10])
            w.add_text_features(features[10:])
    assert not (tmp_path / "data").exists()


def test_rows_read_for_training_or_serving_refuse_a_feature_that_is_not_finite(tmp_path):
    """What a checksum cannot tell (a writer that was not ours, or a dataset changed and signed again): the
    rows a worker or a server reads are checked as they are read, naming the file, its row and the item."""
    data = dataset(tmp_path / "data")
    part = data.path / data.manifest["text"]["files"][0]["file"]
    x = np.load(part)
    x[17, 2] = np.inf
    np.save(part, x)
    assert data.text_features(np.array([3, 4, 5])).shape == (3, 8)  # rows without it read as before
    message = f"{part}: row 18 (item_idx 17): a text feature that is not finite (NaN or inf): make the dataset again"
    for rows in (np.array([16, 17]), None):  # a rank's own rows; serving's all
        with pytest.raises(DataError) as e:
            data.text_features(rows)
        assert str(e.value) == message


def test_verify_refuses_text_features_with_fewer_rows_than_items(tmp_path):
    """Feature parts that hold fewer rows than the catalog (a part cut short, its manifest re-signed so every
    checksum and every part's own shape agree) left the last items without a text row: training and serving
    would read past the end or score the wrong item's text. `prepare verify` (and the start check) refuse it."""
    from alterrec_dist.common.files import file_sha256

    data = dataset(tmp_path / "data")
    manifest = json.loads(data.mpath.read_text())
    [part] = manifest["text"]["files"]
    path = data.path / part["file"]
    np.save(path, np.load(path)[:V - 1])  # the last item's row is gone
    part["rows"] = V - 1
    manifest["sha256"][part["file"]] = file_sha256(path)
    data.mpath.write_text(json.dumps(manifest))
    with pytest.raises(DataError) as e:
        Dataset(data.path).verify()
    assert str(e.value) == f"{data.mpath}: text.files hold {V - 1} rows for {V} items"
