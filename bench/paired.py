"""Paired comparison on the same test sessions: how much of a measured gain the test set's sampling could move.

    python -m bench.paired --method LABEL RUN [RUN ...] [--method ...] [--late-fusion LABEL A B]
        --compare A B [--compare ...] [--resamples 10000] [--out bench/PAIRED.md]

Each method's runs (one per seed, in the same seed order for every method) are scored by the score each serves
(`bench.late_fusion.served_scores`, checked against its summary.json). `--late-fusion LABEL A B` adds a method
whose i-th run is method A's i-th run fused with method B's i-th by the linear rule, alpha chosen on validation
NDCG@10 (`bench.late_fusion.choose_alpha`). A method's per-session test hit@10 and NDCG@10 are the means over its
seeds, so their mean over the sessions is the mean-of-seeds figure the results tables give.

`--compare A B` resamples the test sessions with replacement, the same sessions for both (a paired bootstrap),
and gives A's relative gain over B on each metric: the measured gain, its 95 % percentile interval, and the share
of resamples in which the gain is above 0 and in which it reaches the issue's +5 %: the test set's sampling
noise for these trained models. It gives the same again with the seeds resampled too (seed i of A with seed i
of B, drawn with replacement before the sessions), which adds the training seeds' noise.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from alterrec_dist.common.cli import run_cli
from alterrec_dist.common.config import METRICS
from alterrec_dist.common.errors import ConfigError
from alterrec_dist.common.files import atomic_write_bytes, atomic_write_json
from alterrec_dist.eval.metrics import per_session
from alterrec_dist.grid.report import cell
from bench.fusion_rules import target_ranks
from bench.late_fusion import TIES_NOTE, check_same_data, check_same_sessions, choose_alpha, served_scores

SHOWN = ("hit@10", "ndcg@10")
TARGET_GAIN = 0.05  # issue 14: "at least 5 % above our own ID-only and NFRec (sum)"
RESAMPLE_SEED = 0
CHUNK = 250  # resamples drawn at once: CHUNK x sessions indices
RUNS_NOTE = ("The runs are the directories the command names, scored from their saved models, which git does not keep "
             "(each seed's figures are in the .json beside this file); a run retrained from a committed record "
             "scores as the retrain, which can differ from that record.")


def session_metrics(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, len(SHOWN)) float64: each session's hit@10 and NDCG@10 under `scores`."""
    return per_session(target_ranks(scores, targets))[:, [METRICS.index(m) for m in SHOWN]]


def method_sessions(runs: list[Path], scored: dict) -> list[torch.Tensor]:
    """Per run (seed), its served score's per-session test metrics."""
    return [session_metrics(*scored[run]["test"]) for run in runs]


def late_fusion_sessions(runs_a: list[Path], runs_b: list[Path], scored: dict) -> tuple[list[torch.Tensor], list[float]]:
    """Per seed i, A's i-th run fused with B's i-th at the alpha validation chose: per-session test metrics, alphas."""
    sessions, alphas = [], []
    for a, b in zip(runs_a, runs_b):
        (va, vt), (ta, tt) = scored[a]["valid"], scored[a]["test"]
        alpha = choose_alpha(va, scored[b]["valid"][0], vt)
        sessions.append(session_metrics(alpha * ta + (1 - alpha) * scored[b]["test"][0], tt))
        alphas.append(alpha)
    return sessions, alphas


def bootstrap_gains(a: torch.Tensor, b: torch.Tensor, resamples: int, seeds_too: bool) -> torch.Tensor:
    """(resamples, metrics): A's relative gain over B on each resample. a, b: (seeds, N, metrics) per-seed
    per-session values of the same sessions. The sessions are drawn with replacement, the same for both; with
    `seeds_too` the seeds are drawn first, the same seed numbers for both (seed i of A and of B are one pair), so the
    interval also holds the training seeds' noise (with a few seeds, a little less of it than there is)."""
    n_seeds, n = a.shape[:2]
    generator = torch.Generator().manual_seed(RESAMPLE_SEED)
    gains = []
    for start in range(0, resamples, CHUNK):
        count = min(CHUNK, resamples - start)
        if seeds_too:  # each seed weighted by how often it was drawn (the constant 1/seeds cancels in the ratio)
            pick = torch.randint(n_seeds, (count, n_seeds), generator=generator)
            weights = torch.nn.functional.one_hot(pick, n_seeds).sum(1).to(a.dtype)
        else:
            weights = torch.ones(count, n_seeds, dtype=a.dtype)
        idx = torch.randint(n, (count, n), generator=generator)
        # one seed gathered at a time: the chunk holds (count, N, metrics), not that times the seeds
        sums_a, sums_b = (torch.stack([x[s][idx].sum(1) for s in range(n_seeds)], 1) for x in (a, b))
        weights = weights[:, :, None]
        gains.append((weights * sums_a).sum(1) / (weights * sums_b).sum(1) - 1)
    return torch.cat(gains)


