"""bench.gpu, the one prepared GPU check, runs end to end on the CPU (`--device cpu --small`), so the real
run on the first GPU lent to the project executes code that has already run here."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_the_gpu_check_dry_runs_on_the_cpu_and_writes_its_report(tmp_path):
    out = tmp_path / "GPU.md"
    # one catalog of the two --small has: the second adds suite time, not coverage
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--small", "--items", "5000",
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("## (a) Correctness", "## (b) Training throughput", "## (c) Full-ranking evaluation"):
        assert heading in text
    raw = json.loads(re.search(r"```json\n(.*)\n```", text, re.S).group(1))
    exact = raw["correctness"]["fp32"]
    # on the CPU the "device" run is a second CPU run: the same bands, and losses and metrics to the last bits
    # (a CPU BLAS may pick another kernel for another buffer alignment: 9e-8 relative seen once)
    assert exact["bands"]["identical"] == 1.0 and exact["bands"]["queries"] > 0
    assert exact["loss_max_rel_diff"] < 1e-6 and exact["valid_max_abs_diff"] < 1e-6
    assert raw["correctness"]["bf16_tf32"]["loss_max_rel_diff"] < 2e-2  # bf16 autocast stays within tolerance
    assert raw["correctness"]["brute_force"]["equal"]
    assert raw["correctness"]["fp32"]["eval_ignores_tf32"] and "valid metrics the same with TF32 flipped" in text
    assert [t["items"] for t in raw["throughput"]] == [5_000]
    for t in raw["throughput"]:
        assert [c["phase"] for c in t["cases"]] == ["random", "hard", "augmented"]
        assert all(c["sessions_per_s"] > 0 and c["split_ms"]["mining"] >= 0 for c in t["cases"])
        assert t["floor"]["mine_ms"] > 0 and t["eval_sessions_per_s"] > 0
    assert "loss_ms" in raw["throughput"][0]["floor"]


def test_a_catalog_the_device_cannot_hold_is_recorded_and_the_rest_reported(tmp_path, monkeypatch):
    """V = 10M peaks at ~91 GiB: on an H100 (78 GiB) it runs out of memory. The report keeps the catalogs
    measured and names the one that did not fit, instead of the call bringing back nothing."""
    from bench import gpu
    measure = gpu.throughput

    def throughput(comm, device, shape, V):
        if V == 20_000:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return measure(comm, device, shape, V)

    monkeypatch.setattr(gpu, "throughput", throughput)
    out = tmp_path / "GPU.md"
    assert gpu.main(["--device", "cpu", "--small", "--items", "5000,20000", "--out", str(out)]) == 0
    text = out.read_text()
    assert "V = 20,000: out of memory on this device (CUDA out of memory. Tried to allocate 40.00 GiB)." in text
    assert "| 5,000 | random |" in text and "| 20,000 |" not in text and ", partial" not in text
