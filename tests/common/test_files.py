"""The one manifest reader, the one staged swap that every writer of a directory or file uses, and the one check of
an output against what its command reads."""
import json
import os
from pathlib import Path

import pytest

from alterrec_dist.common import files
from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import Staged, atomic_write_bytes, check_out, load_unreplaced, read_manifest
from alterrec_dist.common.run_layout import served_paths


def one_line_error(directory, **kw) -> str:
    with pytest.raises(DataError) as e:
        read_manifest(directory, "no manifest here (make one)", **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_manifest_errors_are_one_line_naming_the_file(tmp_path):
    path = tmp_path / "manifest.json"
    assert one_line_error(tmp_path) == f"{path}: no manifest here (make one)"
    path.write_text('{"format_version": 1, "files": {"a": ')  # truncated
    assert one_line_error(tmp_path).startswith(f"{path}: not valid JSON (truncated?)")
    path.write_text("[1, 2]")
    assert one_line_error(tmp_path) == f"{path}: not a JSON object"
    path.write_text('{"format_version": 2}')
    assert one_line_error(tmp_path, format_version=1) == f"{path}: format_version 2, expected 1"
    path.write_text('{"format_version": 1, "files": true}')
    assert one_line_error(tmp_path, keys={"files": dict}, format_version=1, remedy="write it again") == \
        f"{path}: files is missing or not of type dict (write it again)"
    path.write_text('{"format_version": 1, "files": {}}')
    assert read_manifest(tmp_path, "absent", {"files": dict}, 1) == {"format_version": 1, "files": {}}


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_staged_output_is_swapped_in_whole_or_not_at_all(tmp_path, kind):
    out = tmp_path / "out"

    def build(staged: Staged, text: str) -> None:
        if kind == "file":
            staged.tmp.write_text(text)
        else:
            staged.tmp.mkdir()
            (staged.tmp / "part").write_text(text)

    def content() -> str:
        return (out if kind == "file" else out / "part").read_text()

    with Staged(out) as staged:
        build(staged, "old")
    assert content() == "old"
    with pytest.raises(RuntimeError), Staged(out) as staged:
        build(staged, "half")
        raise RuntimeError("killed half way")
    assert content() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"], "the old output, nothing beside it"
    with Staged(out) as staged:
        build(staged, "new")
    assert content() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path):
    """The rename onto a directory fails after the temp file is written: the temp file goes too."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("keep")
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "out", b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "keep").read_text() == "keep"


def test_an_output_may_sit_beside_what_a_command_reads_not_in_it(tmp_path):
    """Inside an input, an existing OUT is part of what the command reads (a dataset's split file, a run's model);
    a new one, or an export beside a run's model, replaces nothing the command reads."""
    run, data = tmp_path / "run", tmp_path / "data"
    for d in (run / "model", run / "export", data / "sessions"):
        d.mkdir(parents=True)
    (data / "sessions" / "part.parquet").write_bytes(b"x")
    assert check_out(run / "export", True, served_paths(run)) == run / "export"  # an earlier export, replaced
    assert check_out(data / "scores.parquet", True, [data]) == data / "scores.parquet"  # new: nothing replaced
    with pytest.raises(DataError, match=r"data/sessions/part.parquet: lies in the input .*data, which writing"):
        check_out(data / "sessions" / "part.parquet", True, [data])
    with pytest.raises(DataError, match=r"run/model: holds the input .*run/model, which writing it would delete"):
        check_out(run / "model", True, served_paths(run))


def test_no_output_goes_inside_a_directory_one_of_our_manifests_commits(tmp_path):
    """A run, a scores file or a dataset put inside a dataset, an export or a saved model was deleted without a
    word by that directory's next --overwrite (its writer replaces it whole), whether the command read it or not.
    Any other manifest.json (another tool's) does not stop an output."""
    import json

    for name, manifest in [("dataset", {"format_version": 1, "session_files": {}}), ("export", {"files": {}}),
                           ("model", {"files": {}, "world_size": 1})]:
        (tmp_path / name / "deep").mkdir(parents=True)
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
        for out in (tmp_path / name / "x.parquet", tmp_path / name / "deep" / "run"):
            with pytest.raises(DataError, match=rf"{out}: lies in {tmp_path / name}, which its next --overwrite"):
                check_out(out, False)
        assert check_out(tmp_path / f"{name}-beside", False) == tmp_path / f"{name}-beside"
    outside = tmp_path / "dataset" / ".." / "beside.parquet"  # written beside the dataset: was refused
    assert check_out(outside, False) == outside
    (tmp_path / "link").symlink_to(tmp_path / "dataset" / "deep")  # a link into the dataset: was let through
    with pytest.raises(DataError, match=rf"lies in {tmp_path / 'dataset'}, which its next --overwrite"):
        check_out(tmp_path / "link" / "run", False)
    (tmp_path / "webapp").mkdir()
    (tmp_path / "webapp" / "manifest.json").write_text(json.dumps({"name": "a web app", "icons": []}))
    assert check_out(tmp_path / "webapp" / "scores.parquet", False) == tmp_path / "webapp" / "scores.parquet"


