"""A dataset's identity (what a run records of its data) and `unlike`, which resume and serving compare it with."""
import json
import shutil

import numpy as np

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


def test_the_writer_refuses_an_id_twice(tmp_path):
    """Two items with one id trained, and serving answered for the second whenever the first was asked for."""
    import pytest

    from alterrec_dist.common.errors import DataError

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
