"""A dataset's identity (what a run records of its data) and `unlike`, which resume and serving compare it with."""
import json
import shutil

import numpy as np

from alterrec_dist.data.dataset import Dataset
from alterrec_dist.data.layout import DatasetWriter

V = 30


def dataset(out, test_seed: int = 0, features_seed: int = 0):
    """Items, features and train split fixed; the test split and the features drawn from the seeds given."""
    rng, test_rng = np.random.default_rng(0), np.random.default_rng(test_seed)
    with DatasetWriter(out) as w:
        w.add_sessions("train", [rng.integers(0, V, 3).tolist() for _ in range(40)], rng.integers(0, V, 40))
        w.add_sessions("valid", [[1, 2]] * 5, np.arange(5))
        w.add_sessions("test", [test_rng.integers(0, V, 3).tolist() for _ in range(5)], test_rng.integers(0, V, 5))
        w.set_items([f"item{i}" for i in range(V)], [f"text {i}" for i in range(V)])
        w.add_text_features(np.random.default_rng(features_seed).standard_normal((V, 8)))
        w.commit(source={"kind": "test"}, text_model=None)
    return Dataset(out)


def record(data: Dataset, path):
    path.write_text(json.dumps(data.identity()))
    return path


def test_unlike_compares_content_not_place(tmp_path):
    data = dataset(tmp_path / "data")
    rec = record(data, tmp_path / "dataset.json")
    assert json.loads(rec.read_text())["sha256"] == data.manifest["sha256"]
    assert data.unlike(rec) is None and data.unlike(rec, items_only=True) is None
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    assert Dataset(tmp_path / "moved").unlike(rec) is None  # the same files elsewhere
    assert data.unlike(tmp_path / "no-record.json") is None  # a run made before the record: nothing to compare


def test_unlike_names_the_files_that_differ(tmp_path):
    rec = record(dataset(tmp_path / "data"), tmp_path / "dataset.json")
    other_test = dataset(tmp_path / "other-test", test_seed=1)
    assert other_test.unlike(rec) == "files that differ: sessions/test/part-00000.parquet"
    assert other_test.unlike(rec, items_only=True) is None  # a model's items are the same: other sessions are fine
    other_features = dataset(tmp_path / "other-features", test_seed=1, features_seed=1)
    assert other_features.unlike(rec, items_only=True) == "files that differ: text_features/part-00000.npy"
    assert other_features.unlike(rec) == ("files that differ: sessions/test/part-00000.parquet, "
                                          "text_features/part-00000.npy")