def test_a_write_that_fails_before_its_rename_leaves_the_old_file_whole_and_nothing_beside_it(tmp_path, monkeypatch):
    """A full disk at the write (seen at its fsync, where the data reaches the disk) must leave the previous
    file as it was, not truncated or removed, and no temp file beside it: readers see the old file or the new
    one. The fsync is what makes the rename publish data that is on the disk, not a file a crash can empty."""
    import errno

    from alterrec_dist.common import files

    out = tmp_path / "summary.json"
    out.write_bytes(b"old")
    synced = []

    def full_disk(fd):
        synced.append(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(out, b"new")
    assert e.value.errno == errno.ENOSPC and len(synced) == 1  # the data was synced before the rename
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_manifest_with_true_for_an_integer_key_is_refused_in_one_line(tmp_path):
    """JSON's true is a Python bool, and a bool is an int: `"num_items": true` passed as one item and failed
    later, far from the manifest. A bool is not an int here."""
    path = tmp_path / "manifest.json"
    path.write_text('{"format_version": 1, "num_items": true}')
    assert one_line_error(tmp_path, keys={"num_items": int}, format_version=1, remedy="make it again") == \
        f"{path}: num_items is missing or not of type int (make it again)"
    path.write_text('{"format_version": 1, "num_items": 3}')
    assert read_manifest(tmp_path, "absent", {"num_items": int}, 1)["num_items"] == 3


def test_a_file_replaces_a_file_in_one_rename_and_a_directory_a_directory_whole(tmp_path, monkeypatch):
    """`batch_score --overwrite` over its last scores moved them aside, then renamed the new ones in: a kill between
    the two renames left no scores at all. A file replaces a file in one rename (no moment without one); a
    directory, which a rename cannot put over a non-empty one, still goes aside first, and nothing is left beside."""
    renames, real = [], os.replace

    def replace(src, dst):  # the real rename, seen
        renames.append(Path(dst).name)
        real(src, dst)
    monkeypatch.setattr(files.os, "replace", replace)
    for out, write in ((tmp_path / "scores.parquet", lambda p, v: p.write_text(v)),
                       (tmp_path / "export", lambda p, v: (p.mkdir(), (p / "manifest.json").write_text(v)))):
        for value in ("old", "new"):
            with Staged(out) as staged:
                write(staged.tmp, value)
        assert (out.read_text() if out.is_file() else (out / "manifest.json").read_text()) == "new"
    assert renames == ["scores.parquet", "scores.parquet", "export", f".export.old-{os.getpid()}", "export"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "scores.parquet"]


def test_a_load_that_overlaps_a_replacement_is_read_again_and_one_that_never_ends_is_named(tmp_path, monkeypatch):
    """`load_unreplaced` (exports, saved models): the manifest is read again after the files; a changed one starts
    the load again, and a directory replaced on every attempt is one line, not a mix of two versions."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "manifest.json").write_text('{"v": 1}')
    loads = []

    def load(manifest):  # a writer replaces it during the first load
        loads.append(manifest["v"])
        if len(loads) == 1:
            (d / "manifest.json").write_text('{"v": 2}')
        return manifest["v"]
    assert load_unreplaced(d, lambda where: json.loads((where / "manifest.json").read_text()), load) == 2
    assert loads == [1, 2]

    def always_replaced(manifest):
        (d / "manifest.json").write_text(json.dumps({"v": manifest["v"] + 1}))
    with pytest.raises(DataError, match=rf"^{d}: replaced while being read, {files.LOAD_ATTEMPTS} times running"):
        load_unreplaced(d, lambda where: json.loads((where / "manifest.json").read_text()), always_replaced)


def test_a_load_between_a_swaps_two_renames_waits_for_the_new_directory(tmp_path, monkeypatch):
    """A local swap moves the old directory aside, then renames the new one in: a load between the two found no
    directory at all and said "no saved model" at once (205 of 10k loads beside a training run's saves)."""
    d = tmp_path / "model"
    aside, new = files.temp_sibling(d, "old"), tmp_path / "new"
    aside.mkdir()  # the old model, moved aside this moment
    new.mkdir()
    (new / "manifest.json").write_text('{"v": 2}')
    waits = []

    def the_swap_ends(seconds):
        waits.append(seconds)
        os.replace(new, d)
    monkeypatch.setattr(files.time, "sleep", the_swap_ends)
    assert load_unreplaced(d, lambda where: json.loads((where / "manifest.json").read_text()),
                           lambda manifest: manifest["v"]) == 2
    assert waits == [1.0]


def test_a_lock_is_taken_on_a_descriptor_open_to_write_as_nfs4_requires(tmp_path, monkeypatch):
    """NFSv4 (EFS, Filestore, Azure Files: cluster/pvc.yaml's volumes) grants an exclusive flock only on a file open
    for writing, and refuses it with EBADF otherwise (the kernel's nfs4_proc_lock). A read-only open made every
    train on such a volume fail at its run lock, a traceback. Here flock keeps NFSv4's rule (no NFS server runs
    on this machine)."""
    import errno
    import fcntl
    real = fcntl.flock

    def nfs4_flock(fd, op):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY and op & fcntl.LOCK_EX:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real(fd, op)
    monkeypatch.setattr(files.fcntl, "flock", nfs4_flock)
    fd = files.try_lock(tmp_path / ".lock")
    assert fd is not None
    try:
        assert files.try_lock(tmp_path / ".lock") is None  # held: a second holder is told so
    finally:
        os.close(fd)


def test_a_killed_writers_leftover_is_no_swap_to_wait_for(tmp_path, monkeypatch):
    """A `.model.old-PID` left by a writer killed mid-swap made every load of a missing model wait 2 s before
    saying it is missing: only a live writer's swap is waited for."""
    d = tmp_path / "model"
    files.temp_sibling(d, "old").with_name(files.temp_sibling(d, "old").name.replace(str(os.getpid()), "4194303")
                                           ).mkdir()  # its writer is gone: no such pid
    waits = []
    monkeypatch.setattr(files.time, "sleep", waits.append)
    with pytest.raises(DataError, match="no saved model"):
        load_unreplaced(d, lambda where: read_manifest(where, "no saved model"), lambda manifest: manifest)
    assert waits == []


def test_a_planted_old_sibling_of_pid_0_is_no_swap_to_wait_for(tmp_path, monkeypatch):
    """os.kill(0, 0) succeeds (it signals our own group): pid 0 taken as a writer made every load wait."""
    (tmp_path / ".model.old-0").mkdir()
    waits = []
    monkeypatch.setattr(files.time, "sleep", waits.append)
    with pytest.raises(DataError, match="no saved model"):
        load_unreplaced(tmp_path / "model", lambda where: read_manifest(where, "no saved model"), lambda m: m)
    assert waits == []


@pytest.mark.parametrize("planted", [".out.tmp-99999999999999999999", ".out.tmp-²", ".out.old-0", ".out.tmp-12a",
                                     ".out.tmp-12345678", ".out.tmp-012"])
def test_a_planted_temp_sibling_of_no_pid_is_left_alone_and_the_write_goes_on(tmp_path, planted):
    """A digit string too long for a C long (OverflowError) or a non-ASCII digit (ValueError from int) beside
    an output made every writer of it a traceback (reviewer finding); pid 0 would signal our own group."""
    (tmp_path / planted).write_text("not ours")
    atomic_write_bytes(tmp_path / "out", b"new")
    assert (tmp_path / "out").read_bytes() == b"new" and (tmp_path / planted).read_text() == "not ours"


def test_a_temp_sibling_names_its_output_and_its_writer():
    assert files.sibling_out(f".e00001-s0000002.tmp-{os.getpid()}") == "e00001-s0000002"
    assert files.sibling_out(".a.b.old-4194304") == "a.b"
    not_siblings = ("out", ".out", ".out.tmp-", "out.tmp-12", ".out.new-12", ".out.tmp-12a", ".out.tmp-12345678",
                    ".out.old-0")  # a pid is 1 to 7 digits, the whole name matched
    assert [files.sibling_out(n) for n in not_siblings] == [None] * len(not_siblings)
