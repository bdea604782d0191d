"""The report's tables: the methods with the fusion weight chosen on validation, the switch ablation (each
switch, the helpful ones combined), the choice, what round 2 may still change, and runs that ended on their
budget."""
import json
import sys
from pathlib import Path

import pytest

from alterrec_dist.common.errors import DataError
from alterrec_dist.grid.grid_file import DatasetGrid, load_grid
from alterrec_dist.grid.plan import RunSpec, expand
from alterrec_dist.grid.runner import run_grid
from alterrec_dist.grid.report import (ablation_table, choice_table, gains, longtail, main_table, read_run, rounds_note,
                                       same_config_note, same_config_runs, switch_table)
from alterrec_dist.grid.selection import Choice, validation_score
from tests.grid.grids import one_dataset_grid, tiny_peer_grid


def result(spec: RunSpec, valid: float, test: float) -> dict:
    def scores(x):
        return {"fused": {"hit@10": 2 * x, "ndcg@10": x}}
    return {"spec": spec, "valid": scores(valid), "test": scores(test), "best_epoch": 7}


def test_the_switch_table_shows_each_switch_and_the_combination():
    def spec(name, **kw):
        return RunSpec("d", name, 0, Path(name), [], role="sweep", method="alterrec", **kw)
    runs = [result(spec("a-dropout", sweeps={"model.dropout": 0.5}, extra=["model.dropout=0.5"]), 0.061, 0.051),
            result(spec("a-lr", sweeps={"lr": "3e-3"}, extra=["train.lr_id=3e-3"]), 0.062, 0.052),
            result(spec("a-combined", combined={"model.dropout": 0.5, "lr": "3e-3"},
                        extra=["model.dropout=0.5", "train.lr_id=3e-3"]), 0.066, 0.055)]
    lines = switch_table(runs)
    assert lines[2:] == [
        "| AlterRec (fused) | lr = 3e-3 | 1 | 0.1240 | 0.0620 | 0.1040 | 0.0520 | 7 |",
        "| AlterRec (fused) | model.dropout = 0.5 | 1 | 0.1220 | 0.0610 | 0.1020 | 0.0510 | 7 |",
        "| AlterRec (fused) | combined (model.dropout = 0.5, lr = 3e-3) | 1 | 0.1320 | 0.0660 | 0.1100 | 0.0550 | 7 |"]


def test_the_choice_table_gives_the_chosen_overrides_a_config_takes_over():
    chosen = RunSpec("d", "id_only", 0, Path("x"), [], role="sweep", method="id_only", extra=["model.dropout=0.5"])
    base = RunSpec("d", "nfrec_sum", 0, Path("y"), [], method="nfrec_sum")
    lines = choice_table([Choice("id_only", {"base": 0.060, "model.dropout = 0.5": 0.063}, "model.dropout = 0.5",
                                 [chosen]),
                          Choice("nfrec_sum", {"base": 0.061, "model.dropout = 0.5": 0.059}, "base", [base])])
    assert lines[2:] == ["| ID only | 2 | base: 0.0600, model.dropout = 0.5: 0.0630 | **model.dropout = 0.5** | "
                         "`model.dropout=0.5` |",
                         "| NFRec (sum) | 2 | base: 0.0610, model.dropout = 0.5: 0.0590 | **base** | none |"]


def test_the_report_counts_the_configurations_each_method_tried(tmp_path):
    """The tuning budgets differ (AlterRec has switches of its own): the report gave each candidate's score but
    no count, and the docs called the budgets equal. P tries its base, two switches and their combination; Q,
    not tuned, its base alone."""
    from alterrec_dist.grid.report import write_report

    grid_file = tiny_peer_grid(tmp_path, f"""methods = []
        [[dataset.peer]]
        name = "Q"
        command = ["{{python}}", "{tmp_path}/peer.py"]
        seeds = [0]""")
    grid_file.write_text(f'report = "{tmp_path}/RESULTS.md"\n' + grid_file.read_text())
    grid = load_grid(grid_file)
    specs, failed = run_grid(grid)
    assert failed == []
    write_report(grid, specs, "grid.toml")
    report = (tmp_path / "RESULTS.md").read_text().splitlines()
    assert [line.split(" | ")[:2] for line in report if line.startswith("| P | ")] == [["| P", "4"]]
    assert ("Configurations tried on validation (the budgets are not equal): P 4; one each, not tuned: Q. A method "
            "tries more where it has switches of its own") in "\n".join(report)