def interval(gains: torch.Tensor, j: int) -> dict[str, float]:
    """The 95 % percentile interval of metric j's gains and the shares above 0 and at or above TARGET_GAIN."""
    low, high = torch.quantile(gains[:, j], torch.tensor([0.025, 0.975], dtype=gains.dtype))
    return {"low": low.item(), "high": high.item(), "above_0": (gains[:, j] > 0).double().mean().item(),
            "above_target": (gains[:, j] >= TARGET_GAIN).double().mean().item()}


def paired_gain(a: torch.Tensor, b: torch.Tensor, resamples: int) -> dict[str, dict]:
    """A's relative gain over B per metric, the means over seeds compared (a, b: (seeds, N, metrics)), with the
    paired bootstrap's interval over the test sessions and, under "seeds_too", over the seeds and the sessions."""
    sessions, seeds_too = (bootstrap_gains(a, b, resamples, s) for s in (False, True))
    mean_a, mean_b = a.mean(0), b.mean(0)
    return {m: {"a": mean_a[:, j].mean().item(), "b": mean_b[:, j].mean().item(),
                "gain": (mean_a[:, j].mean() / mean_b[:, j].mean() - 1).item(),
                **interval(sessions, j), "seeds_too": interval(seeds_too, j)}
            for j, m in enumerate(SHOWN)}


def parse_methods(args: argparse.Namespace) -> dict[str, list[Path]]:
    methods = {label: [Path(r) for r in runs] for label, *runs in args.method}
    if any(not runs for runs in methods.values()):
        raise ConfigError("--method needs a label and at least one run directory")
    labels = [label for label, *_ in args.method] + [label for label, *_ in args.late_fusion]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:  # the later one replaced the earlier in the table and in every comparison, unsaid
        raise ConfigError(f"label {twice[0]!r} names two methods (--method and --late-fusion labels must differ)")
    for label, a, b in args.late_fusion:
        for name in (a, b):
            if name not in methods:
                raise ConfigError(f"--late-fusion {label!r}: no --method {name!r}")
    known = set(methods) | {x[0] for x in args.late_fusion}
    for a, b in args.compare:
        for name in (a, b):
            if name not in known:
                raise ConfigError(f"--compare {a!r} {b!r}: no method {name!r} (--method or --late-fusion)")
    seeds = {len(runs) for runs in methods.values()}
    if len(seeds) > 1:
        raise ConfigError(f"every --method needs as many runs (one per seed, same order): {sorted(seeds)}")
    return methods


