"""The results report of an experiment grid, from its run directories alone (no retraining).

Tables like the paper's (Table 1: methods; Table 2: ablation), the imbalance diagnostics (Figs. 3
and 5: per-epoch validation Hits@20 and training loss), long-tail bars relative to `id_only`
(Fig. 6) and the sensitivity to alpha and k2 (Fig. 7). Every number comes from a run's
`summary.json` / `metrics.jsonl` (or a peer's `result.json`) and the report lists each run with
the command that made it.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from alterrec_dist.common import run_layout
from alterrec_dist.common.config import METRICS, PROJECT_ROOT, SCORE_PARTS, read_toml, shown
from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import atomic_write_bytes, read_json
from alterrec_dist.common.methods import METHODS, selection_part, sweep_alpha, sweep_kind
from alterrec_dist.grid.figures import longtail_figure, sensitivity_figure, training_curves
from alterrec_dist.grid.plan import as_toml, shown_command
from alterrec_dist.grid.selection import candidates, choose, combined_label, round_progress

TABLE_METRICS = METRICS[:4]  # the paper's Table 1: Hits and NDCG at 10 and 20
HEADLINE_METRICS = ("hit@10", "ndcg@10")  # the issue's targets, the plots' metrics
TARGET_GAIN = 0.05


def method_label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def own_kind(method: str) -> str:
    """The score a method is reported on: a lone network's own, the rest fused."""
    return selection_part(method, "fused") if method in METHODS else "fused"


# The fused score at the alpha each run chose on validation (`eval.alpha_sweep`; summary.json's "alpha"):
# the protocol for the headline. `read_run` files it as one more kind beside the fixed-alpha ones.
ALPHA_ON_VALID = "fused, α on valid"


def headline_kind(method: str, runs: list[dict]) -> str:
    """A method's own kind, or the fused score at each run's validation-chosen alpha when every run has one."""
    kind = own_kind(method)
    return ALPHA_ON_VALID if kind == "fused" and all(ALPHA_ON_VALID in r["test"] for r in runs) else kind


def kind_label(kind: str, runs: list[dict]) -> str:
    """`kind`, with the alphas the runs chose when it is ALPHA_ON_VALID."""
    if kind != ALPHA_ON_VALID:
        return kind
    alphas = ",".join(f"{r['alpha']:g}" for r in runs)
    return f"{kind}: {alphas}"


UNTUNED = "untuned"  # beside a method or peer the grid ran on one setting only while others were tuned


def untuned_mark(name: str, untuned: frozenset[str]) -> str:
    return f"; {UNTUNED}" if name in untuned else ""


def row_label(method: str, runs: list[dict], kind: str, untuned: frozenset[str]) -> str:
    return f"{method_label(method)} ({kind_label(kind, runs)}{untuned_mark(method, untuned)})"


# -- reading runs ------------------------------------------------------------------------------

def read_run(spec) -> dict | None:
    """The results of one finished run: summary (or peer result), per-epoch log, command, and whether it
    ended on its budget rather than on patience (`ended_on_budget`)."""
    if not spec.done:
        return None
    d = spec.run_dir
    if spec.role == "peer":
        res = read_json(d / spec.done_file)
        try:
            return {"spec": spec, "test": {"peer": res["test"]}, "valid": {"peer": res["valid"]},
                    "best_epoch": res.get("best_epoch"), "command": recorded_command(spec),
                    "on_budget": peer_ended_on_budget(res)}
        except KeyError as e:
            raise DataError(f"{d / spec.done_file}: no {e} (a damaged result: rerun the run)") from None
    summary = read_json(d / run_layout.SUMMARY)
    epochs = read_epochs(d / run_layout.METRICS)
    try:
        run = {"spec": spec, "test": summary["test"], "valid": summary["valid"], "best_epoch": summary["best_epoch"],
               "selection": summary["selection"], "longtail": summary["longtail"], "epochs": epochs,
               "command": recorded_command(spec), "on_budget": ended_on_budget(d, summary)}
    except KeyError as e:
        raise DataError(f"{d / run_layout.SUMMARY}: no {e} (a damaged summary: rerun the run)") from None
    if "alpha" in summary:
        alpha = summary["alpha"]
        run |= {"alpha": alpha["chosen"], "test": run["test"] | {ALPHA_ON_VALID: alpha["test"]},
                "valid": run["valid"] | {ALPHA_ON_VALID: alpha["valid"]}}
    return run