def finished_run(tmp_path: Path, method: str, seed: int, fused: float, alpha: tuple[float, float] | None,
                 epochs_trained: int = 9, best_epoch: int = 3, stopped_by: str | None = "patience") -> dict:
    """A finished run's record as the recipe writes it: summary.json (with the alpha chosen on validation and
    its test NDCG@10 when `alpha` is given; without `stopped_by` when None, as summaries written before it had),
    metrics.jsonl, command.txt, config.toml (m_max 30, patience 6); read back as the report reads it."""
    d = tmp_path / f"{method}-s{seed}"
    d.mkdir()
    (d / "config.toml").write_text("[train]\nm_max = 30\npatience = 6\n")
    scores = {k: {"hit@10": 2 * fused, "hit@20": 3 * fused, "ndcg@10": fused, "ndcg@20": 1.5 * fused}
              for k in ("fused", "id", "text")}
    summary = {"best_epoch": best_epoch, "epochs_trained": epochs_trained, "selection": "fused/ndcg@10",
               "valid": scores, "test": scores, "longtail": {}}
    if stopped_by is not None:
        summary["stopped_by"] = stopped_by
    if alpha is not None:
        chosen, ndcg = alpha
        summary["alpha"] = {"chosen": chosen, "selection": "fused/ndcg@10", "valid": scores["fused"],
                            "test": {"hit@10": 2 * ndcg, "hit@20": 3 * ndcg, "ndcg@10": ndcg, "ndcg@20": 1.5 * ndcg}}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "metrics.jsonl").write_text("{}\n")
    (d / "command.txt").write_text("python -m alterrec_dist.train\n")
    return read_run(RunSpec("d", method, seed, d, [], method=method))


def test_the_headline_is_fused_at_the_alpha_each_run_chose_on_validation(tmp_path):
    alterrec = [finished_run(tmp_path, "alterrec", 0, 0.060, (0.7, 0.063)),
                finished_run(tmp_path, "alterrec", 1, 0.060, (0.8, 0.065))]
    nfrec = [finished_run(tmp_path, "nfrec_sum", 0, 0.058, None)]  # one fused network: no alpha to choose
    table = main_table({"alterrec": alterrec, "nfrec_sum": nfrec}, {}, [])
    assert table[2:] == [
        "| AlterRec (fused, α on valid: 0.7,0.8) | 2 | 0.1280 ± 0.0028 | 0.1920 ± 0.0042 | 0.0640 ± 0.0014 "
        "| 0.0960 ± 0.0021 | 3,3 |",
        "| NFRec (sum) (fused) | 1 | 0.1160 | 0.1740 | 0.0580 | 0.0870 | 3 |"]
    assert gains({"alterrec": alterrec, "nfrec_sum": nfrec}, {}, [])[2:] == [
        "| NFRec (sum) (fused) | 0.1160 | 0.0580 | +10.3 % | +10.3 % | yes |", "",
        "(Means over other seeds than AlterRec's [0, 1]: NFRec (sum) (fused) [0].)"]  # its seed 1 is missing
    assert gains({"alterrec": alterrec, "nfrec_sum": nfrec + [finished_run(tmp_path, "nfrec_sum", 1, 0.058, None)]},
                 {}, [])[2:] == ["| NFRec (sum) (fused) | 0.1160 | 0.0580 | +10.3 % | +10.3 % | yes |"]
    # a run without a sweep has no chosen alpha: the method then reports the fixed-alpha fused score
    mixed = alterrec + [finished_run(tmp_path, "alterrec", 2, 0.061, None)]
    assert main_table({"alterrec": mixed}, {}, [])[2].startswith("| AlterRec (fused) | 3 | 0.1207 ± 0.0012 |")


