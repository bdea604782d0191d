"""Which code made a result: the git commit of the checkout and the torch version, for the records a run keeps.

A record that names no code cannot tell a rerun's difference from a change of code: the grid's Transformer
records were made before the encoder was rewritten, which draws other dropout masks, and nothing said so
(reviewer finding). Outside a git checkout (an installed image) the commit is "unknown".
"""
from __future__ import annotations

import subprocess

from alterrec_dist.common.config import PROJECT_ROOT


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str:
    """The checkout's short commit, or "unknown"."""
    return _git("rev-parse", "--short", "HEAD") or "unknown"


def code_version() -> dict:
    """{"commit", "changed": whether tracked files differ from it (None: unknown), "torch"}."""
    import torch

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git_commit(), "changed": None if status is None else bool(status), "torch": torch.__version__}
