"""Batch scoring's runners: what Ray's scoring actors are given (the runs themselves: test_batch_score)."""
import pytest

from alterrec_dist.common.errors import ConfigError
from alterrec_dist.serve.batch_runners import ray_model_specs

SPEC = {"run": "runs/r", "export": None, "data": None}


@pytest.mark.parametrize("device, actors", [("cuda:1", "cuda"), ("cuda", "cuda"), ("cpu", "cpu")])
def test_actors_score_on_the_device_type_and_this_process_loads_on_the_cpu(device, actors):
    """Ray shows each actor its one GPU as cuda:0: --device cuda:1 crashed every actor, and --device cuda put a
    model copy on GPU 0 in the driver, which scores nothing under Ray (reviewer finding)."""
    here, actor = ray_model_specs({**SPEC, "device": device})
    assert here == {**SPEC, "device": "cpu"} and actor == {**SPEC, "device": actors}


def test_a_bad_device_is_refused_here_in_one_line():
    """Checked before Ray starts (this process, which may have no GPU, only checks the name)."""
    with pytest.raises(ConfigError, match=r"^--device 'gpu:0': not a device \(cpu, cuda or cuda:N\)$"):
        ray_model_specs({**SPEC, "device": "gpu:0"})
    with pytest.raises(ConfigError, match="^--device mps: only cpu and cuda are supported$"):
        ray_model_specs({**SPEC, "device": "mps"})
