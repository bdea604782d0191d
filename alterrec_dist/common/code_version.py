"""Which code made a result, for the records a run keeps: a digest of the package's source and the torch version.

A record that names no code cannot tell a rerun's difference from a change of code: the grid's Transformer
records were made before the encoder was rewritten, which draws other dropout masks, and nothing said so
(reviewer finding). A git commit does not travel with the code: `ray job submit` uploads the working directory
without `.git`, and an image need not carry it. The package's own source does, so its digest names the code
wherever it runs, and a checkout's digest can be compared with a record's (`python -m
alterrec_dist.common.code_version`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


def source_sha256(package: Path = PACKAGE) -> str:
    """sha256 over the package's .py files, each as its path and length then its bytes, in path order:
    byte-compiled caches and data files do not count, a renamed or moved module does."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py"), key=lambda p: p.relative_to(package).as_posix()):
        name, data = path.relative_to(package).as_posix().encode(), path.read_bytes()
        h.update(b"%d:%s%d:" % (len(name), name, len(data)) + data)
    return h.hexdigest()


def code_version() -> dict:
    """{"source_sha256", "torch"}: torch's kernels round differently between releases."""
    import torch

    return {"source_sha256": source_sha256(), "torch": torch.__version__}


if __name__ == "__main__":
    print(source_sha256())
