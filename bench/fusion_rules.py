"""How AlterRec's two networks are fused at inference: the paper's linear rule against four others, on
trained runs' saved models (no training). Each rule's weights are chosen on validation NDCG@10, then tested.

    python -m bench.fusion_rules RUN_DIR [RUN_DIR ...] [--out bench/FUSION.md]

Rules, each over the run's own candidates for alpha (`eval.alpha`, then `eval.alpha_sweep`):
- linear:   alpha * s_id + (1 - alpha) * s_text (the paper's, and the engine's `fused`);
- zscore:   the same over each session's standardised scores, (s - mean) / std over the catalog, so the
            weight is not also undoing the two networks' different logit scales (dot vs cosine / 0.07);
- probmix:  log(alpha * p_id + (1 - alpha) * p_text), the mixture of the two softmax distributions;
- binned:   linear with one alpha per popularity bin of the scored item (the run's `eval.longtail_bins`),
            chosen by coordinate ascent from linear's alpha: the paper's reason for the text network is
            the rarely seen item, so a rule could lean on text there only;
- rrf:      alpha / (60 + rank_id) + (1 - alpha) / (60 + rank_text), weighted reciprocal-rank fusion (Cormack
            et al., 2009, with its k = 60): only each network's order counts, not its scores.
Ranks follow the engine's order (`evaluate.orders_before`: equal scores go by item id), for the target and,
in rrf, for every item: the text network scores items with the same text the same.
Scores come from the serving path (`load_run`, `encode_sessions`: the engine's queries and item matrices),
so the ID network's score and `linear` at the run's chosen alpha equal its summary.json (checked: the run is
refused otherwise).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from alterrec_dist.common.cli import run_cli
from alterrec_dist.common.config import load_config
from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import atomic_write_bytes, atomic_write_json, read_json
from alterrec_dist.common.methods import PAIR, method
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.eval.evaluate import orders_before
from alterrec_dist.eval.metrics import popularity_groups, rank_metrics
from alterrec_dist.grid.report import cell
from alterrec_dist.serve.from_run import load_run
from alterrec_dist.serve.queries import encode_sessions, session_batch

RULES = ("linear", "zscore", "probmix", "binned", "rrf")
RRF_K = 60
SELECT = "ndcg@10"


# -- scores ----------------------------------------------------------------------------------------

def split_scores(bundle, data: Dataset, split: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([S_id, S_text] (N, V) scaled component scores, targets (N,)) for every session of `split`."""
    histories, targets = [], []
    for f in data.session_files(split):
        table = pq.read_table(str(f), columns=["history", "target"])
        histories += table["history"].to_pylist()
        targets += table["target"].to_pylist()
    parts: list[list[torch.Tensor]] = [[] for _ in bundle.matrices]
    for s in range(0, len(histories), bundle.eval_batch_size):
        q = encode_sessions(bundle, [session_batch(histories[s:s + bundle.eval_batch_size], bundle.max_len)])
        for c, (qc, m, sc) in enumerate(zip(q.parts, bundle.matrices, bundle.scales)):
            parts[c].append((qc @ m.T) * sc)
    return [torch.cat(p) for p in parts], torch.tensor(targets)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) each target's rank from 1: 1 + the items that order before it (the engine's order)."""
    before_by_id = torch.arange(scores.shape[1])[None, :] < targets[:, None]
    return orders_before(scores, scores.gather(1, targets[:, None]), before_by_id).sum(1) + 1


def hit_ndcg(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Hit@10 and NDCG@10 (the engine's definitions) of the targets' ranks."""
    metrics = rank_metrics(target_ranks(scores, targets))
    return {m: metrics[m] for m in ("hit@10", "ndcg@10")}


# -- the rules ---------------------------------------------------------------------------------------

def standardised(s: torch.Tensor) -> torch.Tensor:
    return (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True)


def reciprocal_rank(s: torch.Tensor) -> torch.Tensor:
    """1 / (RRF_K + rank) of every item, rank from 1 in the engine's order (columns are in id order, so a stable
    descending sort puts equal scores in id order)."""
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(1, s.shape[1] + 1).expand_as(order).contiguous())
    return 1.0 / (RRF_K + ranks.to(s.dtype))


# Each rule's view of a network's scores: it depends on no weight, so it is made once per split (`rule_parts`),
# not once per candidate weight.
VIEWS = {"zscore": standardised, "probmix": lambda s: torch.log_softmax(s, 1), "rrf": reciprocal_rank}


