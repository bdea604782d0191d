"""Fixtures shared by the test modules. Keep this small: module-specific fixtures live in their module."""
from pathlib import Path

import pytest

# The repo is cloned with shared/ beside it (here /work/main and /work/shared; CI does the same).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data sets; tests that need them skip where they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (clone the repo with shared/ beside it)")
    return SHARED_DATA


@pytest.fixture
def no_ray(monkeypatch):
    """Commands run in this process for bad input: reaching Ray (training's or batch scoring's) fails the test."""
    from alterrec_dist.serve import batch_runners
    from alterrec_dist.training import launch

    def refuse(*a, **k):
        raise AssertionError("Ray was started for a bad input")
    monkeypatch.setattr(launch, "_init_ray", refuse)
    monkeypatch.setattr(batch_runners, "run_ray", refuse)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the whole session (tests/object_store.py)."""
    from tests.object_store import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server, monkeypatch) -> str:
    """`s3://<a fresh bucket>`, with this process's environment pointing at the test server."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    from alterrec_dist.common import storage

    storage._filesystem.cache_clear()  # made for another server's environment, if any
    return f"s3://{s3_server.new_bucket()}"
