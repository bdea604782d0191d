"""Where files live: a local path, or an object in a store (s3://, gs://) reached through pyarrow.fs.

`location(text)` gives a `Path` for a local path and a `StorePath` for a URI. StorePath has the part
of pathlib's API the project uses (/, name, parent, exists, is_file, is_dir, iterdir, read_bytes,
read_text, write_bytes, unlink), so the code that walks a dataset or a run directory runs on either;
the few things pathlib cannot do on a store (open for random access, load an array, remove a tree,
copy) are the functions below, which take either kind.

Credentials and endpoint come from each store's own environment, read by pyarrow, never from the
project's config: for S3 AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and, for a
MinIO-style server, AWS_ENDPOINT_URL; for GCS GOOGLE_APPLICATION_CREDENTIALS.

An object store has no rename, so directories commit differently there (the rule is in `files.py`):
an object appears whole when its upload completes, and a directory is trusted only through its
manifest.json, which is written last and removed first.
"""
from __future__ import annotations

import contextlib
import functools
import io
import shutil
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from alterrec_dist.common.errors import DataError, hide_credentials, one_line

SCHEMES = ("s3", "gs")
CREDENTIALS_ENV = {"s3": "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY", "gs": "GOOGLE_APPLICATION_CREDENTIALS"}
# The file that commits a directory: written last, removed first, and every reader checks the rest against it.
MANIFEST = "manifest.json"


def is_uri(text: str | Path) -> bool:
    """True for an object-store URI (s3://bucket/key, gs://bucket/key)."""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme in SCHEMES


def location(text: str | Path | StorePath) -> Path | StorePath:
    """A `StorePath` for a store URI, else the local path (`~` expanded). Any other scheme is refused:
    a URI taken for a relative path would write into a local folder named like `s3:`."""
    if isinstance(text, StorePath):
        return text
    s = str(text)
    if is_uri(s):
        return StorePath(s)
    if "://" in s:
        raise ValueError(f"{hide_credentials(s)}: unsupported URI scheme (local paths, "
                         f"{', '.join(f'{x}://' for x in SCHEMES)})")
    scheme, colon, _ = s.partition(":")
    if colon and scheme in SCHEMES:  # s3:/bucket/key, a slash short, wrote a local folder named s3:
        raise ValueError(f"{s}: not a store URI ({scheme}://BUCKET/KEY) nor a local path")
    return Path(s).expanduser()


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    # One file system per bucket and process: pyarrow reads the store's environment when it is made.
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


class StorePath:
    """An object, or a key prefix taken as a directory, in a bucket: `scheme://bucket/key`."""

    __slots__ = ("scheme", "key")

    def __init__(self, uri: str):
        scheme, _, rest = uri.partition("://")
        parts = [p for p in rest.split("/") if p not in ("", ".")]
        # rest.startswith("/"): s3:///k took the key's first part for the bucket
        if scheme not in SCHEMES or not parts or rest.startswith("/"):
            raise ValueError(f"{hide_credentials(uri)}: not a store URI with a bucket")
        # no bucket name holds a : or an @: KEY:SECRET@bucket, which pyarrow would read as credentials (a secret
        # key may hold a /, so the @ may come parts later)
        if "@" in rest and any(c in parts[0] for c in ":@"):
            raise ValueError(f"{hide_credentials(uri)}: credentials in a store URI are refused (URIs are written into "
                             f"configs and printed): set them in the environment ({CREDENTIALS_ENV[scheme]})")
        if ".." in parts:  # the client resolves it for one object but not for a listing: two names, one object
            raise ValueError(f"{uri}: '..' in an object key (give the key without it)")
        self.scheme, self.key = scheme, "/".join(parts)

    @property
    def fs(self) -> pafs.FileSystem:
        try:
            return _filesystem(self.scheme, self.key.split("/", 1)[0])
        except pa.ArrowInvalid as e:  # a bucket name the client cannot parse ("bad bucket", "b:99999")
            raise DataError(f"{self}: not a bucket the store client accepts ({one_line(e)})") from None

    # -- names --------------------------------------------------------------------------------
    def __truediv__(self, other: str) -> StorePath:
        return StorePath(f"{self.scheme}://{self.key}/{other}")

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def parent(self) -> StorePath:
        parent = PurePosixPath(self.key).parent
        return StorePath(f"{self.scheme}://{parent}") if str(parent) != "." else self

    def with_name(self, name: str) -> StorePath:
        return self.parent / name

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"StorePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, StorePath) and str(self) == str(other)

    def __lt__(self, other: StorePath) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def absolute(self) -> StorePath:  # a URI is absolute already
        return self

    resolve = absolute

    def is_absolute(self) -> bool:
        return True

    @contextlib.contextmanager
    def _errors(self):
        """A store that cannot be reached, a bucket that does not exist, credentials refused: one line
        naming the URI (DataError); a missing object stays a FileNotFoundError."""
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as e:
            raise DataError(f"{self}: object store error ({one_line(e)})") from None

    # -- what is there ------------------------------------------------------------------------
    def _type(self) -> pafs.FileType:
        with self._errors():
            return self.fs.get_file_info(self.key).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:  # a prefix with objects under it
        return self._type() == pafs.FileType.Directory

    def is_symlink(self) -> bool:
        return False

    def iterdir(self):
        with self._errors():
            infos = self.fs.get_file_info(pafs.FileSelector(self.key, allow_not_found=True))
        for info in infos:
            yield StorePath(f"{self.scheme}://{info.path}")

    def size(self) -> int:
        with self._errors():
            info = self.fs.get_file_info(self.key)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self}: no such object")
        return info.size

    # -- bytes --------------------------------------------------------------------------------
    def open_input(self) -> pa.NativeFile:
        """Random access (Parquet footers, row groups, .npy headers): ranged reads, nothing downloaded whole."""
        try:
            with self._errors():
                return self.fs.open_input_file(self.key)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self}: no such object") from None

    def read_bytes(self) -> bytes:
        with self.open_input() as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One upload: the object appears whole when it completes, or not at all."""
        with self._errors(), self.fs.open_output_stream(self.key) as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    @property
    def bucket(self) -> StorePath:
        return StorePath(f"{self.scheme}://{self.key.split('/', 1)[0]}")

    def check_bucket(self) -> None:
        """DataError unless the bucket exists (and can be reached): checked before any slow work, so a
        typo fails at once rather than at the upload."""
        if not self.bucket.is_dir():
            raise DataError(f"{self}: bucket {self.bucket} not found (or not visible with these credentials)")

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            with self._errors():
                self.fs.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a store has no directories, a prefix exists once an object is under it."""

    def remove_tree(self) -> None:
        """The object, or every object under this prefix; the manifest first, so the directory stops
        being trusted before its files go (a removal cut short leaves files no reader takes). Never a
        whole bucket: no output is one, and the client would empty it before refusing to delete it."""
        if self == self.bucket:
            raise DataError(f"{self}: a whole bucket, which nothing here removes")
        kind = self._type()
        if kind == pafs.FileType.File:
            self.unlink(missing_ok=True)
        elif kind == pafs.FileType.Directory:
            (self / MANIFEST).unlink(missing_ok=True)
            with self._errors():
                self.fs.delete_dir(self.key)  # and the empty directory marker pyarrow leaves behind


