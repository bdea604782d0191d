"""A run's record names the code that made it: a digest of the package's source, wherever it runs from."""
import shutil
import subprocess
import sys

from alterrec_dist.common import code_version as cv


def _copy(tmp_path):
    """The package as `ray job submit` uploads it: no .git above it, byte-compiled caches left out."""
    shutil.copytree(cv.PACKAGE, tmp_path / "alterrec_dist", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "alterrec_dist"


def test_a_copy_without_git_has_the_checkouts_digest(tmp_path):
    copy = _copy(tmp_path)
    (copy / "__pycache__" / "stale.cpython-311.pyc").parent.mkdir(exist_ok=True)
    (copy / "__pycache__" / "stale.cpython-311.pyc").write_bytes(b"not source")
    assert cv.source_sha256(copy) == cv.source_sha256()
    # and the command a user compares a record with prints it
    r = subprocess.run([sys.executable, "-m", "alterrec_dist.common.code_version"], cwd=tmp_path,
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == cv.source_sha256()


def test_any_change_of_source_changes_the_digest(tmp_path):
    copy = _copy(tmp_path)
    original = cv.source_sha256(copy)
    recipe = copy / "training" / "recipe.py"
    recipe.write_bytes(recipe.read_bytes() + b"\n")
    edited = cv.source_sha256(copy)
    (copy / "training" / "recipe.py").rename(copy / "recipe.py")  # the same bytes, moved
    moved = cv.source_sha256(copy)
    assert len({original, edited, moved}) == 3
