"""A run's record names the code that made it."""
import subprocess

import torch

from alterrec_dist.common import code_version as cv
from alterrec_dist.common.config import PROJECT_ROOT


def test_the_checkouts_commit_and_torch():
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    got = cv.code_version()
    assert got["commit"] == head and got["torch"] == torch.__version__ and isinstance(got["changed"], bool)


def test_outside_a_checkout_the_commit_is_unknown(tmp_path, monkeypatch):
    """An installed image has no .git: the record says so rather than failing the run."""
    monkeypatch.setattr(cv, "PROJECT_ROOT", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert cv.code_version() == {"commit": "unknown", "changed": None, "torch": torch.__version__}
