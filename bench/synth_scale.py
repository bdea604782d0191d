"""Time the synthetic generator at catalogue scale and record it in bench/SYNTH.md.

    python bench/synth_scale.py [--items 1000000] [--sessions 2000000] [--keep DIR]

Runs `python -m alterrec_dist.synth ... --text-features random-projection` as a child process into
a temporary directory (removed afterwards unless --keep) and records its wall time and peak RSS
(getrusage of the waited-for child: the generator's own high-water mark, not this script's).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from alterrec_dist.data.dataset import Dataset  # noqa: E402


def machine() -> str:
    mem_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem_kib / 2**20:.1f} GiB RAM, {platform.platform()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}, pyarrow {pyarrow.__version__}")


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def head_shares(popularity: np.ndarray) -> tuple[float, float]:
    c = np.sort(popularity)[::-1]
    return c[: len(c) // 100].sum() / c.sum(), c[: len(c) // 10].sum() / c.sum()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--sessions", type=int, default=2_000_000)
    p.add_argument("--keep", default=None, help="write the dataset here and keep it")
    p.add_argument("--report", default=str(ROOT / "bench" / "SYNTH.md"))
    args = p.parse_args()
    tmp = None if args.keep else tempfile.mkdtemp(prefix="synth-scale-")
    out = Path(args.keep) if args.keep else Path(tmp) / "ds"
    cmd = [sys.executable, "-m", "alterrec_dist.synth", "--items", str(args.items), "--sessions", str(args.sessions),
           "--text-features", "random-projection", "--out", str(out), "--overwrite", "--no-progress"]
    try:
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        wall = time.perf_counter() - start
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
        ds = Dataset(out)
        size_gib = directory_bytes(out) / 2**30
        top1, top10 = head_shares(ds.popularity())
        rows = ds.manifest["splits"]
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    shown = ["python", "-m", "alterrec_dist.synth", *cmd[3:]]
    shown[shown.index("--out") + 1] = "$TMP/ds"
    report = f"""# Synthetic generator at scale

Made by `python bench/synth_scale.py --items {args.items} --sessions {args.sessions}` on
{datetime.now(timezone.utc).strftime('%Y-%m-%d')}, which runs (as a child process, timed):

    {' '.join(shown)}

| | |
|---|---|
| wall time | {wall:.1f} s ({wall / 60:.2f} min) |
| peak RSS of the generator | {peak_gib:.2f} GiB |
| output size on disk | {size_gib:.2f} GiB |
| rows train / valid / test | {rows['train']:,} / {rows['valid']:,} / {rows['test']:,} |
| train-target share of the top 1% / 10% of items | {top1:.1%} / {top10:.1%} |

Machine: {machine()}.

Targets: under 15 min and 4 GiB peak RSS on a 2-core machine. Most of the output is the
float16 text features (N x 384 x 2 bytes). The popularity shares count train targets only
({rows['train'] / args.items:.1f} per item); Amazon-M2 task 2 has 11.7% / 44.3% over all events.
"""
    Path(args.report).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