def test_an_untuned_variant_is_marked_and_set_against_alterrec_on_its_own_setting(tmp_path):
    """AlterRec's random-negatives ablation runs on the base config while AlterRec is tuned: the report set tuned
    AlterRec against it (+26.7 % / +33.5 % on Scientific, 0.65x on the long tail) as if that were the negatives'
    effect alone. Now the variant is marked untuned, and AlterRec's base runs stand beside it."""
    for sub in ("base", "tuned"):
        (tmp_path / sub).mkdir()

    def tail(run, hit):
        run["longtail"] = {k: {"[0,30]": {"n": 9, "hit@10": hit}} for k in ("fused", "id", "text")}
        return run
    base = [tail(finished_run(tmp_path / "base", "alterrec", s, 0.055, None), 0.08) for s in (0, 1)]
    tuned = [tail(finished_run(tmp_path / "tuned", "alterrec", s, 0.070, None), 0.11) for s in (0, 1)]
    for run in tuned:
        run["spec"].role = "sweep"  # the chosen setting's runs
    random = [tail(finished_run(tmp_path, "alterrec_random", s, 0.050, None), 0.06) for s in (0, 1)]
    methods = {"alterrec": tuned, "alterrec_random": random}
    untuned = frozenset({"alterrec_random"})
    same = same_config_runs(base + tuned + random, methods, untuned)
    assert same == {"AlterRec on the dataset's config": base}
    assert main_table(methods, {}, [], untuned)[3].startswith("| AlterRec, random negatives (fused; untuned) | 2 |")
    assert gains(methods, {}, [], untuned)[2:] == [
        "| AlterRec, random negatives (fused; untuned) | 0.1000 | 0.0500 | +40.0 % | +40.0 % | yes |"]
    assert same_config_note(same, random) == [
        "(AlterRec, random negatives is untuned: it runs on the dataset's config, so AlterRec's gain over it above "
        "holds AlterRec's tuning too. On that same config, AlterRec's base runs (fused at `eval.alpha`, seeds [0, 1]) "
        "score 0.1100 / 0.0550 against its 0.1000 / 0.0500 (seeds [0, 1]): +10.0 % / +10.0 % on Hits@10 / "
        "NDCG@10.)", ""]
    assert [row.split(" | ")[0] for row in ablation_table(methods, untuned, same)[2:]] == [
        "| AlterRec (fused)", "| AlterRec (id)", "| AlterRec (text)", "| AlterRec on the dataset's config (fused)",
        "| AlterRec, random negatives (fused; untuned)", "| AlterRec, random negatives (id; untuned)",
        "| AlterRec, random negatives (text; untuned)"]
    id_only = [tail(finished_run(tmp_path, "id_only", s, 0.05, None), 0.1) for s in (0, 1)]
    ratios = longtail({**methods, "id_only": id_only}, "hit@10", untuned, same)[1]
    assert [(label, round(r[0], 6)) for label, r in ratios.items()] == [
        ("AlterRec (fused)", 1.1), ("AlterRec on the dataset's config (fused)", 0.8),
        ("AlterRec, random negatives (fused; untuned)", 0.6)]
    # both on the base setting (neither tuned): the table's comparison is already on one setting
    assert same_config_runs(base + random, {"alterrec": base, "alterrec_random": random},
                            frozenset({"alterrec", "alterrec_random"})) == {}