def recorded_command(spec) -> str:
    """The run's command as its `command.txt` records it, a peer's too (its own result's command names this
    machine's paths); where it has none yet (finished while no runner waited, until a runner records it), the
    grid's command, shown as command.txt is."""
    recorded = spec.run_dir / run_layout.COMMAND
    return recorded.read_text().strip() if recorded.exists() else shown_command(spec.command)


def read_epochs(path: Path) -> list[dict]:
    """metrics.jsonl's lines; a last line cut short (a run killed while writing it) is not one yet."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: missing (a damaged run: move it away to run it again)") from None
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]
    epochs = []
    for number, line in enumerate(lines, 1):
        try:
            epochs.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{path}: line {number} is not JSON") from None
    return epochs


def ended_on_budget(run_dir: Path, summary: dict) -> bool:
    """A run of ours that `train.m_max` ended, not patience: its best epoch came within the last
    `train.patience` epochs, and more epochs might still raise it. The recipe says so (`stopped_by`); for a
    summary written before it did, the same test counted from the best epoch alone (patience ran out with the
    last epoch when it is `patience` epochs back), which the warm-up epochs patience skips change only for a
    run whose warm-up took all but `patience` of its epochs."""
    if "stopped_by" in summary:
        return summary["stopped_by"] == "m_max"
    train = read_toml(run_dir / run_layout.CONFIG, "run config")["train"]
    return (summary.get("epochs_trained") == train["m_max"]
            and not (train["patience"] > 0 and train["m_max"] - 1 - summary["best_epoch"] >= train["patience"]))


def peer_ended_on_budget(result: dict) -> bool:
    """A peer that its time cap (bench/recbole_peer.py's `--max-minutes`) or its epoch ceiling (RecBole's `epochs`;
    it validates every epoch) stopped before its patience ran out (RecBole stops once `stopping_step` validations
    in a row are no better than the best), whichever epoch was its best: more epochs might still raise it."""
    if "time cap" in result.get("stopped_by", ""):
        return True
    config, best, epochs = result.get("config", {}), result.get("best_epoch"), result.get("epochs_run")
    # a result that does not say how many epochs ran (a peer other than RecBole's) is not judged on them
    return (best is not None and epochs is not None and epochs == config.get("epochs")
            and epochs - 1 - best <= config.get("stopping_step", 0))


ON_BUDGET = "*"  # beside a best epoch: the run ended on its budget (epochs or a time cap), not on patience


def best_epochs(runs: list[dict]) -> str:
    return ",".join(f"{r['best_epoch']}{ON_BUDGET if r.get('on_budget') else ''}" for r in runs)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.4f} ± {s:.4f}" if len(values) > 1 else f"{m:.4f}"


def rel(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.1f} %"


# -- tables ------------------------------------------------------------------------------------

def metric_row(label: str, runs: list[dict], kind: str) -> str:
    cells = [cell([r["test"][kind][m] for r in runs]) for m in TABLE_METRICS]
    return f"| {label} | {len(runs)} | " + " | ".join(cells) + f" | {best_epochs(runs)} |"


def table_header(first: str) -> list[str]:
    return [f"| {first} | seeds | " + " | ".join(TABLE_METRICS) + " | best epochs |",
            "|---|---|" + "---|" * len(TABLE_METRICS) + "---|"]


def main_table(methods: dict[str, list[dict]], peers: dict[str, list[dict]], anchors: list[dict],
               untuned: frozenset[str] = frozenset()) -> list[str]:
    lines = table_header("method (score used)")
    for method, runs in methods.items():
        kind = headline_kind(method, runs)
        lines.append(metric_row(row_label(method, runs, kind, untuned), runs, kind))
    for name, runs in peers.items():
        lines.append(metric_row(f"{name} (peer, RecBole{untuned_mark(name, untuned)})", runs, "peer"))
    for a in anchors:
        vals = [f"{a[m]:.4f}" if m in a else "–" for m in TABLE_METRICS]
        lines.append(f"| {a['name']} (published) | – | " + " | ".join(vals) + " | – |")
    return lines


def ablation_table(methods: dict[str, list[dict]], untuned: frozenset[str] = frozenset(),
                   same_config: dict[str, list[dict]] | None = None) -> list[str]:
    """Each variant on each of its scores; `same_config` (label -> runs, scored fused) goes before the random
    negatives' rows: AlterRec on the setting those run on, when that is not AlterRec's tuned one."""
    lines = table_header("variant (score)")
    for method in ("alterrec", "alterrec_random", "id_only", "text_only"):
        runs = methods.get(method)
        if not runs:
            continue
        if method == "alterrec_random":
            lines += [metric_row(f"{label} (fused)", base, "fused") for label, base in (same_config or {}).items()]
        kinds = [METHODS[method].judged_on] if METHODS[method].judged_on else ["fused", "id", "text"]
        if headline_kind(method, runs) == ALPHA_ON_VALID:
            kinds.insert(0, ALPHA_ON_VALID)
        for kind in kinds:
            lines.append(metric_row(row_label(method, runs, kind, untuned), runs, kind))
    return lines


def gains(methods: dict[str, list[dict]], peers: dict[str, list[dict]], anchors: list[dict],
          untuned: frozenset[str] = frozenset()) -> list[str]:
    """AlterRec fused against each baseline, peer and published anchor, relative, on the headline metrics."""
    if "alterrec" not in methods:
        return []
    kind = headline_kind("alterrec", methods["alterrec"])
    lines = [f"| AlterRec ({kind}) vs | its Hits@10 | its NDCG@10 | AlterRec Hits@10 | AlterRec NDCG@10 "
             "| ≥ +5 % on both? |", "|---|---|---|---|---|---|"]
    ours = {m: mean_std([r["test"][kind][m] for r in methods["alterrec"]])[0] for m in HEADLINE_METRICS}
    others = [(f"{method_label(b)} ({headline_kind(b, methods[b])}{untuned_mark(b, untuned)})", methods[b],
               headline_kind(b, methods[b])) for b in ("id_only", "nfrec_sum", "text_only", "alterrec_random")
              if b in methods]
    others += [(f"{name} (peer{untuned_mark(name, untuned)})", runs, "peer") for name, runs in peers.items()]
    rows = [(label, {m: mean_std([r["test"][kind][m] for r in runs])[0] for m in ours}) for label, runs, kind in others]
    rows += [(f"{a['name']} (published)", {m: a[m] for m in ours}) for a in anchors if all(m in a for m in ours)]
    for label, theirs in rows:
        ok = all(ours[m] >= theirs[m] * (1 + TARGET_GAIN) for m in ours)
        lines.append(f"| {label} | {theirs['hit@10']:.4f} | {theirs['ndcg@10']:.4f} | "
                     f"{rel(ours['hit@10'], theirs['hit@10'])} | {rel(ours['ndcg@10'], theirs['ndcg@10'])} | "
                     f"{'yes' if ok else 'no'} |")
    # a seed one method lacks (a failed run) moves its mean by itself: the gain then compares other seeds
    seeds = {label: sorted(r["spec"].seed for r in runs) for label, runs, kind in others if kind != "peer"}
    mine = sorted(r["spec"].seed for r in methods["alterrec"])
    differ = [f"{label} {s}" for label, s in seeds.items() if s != mine]
    if differ:
        lines += ["", f"(Means over other seeds than AlterRec's {mine}: {'; '.join(differ)}.)"]
    return lines


def same_config_runs(runs: list[dict], methods: dict[str, list[dict]], untuned: frozenset[str]) -> dict:
    """AlterRec's base runs, labelled, where the grid tuned AlterRec but ran its random-negatives variant on the
    base setting alone: the comparison on one setting that the tuned gain over that variant is not."""
    if "alterrec_random" not in untuned or "alterrec_random" not in methods or "alterrec" not in methods \
            or "alterrec" in untuned:
        return {}
    base = [r for r in runs if r["spec"].role == "method" and r["spec"].label == "alterrec"]
    return {"AlterRec on the dataset's config": base} if base else {}


def same_config_note(same_config: dict[str, list[dict]], variant: list[dict]) -> list[str]:
    """The random-negatives variant against AlterRec on the same setting, fused at `eval.alpha` both."""
    lines = []
    for base in same_config.values():
        ours, theirs = ({m: mean_std([r["test"]["fused"][m] for r in rs])[0] for m in HEADLINE_METRICS}
                        for rs in (base, variant))
        seeds = [sorted(r["spec"].seed for r in rs) for rs in (base, variant)]
        lines.append(f"(AlterRec, random negatives is {UNTUNED}: it runs on the dataset's config, so AlterRec's gain "
                     "over it above holds AlterRec's tuning too. On that same config, AlterRec's base runs (fused at "
                     f"`eval.alpha`, seeds {seeds[0]}) score "
                     f"{ours['hit@10']:.4f} / {ours['ndcg@10']:.4f} against its {theirs['hit@10']:.4f} / "
                     f"{theirs['ndcg@10']:.4f} (seeds {seeds[1]}): {rel(ours['hit@10'], theirs['hit@10'])} / "
                     f"{rel(ours['ndcg@10'], theirs['ndcg@10'])} on Hits@10 / NDCG@10.)")
    return lines + [""] if lines else []


def choice_table(choices: list) -> list[str]:
    """Each method's number of candidates (its tuning budget), their scores on validation, the chosen one, and the
    overrides that make it (what a config such as configs/scientific.toml takes over)."""
    lines = ["| method | configurations tried | validation score on the selection seeds: base, each switch alone, "
             "the helpful ones together, each later round (the winner so far with one more switch) | chosen "
             "| its overrides |", "|---|---|---|---|---|"]
    for c in choices:
        overrides = " ".join(f"`{o}`" for o in c.runs[0].extra) or "none"
        lines.append(f"| {method_label(c.method)} | {len(c.scores)} | "
                     + ", ".join(f"{v}: {x:.4f}" for v, x in c.scores.items()) + f" | **{c.chosen}** | {overrides} |")
    return lines


def budget_note(choices: list, untuned: list[str], alphas: dict[str, int]) -> list[str]:
    """The tuning budgets, which differ: configurations each method and peer tried on validation (the choice
    table's candidates, one training run each on the selection seeds; one for those not tuned), and the fusion
    weights a method's runs choose among on validation besides (`alphas`: method -> how many `eval.alpha_sweep`
    values)."""
    tried = ", ".join(f"{method_label(c.method)} {len(c.scores)}" for c in choices)
    lines = [f"Configurations tried on validation (the budgets are not equal): {tried}"
             + (f"; one each, not tuned: {', '.join(method_label(m) for m in untuned)}" if untuned else "")
             + ". A method tries more where it has switches of its own (settings of a second network, a training "
             "option only it has) and where its rounds take longer to settle."]
    lines += [f"{method_label(m)}'s runs also choose the fusion weight on validation among `eval.alpha` and {n} "
              "values of `eval.alpha_sweep`, on the same checkpoints (no more training)." for m, n in alphas.items()]
    return [" ".join(lines), ""]


def rounds_note(specs: list, d, names: list[str]) -> list[str]:
    """Which choices a round under way may still change: the methods and peers whose latest round has not
    finished (so that methods compared at different rounds are seen to be)."""
    progress = {name: round_progress(specs, d, name) for name in names}
    pending = [f"{method_label(name)} round {n}, {done} of {total}"
               for name, (n, done, total) in progress.items() if done < total]
    if not pending:
        return []
    return [f"Rounds under way (their runs finished so far): {'; '.join(pending)}. Until a method's latest round "
            "has finished, the winner of its rounds before stands and Table 1 reports it (before round 1 has: "
            "the base, untuned).", ""]


def longtail(methods: dict[str, list[dict]], metric: str, untuned: frozenset[str] = frozenset(),
             same_config: dict[str, list[dict]] | None = None) -> tuple[list[str], dict[str, list[float]], dict]:
    """Per popularity group of the target: each method's mean test metric relative to id_only's (groups no
    test target falls in, e.g. the most popular one on a dataset without such items, left out); `same_config`'s
    runs (label -> runs) fused, before the random negatives."""
    base = methods["id_only"]
    groups = [g for g, cell in base[0]["longtail"]["id"].items() if cell["n"]]
    def mean_metric(runs, kind, g):
        return statistics.mean(r["longtail"][kind][g][metric] for r in runs)
    ref = {g: mean_metric(base, "id", g) for g in groups}
    ratios, counts = {}, {g: base[0]["longtail"]["id"][g]["n"] for g in groups}
    rows = []
    for m, rs in methods.items():
        if m == "alterrec_random":
            rows += [(f"{label} (fused)", base, "fused") for label, base in (same_config or {}).items()]
        if m != "id_only":
            rows.append((f"{method_label(m)} ({own_kind(m)}{untuned_mark(m, untuned)})", rs, own_kind(m)))
    for label, runs, kind in rows:
        ratios[label] = [mean_metric(runs, kind, g) / ref[g] if ref[g] else float("nan") for g in groups]
    return groups, ratios, counts


def alpha_curve(runs: list[dict]) -> tuple[list[float], dict]:
    alphas = sorted(a for a in map(sweep_alpha, runs[0]["test"]) if a is not None)
    out = {}
    for split in ("valid", "test"):
        for m in HEADLINE_METRICS:
            out[(split, m)] = [mean_std([r[split][sweep_kind(a)][m] for r in runs])[0] for a in alphas]
    return alphas, out


def switch_table(runs: list[dict]) -> list[str]:
    """One row per method and value of each swept setting other than k2 (which has its own figure),
    scored on the method's own kind (fused for AlterRec and NFRec): the measured switch ablation."""
    keys = sorted({k for r in runs for k in r["spec"].sweeps if k != "train.k2"})
    combined: dict[tuple[str, str], list[dict]] = {}  # the helpful switches together (the grid's `combine`)
    for r in runs:
        if r["spec"].combined:
            combined.setdefault((r["spec"].method, combined_label(r["spec"])), []).append(r)
    if not keys and not combined:
        return []
    lines = ["| method | setting | seeds | valid hit@10 | valid ndcg@10 | test hit@10 | test ndcg@10 | best epochs |",
             "|---|---|---|---|---|---|---|---|"]
    for key in keys:
        points: dict[tuple[str, str], list[dict]] = {}
        for r in runs:
            if key in r["spec"].sweeps:
                points.setdefault((r["spec"].method, f"{key} = {as_toml(r['spec'].sweeps[key])}"), []).append(r)
        lines += [switch_row(method, setting, rs) for (method, setting), rs in sorted(points.items())]
    lines += [switch_row(method, setting, rs) for (method, setting), rs in sorted(combined.items())]
    return lines


