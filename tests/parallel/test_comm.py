"""Comm's autograd collectives: torch's deprecation warning is quieted at the call, not for the whole process."""
import subprocess
import sys
import warnings

import pytest
import torch

from alterrec_dist.parallel.comm import Comm
from tests.dist_harness import run_world


def test_importing_the_package_leaves_the_warning_filters_alone():
    """A filter set at import changed the warnings of every program that imported the package."""
    code = ("import warnings, torch.distributed.nn.functional; before = list(warnings.filters); "  # theirs first
            "import alterrec_dist.parallel.comm; assert warnings.filters == before, warnings.filters[:3]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def _every_autograd_collective(rank: int, world: int) -> list:
    comm = Comm()
    x = torch.arange(4.0, requires_grad=True) + rank
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gathered = comm.all_gather(x, autograd=True)
        reduced = comm.all_reduce(x, autograd=True)
        swapped = torch.cat(comm.all_to_all(list(x.view(world, -1)), [4 // world] * world, autograd=True))
        (gathered.sum() + reduced.sum() + swapped.sum()).backward()
    return [str(w.message) for w in caught]


@pytest.mark.slow
def test_the_autograd_collectives_warn_nothing():
    assert run_world(_every_autograd_collective, 2) == [[], []]