def test_the_report_says_which_choices_a_round_under_way_may_still_change(tmp_path):
    d = DatasetGrid("d", "d", "configs/default.toml", ["alterrec", "id_only"], [0], select=["model.dropout"])

    def spec(name, method, tuning_round=1, done=False):
        s = RunSpec("d", name, 0, tmp_path / name, [], role="sweep", method=method, tuning_round=tuning_round,
                    combined={"model.dropout": 0.5} if tuning_round > 1 else {})
        if done:
            s.run_dir.mkdir()
            (s.run_dir / "summary.json").write_text("{}")
        return s
    specs = [spec("a", "alterrec"), spec("a2", "alterrec", 2, done=True), spec("a3", "alterrec", 3, done=True),
             spec("b3", "alterrec", 3), spec("i", "id_only"), spec("i2", "id_only", 2, done=True)]
    assert rounds_note(specs, d, ["alterrec", "id_only"]) == [
        "Rounds under way (their runs finished so far): AlterRec round 3, 1 of 2. Until a method's latest round has "
        "finished, the winner of its rounds before stands and Table 1 reports it (before round 1 has: the base, "
        "untuned).", ""]
    assert rounds_note(specs, d, ["id_only"]) == []  # finished: its choice is final
    # round 1 with a switch that never finished (a failed run): Table 1 reports the base, and says so
    base, switch = spec("t", "text_only", done=True), spec("t-d", "text_only")
    switch.extra, switch.sweeps = ["--set", "model.dropout=0.5"], {"model.dropout": 0.5}
    assert rounds_note([base, switch], d, ["text_only"])[0].startswith(
        "Rounds under way (their runs finished so far): Text only round 1, 1 of 2.")


def test_a_best_epoch_is_marked_when_the_run_ended_on_its_budget_not_on_patience(tmp_path):
    stopped = finished_run(tmp_path, "id_only", 0, 0.05, None)  # patience stopped it after 9 of 30 epochs
    whole = finished_run(tmp_path, "id_only", 1, 0.05, None, epochs_trained=30, best_epoch=26, stopped_by="m_max")
    assert main_table({"id_only": [stopped, whole]}, {}, [])[2].endswith("| 3,26* |")
    # a summary from before `stopped_by`: trained all 30 epochs, yet patience (6) ran out with the last one
    # when the best epoch was 23 (epochs 24..29 no better); one epoch later it had not
    assert [finished_run(tmp_path, "id_only", seed, 0.05, None, epochs_trained=30, best_epoch=best,
                         stopped_by=None)["on_budget"] for seed, best in ((2, 23), (3, 24))] == [False, True]

    def peer(name, best_epoch, stopped_by, epochs=50):
        d = tmp_path / name
        d.mkdir()
        scores = {"hit@10": 0.1, "ndcg@10": 0.05}
        (d / "result.json").write_text(json.dumps({"best_epoch": best_epoch, "epochs_run": 8, "stopped_by": stopped_by,
                                                   "config": {"epochs": epochs, "stopping_step": 2},
                                                   "valid": scores, "test": scores, "command": "x"}))
        return read_run(RunSpec("d", "UniSRec", 0, d, [], done_file="result.json", role="peer"))["on_budget"]
    cap = "the time cap (105 CPU min) after 8 epochs"
    assert peer("cut", 7, cap)  # still at its best when the cap stopped it
    # had fallen from its best (UniSRec on Scientific: best 6 of 8), but its patience had not run out: it went
    # unmarked, so the footnote's "ended on its budget" missed a time-capped peer
    assert peer("past", 6, cap)
    ceiling = "early stopping or the epoch ceiling"
    # RecBole stops once more than `stopping_step` (2) validations in a row are no better than the best
    assert not peer("patience", 4, ceiling)  # epochs 5-7 no better, 42 epochs short of the ceiling
    assert peer("ceiling", 5, ceiling, epochs=8)  # epochs 6-7 no better when the 8-epoch ceiling came
    assert not peer("ceiling-and-patience", 4, ceiling, epochs=8)  # patience ran out with the last epoch too