def rule_parts(rule: str, split: tuple[list[torch.Tensor], torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A split's ([S_id, S_text], targets) as `rule` weighs them (its view of each network's scores)."""
    parts, targets = split
    view = VIEWS.get(rule)
    return ([view(p) for p in parts] if view else parts), targets


def fuse(rule: str, parts: list[torch.Tensor], alpha, item_bin: torch.Tensor) -> torch.Tensor:
    """The fused score of `parts` in `rule`'s view (`rule_parts`)."""
    s_id, s_text = parts
    if rule in ("linear", "zscore", "rrf"):
        return alpha * s_id + (1 - alpha) * s_text
    if rule == "probmix":  # log of 0 weight: that network's distribution drops out
        return torch.logaddexp(math.log(max(alpha, 1e-12)) + s_id, math.log(max(1 - alpha, 1e-12)) + s_text)
    if rule == "binned":
        a = torch.tensor(alpha, dtype=s_id.dtype)[item_bin][None, :]
        return a * s_id + (1 - a) * s_text
    raise ValueError(rule)


def choose(rule: str, valid, grid: list[float], item_bin: torch.Tensor, start: float):
    """The rule's weight(s) best on validation NDCG@10 (ties: the first on the grid)."""
    parts, targets = valid
    score = lambda a: hit_ndcg(fuse(rule, parts, a, item_bin), targets)[SELECT]  # noqa: E731
    if rule != "binned":
        return max(grid, key=score)
    alphas = [start] * (int(item_bin.max()) + 1)
    for _ in range(2):  # two passes of coordinate ascent, one bin at a time
        for b in range(len(alphas)):
            alphas[b] = max(grid, key=lambda a: score(alphas[:b] + [a] + alphas[b + 1:]))
    return alphas


def run_rules(run_dir: Path) -> dict:
    bundle = load_run(run_dir)
    if method(bundle.method).networks != PAIR:
        raise DataError(f"{run_dir}: method {bundle.method!r} has no ID and text network to fuse")
    e = load_config(run_dir / "config.toml").eval
    grid = list(dict.fromkeys([e.alpha, *e.alpha_sweep]))  # the engine's candidates, in its tie order
    summary = read_json(run_dir / "summary.json")
    data = Dataset(bundle.provenance["dataset"]["path"])
    valid, test = split_scores(bundle, data, "valid"), split_scores(bundle, data, "test")
    item_bin = torch.from_numpy(popularity_groups(bundle.popularity, bundle.longtail_bins)[0])
    # The engine's scores (linear at the chosen alpha, the ID network) must equal these. Not the text network's
    # alone: items with the same text tie there (Scientific: 17 pairs), and runs made before 7f8a7ba (the grid's)
    # let float rounding order a target among its twins there (the engine now orders them by id, as here).
    chosen = summary["alpha"]["chosen"]
    for split, (parts, targets) in (("valid", valid), ("test", test)):
        engine = {f"alpha {chosen}": summary["alpha"][split], "id": summary[split]["id"]}
        for what, scores in ((f"alpha {chosen}", fuse("linear", parts, chosen, item_bin)), ("id", parts[0])):
            for m, value in hit_ndcg(scores, targets).items():
                if abs(value - engine[what][m]) > 1e-4:
                    raise DataError(f"{run_dir}: {split} {m} at {what} is {value:.5f} here, {engine[what][m]:.5f} "
                                    "in summary.json (model/ and summary.json disagree)")
    out = {}
    for rule in RULES:
        valid_view, test_view = rule_parts(rule, valid), rule_parts(rule, test)
        alpha = choose(rule, valid_view, grid, item_bin, out.get("linear", {}).get("alpha", 0.5))
        out[rule] = {"alpha": alpha, "valid": hit_ndcg(fuse(rule, valid_view[0], alpha, item_bin), valid_view[1]),
                     "test": hit_ndcg(fuse(rule, test_view[0], alpha, item_bin), test_view[1])}
    return out


# -- report ------------------------------------------------------------------------------------------

def report(results: dict[str, dict], command: str, minutes: float) -> str:
    per_run = list(results.values())
    col = lambda rule, split, m: [r[rule][split][m] for r in per_run]  # noqa: E731
    base = statistics.mean(col("linear", "test", "ndcg@10"))
    rows = []
    for rule in RULES:
        alphas = "; ".join(str(r[rule]["alpha"]) for r in per_run)
        rows.append(f"| {rule} | {alphas} | {cell(col(rule, 'valid', 'ndcg@10'))} | "
                    f"{cell(col(rule, 'test', 'hit@10'))} | {cell(col(rule, 'test', 'ndcg@10'))} | "
                    f"{statistics.mean(col(rule, 'test', 'ndcg@10')) / base - 1:+.1%} |")
    best = max(RULES, key=lambda rule: statistics.mean(col(rule, "valid", "ndcg@10")))
    return "\n".join([
        "# Fusion rules for AlterRec's two networks", "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {minutes:.1f} min).",
        "Each rule's weights are chosen on validation NDCG@10 per run, then tested there (rules: the docstring of "
        "bench/fusion_rules.py; binned's alpha per item-popularity bin, as `eval.longtail_bins`).", "",
        "| rule | alpha per run | valid ndcg@10 | test hit@10 | test ndcg@10 | test ndcg@10 vs linear |",
        "|---|---|---:|---:|---:|---:|", *rows, "",
        f"Best on validation (mean over runs): **{best}**, test NDCG@10 "
        f"{statistics.mean(col(best, 'test', 'ndcg@10')) / base - 1:+.1%} against the paper's linear rule.", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fusion_rules", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="AlterRec training run directories (config.toml, model/, summary.json)")
    p.add_argument("--out", default="bench/FUSION.md", help="markdown report (default bench/FUSION.md; the figures beside it as .json)")
    args = p.parse_args(argv)
    started = time.time()
    results = {}
    for run in args.runs:
        results[run] = run_rules(Path(run))
        print(run, {rule: round(r["test"]["ndcg@10"], 4) for rule, r in results[run].items()}, flush=True)
    command = "python -m bench.fusion_rules " + " ".join(args.runs)
    text = report(results, command, (time.time() - started) / 60)
    atomic_write_bytes(args.out, text.encode())
    atomic_write_json(Path(args.out).with_suffix(".json"), {"command": command, "runs": results})
    print(text)
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