def switch_row(method: str, setting: str, runs: list[dict]) -> str:
    kind = "peer" if runs[0]["spec"].role == "peer" else own_kind(method)
    return (f"| {method_label(method)} ({kind}) | {setting} | {len(runs)} | "
            + " | ".join(cell([r[split][kind][m] for r in runs])
                         for split in ("valid", "test") for m in HEADLINE_METRICS)
            + f" | {best_epochs(runs)} |")


# -- the document ------------------------------------------------------------------------------

def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dataset_runs(d, specs: list) -> tuple[list[dict], dict[str, list[dict]], dict[str, list[dict]], list]:
    """A dataset's finished runs; its methods' and peers' runs, each the chosen setting's where a choice was
    made on validation; and those choices."""
    runs = [r for r in (read_run(s) for s in specs if s.dataset == d.name) if r]
    methods: dict[str, list[dict]] = {}
    for m in d.methods:
        got = [r for r in runs if r["spec"].role == "method" and r["spec"].label == m]
        if got:
            methods[m] = got
    peers: dict[str, list[dict]] = {}
    for r in runs:
        if r["spec"].role == "peer" and not r["spec"].extra:
            peers.setdefault(r["spec"].label, []).append(r)
    by_dir = {r["spec"].run_dir: r for r in runs}
    choices = [c for c in (choose(specs, d, m) for m in [*methods, *peers]) if c]
    for c in choices:  # Table 1 and the figures report each method's and peer's chosen runs
        chosen = [by_dir[s.run_dir] for s in c.runs if s.run_dir in by_dir]
        (methods if c.method in methods else peers)[c.method] = chosen
    return runs, methods, peers, choices