Location = Path | StorePath  # what every reader and writer of datasets and runs takes


def open_input(loc: Path | StorePath) -> pa.NativeFile:
    """A file for random access, local or in a store (pyarrow and numpy's header reader both take it)."""
    return loc.open_input() if isinstance(loc, StorePath) else pa.OSFile(str(loc))


def size_of(loc: Path | StorePath) -> int:
    return loc.size() if isinstance(loc, StorePath) else loc.stat().st_size


def load_npy(loc: Path | StorePath, mmap: bool = False) -> np.ndarray:
    """A .npy array; memory-mapped when local and asked for, read whole (one file) from a store."""
    if isinstance(loc, StorePath):
        return np.load(io.BytesIO(loc.read_bytes()))
    return np.load(loc, mmap_mode="r" if mmap else None)


def remove_tree(loc: Path | StorePath) -> None:
    """Remove a file or a directory tree, whichever it is; nothing if it is gone."""
    if isinstance(loc, StorePath):
        loc.remove_tree()
    elif loc.is_dir() and not loc.is_symlink():
        shutil.rmtree(loc, ignore_errors=True)
    else:
        loc.unlink(missing_ok=True)


def files_under(loc: Path | StorePath) -> list[str]:
    """The files under directory `loc`, as paths relative to it (sorted)."""
    if isinstance(loc, StorePath):
        with loc._errors():
            infos = loc.fs.get_file_info(pafs.FileSelector(loc.key, recursive=True, allow_not_found=True))
        return sorted(i.path[len(loc.key) + 1:] for i in infos if i.type == pafs.FileType.File)
    return sorted(str(p.relative_to(loc)) for p in loc.rglob("*") if p.is_file())


def copy_file(src: Path | StorePath, dst: Path | StorePath) -> None:
    """One file from `src` to `dst`, either local or in a store: inside one store the store copies it
    (nothing passes through this machine); otherwise it is streamed."""
    if isinstance(src, StorePath) and isinstance(dst, StorePath) and src.fs.equals(dst.fs):
        with src._errors():
            src.fs.copy_file(src.key, dst.key)
        return
    if isinstance(dst, StorePath):
        try:
            with open_input(src) as f, dst._errors(), dst.fs.open_output_stream(dst.key) as out:
                while block := f.read(1 << 24):
                    out.write(block)
        except BaseException:  # the stream's close completed the upload with the parts sent: take it back
            dst.unlink(missing_ok=True)
            raise
        return
    with open_input(src) as f, open(dst, "wb") as out:
        while block := f.read(1 << 24):
            out.write(block)


def copy_tree(src: Path | StorePath, dst: StorePath) -> None:
    """Directory `src` (local, or in a store) into the store at `dst`, replacing what is there: the old
    manifest goes first (readers stop trusting `dst`), then every old object, then the new files, and
    the new manifest after all of them: its arrival is the commit."""
    dst.remove_tree()
    names = files_under(src)
    for name in sorted(names, key=lambda n: n == MANIFEST):  # the manifest after everything else
        copy_file(src / name, dst / name)
