"""From target ranks to ranking metrics, overall and per long-tail group.

Ranks start at 1. Metrics are kept as sums (not means) so batches can be added up. A sharded evaluator
(eval/evaluate.py) all-reduces each batch's counts of items above the target, so every rank adds the same
global ranks here and holds the same sums: nothing is reduced at the end.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from alterrec_dist.common.config import METRICS


def per_session(ranks: Tensor) -> Tensor:
    """(n,) ranks -> (n, len(METRICS)) float64 metric values per session (their mean is the metric)."""
    r = ranks.to(torch.float64)
    ndcg = 1.0 / torch.log2(r + 1.0)
    # each of METRICS by its name (metric@cutoff), so its columns are in METRICS' order whatever that is
    value = {"hit": lambda within: within, "ndcg": lambda within: ndcg * within, "mrr": lambda within: within / r}
    cutoffs = [(name, int(cutoff)) for name, cutoff in (m.split("@") for m in METRICS)]
    return torch.stack([value[name]((r <= cutoff).to(r.dtype)) for name, cutoff in cutoffs], dim=1)


class MetricSums:
    """Running sums of the metrics, overall (row 0) and per popularity group (rows 1..).

    `sums` is a (1 + groups, 1 + len(METRICS)) float64 tensor: column 0 counts sessions, the
    others sum the metric values. It is the only state.

    On the CPU, whatever device the ranks come from: training's evaluation and serving's `OrderedMetrics` then
    compute and add the same values in the same order, so batch_score reproduces summary.json to the bit (a GPU's
    index_add_ adds in the order its atomics land, and its reductions in another order than the CPU's).
    """

    def __init__(self, group_labels: list[str] = ()):
        self.labels = list(group_labels)
        self.sums = torch.zeros(1 + len(self.labels), 1 + len(METRICS), dtype=torch.float64, device="cpu")

    def add(self, ranks: Tensor, valid: Tensor | None = None, groups: Tensor | None = None) -> None:
        """ranks (n,) from 1; valid (n,) bool drops padding rows; groups (n,) the targets' group index."""
        ranks = ranks.cpu()
        vals = torch.cat([torch.ones_like(ranks, dtype=torch.float64).unsqueeze(1), per_session(ranks)], dim=1)
        if valid is not None:
            vals = vals * valid.cpu().unsqueeze(1).to(vals.dtype)
        self.sums[0] += vals.sum(0)
        if groups is not None:
            self.sums[1:].index_add_(0, groups.to("cpu", torch.long), vals)

    @staticmethod
    def _means(row: Tensor) -> dict[str, float]:
        n = row[0].item()
        # an empty group reports zeros with n = 0 rather than NaN, which would break strict JSON
        return {"n": int(n)} | {k: (v / n if n else 0.0) for k, v in zip(METRICS, row[1:].tolist())}

    def result(self) -> dict[str, float]:
        """Overall {"n", "hit@10", ...} as means over the valid sessions added."""
        return self._means(self.sums[0])

    def group_results(self) -> dict[str, dict[str, float]]:
        """{"[0,30]": {"n", "hit@10", ...}, ...} per popularity group of the target."""
        return {label: self._means(self.sums[1 + i]) for i, label in enumerate(self.labels)}


def rank_metrics(ranks: Tensor) -> dict[str, float]:
    """Mean metrics of a batch of ranks (from 1)."""
    m = MetricSums()
    m.add(ranks)
    return {k: v for k, v in m.result().items() if k != "n"}


def popularity_groups(popularity: np.ndarray, bins: list[int]) -> tuple[np.ndarray, list[str]]:
    """Group index per item by its train popularity; bins (eval.longtail_bins) [30, 100] -> "[0,30]", "(30,100]",
    "(100,inf)".

    Upper edges are inclusive, so an item seen exactly 30 times is in "[0,30]".
    """
    bins = list(bins)
    if any(a >= b for a, b in zip(bins, bins[1:])) or any(b < 0 for b in bins):
        raise ValueError(f"popularity bins must be non-negative and strictly increasing, got {bins}")
    edges = ["0"] + [str(b) for b in bins] + ["inf"]
    labels = [("[" if i == 0 else "(") + f"{lo},{hi}" + ("]" if hi != "inf" else ")")
              for i, (lo, hi) in enumerate(zip(edges, edges[1:]))]
    # side="left": pop == bin edge falls into the group that edge closes
    return np.searchsorted(np.asarray(bins), np.asarray(popularity), side="left").astype(np.int64), labels
