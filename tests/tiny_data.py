"""A tiny real dataset (Parquet shards, manifest, text features) for the multi-process engine tests."""
import numpy as np

from alterrec_dist.data.layout import DatasetWriter

V, TEXT_DIM = 41, 8


def tiny_dataset(out):
    rng = np.random.default_rng(0)
    with DatasetWriter(out) as w:
        for split, n in (("train", 96), ("valid", 24), ("test", 24)):
            hist = [rng.integers(0, V, rng.integers(1, 7)).tolist() for _ in range(n)]
            w.add_sessions(split, hist, rng.integers(0, V, n))
        w.set_items([f"item{i}" for i in range(V)], [f"text {i}" for i in range(V)])
        w.add_text_features(rng.normal(size=(V, TEXT_DIM)))
        w.commit(source={"kind": "test"}, text_model="random")
    return out
