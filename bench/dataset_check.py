"""Time the dataset checks at catalogue scale and record them in bench/DATASET_CHECK.md.

    python -m alterrec_dist.synth --items 1000000 --sessions 2000000 --text-features random-projection \
        --out data/synth-1m --no-progress
    python -m bench.dataset_check data/synth-1m [--repeat 5]

Times, in this process, each step a training start or `prepare verify` takes on that dataset:
opening it (the manifest and its keys), `Dataset.check()` (the always-on check before training:
Parquet footers and statistics, .npy headers, file sizes) best of --repeat runs, and once each
`Dataset.verify()` (check + every file's sha256 + every item index, item id and text feature read) and
the sha256 of all files alone (what `DatasetWriter.commit` adds to prepare and synth). The page cache
is warm after the first read; the first verify of a dataset read from a cold disk is bounded by disk
speed instead.
"""
from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

from alterrec_dist.common.files import file_sha256
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.data.layout import SPLITS, data_files
from bench.synth_scale import directory_bytes, machine

ROOT = Path(__file__).resolve().parent.parent


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dataset")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "DATASET_CHECK.md"))
    args = p.parse_args()
    path = Path(args.dataset)
    data = Dataset(path)
    files = data_files(data.manifest)
    opened = min(timed(lambda: Dataset(path)) for _ in range(args.repeat))
    check = min(timed(data.check) for _ in range(args.repeat))
    sha = timed(lambda: [file_sha256(path / f) for f in files])
    verify = timed(data.verify)
    rows = " / ".join(f"{data.num_rows(s):,}" for s in SPLITS)
    size = directory_bytes(path)
    lines = [
        "# Dataset checks at V = 1M",
        "",
        f"Made by `python -m bench.dataset_check {args.dataset} --repeat {args.repeat}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d}, on a dataset made by",
        "",
        "    python -m alterrec_dist.synth --items 1000000 --sessions 2000000 --text-features random-projection "
        f"--out {args.dataset} --no-progress",
        "",
        f"{data.num_items:,} items, rows train / valid / test {rows}, {len(files)} files, "
        f"{size / 2**30:.2f} GiB on disk (page cache warm).",
        "",
        "| step | when | time |",
        "|---|---|---|",
        f"| open (manifest and its keys) | every start of train, export, batch_score | {opened * 1e3:.1f} ms |",
        f"| `Dataset.check()`: footers, statistics, .npy headers, sizes | every training start, before Ray (best of {args.repeat}) | {check * 1e3:.1f} ms |",
        f"| sha256 of every file | what `DatasetWriter.commit` adds to prepare / synth | {sha:.2f} s |",
        f"| `Dataset.verify()`: check + sha256 + every item index, item id and text feature read | `python -m alterrec_dist.prepare verify DIR`, on demand | {verify:.2f} s |",
        "",
        f"Machine: {machine()}. Shared with other jobs while measured, so the second-scale figures are upper bounds.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
