"""Settings chosen on validation: the one rule that the runner (which then runs the chosen setting's
other seeds) and the report (which reports the chosen runs) both follow.

A method's candidates are its base runs and each point of its sweeps over the dataset's `select`
keys (one switch at a time from the base config). They are compared on the selection seeds (the
dataset's `select_seeds`, else all its seeds) by the mean of the validation score each run chose
its own epoch on. Nothing is chosen until every candidate has finished on those seeds, so a
half-run grid cannot flatter one. Test metrics are never read here.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

BASE = "base"


@dataclass
class Choice:
    method: str
    scores: dict[str, float]  # candidate -> mean validation score on the selection seeds
    chosen: str
    runs: list               # the chosen candidate's RunSpecs, every seed the grid has for it


def validation_score(spec) -> float | None:
    """The validation value a finished run selected its epoch on (e.g. fused/ndcg@10); None if unfinished."""
    if not spec.done:
        return None
    summary = json.loads((spec.run_dir / "summary.json").read_text())
    kind, _, metric = summary["selection"].partition("/")
    return summary["valid"][kind][metric]


def candidates(specs: list, d, method: str) -> dict[str, list]:
    """Candidate label -> its runs: the method's base runs, then each point of each selected sweep."""
    ours = [s for s in specs if s.dataset == d.name and s.method == method]
    base = [s for s in ours if s.role == "method"]
    shown = ", ".join(f"{k} = {base[0].sweeps[k]}" for k in d.select if base and k in base[0].sweeps)
    out = {f"{BASE} ({shown})" if shown else BASE: base}
    for key in d.select:
        for s in ours:
            if s.role == "sweep" and key in s.sweeps:
                out.setdefault(f"{key} = {s.sweeps[key]}", []).append(s)
    return out


def choose(specs: list, d, method: str) -> Choice | None:
    """The method's candidate best on validation, or None (nothing to choose, or not all finished)."""
    cands = candidates(specs, d, method)
    if len(cands) < 2 or not d.select:
        return None
    seeds = d.select_seeds or d.seeds
    scores = {}
    for label, runs in cands.items():
        values = [validation_score(s) for s in runs if s.seed in seeds]
        if len(values) < len(seeds) or None in values:
            return None
        scores[label] = statistics.mean(values)
    chosen = max(scores, key=scores.get)
    return Choice(method, scores, chosen, sorted(cands[chosen], key=lambda s: s.seed))
