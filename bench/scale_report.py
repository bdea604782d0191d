"""bench/RESULTS.md from the raw figures of a `bench.scale` run (written atomically, command first).

Aggregation: a step takes as long as its slowest worker (the collectives wait for it), so step times
are the max over workers, pooled over repeats: median and min-max. Section times, bytes and memory
are per worker per step; bytes and memory are the max over workers.
"""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import numpy as np
import torch

from alterrec_dist.common.device import CPU_TILE_ROWS
from alterrec_dist.common.files import atomic_write_bytes
from bench import formulas

SECTIONS = ("mining", "loss", "encoder", "optimizer")
COLLECTIVES = ("all_gather", "all_gather_backward", "all_reduce_RedOpType.SUM", "all_reduce_RedOpType.SUM_backward",
               "all_reduce_RedOpType.MAX", "all_to_all", "all_to_all_backward")
# Physical floor on one H100 (bf16, B=1024, d=300, k2=20,000), ms per 1024 sessions: score + top-k2, and
# the band loss forward+backward with a dense band mask (measured at 1M items; taken as linear in V).
FLOOR_SCORE_MS = {1_000_000: 12.9, 10_000_000: 118.0}
FLOOR_LOSS_MS_PER_M = 51.0
PROJECT_W, PROJECT_B, PROJECT_K2 = 8, 1024, 20_000
TARGET_MERGE_BYTES = 2e6
# what bench.scale sets for its second reference comparison (bench/scale.py KEEP_FREED_MEMORY)
KEEP_MEMORY_NOTE = "MALLOC_MMAP_THRESHOLD_=2^32 MALLOC_TRIM_THRESHOLD_=2^36"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def short(collective: str) -> str:
    return collective.replace("all_reduce_RedOpType.", "all_reduce ").replace("_backward", " bwd")


