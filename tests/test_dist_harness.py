"""The harness starts a world again only when its gloo group could not be made, never when the
code under test failed."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessRaisedException

from tests import dist_harness
from tests.dist_harness import run_world


def rank_sum(rank: int, world: int) -> int:
    x = torch.tensor([rank + 1])
    dist.all_reduce(x)
    return int(x)


def failing_on_rank0(rank: int, world: int, calls: str) -> int:
    if rank == 0:
        with open(calls, "a") as f:
            f.write("call\n")
        raise ValueError("the code under test failed")
    return rank


def _init_failing(calls: Path, once: bool):
    """init_process_group that fails like gloo's connect: for the first caller only (`once`: whichever rank
    creates the marker `calls`, an atomic choice), or always (a line per call in `calls`); else the real one."""
    real = dist.init_process_group

    def init(*args, **kwargs):
        if once:
            try:
                os.close(os.open(calls, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return real(*args, **kwargs)
        else:
            with open(calls, "a") as f:
                f.write("init\n")
        raise RuntimeError("Gloo connectFullMesh failed with [pair.cc:553] Connection closed by peer")
    return init


@pytest.mark.slow  # forked gloo worlds
def test_a_world_whose_group_was_not_made_is_started_again(tmp_path, monkeypatch):
    monkeypatch.setattr(dist_harness.dist, "init_process_group", _init_failing(tmp_path / "failed", once=True))
    with pytest.warns(UserWarning, match="gloo group of 2 not made"):
        assert run_world(rank_sum, 2) == [3, 3]


@pytest.mark.slow  # forked gloo worlds
def test_a_group_never_made_fails_after_the_last_attempt(tmp_path, monkeypatch):
    calls = tmp_path / "calls"  # forked ranks see the patched function
    monkeypatch.setattr(dist_harness.dist, "init_process_group", _init_failing(calls, once=False))
    with pytest.warns(UserWarning), pytest.raises(ProcessRaisedException, match="connectFullMesh"):
        run_world(rank_sum, 1)
    assert len(calls.read_text().splitlines()) == dist_harness.SETUP_ATTEMPTS


@pytest.mark.slow  # forked gloo worlds
def test_a_failure_in_the_code_under_test_is_not_retried(tmp_path):
    calls = tmp_path / "calls"
    with pytest.raises(ProcessRaisedException, match="the code under test failed"):
        run_world(failing_on_rank0, 2, str(calls))
    assert calls.read_text().splitlines() == ["call"]
