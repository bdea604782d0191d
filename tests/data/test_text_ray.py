"""`prepare --ray` against in-process encoding on a slice of real Scientific item texts (real MiniLM,
real Ray): the same bytes, one cache for both, and the streamed rows are the model's own encoding."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

from alterrec_dist.data.dataset import Dataset
from alterrec_dist.data.text_features import default_model_path, encode_batch, load_encoding_model
from alterrec_dist.prepare import main

pytestmark = pytest.mark.slow  # a local Ray and MiniLM over a few hundred texts: ~1 min on 2 cores
ITEMS = 240


@pytest.fixture(scope="module")
def scientific_slice(shared_data, tmp_path_factory) -> tuple[Path, list[str]]:
    """A `prepare log` input of the first ITEMS Scientific items: some without text, some sharing one."""
    d = tmp_path_factory.mktemp("slice")
    lines = (shared_data / "scientific" / "Scientific.text").read_text().splitlines()[1: ITEMS + 1]
    items = [line.split("\t") for line in lines]
    texts = ["" if i % 50 == 7 else items[i - 1][1] if i % 40 == 3 else text for i, (_, text) in enumerate(items)]
    with open(d / "items.csv", "w", newline="") as f:
        csv.writer(f).writerows([("item", "title"), *((asin, t) for (asin, _), t in zip(items, texts))])
    events = [f"u{u},{items[(u * 7 + t * 13) % ITEMS][0]},{t}" for u in range(20) for t in range(4)]
    (d / "inter.csv").write_text("user,item,ts\n" + "\n".join(events) + "\n")
    return d, texts


def prepare(src: Path, out: Path, cache: Path, monkeypatch, capsys, *extra: str) -> tuple[Dataset, str]:
    """(the dataset, what prepare printed)"""
    monkeypatch.setenv("ALTERREC_CACHE", str(cache))
    main(["log", "--interactions", str(src / "inter.csv"), "--items", str(src / "items.csv"), "--user-col", "user",
          "--item-col", "item", "--time-col", "ts", "--text-cols", "title", "--out", str(out), "--no-progress", *extra])
    return Dataset(out), capsys.readouterr().out


def feature_bytes(ds: Dataset) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((ds.path / "text_features").iterdir())}


def cache_bytes(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*.npz"))}


def test_ray_writes_the_same_bytes_and_shares_the_cache(scientific_slice, tmp_path, monkeypatch, capsys):
    """In-process and on Ray: the same feature and cache bytes, each path reads the other's cache, and the
    streamed part is the model's own encoding of the whole array, as the code before streaming wrote it."""
    src, texts = scientific_slice
    distinct = len({t for t in texts if t})
    here, said = prepare(src, tmp_path / "here", tmp_path / "cache-here", monkeypatch, capsys)
    assert f"{distinct} encoded, 0 from cache" in said
    on_ray, said = prepare(src, tmp_path / "ray", tmp_path / "cache-ray", monkeypatch, capsys, "--ray", "--ray-actors", "2")
    assert f"{distinct} encoded, 0 from cache" in said
    assert feature_bytes(on_ray) == feature_bytes(here)
    assert cache_bytes(tmp_path / "cache-ray") == cache_bytes(tmp_path / "cache-here")
    # One cache: each path finds every text the other encoded (so Ray is not even started).
    again, said = prepare(src, tmp_path / "again", tmp_path / "cache-ray", monkeypatch, capsys)
    assert f"0 encoded, {distinct} from cache" in said
    ray_again, said = prepare(src, tmp_path / "ray-again", tmp_path / "cache-here", monkeypatch, capsys, "--ray")
    assert f"0 encoded, {distinct} from cache" in said
    assert feature_bytes(again) == feature_bytes(ray_again) == feature_bytes(here)
    assert feature_bytes(here)["part-00000.npy"] == whole_array_encoding(texts)


def whole_array_encoding(texts: list[str]) -> bytes:
    """The bytes of the plainest encoding: each distinct text encoded alone (`text_features._encode_plan`: a text's
    vector is its own, whatever batch of its length it ran in), the V×D float16 array assembled whole (zero rows
    without text), saved as one .npy part."""
    distinct = list(dict.fromkeys(t for t in texts if t))
    model = load_encoding_model(default_model_path(), progress=False)
    vectors = np.stack([encode_batch(model, [text])[0] for text in distinct])
    features = np.zeros((len(texts), 384), dtype=np.float16)
    with_text = [i for i, t in enumerate(texts) if t]
    features[with_text] = vectors[[distinct.index(texts[i]) for i in with_text]]
    expected = io.BytesIO()
    np.save(expected, features)
    return expected.getvalue()