def report(table: dict, comparisons: list[dict], checks: dict, resamples: int, command: str, minutes: float) -> str:
    sessions = len(next(iter(table.values()))["sessions"][0])  # every run ranks the same (check_same_sessions)
    methods = []
    for label, m in table.items():
        alpha = f" (alpha on valid: {', '.join(map(str, m['alphas']))})" if m.get("alphas") else ""
        cells = " | ".join(cell([seed[k] for seed in m["test"]]) for k in SHOWN)
        methods.append(f"| {label}{alpha} | {len(m['test'])} | {cells} |")
    shares = lambda i: f"{i['low']:+.1%} … {i['high']:+.1%} | {i['above_0']:.1%} | {i['above_target']:.1%}"  # noqa: E731
    rows = [f"| {c['a']} against {c['b']} | {metric} | {g['a']:.4f} | {g['b']:.4f} | {g['gain']:+.1%} | "
            f"{shares(g)} | {shares(g['seeds_too'])} |" for c in comparisons for metric, g in c["gains"].items()]
    return "\n".join([
        "# Paired comparison on the same test sessions", "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {minutes:.1f} min).",
        "Each run scored by the score it serves; a method's figure is the mean over its seeds; a late fusion fuses "
        "the two methods' runs of one seed, alpha chosen on validation NDCG@10 (bench/paired.py).",
        RUNS_NOTE, "",
        f"## Methods (test, {sessions:,} sessions, mean ± std over seeds)", "",
        "| method | seeds | hit@10 | ndcg@10 |", "|---|---|---:|---:|", *methods, "",
        f"## Gains, resampled ({resamples:,} paired bootstrap resamples)", "",
        "Sessions: the test sessions drawn with replacement, the same for both methods: the test set's sampling "
        "noise for these trained models. Seeds too: each resample first draws the seeds with replacement, the same "
        "seed numbers for both, then the sessions: the training seeds' noise as well (with a few seeds it "
        "understates that part).", "",
        "| comparison | metric | A | B | gain | sessions: 95 % interval | gain > 0 | gain ≥ "
        f"{TARGET_GAIN:+.0%} | seeds too: 95 % interval | gain > 0 | gain ≥ {TARGET_GAIN:+.0%} |",
        "|---|---|---:|---:|---:|---|---:|---:|---|---:|---:|", *rows, "",
        f"Each run's served test NDCG@10 here against its summary.json ({TIES_NOTE}):", "",
        *[f"- {run}: {c['here']['ndcg@10']:.5f} here, {c['summary']['ndcg@10']:.5f} in summary.json"
          for run, c in checks.items()], ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", nargs="+", action="append", required=True, metavar="LABEL RUN",
                   help="a label and its runs (training run directories with model/ and summary.json), one per "
                        "seed, in the same seed order for every method")
    p.add_argument("--late-fusion", nargs=3, action="append", default=[], metavar=("LABEL", "A", "B"),
                   help="a method made of methods A's and B's runs of each seed fused, alpha on validation")
    p.add_argument("--compare", nargs=2, action="append", required=True, metavar=("A", "B"),
                   help="report A's gain over B with its bootstrap interval")
    p.add_argument("--resamples", type=int, default=10_000, help="paired bootstrap resamples (default 10000)")
    p.add_argument("--out", default="bench/PAIRED.md", help="markdown report (the figures beside it as .json)")
    args = p.parse_args(argv)
    if args.resamples < 100:
        raise ConfigError(f"--resamples {args.resamples}: at least 100 for a 95 % interval")
    methods = parse_methods(args)
    started = time.time()
    runs = list(dict.fromkeys(r for runs in methods.values() for r in runs))
    check_same_data(runs)
    scored = {run: served_scores(run) for run in runs}
    check_same_sessions(scored)
    table = {label: {"runs": [str(r) for r in runs], "sessions": method_sessions(runs, scored)}
             for label, runs in methods.items()}
    for label, a, b in args.late_fusion:
        sessions, alphas = late_fusion_sessions(methods[a], methods[b], scored)
        table[label] = {"runs": [*table[a]["runs"], *table[b]["runs"]], "sessions": sessions, "alphas": alphas}
    for m in table.values():  # each seed's test figures, for the report and its .json
        m["test"] = [{k: s[:, j].mean().item() for j, k in enumerate(SHOWN)} for s in m["sessions"]]
    comparisons = []
    for a, b in args.compare:
        gains = paired_gain(*(torch.stack(table[x]["sessions"]) for x in (a, b)), args.resamples)
        comparisons.append({"a": a, "b": b, "gains": gains})
        print(a, "against", b, {m: f"{g['gain']:+.2%} [{g['low']:+.2%}, {g['high']:+.2%}], seeds too "
                                   f"[{g['seeds_too']['low']:+.2%}, {g['seeds_too']['high']:+.2%}]"
                                for m, g in comparisons[-1]["gains"].items()}, flush=True)
    words = [w for x in args.method for w in ("--method", *x)] + \
        [w for x in args.late_fusion for w in ("--late-fusion", *x)] + [w for x in args.compare for w in ("--compare", *x)]
    command = "python -m bench.paired " + shlex.join([*words, "--resamples", str(args.resamples), "--out", args.out])
    checks = {str(run): s["check"] for run, s in scored.items()}
    text = report(table, comparisons, checks, args.resamples, command, (time.time() - started) / 60)
    atomic_write_bytes(args.out, text.encode())
    atomic_write_json(Path(args.out).with_suffix(".json"), {
        "command": command, "resamples": args.resamples, "resample_seed": RESAMPLE_SEED,
        "methods": {label: {"runs": m["runs"], "alphas": m.get("alphas"), "test": m["test"]}
                    for label, m in table.items()},
        "comparisons": comparisons, "summary_check": checks})
    print(text)
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
