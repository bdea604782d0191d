"""The real bundled all-MiniLM-L6-v2 through `encode_texts`: meaning, missing text, the cache."""
import numpy as np
import pytest

from alterrec_dist.common.errors import DataError
from alterrec_dist.data.text_features import EncodeStats, encode_texts

TITLES = [
    "USB-C charging cable, 2 m, braided nylon",
    "Braided USB Type-C charger cable 6 ft",
    "Stainless steel garden hose nozzle with 8 spray patterns",
    None,
    "",
    "   ",
]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    cache = tmp_path_factory.mktemp("text-cache")
    stats = EncodeStats()
    features, has_text = encode_texts(TITLES, cache_dir=cache, progress=False, stats=stats)
    return features, has_text, stats, cache


def test_shapes_dtype_and_unit_norm(encoded):
    features, has_text, _, _ = encoded
    assert features.shape == (len(TITLES), 384) and features.dtype == np.float16
    norms = np.linalg.norm(features[:3].astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)  # MiniLM's own Normalize module, kept


def test_similar_titles_are_closer_than_unrelated(encoded):
    f = encoded[0].astype(np.float32)
    cable_cable, cable_hose = f[0] @ f[1], f[0] @ f[2]
    assert cable_cable > cable_hose + 0.2


def test_missing_text_is_a_zero_row(encoded):
    features, has_text, stats, _ = encoded
    assert has_text.tolist() == [True, True, True, False, False, False]
    assert not features[3:].any()
    assert stats.without_text == 3


def test_cache_serves_a_second_call(encoded):
    features, _, first, cache = encoded
    assert (first.encoded, first.cached) == (3, 0)
    stats = EncodeStats()
    again, _ = encode_texts(TITLES[:3] + ["A new title never seen before"], cache_dir=cache, progress=False, stats=stats)
    assert (stats.cached, stats.encoded) == (3, 1)
    np.testing.assert_array_equal(again[:3], features[:3])
    # Hits now span two cache files (one per call); every row lands in its own place.
    stats = EncodeStats()
    mixed, _ = encode_texts([TITLES[2], "A new title never seen before", TITLES[0]], cache_dir=cache,
                            progress=False, stats=stats)
    assert (stats.cached, stats.encoded) == (3, 0)
    np.testing.assert_array_equal(mixed, again[[2, 3, 0]])


def test_duplicate_texts_are_encoded_once(tmp_path):
    stats = EncodeStats()
    f, _ = encode_texts(["same words", "same words", "other words"], cache_dir=tmp_path, progress=False, stats=stats)
    assert stats.encoded == 2
    np.testing.assert_array_equal(f[0], f[1])


def test_no_text_at_all_loads_no_model(tmp_path):
    stats = EncodeStats()
    f, has_text = encode_texts([None, ""], cache_dir=tmp_path, progress=False, stats=stats)
    assert f.shape == (2, 384) and not f.any() and not has_text.any()
    assert not stats.model_loaded and not any(tmp_path.iterdir())


def test_text_model_must_be_a_local_model_directory(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        encode_texts(["x"], model=str(tmp_path), cache_dir=tmp_path, progress=False)
