"""Files written whole or not at all, and the manifests that describe directories of them.

On a local disk every writer of an output OUT works beside it (`Staged`): it builds `.OUT.tmp-PID`
and renames it to OUT. A file replaces a file in that one rename; a previous directory OUT is moved aside
to `.OUT.old-PID` first and removed after the swap. So a reader sees the old OUT or the new one, never a
mix, and a crash leaves only siblings that the next writer removes.

In an object store (`storage.StorePath`) there is no rename. A file is one upload, which appears
whole or not at all. A directory is built in a local temp directory and uploaded by
`storage.copy_tree` (one that every rank writes at once: `parallel/saved.py`): the old manifest is
removed first, the new one is uploaded last, and its arrival is the commit. Every reader opens a directory through `read_manifest` and checks the files
against the sha256 it lists, so a directory whose upload was cut short (no manifest) is never read,
and a file that does not match its manifest is an error naming it.

A manifest is `DIR/manifest.json`, read by `read_manifest`, whose errors are one line naming it.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from alterrec_dist.common import storage
from alterrec_dist.common.errors import DataError, one_line
from alterrec_dist.common.storage import MANIFEST, Location, StorePath


def file_sha256(path: str | Location) -> str:
    h = hashlib.sha256()
    with storage.open_input(storage.location(path)) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Location, data: bytes) -> None:
    """Write beside, then rename (in a store: one upload): readers see the old file or the new one,
    never a torn one."""
    path = storage.location(path)
    if isinstance(path, StorePath):
        path.write_bytes(data)
        return
    remove_stale_siblings(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Location) -> dict:
    """A JSON object from `path`; DataError naming the file if it is missing, truncated or not an object."""
    path = storage.location(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"{path}: not valid JSON (truncated?) ({one_line(e)})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: not a JSON object")
    return doc


# Every writer of an output OUT works beside it: `.OUT.tmp-PID` (built, then renamed to OUT) and, when
# replacing a directory, `.OUT.old-PID` (the previous OUT, removed after the swap). These two names are the rule.
def temp_sibling(out: Path, kind: str = "tmp") -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}"


# what `temp_sibling` names: a pid is 1 to 7 ASCII digits (Linux's pid_max is at most 2^22), so a planted
# `.OUT.tmp-99999999999999999999` or `.OUT.tmp-²` is no writer's and nothing to wait for or signal
TEMP_SIBLING = re.compile(r"\.(?P<out>.+)\.(?P<kind>tmp|old)-(?P<pid>[1-9][0-9]{0,6})")


def sibling_out(name: str) -> str | None:
    """The name of the OUT whose temp sibling is named `name`, None for a name not of that form."""
    found = TEMP_SIBLING.fullmatch(name)
    return found["out"] if found else None


def temp_siblings(out: Path, kind: str) -> Iterable[Path]:
    """Every writer's `temp_sibling(out, kind)`, this process's or another's."""
    return out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")


def remove_stale_siblings(out: str | Path) -> None:
    """A writer killed by SIGKILL cannot clean up: remove the temp siblings of `out` (files or
    directories) whose process is gone, and our own pid's, left by an earlier writer in this process."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for stale in temp_siblings(out, kind):
            pid = _writer_pid(stale)
            if pid is not None and (pid == os.getpid() or not _process_alive(pid)):
                storage.remove_tree(stale)


def _writer_pid(sibling: Path) -> int | None:
    """The pid that names a temp sibling (`temp_sibling`), None for a name not of that form."""
    found = TEMP_SIBLING.fullmatch(sibling.name)
    return int(found["pid"]) if found else None


def replace_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`, replacing what is there (a file or a directory). A file replaces a file
    in one rename, so there is no moment without one; a directory cannot replace a directory so (rename refuses a
    non-empty target), so the old one is moved aside first."""
    if (out.exists() or out.is_symlink()) and not (tmp.is_file() and out.is_file() and not out.is_symlink()):
        old = temp_sibling(out, "old")
        os.replace(out, old)
        os.replace(tmp, out)
        storage.remove_tree(old)
    else:
        os.replace(tmp, out)