def dataset_section(d, specs: list, grid, lines: list[str]) -> None:
    runs, methods, peers, choices = dataset_runs(d, specs)
    tried = {m: len(candidates(specs, d, m)) for m in [*methods, *peers]}  # configurations of each
    one_setting = [m for m, n in tried.items() if n == 1]
    untuned = frozenset(one_setting) if choices else frozenset()  # beside what was chosen on validation
    same_config = same_config_runs(runs, methods, untuned)
    expected = sum(1 for s in specs if s.dataset == d.name)
    lines += [f"## {d.title}", ""]
    if d.note:
        lines += [d.note.replace("\n", " "), ""]
    if len(runs) < expected:
        lines += [f"**Incomplete:** {len(runs)} of {expected} runs finished; rows below cover finished runs only.", ""]
    lines += ["### Table 1: methods (test, mean ± std over seeds, at the best validation epoch)", ""]
    lines += main_table(methods, peers, d.anchors, untuned) + [""]
    if untuned:
        lines += [f"({UNTUNED}: run on the dataset's config, a peer on its code's defaults, while the others were "
                  "tuned on validation; the configurations each tried are counted below.)", ""]
    if any(headline_kind(m, rs) == ALPHA_ON_VALID for m, rs in methods.items()):
        lines += [f"({ALPHA_ON_VALID}: the fused score at the fusion weight each run chose on validation NDCG@10 "
                  "among `eval.alpha` and `eval.alpha_sweep` at its best epoch, the alphas listed per seed; "
                  "(fused) is at the config's `eval.alpha`.)", ""]
    if any(r["on_budget"] for r in runs):
        lines += [f"({ON_BUDGET} beside a best epoch, here and below: the run ended on its budget before its patience "
                  "ran out: ours trained every epoch of `train.m_max`, a peer hit its time cap (CPU minutes) or its "
                  "epoch ceiling. More epochs might still raise it.)", ""]
    for a in d.anchors:
        lines.append(f"- {a['name']}: {a['source']}")
    if d.anchors:
        lines.append("")
    if choices:
        lines += [f"Chosen on validation (seeds {d.select_seeds or d.seeds}: mean of each run's own selection "
                  "metric; Table 1 and the figures use the chosen setting's runs on every seed):", ""]
        lines += choice_table(choices) + [""]
        alphas = {m: len([k for k in rs[0]["valid"] if sweep_alpha(k) is not None]) for m, rs in methods.items()
                  if headline_kind(m, rs) == ALPHA_ON_VALID}
        lines += budget_note(choices, one_setting, alphas)  # with a choice made, the untuned are the one-setting
    lines += rounds_note(specs, d, [m for m, n in tried.items() if n > 1])
    g = gains(methods, peers, d.anchors, untuned)
    if g:
        lines += ["Fused AlterRec relative to each of the others (means over seeds; the target is ≥ +5 % over ID "
                  "only and NFRec on both metrics):", ""] + g + [""]
        lines += same_config_note(same_config, methods.get("alterrec_random", []))
    if {"alterrec", "id_only", "text_only"} <= methods.keys():
        lines += ["### Table 2: ablation", ""] + ablation_table(methods, untuned, same_config) + [""]
    figures = Figures(grid.images, Path(os.path.relpath(grid.images, grid.report.parent)), d.name)
    if "nfrec_sum" in methods:
        lines += nfrec_section(methods["nfrec_sum"], figures)
    if "alterrec" in methods:
        lines += alterrec_curves_section(methods["alterrec"], figures)
    if "id_only" in methods and len(methods) > 1:
        lines += longtail_section(methods, "hit@10", figures, untuned, same_config)
    if "alterrec" in methods and any(sweep_alpha(k) is not None for k in methods["alterrec"][0]["test"]):
        lines += sensitivity_section(methods["alterrec"], runs, figures)
    switches = switch_table(runs)
    if switches:
        lines += ["### Switches, one at a time", "",
                  "Each row changes one setting of the dataset's config; the row at the config's own value is "
                  "the method's base run. Each method is scored on its own kind at its best validation epoch, "
                  "mean ± std over the seeds listed. Settings are chosen on the validation columns only.", ""]
        lines += switches + [""]
    lines += ["### Runs", "", "| run directory | best epoch | command |", "|---|---|---|"]
    for r in runs:
        lines.append(f"| `{shown(r['spec'].run_dir)}` | {best_epochs([r])} | `{r['command']}` |")
    lines.append("")


