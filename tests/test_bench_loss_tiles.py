"""bench/loss_tiles.py, the command bench/LOSS.md records, runs: the untiled loss of 1b57529 imports modules
that have moved since (alterrec_dist.mining, .sharded), which stopped it at its import."""
import subprocess
import sys

import pytest

from alterrec_dist.common.config import PROJECT_ROOT
from bench.loss_tiles import UNTILED_AT


def test_the_tiled_and_untiled_losses_run_side_by_side_and_agree(tmp_path):
    if subprocess.run(["git", "cat-file", "-e", f"{UNTILED_AT}^{{commit}}"], cwd=PROJECT_ROOT).returncode:
        pytest.skip(f"a checkout without commit {UNTILED_AT} (shallow): the untiled loss is read from it")
    out = tmp_path / "LOSS.md"
    r = subprocess.run([sys.executable, "-m", "bench.loss_tiles", "--rows", "3000", "--batch", "8", "--dim", "4",
                        "--band", "20", "--reps", "1", "--out", str(out)], cwd=PROJECT_ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in out.read_text().splitlines() if line.startswith("| 3,000 |"))
    untiled_loss, tiled_loss = row.split("|")[-2].split(" / ")
    assert float(untiled_loss) == float(tiled_loss)