def machine() -> str:
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{os.cpu_count()} CPU cores ({cpu}), {mem:.1f} GiB RAM, GPU: {gpu}; {platform.platform()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def group(points: list[dict]) -> dict[tuple[int, int], list[dict]]:
    out: dict[tuple[int, int], list[dict]] = {}
    for p in points:
        out.setdefault((p["items"], p["world"]), []).append(p)
    return out


def case_rows(reps: list[dict]) -> list[dict]:
    """Per case: pooled step times, mean sections, bytes (max over workers), per (V, W) point."""
    rows = []
    for i, first in enumerate(reps[0]["ranks"][0]["cases"]):
        steps = [s for p in reps for s in np.max([r["cases"][i]["step_s"] for r in p["ranks"]], axis=0)]
        cases = [r["cases"][i] for p in reps for r in p["ranks"]]
        sections = {k: float(np.mean([c["sections"].get(k, 0.0) for c in cases])) for k in SECTIONS}
        sections["other"] = float(np.mean(steps)) - sum(sections.values())
        keys = {k for c in cases for k in c["bytes"]}
        rows.append({"negatives": first["negatives"], "merge": first["merge"], "steps": steps,
                     "sections": sections, "setup_s": float(np.median([c["setup_s"] for c in cases])),
                     "bytes": {k: max(c["bytes"].get(k, 0.0) for c in cases) for k in keys},
                     "merge_bytes": max(c["bytes_by_call"].get("mine_band", 0.0) for c in cases),
                     "merge_rounds": max(c.get("merge_rounds", 0.0) for c in cases)})
    return rows


def point_summary(reps: list[dict]) -> dict:
    ranks = [r for p in reps for r in p["ranks"]]
    first = reps[0]["ranks"][0]
    return {"batch": first["batch"], "k2": first["k2"], "local_items": max(r["local_items"] for r in ranks),
            "repeats": len(reps), "steps": len(first["cases"][0]["step_s"]),
            "table": float(np.median([max(sum(r["table_bytes"].values()) for r in p["ranks"]) for p in reps])),
            "table_parts": first["table_bytes"],
            "rss": float(np.median([max(r["peak_rss"] for r in p["ranks"]) for p in reps])),
            "device_peak": max((r.get("device_peak", 0) for r in ranks), default=0),
            "build_s": float(np.median([max(r["build_s"] for r in p["ranks"]) for p in reps])),
            "eval_s": float(np.median([max(r["eval"]["seconds"] for r in p["ranks"]) for p in reps])),
            "eval_sessions": first["eval"]["sessions"], "cases": case_rows(reps)}


def floor_sessions_per_s(items: int) -> float | None:
    if items not in FLOOR_SCORE_MS:
        return None
    return 1024 / ((FLOOR_SCORE_MS[items] + FLOOR_LOSS_MS_PER_M * items / 1e6) / 1e3)


def write(path: Path, raw: dict) -> None:
    atomic_write_bytes(path, render(raw).encode())


def render(raw: dict) -> str:
    a = raw["args"]
    summaries = {k: point_summary(v) for k, v in sorted(group(raw["points"]).items())}
    cuda = a["device"].startswith("cuda")
    L = [
        "# Scale benchmark: throughput, memory per worker, traffic per step",
        "",
        "Regenerate from the repository root (catalogs are made into `data/bench/` if absent):",
        "",
        f"    {raw['command']}",
        "",
        "The raw figures go to `data/bench/results-<time>.json`; `python -m bench.scale --report-only <that file>` "
        "rewrites this page from them without measuring again.",
        "",
        f"Run finished {raw['finished']}, {raw['seconds'] / 60:.1f} min wall. "
        f"Machine: {raw['machine']}.",
        f"Load average (1/5/15 min) before: {' / '.join(f'{x:.1f}' for x in raw['load'][0])}, "
        f"after: {' / '.join(f'{x:.1f}' for x in raw['load'][1])} "
        + ("(other work shared the machine: timings are slower and noisier than on an idle one)."
           if raw["load"][0][0] >= 1.0 else "(no other work on the machine)."),
        "",
        ("Device: " + a["device"]) if cuda else
        "**No GPU was available to this run: every row below is CPU (gloo); the GPU rows of the issue "
        "(V = 1M and 10M, B = 1024, d = 300, k2 = 20,000, bf16, against the H100 floor) are not measured.**",
        "",
        f"Shapes: d = {a['dim']}, k1 = {a['k1']}, k2 = {a['k2']}, p = {a['p']} (augmented), text features "
        f"{a['text_dim']}-dim float16 (synthetic, random projection), {a['dtype']}, mean session encoder, "
        f"{a['threads']} torch thread(s) per worker, extra overrides: {a['sets'] or 'none'}. The trained "
        "network is the ID network (the sharded learnable table); the frozen text network supplies the hard "
        "negatives. Steps run on pre-read batches (Parquet reading is not timed); each worker process does one "
        "untimed warm-up step first.",
        "",
        "| V | B (global) | workers | timed steps per case x repeats | build s | phase setup s (frozen item matrix) |",
        "|---:|---:|---:|---|---:|---:|",
    ]
    for (items, world), s in summaries.items():
        setup = max(c["setup_s"] for c in s["cases"])
        L.append(f"| {items:,} | {s['batch']} | {world} | {s['steps']} x {s['repeats']} | {s['build_s']:.1f} | {setup:.2f} |")
    L += training_section(summaries, cuda)
    L += traffic_section(summaries, a)
    L += memory_section(summaries, cuda)
    L += model_section(summaries, a)
    L += merge_section(summaries, a["k1"])
    if raw.get("reference"):
        L += reference_section(raw["reference"], raw.get("reference_kept_memory"))
    L += targets_section(summaries, raw.get("reference"), raw.get("reference_kept_memory"), cuda, a["k1"])
    if raw.get("previous"):
        L += previous_section(summaries, raw["previous"])
    return "\n".join(L) + "\n"


def previous_figures(report: str) -> dict:
    """What an earlier RESULTS.md says, to set beside a new run: when it ran, sessions/s per (V, W, phase,
    merge) and peak RSS (GiB) per (V, W), read from its tables."""
    finished = re.search(r"Run finished ([^,]+), ([\d.]+) min wall", report)
    rates, rss = {}, {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[2] in ("random", "hard", "augmented") and cells[0][:1].isdigit():
            rates["/".join(cells[:4]).replace(",", "")] = float(cells[4].replace(",", ""))
        elif len(cells) >= 7 and cells[3].endswith("MiB") and cells[5].endswith("GiB"):
            rss["/".join(cells[:2]).replace(",", "")] = float(cells[5].split()[0])
    return {"finished": finished.group(1) if finished else "?", "sessions_per_s": rates, "peak_rss_gib": rss}


def previous_section(summaries: dict, previous: dict) -> list[str]:
    """This run beside the one whose RESULTS.md it replaced (same command, earlier code)."""
    L = ["", f"## Against the previous run ({previous['finished']})", "",
         "The figures of the RESULTS.md this run replaced, read from its tables, beside this run's; *now / then* is "
         "the ratio (above 1: faster, or more memory). Both are medians over repeats on the same kind of machine, "
         "but not in one process: background load differs between the two (see the load averages).", "",
         "| V | W | phase | merge | sessions/s then | sessions/s now | now / then |", "|---:|---:|---|---|---:|---:|---:|"]
    for (items, world), s in summaries.items():
        for c in s["cases"]:
            then = previous["sessions_per_s"].get(f"{items}/{world}/{c['negatives']}/{c['merge']}")
            now = s["batch"] / np.median(c["steps"])
            L.append(f"| {items:,} | {world} | {c['negatives']} | {c['merge']} | "
                     + (f"{then:,.1f} | {now:,.1f} | {now / then:.2f} |" if then else f"- | {now:,.1f} | - |"))
    L += ["", "| V | W | peak RSS then | peak RSS now | now / then |", "|---:|---:|---:|---:|---:|"]
    for (items, world), s in summaries.items():
        then, now = previous["peak_rss_gib"].get(f"{items}/{world}"), s["rss"] / 2**30
        L.append(f"| {items:,} | {world} | " + (f"{then:.2f} GiB | {now:.2f} GiB | {now / then:.2f} |" if then
                                               else f"- | {now:.2f} GiB | - |"))
    return L


def training_section(summaries: dict, cuda: bool) -> list[str]:
    L = ["", "## Training throughput and time split", "",
         "sessions/s = B / step time (median over the timed steps of every repeat; spread = min-max); *vs W=1* is "
         "the ratio of the medians. The split is ms per step, mean over steps and workers; *other* is the mean step "
         "time left over. Where the cores are already busy with other work, W = 2 workers share the CPU time one "
         "worker would get: the per-score costs in the checks section below show how much.",
         "", "| V | W | phase | merge | sessions/s | spread | vs W=1 | mining | loss | encoder | optimizer | other |"
         + (" of floor |" if cuda else ""),
         "|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "")]
    for (items, world), s in summaries.items():
        base = summaries.get((items, 1))
        for i, c in enumerate(s["cases"]):
            rate = s["batch"] / np.median(c["steps"])
            lo, hi = s["batch"] / max(c["steps"]), s["batch"] / min(c["steps"])
            ratio = f"{rate / (base['batch'] / np.median(base['cases'][i]['steps'])):.2f}x" if base else "-"
            split = " | ".join(f"{c['sections'][k] * 1e3:.0f}" for k in (*SECTIONS, "other"))
            floor = floor_sessions_per_s(items)
            extra = (f" {rate / floor:.0%} |" if floor else " - |") if cuda else ""
            L.append(f"| {items:,} | {world} | {c['negatives']} | {c['merge']} | {rate:,.1f} | {lo:,.1f}-{hi:,.1f} | "
                     f"{ratio} | {split} |{extra}")
    L += ["", "Evaluation (full ranking over all V items, id + text + fused, on the valid split):", "",
          "| V | W | sessions | seconds | sessions/s |", "|---:|---:|---:|---:|---:|"]
    for (items, world), s in summaries.items():
        L.append(f"| {items:,} | {world} | {s['eval_sessions']} | {s['eval_s']:.2f} | {s['eval_sessions'] / s['eval_s']:,.1f} |")
    return L


def matches_formula(a: dict, s: dict, world: int, c: dict) -> str:
    """Do the counted data-independent collectives equal bench/formulas.py (docs/SCALING.md)? Only
    for the plain fp32 setup the formulas describe."""
    if a["sets"] or a["dtype"] != "fp32":
        return "-"
    want = formulas.collective_bytes(c["negatives"], c["merge"], s["batch"], world, a["dim"], s["k2"], a["p"],
                                     k1=a["k1"], rounds=c["merge_rounds"])
    return "yes" if all(c["bytes"].get(k, 0.0) == v for k, v in want.items()) else "**no**"


def traffic_section(summaries: dict, a: dict) -> list[str]:
    L = ["", "## Traffic per step per worker, by collective", "",
         "Bytes this worker hands to each collective per step, counted by `Comm` in the sharding layer as the "
         "collective runs (*bwd*: the backward of an autograd collective, counted when its gradient arrives); max "
         "over workers. At W = 1 the same code runs and counts, but nothing leaves the process. *merge* is the part "
         "sent inside `mine_band` (the band merge alone); *rounds* its bisection rounds per step (mean over steps, "
         "max over repeats: data-dependent, at most 32, none at W = 1). *formula*: the all-gather and all-reduce "
         "counts equal docs/SCALING.md's formulas (`bench/formulas.py`) at those rounds; the all-to-all depends on "
         "the items in the batch.", "",
         "| V | W | phase | merge | " + " | ".join(short(k) for k in COLLECTIVES) + " | total | merge | rounds | formula |",
         "|---:|---:|---|---|" + "---:|" * (len(COLLECTIVES) + 3) + "---|"]
    for (items, world), s in summaries.items():
        for c in s["cases"]:
            cells = " | ".join(fmt_bytes(c["bytes"].get(k, 0.0)) for k in COLLECTIVES)
            L.append(f"| {items:,} | {world} | {c['negatives']} | {c['merge']} | {cells} | "
                     f"{fmt_bytes(sum(c['bytes'].values()))} | {fmt_bytes(c['merge_bytes'])} | "
                     f"{c['merge_rounds']:.1f} | {matches_formula(a, s, world, c)} |")
    return L


def memory_section(summaries: dict, cuda: bool) -> list[str]:
    L = ["", "## Memory per worker", "",
         "Item table = this worker's ID rows + their gradient + AdamW state + float16 text features + the frozen "
         "network's item matrix, summed from the tensors themselves. Peak RSS = `getrusage` of the worker process "
         "(max over workers; includes Python, torch and the training score tile and its gradient)."
         + (" Device peak = `torch.cuda.max_memory_allocated`." if cuda else ""), "",
         "| V | W | rows per worker | item table | vs W=1 | peak RSS | vs W=1 |" + (" device peak |" if cuda else ""),
         "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "")]
    for (items, world), s in summaries.items():
        base = summaries.get((items, 1))
        t_ratio = f"{s['table'] / base['table']:.3f}" if base else "-"
        r_ratio = f"{s['rss'] / base['rss']:.2f}" if base else "-"
        extra = f" {s['device_peak'] / 2**30:.2f} GiB |" if cuda else ""
        L.append(f"| {items:,} | {world} | {s['local_items']:,} | {s['table'] / 2**20:,.0f} MiB | {t_ratio} | "
                 f"{s['rss'] / 2**30:.2f} GiB | {r_ratio} |{extra}")
    return L


def model_section(summaries: dict, a: dict) -> list[str]:
    """The measurements against docs/SCALING.md's cost model: time per unit of the term that should
    drive it (flat across V and W where the model holds), memory against the formulas."""
    L = ["", "## Checks against the cost model (docs/SCALING.md)", "",
         "Per worker: S = B x V/W training scores per step (G = B gathered queries x the shard's rows), R = V/W x d "
         "row values. *loss* and *mining* are ns per score (random and hard/threshold phases), *optimizer* ns per row "
         "value (random phase); flat columns mean the time follows the model. *table* is the measured item table "
         "against `formulas.table_bytes`; *rest of RSS* = peak RSS - table - the 2 x 4 x B x tile bytes of one "
         "training score tile and its gradient (`formulas.score_tile_bytes`).", "",
         "| V | W | S (M) | loss ns/score | mining ns/score | optimizer ns/value | table measured - formula | rest of RSS |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (items, world), s in summaries.items():
        S = s["batch"] * s["local_items"]
        R = s["local_items"] * a["dim"]
        by = {(c["negatives"], c["merge"]): c for c in s["cases"]}
        random, hard = by[("random", "-")], by[("hard", "threshold")]
        table = formulas.table_bytes(items, world, a["dim"], a["text_dim"])
        rest = s["rss"] - s["table"] - formulas.score_tile_bytes(s["batch"], items, world, CPU_TILE_ROWS)
        L.append(f"| {items:,} | {world} | {S / 1e6:,.1f} | {random['sections']['loss'] / S * 1e9:.1f} | "
                 f"{hard['sections']['mining'] / S * 1e9:.1f} | {random['sections']['optimizer'] / R * 1e9:.2f} | "
                 f"{s['table'] - table:+,.0f} B | {rest / 2**30:.2f} GiB |")
    return L


def merge_projection(summaries: dict, k1: int) -> dict | None:
    """The threshold merge at W = 8, B = 1024, k2 = 20,000 (B per worker, G = W*B, and B global): at the
    bound of 32 rounds, and at the most rounds measured; against the all-gather merge's formula, after
    checking the measured bytes of both merges against their formulas (hard phase)."""
    measured = [(world, s, c) for (_, world), s in summaries.items() for c in s["cases"]
                if c["negatives"] == "hard" and c["merge"] != "-"]
    if not measured:
        return None
    agree = all(c["merge_bytes"] == (formulas.threshold_merge_bytes(s["batch"], world, k1, s["k2"], c["merge_rounds"])
                                     if c["merge"] == "threshold" else s["batch"] * (s["k2"] + 1) * formulas.FP32)
                + s["batch"] * formulas.tie_check_bytes(world, k1, s["k2"])  # after either merge
                for world, s, c in measured)
    rounds = max(c["merge_rounds"] for _, _, c in measured if c["merge"] == "threshold")
    out = {"agree": agree, "rounds": rounds}
    for name, G in (("per_worker", PROJECT_W * PROJECT_B), ("global", PROJECT_B)):
        out[name] = {"G": G, "bound": formulas.threshold_merge_bytes(G, PROJECT_W, k1, PROJECT_K2),
                     "measured_rounds": formulas.threshold_merge_bytes(G, PROJECT_W, k1, PROJECT_K2, rounds),
                     "allgather": G * (PROJECT_K2 + 1) * formulas.FP32}
    return out


def merge_section(summaries: dict, k1: int) -> list[str]:
    m = merge_projection(summaries, k1)
    if m is None:
        return []
    a, b = m["per_worker"], m["global"]
    cb = formulas.count_bytes(PROJECT_W, k1, PROJECT_K2)
    return ["", "## Band merge traffic, projected from the measured bytes", "",
            f"Measured (hard phase, every V and W): the threshold merge sends {formulas.BRACKET_FLOATS} floats per "
            "gathered query for its bracket, then one packed count per query per round; the all-gather merge k2+1 "
            "floats per query; either, one packed count per query more for the tie check (no tie group crosses "
            f"a band edge in these random scores, so no id bisection). Every measured merge {'equals' if m['agree'] else '**does not equal**'} those formulas. "
            f"Rounds are data-dependent: at most 32 (a float32 has 32 bits), {m['rounds']:.1f} at most here. "
            f"Projected to W = 8, k2 = 20,000 ({cb}-byte packed counts at W = 8):", "",
            "| B = 1024 read as | gathered queries G | threshold merge, 32 rounds (bound) | at the measured rounds | "
            "all-gather merge |", "|---|---:|---:|---:|---:|",
            f"| sessions per worker (DESIGN.md) | {a['G']:,} | {fmt_bytes(a['bound'])} | {fmt_bytes(a['measured_rounds'])} "
            f"| {fmt_bytes(a['allgather'])} |",
            f"| sessions per step, all workers | {b['G']:,} | {fmt_bytes(b['bound'])} | {fmt_bytes(b['measured_rounds'])} "
            f"| {fmt_bytes(b['allgather'])} |",
            "", "Bytes here are what a worker hands to the collective; a ring all-reduce puts about 2(W-1)/W times "
            "that on the wire, an all-gather (W-1) times (see docs/SCALING.md)."]


def reference_rows(name: str, ref: dict) -> list[str]:
    e, r = np.median(ref["engine_s"]), np.median(ref["reference_s"])
    return [f"| {name} | engine | {e:.2f} | {min(ref['engine_s']):.2f}-{max(ref['engine_s']):.2f} | {ref['batch'] / e:,.1f} | |",
            f"| {name} | reference | {r:.2f} | {min(ref['reference_s']):.2f}-{max(ref['reference_s']):.2f} | "
            f"{ref['batch'] / r:,.1f} | **{r / e:.1f}x** |"]


def reference_section(ref: dict, kept: dict | None) -> list[str]:
    mining = np.median(ref["reference_mining_s"])
    L = ["", "## Engine vs the per-step reference approach", "",
         f"V = {ref['items']:,}, B = {ref['batch']}, d = {ref['dim']}, k1 = {ref['k1']}, k2 = {ref['k2']:,}, hard "
         "phase, one worker, same networks, same batches, alternating step by step in one process "
         "(`bench/reference_step.py`: dense B x V frozen scores, top-k2 on the host, B x (k2-k1) x d negative rows "
         "gathered per session; the engine: per-shard top-(k2+1) selection + threshold merge, band loss over the "
         "shard's score matrix, no negative row gathered).", ""]
    if kept:
        L += ["Measured twice, in two fresh processes: with glibc's default allocator, which hands every large buffer "
              "back to the OS when it is freed (so each step page-faults its big buffers in again: the reference's "
              "B x k2 x d gather above all), and with it told to keep freed memory (`" + KEEP_MEMORY_NOTE + "`).", ""]
    L += ["| allocator | | step s (median) | min-max | sessions/s | reference / engine |", "|---|---|---:|---|---:|---:|"]
    L += reference_rows("glibc default", ref)
    if kept:
        L += reference_rows("freed memory kept", kept)
    L += ["", f"Of the reference's step (default allocator), {mining:.2f} s is the dense scores + host top-k2 and the "
          "rest the loss over gathered negative rows; the engine's step splits into "
          + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(ref["engine_sections"].items(), key=lambda kv: -kv[1]))
          + f". Same loss on the first batch before any update: engine {ref['engine_loss']:.6f}, "
          f"reference {ref['reference_loss']:.6f}."]
    return L


def targets_section(summaries: dict, ref: dict | None, kept: dict | None, cuda: bool, k1: int) -> list[str]:
    L = ["", "## Targets", "", "| target | measured | status |", "|---|---|---|"]
    for items in sorted({v for v, _ in summaries}):
        one, two = summaries.get((items, 1)), summaries.get((items, 2))
        if one and two:
            ratio = two["table"] / one["table"]
            L.append(f"| item-table memory per worker at W=2 <= 0.55 x W=1 (V = {items:,}) | {ratio:.3f} "
                     f"(peak RSS {two['rss'] / one['rss']:.2f}) | {'met' if ratio <= 0.55 else 'not met'} |")
    m = merge_projection(summaries, k1)
    if m:
        a, b = m["per_worker"], m["global"]
        status = ("not shown: the measured merge bytes do not follow the formula" if not m["agree"] else
                  "met by construction: at most 32 rounds of one packed int32 per query" if a["bound"] <= TARGET_MERGE_BYTES
                  else "not met at the 32-round bound")
        L.append(f"| threshold merge <= 2 MB per worker per step at W=8, B=1024 | {fmt_bytes(a['bound'])} at the bound "
                 f"with B per worker ({fmt_bytes(a['measured_rounds'])} at the {m['rounds']:.1f} rounds measured; "
                 f"all-gather merge: {fmt_bytes(a['allgather'])}); {fmt_bytes(b['bound'])} with B global | {status} |")
    gpu = "not measured: no GPU in this run" if not cuda else None
    L.append(f"| GPU: >= 10,000 sessions/s end to end at V = 1M (>= 60 % of the floor) | {gpu or 'see the training table'} | "
             + ("open; projection in docs/SCALING.md |" if gpu else "see the floor column |"))
    for name, r in (("glibc default allocator", ref), ("freed memory kept", kept)):
        if r:
            e = np.median(r["engine_s"])
            ratio = np.median(r["reference_s"]) / e
            top = max(r["engine_sections"].items(), key=lambda kv: kv[1])
            status = "met" if ratio >= 20 else (f"not met: the engine's step is {top[1]:.2f} of {e:.2f} s {top[0]} "
                                                "(docs/SCALING.md)")
            L.append(f"| >= 20x faster per step than the reference approach ({name}) | {ratio:.1f}x on "
                     f"{'GPU' if cuda else 'CPU'} (V = {r['items']:,}, B = {r['batch']}, k2 = {r['k2']:,}, "
                     f"d = {r['dim']}) | {status} |")
    if (10_000_000, 1) in summaries and not cuda:
        L.append(f"| V = 10M trains on one GPU | not measured on a GPU; on CPU V = 10M trained at W = 1 with peak RSS "
                 f"{summaries[(10_000_000, 1)]['rss'] / 2**30:.1f} GiB | open; projection in docs/SCALING.md |")
    elif (10_000_000, 1) in summaries:
        L.append("| V = 10M trains on one GPU | trained at W = 1: see the memory table | met |")
    return L