def check_out(out: str | Location, overwrite: bool, inputs: Iterable[str | Location | None] = (),
              apart: Iterable[str | Location] = ()) -> Location:
    """OUT as an absolute path (or a store URI), refused (DataError) if it exists and `overwrite` is off, or
    if it is, or holds, one of the command's `inputs` (None: not given): replacing it would delete what the
    command reads (`export --run R --out R --overwrite` did); or if it exists inside one (a file or directory
    the command reads as part of it: `--data D --out D/sessions/test/part-00000.parquet --overwrite` replaced
    the dataset's test split). `apart`: directories the command also writes into (a cache), which OUT may not
    overlap at all, new or not; and (`check_outside`) if it lies in a dataset, an export or a saved model.
    Every command checks this first."""
    # `--out "$UNSET"` resolved to the current directory, which --overwrite then replaced with the output
    if isinstance(out, str) and not out.strip():
        raise DataError("an output path is empty (an unset variable?): give --out (or --metrics-out) a path")
    out = resolve_location(out)
    inputs = [resolve_location(s) for s in inputs if s is not None]
    for directory in map(resolve_location, apart):
        if within(directory, out) or within(out, directory):
            raise DataError(f"{out}: overlaps {directory}, which this command writes too (keep them apart)")
    for source in inputs:
        if within(source, out):
            raise DataError(f"{out}: holds the input {source}, which writing it would delete")
    for source in inputs:
        if within(out, source) and (out.exists() or out.is_symlink()):
            raise DataError(f"{out}: lies in the input {source}, which writing it would change")
    check_outside(out)
    if isinstance(out, StorePath):
        if out == out.bucket:
            raise DataError(f"{out}: an output goes under a key in the bucket ({out}/NAME), not the bucket itself")
        out.check_bucket()
    check_replace(out, overwrite)
    return out


def check_replace(out: Location, overwrite: bool) -> None:
    """Whether what is at OUT may be replaced: only with `overwrite`, and only a file or a directory."""
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise DataError(f"{out}: output exists (pass --overwrite to replace it)")
    if isinstance(out, Path) and out.exists() and not (out.is_file() or out.is_dir()):  # /dev/null, a pipe
        raise DataError(f"{out}: not a regular file or directory, which no command replaces")


def within(path: str | Location, directory: str | Location) -> bool:
    """Whether `path` is `directory` or lies under it (local paths with `..` and links resolved)."""
    path, directory = resolve_location(path), resolve_location(directory)
    if isinstance(path, StorePath) or isinstance(directory, StorePath):
        return str(path) == str(directory) or str(path).startswith(f"{directory}/")
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def check_outside(out: str | Location) -> None:
    """Refuse an output, new or not, inside a directory that one of our manifests commits (a dataset, an export,
    a saved model, a checkpoint): its writer replaces it whole, so its next `--overwrite` deleted what was put in
    it without a word (a run trained into a dataset, a scores file in an export), and `prepare verify` never saw
    it there. Local paths are walked as they resolve (`..` and links followed: `D/../x` is beside D, a link into
    D is in it); in a store a level costs a HEAD and a LIST, and a level the credentials may not read is passed."""
    out = resolve_location(out)
    directory = (out.resolve() if isinstance(out, Path) else out).parent
    while True:
        if _committed(directory):
            raise DataError(f"{out}: lies in {directory}, which its next --overwrite replaces whole: write it "
                            "elsewhere")
        if directory.parent == directory:  # the root, or the bucket
            return
        directory = directory.parent


def _committed(directory: Location) -> bool:
    """Whether `directory` is one a manifest of ours commits: its manifest lists files (an export, a saved model, a
    checkpoint: "files"; a dataset: "session_files"), not any manifest.json another tool left."""
    try:
        manifest = read_json(directory / MANIFEST) if (directory / MANIFEST).is_file() else None
    except DataError:
        return False
    return isinstance(manifest, dict) and ("files" in manifest or "session_files" in manifest)