@dataclass(frozen=True)
class Figures:
    """Where a dataset's figures go (`path`) and how the report links them (`link`)."""
    images: Path      # the grid's image directory
    relative: Path    # the same, relative to the report
    dataset: str

    def path(self, what: str) -> Path:
        return self.images / f"{self.dataset}_{what}.png"

    def link(self, what: str, alt: str) -> str:
        return f"![{alt}]({self.relative / f'{self.dataset}_{what}.png'})"


def nfrec_section(runs: list[dict], figures: Figures) -> list[str]:
    training_curves(runs, {"loss": "y = y_id + y_text", "loss_id": "y_id alone", "loss_text": "y_text alone"},
                    "NFRec (sum)", figures.path("nfrec_imbalance"))
    return ["### Fig. 3: NFRec's imbalance", "", figures.link("nfrec_imbalance", "NFRec per-epoch"), "",
            "Validation Hits@20 of NFRec's whole score and of its ID and text parts alone, and the training "
            "loss of the sum and of each part scored alone (mean over seeds). Final epoch: "
            + ", ".join(f"{k} {statistics.mean(r['epochs'][-1]['valid'][k]['hit@20'] for r in runs):.4f}"
                        for k in SCORE_PARTS) + ".", ""]


def alterrec_curves_section(runs: list[dict], figures: Figures) -> list[str]:
    training_curves(runs, {"loss": "loss of the network trained that epoch"}, "AlterRec",
                    figures.path("alterrec_curves"))
    return ["### Fig. 5: AlterRec per epoch", "", figures.link("alterrec_curves", "AlterRec per-epoch"), "",
            "Validation Hits@20 of the ID, text and fused scores, and the training loss (mean over seeds).", ""]


