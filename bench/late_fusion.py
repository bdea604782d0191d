"""Late fusion of runs trained apart: what AlterRec's alternating training must beat beyond its baselines.

    python -m bench.late_fusion --pair LABEL RUN_A RUN_B [--pair ...] [--reference LABEL RUN [RUN ...]]
        [--out bench/LATE_FUSION.md]

Each run is scored by the score it serves (what `recommend` and `batch_score` rank by: AlterRec's fused score at
the alpha it chose on validation; ID only's and text only's own network's), and a pair is fused by the paper's
linear rule, alpha * s_A + (1 - alpha) * s_B, with alpha chosen on validation NDCG@10 among 0, 0.1, ..., 1 (so
never below either run alone on validation), then tested. Two pairs answer two questions about a method's gain
over its baselines:
- ID only + text only, trained apart: naive late fusion of the same two networks AlterRec trains in turns;
- two seeds of one method: a seed ensemble, what fusing any two models of that kind gives.
Pairs under one label (e.g. seed 0 with seed 0, seed 1 with seed 1) are reported as mean ± std. A reference
row reads runs' summary.json only (valid and test of the score each serves), e.g. the grid's AlterRec records.
Scores come from the serving path (`bench.fusion_rules.split_scores`), and every run's served score must give
its summary.json's test metrics (refused otherwise).
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from alterrec_dist.common.cli import run_cli
from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import atomic_write_bytes, atomic_write_json, read_json
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.grid.report import cell
from alterrec_dist.serve.from_run import load_run
from bench.fusion_rules import SELECT, hit_ndcg, split_scores

# Runs made before 7f8a7ba (the grid's, and their retrained copies) scored a target by its own row's dot product
# and the catalog by a matmul, so where a target's text equals another item's (Scientific: 17 pairs, the targets of
# 195 of 8,442 test sessions) float rounding ordered it among its twins, where these scores (one matrix for both)
# tie and go by item id, as the engine now does too. A text network's served score moves by that (measured: text
# only, seed 0, test NDCG@10 0.06063 here against 0.06127 in summary.json), a score with an ID part by less than
# 1e-4 (bench/fusion_rules.py); a model that is not the summary's run differs by far more. Each run's figures on
# both sides go into the report's .json.
SUMMARY_TOLERANCE = 1e-3
TIES_NOTE = ("equal scores go by item id here, as in the engine since 7f8a7ba; a run made before it ordered a target "
             "among items of the same text by float rounding, see SUMMARY_TOLERANCE in bench/late_fusion.py, so a text "
             "network's figures here, the tables' above too, can sit a little below its summary.json's "
             "(docs/RESULTS.md's, for a grid run)")
ALPHAS = [a / 10 for a in range(10, -1, -1)]  # 1 (run A alone) first: ties go to it, then to more of A


def summary_served(run_dir: Path) -> dict:
    """{valid, test}: the metrics of the score the run serves, as its summary.json gives them (`served_kind`)."""
    summary = read_json(run_dir / "summary.json")
    return {split: summary["alpha"][split] if "alpha" in summary else summary[split]["fused"]
            for split in ("valid", "test")}


def served_scores(run_dir: Path) -> dict:
    """The run's served score (its served kind's weights over the component scores) and targets on valid and test,
    checked against its summary.json."""
    bundle = load_run(run_dir)
    data = Dataset(bundle.provenance["dataset"]["path"])
    out = {}
    for split in ("valid", "test"):
        parts, targets = split_scores(bundle, data, split)
        scores = sum(w * p for w, p in zip(bundle.served_weights, parts) if w)
        out[split] = (scores, targets)
    here, engine = hit_ndcg(*out["test"]), summary_served(run_dir)["test"]
    for m, value in here.items():
        if abs(value - engine[m]) > SUMMARY_TOLERANCE:
            raise DataError(f"{run_dir}: test {m} of its served score is {value:.5f} here, {engine[m]:.5f} in "
                            "summary.json (model/ and summary.json disagree)")
    out["check"] = {"here": here, "summary": {m: engine[m] for m in here}}
    return out


def check_same_data(runs: list[Path]) -> None:
    """Before any scoring: runs trained on other data (their dataset.json records differ) cannot be fused or
    paired; a pair of two datasets failed only after both were scored, as a tensor size mismatch."""
    first, *rest = runs
    data = Dataset(recorded_dataset(first))
    for run in rest:
        unlike = data.unlike(run / "dataset.json")
        if unlike:
            raise DataError(f"{run}: trained on other data than {first} ({unlike})")


def recorded_dataset(run_dir: Path) -> str:
    return read_json(run_dir / "dataset.json")["path"]


def check_same_sessions(scored: dict) -> None:
    """Every run must rank the same test sessions' targets, in the same order, or pairing means nothing (what
    `check_same_data` cannot see: runs whose records hold no checksums)."""
    first, *rest = scored
    for run in rest:
        if not torch.equal(scored[run]["test"][1], scored[first]["test"][1]):
            raise DataError(f"{run}: other test sessions than {first} (runs of other datasets cannot be paired)")


def choose_alpha(valid_a: torch.Tensor, valid_b: torch.Tensor, targets: torch.Tensor) -> float:
    """The alpha of ALPHAS whose alpha * A + (1 - alpha) * B has the best validation NDCG@10 (ties: the first)."""
    return max(ALPHAS, key=lambda a: hit_ndcg(a * valid_a + (1 - a) * valid_b, targets)[SELECT])


def fuse_pair(run_a: Path, run_b: Path, scored: dict) -> dict:
    """alpha chosen on validation for alpha * s_A + (1 - alpha) * s_B, and each run alone, on both splits."""
    (va, vt), (ta, tt) = scored[run_a]["valid"], scored[run_a]["test"]
    vb, tb = scored[run_b]["valid"][0], scored[run_b]["test"][0]
    alpha = choose_alpha(va, vb, vt)
    return {"alpha": alpha,
            "valid": hit_ndcg(alpha * va + (1 - alpha) * vb, vt), "test": hit_ndcg(alpha * ta + (1 - alpha) * tb, tt),
            "alone": {"a": {"valid": hit_ndcg(va, vt), "test": hit_ndcg(ta, tt)},
                      "b": {"valid": hit_ndcg(vb, vt), "test": hit_ndcg(tb, tt)}}}


def report(pairs: dict[str, list[dict]], references: dict[str, list[dict]], checks: dict[str, dict], command: str,
           minutes: float) -> str:
    rows = []
    for label, results in pairs.items():
        fused = lambda split, m, r=results: [x[split][m] for x in r]  # noqa: E731
        alone = lambda run, r=results: [x["alone"][run]["test"]["ndcg@10"] for x in r]  # noqa: E731
        gain = statistics.mean(fused("test", "ndcg@10")) / statistics.mean(map(max, alone("a"), alone("b"))) - 1
        rows.append(f"| {label} | {len(results)} | {'; '.join(str(x['alpha']) for x in results)} | "
                    f"{cell(fused('valid', 'ndcg@10'))} | {cell(fused('test', 'hit@10'))} | "
                    f"{cell(fused('test', 'ndcg@10'))} | {cell(alone('a'))} | {cell(alone('b'))} | "
                    f"{gain:+.1%} |")
    for label, runs in references.items():
        col = lambda split, m, r=runs: [x[split][m] for x in r]  # noqa: E731
        rows.append(f"| {label} (reference: summary.json) | {len(runs)} | its own | {cell(col('valid', 'ndcg@10'))} "
                    f"| {cell(col('test', 'hit@10'))} | {cell(col('test', 'ndcg@10'))} | | | |")
    return "\n".join([
        "# Late fusion of runs trained apart", "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {minutes:.1f} min).",
        "Each run scored by the score it serves; a pair fused as alpha * A + (1 - alpha) * B with alpha chosen on "
        "validation NDCG@10, then tested (bench/late_fusion.py). Gain: the fused test NDCG@10 against the better "
        "run of each pair alone, means over the pairs.", "",
        "| pair | pairs | alpha per pair | valid ndcg@10 | test hit@10 | test ndcg@10 | A alone test ndcg@10 | "
        "B alone test ndcg@10 | gain over the better alone |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"Each run alone here against its summary.json, test NDCG@10 ({TIES_NOTE}):", "",
        *[f"- {run}: {c['here']['ndcg@10']:.5f} here, {c['summary']['ndcg@10']:.5f} in summary.json"
          for run, c in checks.items()], ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.late_fusion", description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", nargs=3, action="append", required=True, metavar=("LABEL", "RUN_A", "RUN_B"),
                   help="two training run directories (config.toml, model/, summary.json) to fuse; repeat a label "
                        "for more pairs of the same kind")
    p.add_argument("--reference", nargs="+", action="append", default=[], metavar="LABEL RUN",
                   help="a label and run directories whose summary.json figures (of the score each serves) are "
                        "shown beside the pairs")
    p.add_argument("--out", default="bench/LATE_FUSION.md",
                   help="markdown report (default bench/LATE_FUSION.md; the figures beside it as .json)")
    args = p.parse_args(argv)
    if any(len(r) < 2 for r in args.reference):
        raise DataError("--reference needs a label and at least one run directory")
    started = time.time()
    runs = list(dict.fromkeys(Path(r) for _, a, b in args.pair for r in (a, b)))
    check_same_data(runs)
    scored = {run: served_scores(run) for run in runs}
    check_same_sessions(scored)
    pairs: dict[str, list[dict]] = {}
    for label, a, b in args.pair:
        pairs.setdefault(label, []).append({"runs": [a, b], **fuse_pair(Path(a), Path(b), scored)})
        print(label, a, b, {k: round(v, 4) for k, v in pairs[label][-1]["test"].items()}, flush=True)
    references = {r[0]: [summary_served(Path(d)) for d in r[1:]] for r in args.reference}
    words = [w for x in args.pair for w in ("--pair", *x)] + [w for r in args.reference for w in ("--reference", *r)]
    command = "python -m bench.late_fusion " + shlex.join([*words, "--out", args.out])
    checks = {str(run): s["check"] for run, s in scored.items()}
    text = report(pairs, references, checks, command, (time.time() - started) / 60)
    atomic_write_bytes(args.out, text.encode())
    atomic_write_json(Path(args.out).with_suffix(".json"), {
        "command": command, "pairs": pairs, "references": references,
        "summary_check": checks})
    print(text)
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
