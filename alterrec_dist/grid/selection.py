"""Settings chosen on validation: the one rule that the runner (which then runs the chosen setting's
other seeds) and the report (which reports the chosen runs) both follow.

A method's candidates are its base runs and each point of its sweeps over the dataset's `select`
keys (one switch at a time from the base config); a peer's are its base runs and each point of its
own sweeps. Where the grid sets `combine`, one more candidate joins the switches that beat the base:
per key, its best point. That is round 1. Where the grid sets `rounds` above 1, each further round starts
from the winner so far and tries each switch it lacks on top of it, one at a time (a switch that lost alone
against the base may still help the winner: `train.reject_worse` did for AlterRec's Transformer, in a
probe); the rounds stop early once one leaves the winner unchanged (the next would repeat it).
Candidates are compared on the selection seeds (the dataset's `select_seeds`, else all its seeds, that
the base runs have) by the mean of the validation score each run chose its own epoch on. Nothing is
chosen from a round until every candidate of it has finished, so a half-run grid cannot flatter one;
until a round has finished, the winner of the rounds before it stands. Test metrics are never read here.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import read_json
from alterrec_dist.common.methods import score_and_metric

BASE = "base"


@dataclass
class Choice:
    method: str               # a method, or a peer's name
    scores: dict[str, float]  # candidate -> mean validation score on the selection seeds
    chosen: str
    runs: list               # the chosen candidate's RunSpecs, every seed the grid has for it


def validation_score(spec) -> float | None:
    """The validation value a finished run selected its epoch on (e.g. fused/ndcg@10; a RecBole peer's
    is NDCG@10); None if unfinished."""
    if not spec.done:
        return None
    path = spec.run_dir / spec.done_file
    result = read_json(path)
    try:
        if spec.role == "peer":
            score = result["valid"]["ndcg@10"]
        else:
            kind, metric = score_and_metric(result["selection"])
            score = result["valid"][kind][metric]
    except (KeyError, TypeError):
        raise DataError(f"{path}: no validation score to select on (a damaged result: rerun the run)") from None
    # a run that diverged ranks last: NaN would win or lose `max` by its place in the candidates
    return float("-inf") if math.isnan(score) else score


def switch_points(ours: list, d) -> dict[tuple[str, object], list]:
    """(key, value) -> the runs of that single switch: each point of each sweep that tunes the method
    (a method's over the `select` keys, a peer's all of its own)."""
    points: dict[tuple[str, object], list] = {}
    for s in ours:
        for key, value in s.sweeps.items():
            if s.extra and not s.combined and (key in d.select or s.role == "peer"):
                points.setdefault((key, value), []).append(s)
    return points


def combined_label(spec) -> str:
    """A combination's label: round 1's helpful switches together, or a later round's setting (the winner's
    switches, then the one tried on top)."""
    name = "combined" if spec.tuning_round == 1 else f"round {spec.tuning_round}"
    return f"{name} (" + ", ".join(f"{k} = {v}" for k, v in spec.combined.items()) + ")"


def candidates(specs: list, d, method: str, last_round: int | None = None) -> dict[str, list]:
    """Candidate label -> its runs: the base runs (no overrides), each single switch, then the helpful
    switches combined, then the later rounds' settings (once the runner has added those runs), up to
    `last_round` (None: every round)."""
    ours = [s for s in specs if s.dataset == d.name and s.method == method
            and (last_round is None or s.tuning_round <= last_round)]
    base = [s for s in ours if not s.extra]
    shown = ", ".join(f"{k} = {base[0].sweeps[k]}" for k in d.select if base and k in base[0].sweeps)
    out = {f"{BASE} ({shown})" if shown else BASE: base}
    out.update({f"{key} = {value}": runs for (key, value), runs in switch_points(ours, d).items()})
    for s in ours:
        if s.combined:
            out.setdefault(combined_label(s), []).append(s)
    return out


def selection_seeds(cands: dict[str, list], d) -> list[int]:
    base_seeds = {s.seed for s in next(iter(cands.values()))}  # a peer may run fewer seeds than the dataset
    return [s for s in (d.select_seeds or d.seeds) if s in base_seeds]


def mean_scores(cands: dict[str, list], seeds: list[int]) -> dict[str, float] | None:
    """Each candidate's mean validation score on `seeds`; None until every one has finished there."""
    scores = {}
    for label, runs in cands.items():
        values = [validation_score(s) for s in runs if s.seed in seeds]
        if len(values) < len(seeds) or None in values:
            return None
        scores[label] = statistics.mean(values)
    return scores


