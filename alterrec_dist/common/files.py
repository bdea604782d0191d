"""Files written whole or not at all, and the manifests that describe directories of them.

Every writer of an output OUT works beside it (`Staged`): it builds `.OUT.tmp-PID` and renames it to
OUT, moving a previous OUT aside to `.OUT.old-PID` and removing that after the swap; so a reader sees
the old OUT or the new one, never a mix, and a crash leaves only siblings that the next writer removes.
A manifest is `DIR/manifest.json`, read by `read_manifest`, whose errors are one line naming it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from pathlib import Path

from alterrec_dist.common.errors import DataError, one_line


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write beside, then rename: readers see the old file or the new one, never a torn one."""
    path = Path(path)
    remove_stale_siblings(path)
    tmp = temp_sibling(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> dict:
    """A JSON object from `path`; DataError naming the file if it is missing, truncated or not an object."""
    path = Path(path)
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
# replacing, `.OUT.old-PID` (the previous OUT, removed after the swap). These two names are the rule.
def temp_sibling(out: Path, kind: str = "tmp") -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}"


def remove_stale_siblings(out: str | Path) -> None:
    """A writer killed by SIGKILL cannot clean up: remove the temp siblings of `out` (files or
    directories) whose process is gone, and our own pid's, left by an earlier writer in this process."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for stale in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and (int(pid) == os.getpid() or not _process_alive(int(pid))):
                remove_path(stale)


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree, whichever it is; nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`, replacing what is there (a file or a directory)."""
    if out.exists() or out.is_symlink():
        old = temp_sibling(out, "old")
        os.replace(out, old)
        os.replace(tmp, out)
        remove_path(old)
    else:
        os.replace(tmp, out)


def check_out(out: str | Path, overwrite: bool) -> Path:
    """OUT as an absolute path, refused (DataError) if it exists and `overwrite` is off: every
    command checks this first, before any slow work."""
    out = Path(out).absolute()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise DataError(f"{out}: output exists (pass --overwrite to replace it)")
    return out


def make_parent(out: Path) -> None:
    """Create the directory OUT goes in; DataError (one line) if it cannot be."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create its directory {out.parent} ({e.strerror or e})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise DataError(f"{out}: its directory {out.parent} is not writable")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Staged:
    """An output (file or directory) built at `tmp`, a temp sibling of `out`, and swapped in whole by
    `commit`; `abort` removes it. As a context manager: committed when the block ends, removed when it raises."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        make_parent(self.out)
        remove_stale_siblings(self.out)  # left by writers that were killed
        self.tmp = temp_sibling(self.out)

    def commit(self) -> Path:
        replace_into_place(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        remove_path(self.tmp)

    def __enter__(self) -> "Staged":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def read_manifest(directory: str | Path, absent: str, keys: dict[str, type] | None = None,
                  format_version: int | None = None, remedy: str = "a damaged manifest") -> dict:
    """DIR/manifest.json as a dict, checked: DataError in one line naming it when it is not there
    (`absent` says what to do), not a JSON object, of another `format_version`, or without one of
    `keys` of its type (`remedy` says what to do)."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: {absent}")
    manifest = read_json(path)
    if format_version is not None and manifest.get("format_version") != format_version:
        raise DataError(f"{path}: format_version {manifest.get('format_version')!r}, expected {format_version}")
    check_keys(path, manifest, keys or {}, remedy)
    return manifest


def check_keys(path: Path, table: dict, keys: dict[str, type], remedy: str, prefix: str = "") -> None:
    """DataError naming `path` at the first of `keys` that `table` lacks or holds with another type."""
    for key, typ in keys.items():
        value = table.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise DataError(f"{path}: {prefix}{key} is missing or not a {typ.__name__} ({remedy})")