def longtail_section(methods: dict[str, list[dict]], metric: str, figures: Figures, untuned: frozenset[str],
                     same_config: dict[str, list[dict]]) -> list[str]:
    groups, ratios, counts = longtail(methods, metric, untuned, same_config)
    longtail_figure(groups, ratios, counts, metric, figures.path("longtail"))
    lines = ["### Fig. 6: long tail", "", figures.link("longtail", "long tail"), "",
             f"Test {metric} per target-popularity group divided by ID only's (mean over seeds):", "",
             "| method | " + " | ".join(f"{g} (n={counts[g]})" for g in groups) + " |",
             "|---|" + "---|" * len(groups)]
    lines += [f"| {label} | " + " | ".join(f"{v:.2f}×" for v in vals) + " |" for label, vals in ratios.items()]
    return lines + [""]


def sensitivity_section(alterrec: list[dict], runs: list[dict], figures: Figures) -> list[str]:
    alphas, alpha_vals = alpha_curve(alterrec)
    k2_runs = sorted((r for r in runs if "train.k2" in r["spec"].sweeps and r["spec"].method == "alterrec"),
                     key=lambda r: r["spec"].sweeps["train.k2"])
    k2s = [r["spec"].sweeps["train.k2"] for r in k2_runs]
    k2_vals = {(split, m): [r[split]["fused"][m] for r in k2_runs]
               for split in ("valid", "test") for m in HEADLINE_METRICS}
    sensitivity_figure(alphas, alpha_vals, k2s, k2_vals, figures.path("sensitivity"))
    best_a = alphas[max(range(len(alphas)), key=lambda i: alpha_vals[("valid", "ndcg@10")][i])]
    ia = alphas.index(best_a)
    lines = ["### Fig. 7: sensitivity to alpha and k2", "", figures.link("sensitivity", "sensitivity"), "",
             "alpha is inference-only in AlterRec, so each alpha is scored on the same checkpoints (AlterRec, "
             "all seeds, at the epoch selected with alpha = 0.5). Chosen on validation NDCG@10: "
             f"**alpha = {best_a:g}**, test Hits@10 {alpha_vals[('test', 'hit@10')][ia]:.4f}, "
             f"NDCG@10 {alpha_vals[('test', 'ndcg@10')][ia]:.4f}.", "",
             "| alpha | " + " | ".join(f"{a:g}" for a in alphas) + " |", "|---|" + "---|" * len(alphas)]
    for (split, m), ys in alpha_vals.items():
        lines.append(f"| {split} {m} | " + " | ".join(f"{y:.4f}" for y in ys) + " |")
    if k2s:
        lines += ["", "| k2 | " + " | ".join(str(k) for k in k2s) + " |", "|---|" + "---|" * len(k2s)]
        for (split, m), ys in k2_vals.items():
            lines.append(f"| {split} {m} | " + " | ".join(f"{y:.4f}" for y in ys) + " |")
    return lines + [""]


