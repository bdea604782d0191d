"""The real bundled all-MiniLM-L6-v2 through `write_text_features`: meaning, missing text, the cache,
the rows streamed to the writer part by part."""
import resource
import signal
from pathlib import Path

import numpy as np
import pytest

from alterrec_dist.common.errors import DataError
from alterrec_dist.data import text_features
from alterrec_dist.data.text_features import EncodeStats, write_text_features

TITLES = [
    "USB-C charging cable, 2 m, braided nylon",
    "Braided USB Type-C charger cable 6 ft",
    "Stainless steel garden hose nozzle with 8 spray patterns",
    None,
    "",
    "   ",
]


class Blocks:
    """The writer's side of `write_text_features`: what it was handed, block by block."""

    def __init__(self, rows_per_part: int = 262_144):
        self.feature_rows_per_part = rows_per_part
        self.blocks: list[np.ndarray] = []
        self.has_text = None

    def add_text_features(self, block: np.ndarray) -> None:
        self.blocks.append(block)

    def set_has_text(self, mask: np.ndarray) -> None:
        self.has_text = mask


def encode(texts, rows_per_part=262_144, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(features, has_text) as one array each, the blocks checked to be parts of `rows_per_part` rows."""
    sink = Blocks(rows_per_part)
    has_text = write_text_features(sink, texts, progress=False, **kw)
    assert [len(b) for b in sink.blocks[:-1]] == [rows_per_part] * (len(sink.blocks) - 1)
    assert sink.has_text is has_text
    return np.concatenate(sink.blocks), has_text


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    cache = tmp_path_factory.mktemp("text-cache")
    stats = EncodeStats()
    features, has_text = encode(TITLES, cache_dir=cache, stats=stats)
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
    again, _ = encode(TITLES[:3] + ["A new title never seen before"], cache_dir=cache, stats=stats)
    assert (stats.cached, stats.encoded) == (3, 1)
    np.testing.assert_array_equal(again[:3], features[:3])
    # Hits now span two cache files (one per call); every row lands in its own place, in parts of
    # any size (a part gathers from each file it needs).
    stats = EncodeStats()
    mixed, _ = encode([TITLES[2], None, "A new title never seen before", TITLES[0], TITLES[2]], rows_per_part=2,
                      cache_dir=cache, stats=stats)
    assert (stats.cached, stats.encoded, stats.model_loaded) == (3, 0, False)
    np.testing.assert_array_equal(mixed, np.concatenate([again[[2]], np.zeros((1, 384), np.float16), again[[3, 0, 2]]]))


def test_an_unreadable_cache_file_is_a_warning_and_a_miss(encoded, tmp_path, capsys):
    features, _, _, cache = encoded
    for f in cache.rglob("chunk-*.npz"):
        (tmp_path / f.relative_to(cache)).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f.relative_to(cache)).write_bytes(f.read_bytes()[:100])  # torn: not a zip
    stats = EncodeStats()
    again, _ = encode(TITLES, cache_dir=tmp_path, stats=stats)
    assert "warning: ignoring unreadable text cache file" in capsys.readouterr().err
    assert (stats.cached, stats.encoded) == (0, 3)
    np.testing.assert_array_equal(again, features)


def header_only(descr: str, shape: tuple) -> bytes:
    """A .npy header and no data, as a crafted file would carry it."""
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("members, why", [
    ({"keys.npy": header_only("|V32", (10 ** 12,))}, "(1000000000000,), not at most"),  # 286 bytes, 10^12 keys
    ({"keys.npy": npy_bytes(np.zeros(5, "S64"))}, "keys |S64 (5,)"),  # another key type: np.concatenate's traceback
    ({"keys.npy": npy_bytes(np.zeros((3, 1), "V32")), "vectors.npy": npy_bytes(np.zeros((3, 384), np.float16))},
     "keys |V32 (3, 1)"),  # digests, but 2-D: beside a good file, np.concatenate's traceback
    ({"vectors.npy": npy_bytes(np.zeros((3, 384), np.float16))}, "keys.npy"),  # no keys: a KeyError
])
def test_a_cache_file_whose_keys_are_not_digests_is_a_warning_and_a_miss_read_no_further(
        encoded, tmp_path, capsys, members, why):
    """A 286-byte file whose header declares 10^12 keys stopped every run for memory; keys of another type, a
    DTypePromotionError traceback (reviewer findings). The header is read first: the file is a miss. The first
    call's good files sit beside it."""
    import shutil
    import zipfile
    features, _, _, cache = encoded
    chunk = next(cache.rglob("chunk-*.npz"))
    shutil.copytree(chunk.parent, tmp_path / chunk.parent.relative_to(cache))
    crafted = tmp_path / chunk.parent.relative_to(cache) / "chunk-ffff.npz"
    with zipfile.ZipFile(crafted, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    stats = EncodeStats()
    again, _ = encode(TITLES, cache_dir=tmp_path, stats=stats)
    err = capsys.readouterr().err
    assert f"warning: ignoring unreadable text cache file {crafted}" in err and why in err, err
    assert stats.cached + stats.encoded == 3 and stats.cached > 0  # the good files still serve
    np.testing.assert_array_equal(again, features)


@pytest.mark.parametrize("vectors, problem", [
    (header_only("|V1000000000", (3, 384)), r"\|V1000000000"),  # 1 TiB asked for
    (npy_bytes(np.ones((3, 384), np.int16)), "int16"),  # read as features, exit 0
])
def test_a_cache_file_whose_vectors_are_not_floats_is_one_error_then_a_miss(encoded, tmp_path, vectors, problem):
    """The shape was checked before the read but not the type: (3, 384) items of a gigabyte each asked for 1 TiB,
    a MemoryError on every run that neither named the file nor removed it (reviewer finding)."""
    import zipfile

    def other_vectors(chunk, copy):
        with np.load(chunk) as z:
            keys = z["keys"]
        with zipfile.ZipFile(copy, "w") as out:
            out.writestr("keys.npy", npy_bytes(keys))
            out.writestr("vectors.npy", vectors)

    refused_then_encoded_again(encoded, tmp_path, other_vectors, rf"\(vectors of {problem}, not floats\)")


def test_a_cache_file_damaged_past_its_keys_is_one_error_then_a_miss(encoded, tmp_path):
    """Its keys read, its vectors not (a bad CRC): a traceback on every run, the file never replaced. Now one
    line naming it, the file removed, and the next run encodes those texts again."""
    import zipfile

    def flip_a_vector_byte(chunk, copy):
        data = bytearray(chunk.read_bytes())
        data[zipfile.ZipFile(chunk).getinfo("vectors.npy").header_offset + 300] ^= 0xFF  # inside the vectors
        copy.write_bytes(bytes(data))

    refused_then_encoded_again(encoded, tmp_path, flip_a_vector_byte, r"\(Bad CRC-32 .*removed it")


def refused_then_encoded_again(encoded, tmp_path, damage, problem: str) -> None:
    """The first call's cache file, copied into a cache of its own by `damage(chunk, copy)`: one line matching
    `problem` and the file removed, then the next run encodes its texts to the features they had."""
    features, _, _, cache = encoded
    (chunk,) = [f for f in cache.rglob("chunk-*.npz") if len(np.load(f)["keys"]) == 3]  # the first call's
    copy = tmp_path / chunk.relative_to(cache)
    copy.parent.mkdir(parents=True)
    damage(chunk, copy)
    with pytest.raises(DataError, match=rf"{copy.name}: a damaged text cache file {problem}"):
        encode(TITLES, cache_dir=tmp_path)
    assert not copy.exists()
    stats = EncodeStats()
    again, _ = encode(TITLES, cache_dir=tmp_path, stats=stats)
    assert (stats.cached, stats.encoded) == (0, 3)
    np.testing.assert_array_equal(again, features)


@pytest.mark.parametrize("damage, problem", [
    (lambda v: v[:2], r"vectors \(2, 384\), its keys and the model want \(3, 384\)"),  # was an IndexError
    (lambda v: v[:, :100], r"vectors \(3, 100\), its keys and the model want \(3, 384\)"),  # a 100-wide dataset
    (lambda v: np.where(np.arange(3)[:, None] == 1, np.nan, v), "a vector that is not finite as float16"),
    (lambda v: v.astype(np.float64) * 1e6, "a vector that is not finite as float16"),  # inf once cast
])
def test_a_cache_file_whose_vectors_do_not_fit_its_keys_or_the_model_is_one_error_then_a_miss(
        encoded, tmp_path, damage, problem):
    """Vectors that read but are wrong: they made a dataset of NaNs, or of another width under the model's
    name, with exit 0 (or a traceback). Now the same as a damaged file: one line, the file removed."""
    def rewrite_vectors(chunk, copy):
        with np.load(chunk) as z:
            np.savez(copy, keys=z["keys"], vectors=damage(z["vectors"]))

    refused_then_encoded_again(encoded, tmp_path, rewrite_vectors, rf"\({problem}\); removed it")


def test_an_interrupted_run_resumes_from_its_saved_chunks(tmp_path, monkeypatch):
    """Chunks of 2 texts: a run killed in its second chunk keeps the first; the rerun encodes the rest."""
    monkeypatch.setattr(text_features, "CACHE_CHUNK_ROWS", 2)
    texts = [f"item number {i} of a small catalog" + "!" * i for i in range(5)]
    real = text_features.encode_here

    def dies_at_the_third_batch(model_dir, batches, progress):
        for i, vectors in enumerate(real(model_dir, batches, progress)):
            if i == 2:
                raise KeyboardInterrupt
            yield vectors
    with pytest.raises(KeyboardInterrupt):
        encode(texts, cache_dir=tmp_path, batch_size=1, encoder=dies_at_the_third_batch)
    stats = EncodeStats()
    encode(texts, cache_dir=tmp_path, batch_size=1, stats=stats)
    assert (stats.cached, stats.encoded) == (2, 3)


def test_duplicate_texts_are_encoded_once(tmp_path):
    stats = EncodeStats()
    f, _ = encode(["same words", "same words", "other words"], cache_dir=tmp_path, stats=stats)
    assert stats.encoded == 2
    np.testing.assert_array_equal(f[0], f[1])


def test_no_text_at_all_loads_no_model(tmp_path):
    stats = EncodeStats()
    f, has_text = encode([None, "", None], rows_per_part=2, cache_dir=tmp_path, stats=stats)
    assert f.shape == (3, 384) and not f.any() and not has_text.any()
    assert not stats.model_loaded and not any(tmp_path.iterdir())


def test_text_model_must_be_a_local_model_directory(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        encode(["x"], model=str(tmp_path), cache_dir=tmp_path)


def test_a_directory_that_only_looks_like_a_model_is_one_line(tmp_path):
    """A --text-model with a config.json that no model loads from was a ValueError traceback."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(DataError, match=rf"{model}: not a loadable sentence-transformers model \(.*\(--text-model\)"):
        encode(["x"], model=str(model), cache_dir=tmp_path / "cache")


def test_a_text_cache_that_is_a_file_is_refused_before_encoding(tmp_path):
    """ALTERREC_CACHE naming a file was a NotADirectoryError traceback, and only once every text was encoded."""
    cache = tmp_path / "cache.parquet"
    cache.write_text("a file")
    stats = EncodeStats()
    for root in (cache, cache / "sub"):
        with pytest.raises(DataError, match=rf"{root}: the text cache \(ALTERREC_CACHE\) cannot be a directory: "
                                            rf"{cache} is a file"):
            encode(["x"], cache_dir=root, stats=stats)
    assert not stats.model_loaded


def test_a_model_that_truncates_its_vectors_is_read_back_from_the_cache(tmp_path):
    """A Matryoshka model's `truncate_dim` (config_sentence_transformers.json) cuts what `encode` gives: its
    cached vectors were then judged damaged against the width its Pooling config says, on every run."""
    import json
    import shutil

    model = Path(shutil.copytree(text_features.default_model_path(), tmp_path / "model"))
    config = model / "config_sentence_transformers.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "truncate_dim": 128}))
    first, _ = encode(TITLES, cache_dir=tmp_path / "cache", model=str(model))
    stats = EncodeStats()
    again, _ = encode(TITLES, cache_dir=tmp_path / "cache", model=str(model), stats=stats)
    assert first.shape == (len(TITLES), 128) and (stats.cached, stats.encoded) == (3, 0)
    np.testing.assert_array_equal(again, first)
    assert encode([None], cache_dir=tmp_path / "cache", model=str(model))[0].shape == (1, 128)  # no text: its width


def test_a_cache_chunk_that_cannot_be_written_names_the_cache_not_the_output(tmp_path):
    """The text cache (ALTERREC_CACHE, often another disk) is written while a dataset is staged: a chunk whose
    write failed was reported as the dataset's ("DATASET: cannot write (File too large)"), sending the user to the
    wrong disk."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"w")
    cache = text_features._EncodingCache(tmp_path / "cache", model_dir)
    cache.dir.mkdir(parents=True)
    cache.dir.chmod(0o500)  # the chunk's write fails: a user cannot write here, root goes past the size limit
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000, hard))
    try:
        with pytest.raises(DataError, match=rf"^{cache.dir}/chunk-[0-9a-f]+\.npz: cannot write \("):
            cache.save(np.arange(100, dtype=np.uint64), np.zeros((100, 8), np.float16))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
        cache.dir.chmod(0o700)


def test_a_texts_vector_is_its_own_whatever_the_cache_held(tmp_path):
    """Batches of one token length: a text's vector is the one it has encoded alone, so a dataset's features do not
    depend on which texts the cache already held (with batches of mixed lengths, Scientific prepared after a
    cache warmed on part of it differed in 731 float16 values: reviewer finding) nor on the batch size."""
    texts = [f"{' '.join(['widget'] * (i % 9 + 1))} model {i}" for i in range(40)]
    fresh, _ = encode(texts, cache_dir=tmp_path / "fresh")
    encode(texts[::3], cache_dir=tmp_path / "warmed")
    warmed, _ = encode(texts, cache_dir=tmp_path / "warmed")
    other_batches, _ = encode(texts, cache_dir=tmp_path / "batch-7", batch_size=7)
    model = text_features.load_encoding_model(text_features.default_model_path(), progress=False)
    alone = np.stack([text_features.encode_batch(model, [t])[0] for t in texts])
    assert fresh.tobytes() == warmed.tobytes() == other_batches.tobytes() == alone.tobytes()


def test_the_plan_batches_texts_of_one_token_length_longest_first():
    lengths = np.array([3, 5, 3, 3, 9, 5, 3])
    chunks = text_features._encode_plan(lengths, batch_size=2)
    batches = [list(b) for chunk in chunks for b in chunk]
    assert batches == [[4], [1, 5], [0, 2], [3, 6]]
    assert len(chunks) == 1  # 7 texts, far below a chunk's


def test_the_batches_are_planned_on_a_cpu_copy_of_the_model(tmp_path, monkeypatch):
    """Planning counts tokens on the CPU: with --ray the actors encode, and the driver's copy had sat on its GPU 0
    (sentence-transformers' pick) beside an actor's, all along (reviewer finding). The encoder loads its own."""
    import sentence_transformers

    devices, real = [], sentence_transformers.SentenceTransformer

    def recorded(*args, device=None, **kwargs):
        devices.append(device)
        return real(*args, device=device, **kwargs)
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", recorded)
    write_text_features(Blocks(), ["a lamp", "a desk lamp with a shade"], progress=False, cache_dir=tmp_path)
    assert devices == ["cpu", None]  # the plan's, then encode_here's (its device: sentence-transformers' choice)
