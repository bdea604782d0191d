"""Item-text encoding: peak memory at V = 1M and items/s in this process and on Ray; writes bench/ENCODE.md.

    python -m bench.encode [--distinct 1024] [--items 1000000] [--actors 2]

Texts are the first --distinct distinct texts of Scientific (../shared/data/scientific/Scientific.text).
Every figure comes from a fresh child process (`--child MODE`), so nothing loaded by one run (the model,
torch, Ray) counts in another's memory, each with its own cache directory (the cache_dir argument):

* rate: the distinct texts written by `write_text_features` into a DatasetWriter from an empty cache,
  in this process (one torch thread, and torch's default: every core) and with --actors Ray actors of one
  thread (a private local Ray): end to end is
  the whole call; start-up is the same call on one batch of texts (model load; on Ray also Ray's start
  and each actor's model load), and the rate after start-up is the difference of the two. (Timing the
  results as they reach the driver would flatter Ray: the actors work ahead of the first result.)
* peak: --items items whose texts cycle over the distinct texts (dedup runs only those through the
  model), written by the streaming code and by the code before it (text_features.py at OLD_COMMIT,
  which returned the V×D array), both from an empty cache (model loaded, the distinct texts encoded)
  and from a warm one (no model). Peak = VmHWM of the child, reset (/proc/self/clear_refs) once the
  item texts are built, so it is the encoding's own high-water mark; the RSS before is given too.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from alterrec_dist.data.text_features import DEFAULT_BATCH_SIZE, default_threads
from bench.at_commit import module_at

ROOT = Path(__file__).resolve().parent.parent
SCIENTIFIC = ROOT.parent / "shared" / "data" / "scientific" / "Scientific.text"
OLD_COMMIT = "a5ffadc"  # main's HEAD before issue 17 part 3: encode_texts returned V×D whole
D = 384
ONE_BATCH = DEFAULT_BATCH_SIZE  # texts of the run that measures start-up alone
RATES = ("rate-here", "rate-here-all", "rate-ray")


def distinct_texts(n: int) -> list[str]:
    texts = dict.fromkeys(line.split("\t", 1)[1] for line in SCIENTIFIC.read_text().splitlines()[1:])
    return list(texts)[:n]


# -- the child: one measured run ----------------------------------------------------------------------

def status_kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def child(mode: str, distinct: int, items: int, actors: int, cache: str) -> dict:
    from alterrec_dist.data.layout import DatasetWriter
    from alterrec_dist.data.text_features import EncodeStats, encode_here, write_text_features
    from alterrec_dist.data.text_ray import ray_encoder

    base = distinct_texts(distinct)
    texts = base if mode.startswith("rate") else [base[i % len(base)] for i in range(items)]
    old = module_at(OLD_COMMIT, "alterrec_dist/data/text_features.py") if mode == "peak-old" else None
    rss_before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    stats = EncodeStats()
    # rate-here and rate-ray: one torch thread a process; rate-here-all and peak: the default (every core)
    encoder = (ray_encoder(actors, threads=1) if mode == "rate-ray" else
               functools.partial(encode_here, threads=1) if mode == "rate-here" else encode_here)
    with tempfile.TemporaryDirectory() as tmp, DatasetWriter(Path(tmp) / "out") as writer:
        start = time.perf_counter()
        if old is None:
            write_text_features(writer, texts, cache_dir=cache, progress=False, stats=stats, encoder=encoder)
        else:
            features, has_text = old.encode_texts(texts, cache_dir=cache, progress=False, stats=stats)
            writer.add_text_features(features)
            writer.set_has_text(has_text)
        wall = time.perf_counter() - start
        writer.abort()
    return {"wall_s": wall, "encoded": stats.encoded, "cached": stats.cached,
            "rss_before_mib": rss_before / 1024, "peak_mib": status_kib("VmHWM") / 1024}


# -- the parent: every run, then the report ---------------------------------------------------------------

def run_child(mode: str, args: argparse.Namespace, cache: Path, distinct: int | None = None) -> dict:
    argv = [sys.executable, "-m", "bench.encode", "--child", mode, "--distinct", str(distinct or args.distinct),
            "--items", str(args.items), "--actors", str(args.actors), "--cache", str(cache)]
    out = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(mode, distinct or args.distinct, cache.name, result, flush=True)
    return result


def report(args: argparse.Namespace, r: dict) -> str:
    from bench.synth_scale import machine

    n, v, threads = args.distinct, args.items, default_threads()
    net = {m: (n - ONE_BATCH) / (r[m]["wall_s"] - r[m + "-one-batch"]["wall_s"]) for m in RATES}
    old_bytes = v * D * 2
    lines = [
        "# Item-text encoding: memory and rate",
        "",
        f"Made by `python -m bench.encode --distinct {n} --items {v} --actors {args.actors}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d} (bench/encode.py's docstring says what each figure is).",
        "",
        f"## Peak memory at V = {v:,} items ({n:,} distinct Scientific texts, all-MiniLM-L6-v2, D = {D})",
        "",
        "| code | cache | encoded | peak RSS of the encoding | RSS before |",
        "|---|---|---|---|---|",
    ]
    for mode, label in (("peak-new", "streaming (this code)"), ("peak-old", f"whole V×D (code at {OLD_COMMIT})")):
        for temp in ("cold", "warm"):
            x = r[f"{mode}-{temp}"]
            lines.append(f"| {label} | {'empty' if temp == 'cold' else 'warm'} | {x['encoded']:,} | "
                         f"{x['peak_mib']:,.0f} MiB | {x['rss_before_mib']:,.0f} MiB |")
    lines += [
        "",
        f"The old code held V×D float16 = {old_bytes / 2**20:,.0f} MiB ({old_bytes / 1e6:,.0f} MB) of features at once "
        "(more when the distinct texts are many: their V_unique×D rows from the cache and from the encoder "
        "besides). The streaming code holds one dataset part (262,144 rows × D float16 = 192 MiB) and one cache "
        "file (8,192 rows) at a time, plus O(V) bookkeeping (each item's distinct-text row, the distinct "
        "texts' sha256 keys and cache positions); that bound does not grow with V. Measured, nothing "
        "extrapolated; the texts repeat, so the distinct-text bookkeeping is that of "
        f"{n:,} texts, not of a catalog of {v:,} distinct ones (32 B of key and 16 B of position per distinct text "
        "more: 48 MB at 1M).",
        "",
        f"## Rate: {n:,} distinct texts from an empty cache",
        "",
        "| path | end to end | items/s end to end | start-up (one batch of "
        f"{ONE_BATCH}) | items/s after start-up |",
        "|---|---|---|---|---|",
        *(f"| {label} | {r[m]['wall_s']:.1f} s | {n / r[m]['wall_s']:.1f} | {r[m + '-one-batch']['wall_s']:.1f} s | "
          f"{net[m]:.1f} |" for m, label in (("rate-here", "in this process, 1 torch thread"),
                                             ("rate-here-all", f"in this process, {threads} torch threads (default)"),
                                             ("rate-ray", f"Ray Data, {args.actors} CPU actors of 1 thread"))),
        "",
        f"Ray / in-process at 1 thread: {net['rate-ray'] / net['rate-here']:.2f}× after start-up, "
        f"{r['rate-here']['wall_s'] / r['rate-ray']['wall_s']:.2f}× end to end; Ray / in-process at {threads} threads: "
        f"{net['rate-ray'] / net['rate-here-all']:.2f}× and {r['rate-here-all']['wall_s'] / r['rate-ray']['wall_s']:.2f}×. "
        "Start-up is the model load here; "
        "on Ray, Ray's start and each actor's model load. After start-up = "
        f"({n:,} − {ONE_BATCH}) / (end to end − start-up).",
        "",
        f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} when the rates were written (2 cores: "
        "anything much above 0 means other jobs shared them, and the rates are lower bounds).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--distinct", type=int, default=1024)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "bench" / "ENCODE.md"))
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.distinct, args.items, args.actors, args.cache)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in RATES:
            results[mode] = run_child(mode, args, Path(tmp) / mode)
            results[f"{mode}-one-batch"] = run_child(mode, args, Path(tmp) / f"{mode}-one-batch", ONE_BATCH)
        for mode in ("peak-new", "peak-old"):
            # cold: its own empty cache; warm: the cache in-process rating filled (the same distinct texts)
            results[f"{mode}-cold"] = run_child(mode, args, Path(tmp) / f"{mode}-cold")
            results[f"{mode}-warm"] = run_child(mode, args, Path(tmp) / "rate-here")
    Path(args.out).write_text(report(args, results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