def latest_round(specs: list, d, name: str) -> int:
    """The latest tuning round a method or peer has runs of (1 before any refinement)."""
    return max((s.tuning_round for s in specs if s.dataset == d.name and s.method == name), default=1)


def choose_after(specs: list, d, name: str, rounds: int) -> Choice | None:
    """The candidate best on validation over rounds 1..`rounds`, or None until every one of them has finished
    on the selection seeds (or with nothing to choose from)."""
    cands = candidates(specs, d, name, rounds)
    seeds = selection_seeds(cands, d)
    scores = mean_scores(cands, seeds) if len(cands) > 1 and seeds else None
    if scores is None:
        return None
    chosen = max(scores, key=scores.get)
    return Choice(name, scores, chosen, sorted(cands[chosen], key=lambda s: s.seed))


def choose(specs: list, d, name: str) -> Choice | None:
    """The candidate of a method or peer best on validation over the rounds that have finished (a round
    under way leaves the winner of those before it standing), or None (round 1 not all finished)."""
    for rounds in range(latest_round(specs, d, name), 0, -1):
        choice = choose_after(specs, d, name, rounds)
        if choice is not None:
            return choice
    return None


def round_progress(specs: list, d, name: str) -> tuple[int, int, int]:
    """(round, finished, all) of a method's or peer's latest round's candidate runs on the selection seeds
    (round 1's: the base, each single switch and, once added, their combination)."""
    n = latest_round(specs, d, name)
    cands = candidates(specs, d, name)
    seeds = selection_seeds(cands, d)
    runs = {s.run_dir: s for runs in cands.values() for s in runs if s.tuning_round == n and s.seed in seeds}
    return n, sum(s.done for s in runs.values()), len(runs)


def helpful_switches(specs: list, d, name: str) -> list[tuple[str, object, object]] | None:
    """The single switches to combine: per swept key, (key, value, its run on the first selection seed,
    whose overrides the combination joins) for the point best on validation where that beats the base.
    None until every single switch has finished on the selection seeds. Test metrics are never read."""
    ours = [s for s in specs if s.dataset == d.name and s.method == name and not s.combined]
    cands = candidates(ours, d, name)
    seeds = selection_seeds(cands, d)
    scores = mean_scores(cands, seeds) if seeds else None
    if scores is None:
        return None
    base = scores[next(iter(cands))]
    best: dict[str, tuple[float, object, object]] = {}  # key -> (score, value, run)
    for (key, value), runs in switch_points(ours, d).items():
        score = scores[f"{key} = {value}"]
        if score > base and score > best.get(key, (float("-inf"),))[0]:
            best[key] = (score, value, next(s for s in runs if s.seed == seeds[0]))
    return [(key, value, run) for key, (_, value, run) in best.items()]


def next_round(specs: list, d, name: str, n: int) -> tuple[object, list[tuple[str, object, dict, list[str]]]] | None:
    """The winner of rounds 1..n-1 (its first run) and round `n`'s settings (n >= 2): per single switch the
    winner lacks (another point of a key it sets included), (key, value, the winner's setting with that switch
    on top, the overrides that make it). None until those rounds have finished; no settings when the winner
    is the base (round 1 tried each switch on it) or no candidate of round n-1 (which already tried each
    switch on it), nor for a setting an earlier round ran (e.g. a winning switch plus the one other that
    helped is the combination)."""
    leader = choose_after(specs, d, name, n - 1)
    if leader is None:
        return None
    won = leader.runs[0]
    setting = dict(won.combined) or (dict(won.sweeps) if won.extra else {})
    if not setting or won.tuning_round < n - 1:
        return won, []
    ours = [s for s in specs if s.dataset == d.name and s.method == name and s.tuning_round < n]
    points = switch_points(ours, d)
    ran = [dict(s.combined) for s in ours if s.combined] + [{k: v} for k, v in points]
    out = []
    for key, value in points:
        tried = {**setting, key: value}
        if tried in ran:
            continue
        ran.append(tried)
        extra = [o for k, v in tried.items() for o in points[(k, v)][0].extra]
        out.append((key, value, tried, extra))
    return won, out