def check_file_out(path: str | Location, overwrite: bool, inputs: Iterable[str | Location | None] = ()) -> Location:
    """A file a command writes whole at its end (`write_file_out`, --metrics-out), replacing one there only with
    `overwrite` as --out does (a run's metrics.jsonl was replaced silently): refused before the command's work if
    it cannot be written (a directory there, a file where its directory would be made) or would replace what the
    command reads (`inputs`, as for `check_out`: a run's summary.json was overwritten silently)."""
    if str(path).endswith("/"):  # pathlib drops the slash: `--out scores/` wrote a file named scores
        raise DataError(f"{path}: ends in '/', a directory (give a file name)")
    out = check_out(path, True, inputs)  # where it may go; whether it may replace a file there, last
    if out.is_dir():  # in a store: a prefix with objects under it, which an object of its name would hide
        raise DataError(f"{out}: is a directory (give a file name)")  # not "pass --overwrite", which cannot help
    if isinstance(out, Path):
        above = nearest_existing(out.parent)  # its directory, or where that is made
        if not above.is_dir():
            raise DataError(f"{out}: {above} is not a directory")
    check_replace(out, overwrite)
    return out


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest of its directories that exists: where making it would start."""
    return next(p for p in (path, *path.parents) if p.exists())


def write_file_out(path: str | Location, obj) -> None:
    """`obj` as JSON to the file `check_file_out` passed, its directory made first (like --out's)."""
    path = resolve_location(path)
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def resolve_location(out: str | Location) -> Location:
    """A path the user gave as an absolute local path, or a store URI; DataError for any other scheme."""
    try:
        return storage.location(out).absolute()
    except ValueError as e:
        raise DataError(str(e)) from None


def make_parent(out: Path) -> Path | None:
    """Create the directory OUT goes in; DataError (one line) if it cannot be. Returns the outermost
    directory it created (None if OUT's directory was there), for `remove_made_parents` to take back."""
    made = next((d for d in reversed(out.parents) if not d.exists()), None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create its directory {out.parent} ({e.strerror or e})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise DataError(f"{out}: its directory {out.parent} is not writable")
    return made


def remove_made_parents(out: Path, made: Path | None) -> None:
    """Remove the directories `make_parent` created for OUT, innermost first, while they are empty: a
    failed command leaves nothing behind, and one that ran beside it into the same directory keeps it."""
    if made is None:
        return
    for directory in (out.parent, *out.parent.parents):
        try:
            directory.rmdir()
        except OSError:
            return
        if directory == made:
            return


def try_lock(path: Path) -> int | None:
    """An open descriptor holding the exclusive lock on the file `path` (made if missing), or None when another
    process holds it. The OS drops the lock when its holder closes the descriptor or dies, so a killed holder
    blocks nothing. OSError where the lock cannot be taken at all (a file system without locks)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # NFSv4 locks only what is open to write
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # another user's lock file: enough for a local flock
    if fd < 3:  # a process started with stdin/stdout closed: a child's stdin/stdout would replace it there
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(fd)
        fd = moved
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, BlockingIOError):
            return None
        raise
    return fd


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Staged:
    """An output (file or directory) built at the local path `tmp` and put in place whole by `commit`;
    `abort` removes it. As a context manager: committed when the block ends, removed when it raises, and an
    OSError raised in the block (a write that failed: a full disk) becomes the one line of `cannot_write`.

    Locally `tmp` is a temp sibling of `out`, renamed onto it. For an `out` in a store, `tmp` is in a
    local temp directory and `commit` uploads it: a file in one upload, a directory manifest last."""

    def __init__(self, out: str | Location):
        self.out = storage.location(out)
        if isinstance(self.out, StorePath):
            self._local = Path(tempfile.mkdtemp(prefix="alterrec-upload-"))
            self.tmp = self._local / self.out.name
            return
        self._local = None
        self._made = make_parent(self.out)
        remove_stale_siblings(self.out)  # left by writers that were killed
        self.tmp = temp_sibling(self.out)

    def make_dirs(self, *names: str) -> None:
        """The directories `names` inside `tmp` (an output directory's folders), or DataError in one line where
        they cannot be made (`--out /proc/x`: the first write is here)."""
        try:
            for name in names:
                (self.tmp / name).mkdir(parents=True)
        except OSError as e:
            raise DataError(f"{self.out}: cannot write beside it ({e.strerror or e})") from None

    def commit(self) -> Location:
        if self._local is None:
            replace_into_place(self.tmp, self.out)
            return self.out
        try:
            if self.tmp.is_dir():
                try:
                    storage.copy_tree(self.tmp, self.out)
                except BaseException:  # SIGTERM mid-upload: the old objects went first, and part of the new
                    self.out.remove_tree()  # without its manifest is no output (a rerun found "output exists")
                    raise
            else:
                storage.copy_file(self.tmp, self.out)  # takes back a part upload itself
        finally:
            self.abort()  # the local staging, in either case (an interrupted upload left it, 67 MB for an export)
        return self.out

    def abort(self) -> None:
        storage.remove_tree(self._local if self._local is not None else self.tmp)
        if self._local is None:
            remove_made_parents(self.out, self._made)

    def __enter__(self) -> "Staged":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
            return False
        self.abort()
        if isinstance(exc, OSError):  # a write that failed (a full disk, a file size limit): said of the output
            raise cannot_write(self.out, exc) from None
        return False


def cannot_write(out: str | Location, e: OSError) -> DataError:
    """The one line of a write of the output `out` that failed (pyarrow's, numpy's and torch's own errors name
    no file, or a temp file that is gone)."""
    return DataError(f"{out}: cannot write ({one_line(e)})")


@contextmanager
def writing(out: str | Location):
    """A block that writes `out`: an OSError in it (a full disk) is the one line of `cannot_write`."""
    try:
        yield
    except OSError as e:
        raise cannot_write(out, e) from None


def read_manifest(directory: str | Location, absent: str, keys: dict[str, type] | None = None,
                  format_version: int | None = None, remedy: str = "a damaged manifest") -> dict:
    """DIR/manifest.json as a dict, checked: DataError in one line naming it when it is not there
    (`absent` says what to do), not a JSON object, of another `format_version`, or without one of
    `keys` of its type (`remedy` says what to do)."""
    path = storage.location(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: {absent}")
    manifest = read_json(path)
    if format_version is not None and manifest.get("format_version") != format_version:
        raise DataError(f"{path}: format_version {manifest.get('format_version')!r}, expected {format_version}")
    check_keys(path, manifest, keys or {}, remedy)
    return manifest


LOAD_ATTEMPTS = 3


def load_unreplaced(directory: Location, manifest_of, load):
    """`load(manifest)` of a directory committed by its manifest (an export, a saved model) that its writer may
    replace while it is read: `export --overwrite`, or training saving a new best model into RUN/model (two
    renames locally, objects one by one in a store). A load could pair one version's manifest with the other's
    files, silently or as a raw FileNotFoundError. The manifest (`manifest_of(directory)`) is read again after
    the files: a load counts only if it is unchanged, and one that overlapped a replacement starts again
    (LOAD_ATTEMPTS in all; a manifest missing mid-swap is waited for a second each time)."""
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        if attempt < LOAD_ATTEMPTS and not (directory / MANIFEST).is_file() and (
                directory.is_dir() or _moved_aside(directory)):
            time.sleep(1.0)  # not one, or one mid-swap: in a store its manifest is uploaded last, locally the
            continue         # old directory is moved aside before the new one is renamed in
        manifest = manifest_of(directory)
        try:
            loaded = load(manifest)
        except (DataError, OSError) as e:
            if _replaced(directory, manifest):
                continue
            if isinstance(e, DataError):
                raise
            raise DataError(f"{directory}: cannot read ({one_line(e)})") from None
        if not _replaced(directory, manifest):
            return loaded
    raise DataError(f"{directory}: replaced while being read, {LOAD_ATTEMPTS} times running: load it again")


def _moved_aside(directory: Location) -> bool:
    """Whether a writer has just moved the local `directory` aside to put its new one in (`replace_into_place`)."""
    return not isinstance(directory, StorePath) and any(
        (pid := _writer_pid(s)) is not None and _process_alive(pid)
        for s in temp_siblings(directory, "old"))  # a killed writer's leftover is no swap under way


def _replaced(directory: Location, manifest: dict) -> bool:
    """Whether the directory's manifest is no longer `manifest` (gone counts: mid-swap)."""
    try:
        return read_json(directory / MANIFEST) != manifest
    except DataError:
        return True


def check_keys(path: Path, table: dict, keys: dict[str, type], remedy: str, prefix: str = "") -> None:
    """DataError naming `path` at the first of `keys` that `table` lacks or holds with another type."""
    for key, typ in keys.items():
        value = table.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise DataError(f"{path}: {prefix}{key} is missing or not of type {typ.__name__} ({remedy})")