def test_damaged_results_are_named_and_a_diverged_run_ranks_last(tmp_path):
    """A run's NaN validation score made `max` keep the base whatever the switches scored; a summary without a
    key, or a metrics.jsonl line that is not JSON, stopped the whole report with a bare traceback."""
    run = finished_run(tmp_path, "alterrec", 0, 0.06, None)["spec"]
    summary = json.loads((run.run_dir / "summary.json").read_text())
    summary["valid"]["fused"]["ndcg@10"] = float("nan")
    (run.run_dir / "summary.json").write_text(json.dumps(summary))
    assert validation_score(run) == float("-inf")
    del summary["valid"]
    (run.run_dir / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match=r"summary.json: no validation score to select on"):
        validation_score(run)
    with pytest.raises(DataError, match=r"summary.json: no 'valid' \(a damaged summary"):
        read_run(run)
    peer = RunSpec("d", "UniSRec", 0, tmp_path / "peer", [], done_file="result.json", role="peer")
    peer.run_dir.mkdir()
    (peer.run_dir / "result.json").write_text('{"valid": {}, "te')
    assert not peer.done and read_run(peer) is None  # cut short: not done, so run again (it counted as done)
    (peer.run_dir / "result.json").write_text('{"valid": {"ndcg@10": 0.05}}')
    with pytest.raises(DataError, match=r"result.json: no 'test' \(a damaged result"):
        read_run(peer)


def test_a_finished_run_without_its_metrics_log_is_named(tmp_path):
    """A finished run whose metrics.jsonl is gone stopped the report with a FileNotFoundError traceback."""
    run = finished_run(tmp_path, "alterrec", 0, 0.06, None)["spec"]
    (run.run_dir / "metrics.jsonl").unlink()
    with pytest.raises(DataError, match=r"metrics.jsonl: missing \(a damaged run: move it away to run it again\)"):
        read_run(run)


def test_a_run_finished_without_its_runner_shows_the_grids_command_as_typed(tmp_path):
    """A run that finished while no runner waited for it has no command.txt: the report showed its command with
    this machine's interpreter path (/…/.venv/bin/python), not as a user types it."""
    spec = finished_run(tmp_path, "alterrec", 0, 0.06, None)["spec"]
    (spec.run_dir / "command.txt").unlink()
    spec.command = [sys.executable, "-m", "alterrec_dist.train", "--set", "train.seed=0"]
    assert read_run(spec)["command"] == "python -m alterrec_dist.train --set train.seed=0"


def test_a_metrics_line_cut_short_is_not_read_and_a_bad_one_is_named(tmp_path):
    run = finished_run(tmp_path, "alterrec", 0, 0.06, None)["spec"]
    metrics = run.run_dir / "metrics.jsonl"
    metrics.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')  # a run killed while writing its line
    assert read_run(run)["epochs"] == [{"epoch": 0}, {"epoch": 1}]
    metrics.write_text('{"epoch": 0}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl: line 2 is not JSON"):
        read_run(run)


def test_a_peers_command_is_its_command_txt_not_its_results_own(tmp_path):
    """A peer's result.json records the command as its script saw it, with this machine's paths (`--out
    /work/main/results/...`): the report showed that in 17 committed rows, not the runner's command.txt."""
    d = tmp_path / "peer"
    d.mkdir()
    scores = {"hit@10": 0.1, "ndcg@10": 0.05}
    (d / "result.json").write_text(json.dumps({"valid": scores, "test": scores,
                                               "command": f"{sys.executable} bench/recbole_peer.py --out {d}"}))
    (d / "command.txt").write_text("python bench/recbole_peer.py --out results/peer\n")
    spec = RunSpec("d", "SASRec", 0, d, [sys.executable, "bench/recbole_peer.py"], done_file="result.json", role="peer")
    assert read_run(spec)["command"] == "python bench/recbole_peer.py --out results/peer"
    (d / "command.txt").unlink()  # finished while no runner waited: the grid's command, as typed
    assert read_run(spec)["command"] == "python bench/recbole_peer.py"


def test_a_report_goes_into_a_folder_made_for_it(tmp_path):
    """A report in a folder that did not exist was a FileNotFoundError traceback after the runs had trained,
    unless a plot had happened to make the folder."""
    from alterrec_dist.grid.report import write_report

    grid = load_grid(one_dataset_grid(tmp_path / "grid.toml", 'methods = ["id_only"]',
                                      head=f'report = "{tmp_path}/new/RESULTS.md"'))
    write_report(grid, expand(grid), "grid.toml")
    assert (tmp_path / "new" / "RESULTS.md").read_text().startswith("# ")
