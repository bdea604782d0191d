"""The choice on validation (grid/selection.py), its rounds, and the chosen setting's other seeds (runner)."""
import json
from pathlib import Path

from alterrec_dist.grid.grid_file import DatasetGrid
from alterrec_dist.grid.plan import RunSpec, combined_runs, confirm_runs, refined_runs
from alterrec_dist.grid.selection import choose, helpful_switches


def grid(select=("train.m_max",), **kw) -> DatasetGrid:
    return DatasetGrid("d", "d", "configs/default.toml", ["alterrec", "nfrec_sum", "id_only"], [0, 1],
                       select=list(select), **kw)


def run(tmp: Path, method: str, seed: int, point: str, valid: float | None, test: float = 0.0,
        key="train.m_max", extra=()) -> RunSpec:
    """A run whose summary.json says `valid` (None: unfinished); `point` "" is the method's base run."""
    run_dir = tmp / (f"{method}-{point}-s{seed}" if point else f"{method}-s{seed}")
    run_dir.mkdir()
    if valid is not None:
        summary = {"selection": "fused/ndcg@10", "valid": {"fused": {"ndcg@10": valid}},
                   "test": {"fused": {"ndcg@10": test}}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    value = int(point.split("=")[1]) if point else 16
    return RunSpec("d", method, seed, run_dir, [], role="sweep" if point else "method", method=method,
                   sweeps={key: value}, extra=list(extra) or ([f"{key}={value}"] if point else []))


def test_each_method_takes_the_setting_best_on_validation_never_test(tmp_path):
    base = [run(tmp_path, "alterrec", s, "", 0.060, 0.050) for s in (0, 1)]
    longer = [run(tmp_path, "alterrec", s, "m_max=30", 0.062, 0.040) for s in (0, 1)]  # better valid, worse test
    nf_base = [run(tmp_path, "nfrec_sum", s, "", 0.061, 0.049) for s in (0, 1)]
    nf_longer = [run(tmp_path, "nfrec_sum", s, "m_max=30", 0.059, 0.055) for s in (0, 1)]  # worse valid, better test
    specs = base + longer + nf_base + nf_longer
    ours, theirs = choose(specs, grid(), "alterrec"), choose(specs, grid(), "nfrec_sum")
    assert (ours.chosen, ours.runs) == ("train.m_max = 30", longer)
    assert ours.scores == {"base (train.m_max = 16)": 0.060, "train.m_max = 30": 0.062}
    assert (theirs.chosen, theirs.runs) == ("base (train.m_max = 16)", nf_base)


def test_the_best_switch_over_all_selected_keys_wins(tmp_path):
    base = [run(tmp_path, "id_only", s, "", 0.060) for s in (0, 1)]
    best = [run(tmp_path, "id_only", s, "m_max=30", 0.065) for s in (0, 1)]
    later = [run(tmp_path, "id_only", s, "k2=1", 0.061, key="train.k2") for s in (0, 1)]  # the later key's best
    choice = choose(base + best + later, grid(select=["train.m_max", "train.k2"]), "id_only")
    assert choice.chosen == "train.m_max = 30" and choice.scores["train.k2 = 1"] == 0.061


def test_nothing_is_chosen_until_every_candidate_has_finished(tmp_path):
    base = [run(tmp_path, "alterrec", s, "", 0.060) for s in (0, 1)]
    partial = [run(tmp_path, "alterrec", 0, "m_max=30", 0.070), run(tmp_path, "alterrec", 1, "m_max=30", None)]
    assert choose(base + partial, grid(), "alterrec") is None


def test_sweeps_on_the_selection_seeds_then_the_chosen_point_on_the_others(tmp_path):
    d = grid(select_seeds=[0])
    base = [run(tmp_path, "alterrec", s, "", 0.060) for s in (0, 1)]
    point = run(tmp_path, "alterrec", 0, "m_max=30", None, extra=["train.m_max=30"])
    assert confirm_runs(d, "alterrec", base + [point]) == []  # not chosen yet
    (point.run_dir / "summary.json").write_text(json.dumps({"selection": "fused/ndcg@10",
                                                            "valid": {"fused": {"ndcg@10": 0.07}}}))
    [more] = confirm_runs(d, "alterrec", base + [point])
    assert (more.seed, more.run_dir.name, more.role) == (1, "alterrec-m_max=30-s1", "sweep")
    assert "train.m_max=30" in more.command and "train.seed=1" in more.command
    assert choose(base + [point, more], d, "alterrec").runs == [point, more]
    assert confirm_runs(d, "id_only", base + [point]) == []  # another method's sweep is not its own


def test_a_peer_is_tuned_on_its_own_validation_ndcg(tmp_path):
    def peer(point: str, valid: float) -> RunSpec:
        run_dir = tmp_path / (f"SASRec-{point}-s0" if point else "SASRec-s0")
        run_dir.mkdir()
        (run_dir / "result.json").write_text(json.dumps({"valid": {"ndcg@10": valid}, "test": {"ndcg@10": 0.0}}))
        key, _, value = point.partition("=")
        return RunSpec("d", "SASRec", 0, run_dir, [], done_file="result.json", role="peer", method="SASRec",
                       sweeps={key: value} if point else {}, extra=[point] if point else [])
    runs = [peer("", 0.058), peer("hidden_size=300", 0.061), peer("learning_rate=0.003", 0.055)]
    choice = choose(runs, grid(select=()), "SASRec")  # a peer's sweeps tune it without `select`
    assert choice.chosen == "hidden_size = 300" and choice.runs == [runs[1]]
    assert choice.scores == {"base": 0.058, "hidden_size = 300": 0.061, "learning_rate = 0.003": 0.055}


def test_the_switches_that_beat_the_base_on_validation_run_together_then_compete(tmp_path):
    d = grid(select=["train.m_max", "train.m_gap", "train.patience"], select_seeds=[0], combine=True)
    base = [run(tmp_path, "alterrec", s, "", 0.060, 0.070) for s in (0, 1)]
    singles = [run(tmp_path, "alterrec", 0, "m_max=30", 0.064, 0.010),
               run(tmp_path, "alterrec", 0, "m_max=20", 0.062),                        # beats base, not m_max=30
               run(tmp_path, "alterrec", 0, "m_gap=1", 0.061, key="train.m_gap"),
               run(tmp_path, "alterrec", 0, "patience=3", 0.059, key="train.patience")]  # below base: left out
    pending = run(tmp_path, "alterrec", 0, "patience=4", None, key="train.patience")
    assert combined_runs(d, "alterrec", base + singles + [pending]) == []  # not until every switch has finished
    specs = base + singles
    assert helpful_switches(specs, d, "alterrec") == [("train.m_max", 30, singles[0]), ("train.m_gap", 1, singles[2])]
    [both] = combined_runs(d, "alterrec", specs)
    assert (both.run_dir.name, both.seed, both.combined) == ("alterrec-combined-s0", 0,
                                                              {"train.m_max": 30, "train.m_gap": 1})
    assert both.extra == ["train.m_max=30", "train.m_gap=1"] and "train.m_gap=1" in both.command
    assert choose(specs + [both], d, "alterrec") is None  # the combination is a candidate: wait for it
    both.run_dir.mkdir()
    (both.run_dir / "summary.json").write_text(json.dumps({"selection": "fused/ndcg@10",
                                                           "valid": {"fused": {"ndcg@10": 0.066}}}))
    choice = choose(specs + [both], d, "alterrec")
    assert choice.chosen == "combined (train.m_max = 30, train.m_gap = 1)" and choice.runs == [both]
    [more] = confirm_runs(d, "alterrec", specs + [both])
    assert (more.run_dir.name, more.combined, more.extra) == ("alterrec-combined-s1", both.combined, both.extra)
    assert not combined_runs(grid(select=d.select, select_seeds=[0]), "alterrec", specs)  # only with `combine`


def test_one_helpful_switch_makes_no_combination(tmp_path):
    d = grid(select=["train.m_max", "train.m_gap"], select_seeds=[0], combine=True)
    specs = [run(tmp_path, "id_only", 0, "", 0.060), run(tmp_path, "id_only", 0, "m_max=30", 0.064),
             run(tmp_path, "id_only", 0, "m_gap=1", 0.058, key="train.m_gap")]
    assert combined_runs(d, "id_only", specs) == []


def finish(spec: RunSpec, valid: float) -> None:
    spec.run_dir.mkdir(exist_ok=True)
    (spec.run_dir / "summary.json").write_text(json.dumps({"selection": "fused/ndcg@10",
                                                           "valid": {"fused": {"ndcg@10": valid}}}))


def test_round_two_tries_each_switch_the_winner_lacks_on_top_of_it_and_the_choice_waits_for_it(tmp_path):
    d = grid(select=["train.m_max", "train.m_gap", "train.patience"], select_seeds=[0], combine=True, rounds=2)
    base = [run(tmp_path, "alterrec", s, "", 0.060) for s in (0, 1)]
    singles = [run(tmp_path, "alterrec", 0, "m_max=30", 0.064), run(tmp_path, "alterrec", 0, "m_max=20", 0.062),
               run(tmp_path, "alterrec", 0, "m_gap=1", 0.061, key="train.m_gap"),
               run(tmp_path, "alterrec", 0, "patience=3", 0.059, key="train.patience")]  # lost alone
    assert refined_runs(d, "alterrec", base + singles) == []  # round 1 waits for its combination
    [both] = combined_runs(d, "alterrec", base + singles)
    finish(both, 0.066)
    specs = base + singles + [both]
    other, on_top = refined_runs(d, "alterrec", specs)  # m_max=30 and m_gap=1 are the winner's already
    assert (other.run_dir.name, other.combined) == ("alterrec-round2-m_max=20-s0",
                                                    {"train.m_max": 20, "train.m_gap": 1})
    assert (on_top.run_dir.name, on_top.tuning_round) == ("alterrec-round2-patience=3-s0", 2)
    assert on_top.extra == ["train.m_max=30", "train.m_gap=1", "train.patience=3"]
    assert "train.patience=3" in on_top.command
    finish(other, 0.063)
    assert choose(specs + [other, on_top], d, "alterrec").runs == [both]  # round 1's winner until round 2 is whole
    [former] = confirm_runs(d, "alterrec", specs + [other, on_top])
    assert former.run_dir.name == "alterrec-combined-s1"
    finish(former, 0.065)
    finish(on_top, 0.068)
    choice = choose(specs + [other, on_top], d, "alterrec")
    assert choice.chosen == "round 2 (train.m_max = 30, train.m_gap = 1, train.patience = 3)"
    assert choice.scores["combined (train.m_max = 30, train.m_gap = 1)"] == 0.066 and choice.runs == [on_top]
    # the new choice's other seed is added; the former choice's finished one stays in the grid, not rerun
    kept, more = confirm_runs(d, "alterrec", specs + [other, on_top])
    assert (kept.run_dir.name, kept.done) == ("alterrec-combined-s1", True)
    assert (more.run_dir.name, more.tuning_round, more.extra) == ("alterrec-round2-patience=3-s1", 2, on_top.extra)
    assert not refined_runs(grid(select=d.select, select_seeds=[0], combine=True), "alterrec", specs)


def test_round_two_on_a_single_winning_switch_skips_what_round_one_ran_and_none_follows_a_winning_base(tmp_path):
    d = grid(select=["train.m_max", "train.m_gap", "train.patience"], select_seeds=[0], combine=True, rounds=2)
    specs = [run(tmp_path, "id_only", 0, "", 0.060), run(tmp_path, "id_only", 0, "m_max=30", 0.064),
             run(tmp_path, "id_only", 0, "m_gap=1", 0.061, key="train.m_gap"),
             run(tmp_path, "id_only", 0, "patience=3", 0.059, key="train.patience")]
    [both] = combined_runs(d, "id_only", specs)
    finish(both, 0.063)  # the combination lost to m_max=30 alone, whose round 2 adds patience only
    [on_top] = refined_runs(d, "id_only", specs + [both])
    assert on_top.combined == {"train.m_max": 30, "train.patience": 3}
    losing = [run(tmp_path, "text_only", 0, "", 0.070), run(tmp_path, "text_only", 0, "m_max=30", 0.064)]
    assert refined_runs(d, "text_only", losing) == []  # the base won: round 1 already tried each switch on it


def test_round_three_starts_from_round_two_s_winner_and_none_follows_a_round_that_changed_nothing(tmp_path):
    d = grid(select=["train.m_max", "train.m_gap", "train.patience"], select_seeds=[0], combine=True, rounds=3)
    base = [run(tmp_path, "alterrec", s, "", 0.060) for s in (0, 1)]
    singles = [run(tmp_path, "alterrec", 0, "m_max=30", 0.064), run(tmp_path, "alterrec", 0, "m_max=20", 0.062),
               run(tmp_path, "alterrec", 0, "m_gap=1", 0.061, key="train.m_gap"),
               run(tmp_path, "alterrec", 0, "patience=3", 0.059, key="train.patience")]
    [both] = combined_runs(d, "alterrec", base + singles)
    finish(both, 0.066)
    specs = base + singles + [both]
    other, on_top = refined_runs(d, "alterrec", specs)  # round 3 waits for round 2
    finish(other, 0.067)  # round 2's winner: m_max=20 with m_gap=1
    finish(on_top, 0.063)
    *second, third = refined_runs(d, "alterrec", specs)
    assert [s.run_dir for s in second] == [other.run_dir, on_top.run_dir]
    # from round 2's winner, only patience=3 is new (m_max=30 with m_gap=1 is round 1's combination)
    assert (third.run_dir.name, third.tuning_round) == ("alterrec-round3-patience=3-s0", 3)
    assert third.combined == {"train.m_max": 20, "train.m_gap": 1, "train.patience": 3}
    assert third.extra == ["train.m_max=20", "train.m_gap=1", "train.patience=3"]
    assert choose(specs + [other, on_top, third], d, "alterrec").runs == [other]  # until round 3 is whole
    finish(third, 0.070)
    choice = choose(specs + [other, on_top, third], d, "alterrec")
    assert choice.chosen == "round 3 (train.m_max = 20, train.m_gap = 1, train.patience = 3)"
    assert len(refined_runs(d, "alterrec", specs)) == 3  # `rounds` = 3: no fourth
    finish(other, 0.063)  # had round 2 left round 1's winner standing, round 3 would repeat round 2
    assert [s.run_dir for s in refined_runs(d, "alterrec", specs)] == [other.run_dir, on_top.run_dir]


def test_a_diverged_candidate_is_never_chosen_over_a_finite_one_whatever_its_place(tmp_path):
    """A run that diverged scores NaN on validation. `max` over the candidates keeps whichever came first
    when one is NaN (no comparison with NaN holds), so a diverged base was chosen over a better switch,
    and its seeds were reported as the method's result."""
    nan = float("nan")
    for where, base_valid, point_valid, chosen in [("nan-base", nan, 0.060, "train.m_max = 30"),
                                                    ("nan-point", 0.060, nan, "base (train.m_max = 16)")]:
        (tmp_path / where).mkdir()
        specs = [run(tmp_path / where, "alterrec", s, "", base_valid) for s in (0, 1)] + \
                [run(tmp_path / where, "alterrec", s, "m_max=30", point_valid) for s in (0, 1)]
        choice = choose(specs, grid(), "alterrec")
        assert choice.chosen == chosen, where
        assert choice.scores[chosen] == 0.060 and float("-inf") in choice.scores.values()


def test_a_candidate_missing_a_selection_seed_is_not_compared_with_one_that_has_both(tmp_path):
    """With select_seeds [0, 1], a switch that has run on seed 0 only (its seed 1 not even planned yet) was
    compared by its one score against the base's mean over two: one lucky seed chose it. Nothing is chosen
    until it has both."""
    d = grid(select_seeds=[0, 1])
    base = [run(tmp_path, "alterrec", s, "", 0.060) for s in (0, 1)]
    lucky = run(tmp_path, "alterrec", 0, "m_max=30", 0.070)
    assert choose(base + [lucky], d, "alterrec") is None
    unlucky = run(tmp_path, "alterrec", 1, "m_max=30", 0.040)  # its mean, 0.055, is below the base's
    assert choose(base + [lucky, unlucky], d, "alterrec").chosen == "base (train.m_max = 16)"


def test_a_switch_that_only_ties_the_base_is_not_helpful(tmp_path):
    """A switch is combined only where it beats the base on validation: one that scores exactly the base's
    (often a setting that changed nothing, e.g. a patience never reached) would make a combination that is
    just the other switch again, a run on every selection seed for nothing."""
    d = grid(select=["train.m_max", "train.patience"], select_seeds=[0], combine=True)
    specs = [run(tmp_path, "alterrec", 0, "", 0.060), run(tmp_path, "alterrec", 0, "m_max=30", 0.064),
             run(tmp_path, "alterrec", 0, "patience=3", 0.060, key="train.patience")]  # the base's score exactly
    assert helpful_switches(specs, d, "alterrec") == [("train.m_max", 30, specs[1])]
    assert combined_runs(d, "alterrec", specs) == []
