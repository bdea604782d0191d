"""The one manifest reader and the one staged swap that every writer of a directory or file uses."""
import pytest

from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import Staged, atomic_write_bytes, read_manifest


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
