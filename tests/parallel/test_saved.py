"""Saved models and checkpoints (parallel/saved.py): a model read while training replaces it, and a write that
fails. (Shards reassembling at any world size: tests/training/test_checkpoint.py.)"""
import json
import resource
import shutil
import signal

import pytest
import torch

from alterrec_dist.common.files import file_sha256, replace_into_place
from alterrec_dist.parallel import saved
from alterrec_dist.parallel.saved import load_model, save_file
from tests.serve.test_export import trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory, "alterrec")


def test_a_model_load_that_overlaps_a_new_best_epoch_reads_one_model(run, tmp_path, monkeypatch):
    """Training replaces RUN/model at each new best epoch. `export --run` (and `recommend`, `batch_score --run`)
    loading it meanwhile took the old manifest (its epoch, its checksums) with the new model's networks, to exit 0.
    The manifest is read again after the files: such a load starts again and returns the newer model whole."""
    live, newer = tmp_path / "model", tmp_path / "newer"
    shutil.copytree(run / "model", live)
    shutil.copytree(run / "model", newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    states = torch.load(newer / "networks.pt", weights_only=True)
    for state in states.values():
        for value in state.values():
            if value.is_floating_point():
                value.mul_(2)  # another epoch's weights
    torch.save(states, newer / "networks.pt")
    manifest["epoch"] += 2
    manifest["files"]["networks.pt"] = file_sha256(newer / "networks.pt")
    (newer / "manifest.json").write_text(json.dumps(manifest))
    real, swaps = saved.load_cpu, []

    def swapping(*args, **kwargs):
        if not swaps:  # after the checksums, before the networks are read: the new best epoch lands
            swaps.append(1)
            replace_into_place(newer, live)
        return real(*args, **kwargs)
    monkeypatch.setattr(saved, "load_cpu", swapping)
    loaded_manifest, loaded_states, _ = load_model(live)
    assert swaps == [1] and loaded_manifest["epoch"] == manifest["epoch"]
    for name, state in states.items():
        for key, value in state.items():
            assert torch.equal(loaded_states[name][key], value), (name, key)


def test_a_save_that_falls_short_is_an_oserror_as_from_any_writer(tmp_path):
    """torch's zip writer reports a write that fell short (a full disk) as a RuntimeError, "unexpected pos 16960
    vs 16848": the commands turned every OSError into one line naming their output, and let this one through as
    a traceback (export's encoders.pt, a checkpoint's files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed rather than told
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # every write past 20 kB fails, as on a full disk
    try:
        with pytest.raises(OSError, match=r"^a write fell short: a full disk\? \(torch: .*unexpected pos"):
            save_file(tmp_path / "x.pt", torch.zeros(100_000))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert save_file(tmp_path / "x.pt", torch.zeros(10)) == file_sha256(tmp_path / "x.pt")


LOAD_SHORT_OF_MEMORY = """
import re, resource, sys
from alterrec_dist.parallel.saved import load_cpu
vm = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) << 10
resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    load_cpu(__import__("pathlib").Path(sys.argv[1]))
except MemoryError as e:
    print("MemoryError", e)
except Exception as e:
    print(type(e).__name__, e)
"""


@pytest.mark.slow
def test_a_file_read_short_of_memory_is_out_of_memory_not_a_foreign_file(tmp_path):
    """load_cpu names a file torch cannot read as not this project's; torch's CPU allocator fails as a
    RuntimeError too, and a saved model read on too small a machine was called foreign (reviewer finding)."""
    import subprocess
    import sys
    path = tmp_path / "networks.pt"
    save_file(path, {"w": torch.zeros(50_000_000)})  # 200 MB
    r = subprocess.run([sys.executable, "-c", LOAD_SHORT_OF_MEMORY, str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.startswith(f"MemoryError {path}: "), r.stdout + r.stderr[-2000:]