def write_report(grid, specs: list, grid_file: str) -> None:
    # The header names the command that remakes the report, not the one that last wrote it: a runner started
    # with --only still reports on every finished run of the grid, which is what this command reads too.
    remake = f"python -m alterrec_dist.experiments --grid {grid_file} --report-only"
    lines = [
        f"# {grid.title}", "",
        f"Made from the run directories under `{shown(grid.out)}` "
        f"(commit {git_commit()}, {datetime.date.today().isoformat()}, {platform.node() or 'this machine'}: "
        f"{platform.processor() or platform.machine()}, CPU only); `{remake}` rewrites this file and the plots "
        "without training.", "",
        "Protocol: every method uses the dataset's config, except settings chosen on validation where a "
        "dataset says so (no hyper-parameter was tuned on test); "
        "each run selects its epoch on validation (NDCG@10 of its own score: fused for AlterRec and NFRec) and "
        "reports test at that epoch; full ranking over the whole catalog; mean ± sample std over seeds.", "",
    ]
    for d in grid.datasets:
        dataset_section(d, specs, grid, lines)
    grid.report.parent.mkdir(parents=True, exist_ok=True)  # a new folder: the temp file beside the report failed
    atomic_write_bytes(grid.report, ("\n".join(lines) + "\n").encode())
