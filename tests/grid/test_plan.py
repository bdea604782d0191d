"""What a grid runs (grid/plan.py): the committed grid's tuning budget, sweeps that fit no method, the tuning
rounds' candidates as their switches finish, the order runs start in, and the commands that make them."""
import json
import sys
import textwrap
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import pytest

from alterrec_dist.common.config import PROJECT_ROOT, load_config
from alterrec_dist.common.errors import ConfigError
from alterrec_dist.grid.grid_file import load_grid
from alterrec_dist.grid.plan import expand, method_config, settings_differ, shown_command
from alterrec_dist.grid.selection import choose
from tests.grid.grids import one_dataset_grid, tiny_peer_grid


# What a method's config refuses or ignores, and so is not one of its switches: a key, or one point of it. AlterRec's
# two networks each take a logit form of their own; ID only's and text only's one network has it as `cosine`.
PER_NETWORK = {"logits=id_cosine", "logits=text_cosine"}


NOT_THEIRS = {  # (train.method and train.reject_worse: AlterRec's own switches, which no other method has)
    "nfrec_sum": {"logits", "train.method", "train.reject_worse"},  # one fused network: no per-network cosine logits
    "id_only": {"model.text_adapter", "train.method", "train.reject_worse", *PER_NETWORK},
    "text_only": {"model.id_init", "train.method", "train.reject_worse", *PER_NETWORK},
    "alterrec": set(),
}


def test_the_committed_grid_tunes_each_method_over_the_same_switches():
    grid = load_grid(PROJECT_ROOT / "configs/experiments/paper.toml")
    [d] = [d for d in grid.datasets if d.name == "scientific"]
    specs = [s for s in expand(grid) if s.dataset == "scientific"]
    # the runs of each method's chosen setting (once its candidates have run): on every seed
    chosen = {s.run_dir for m in NOT_THEIRS for s in (getattr(choose(specs, d, m), "runs", None) or [])}
    points = defaultdict(set)  # method -> (key, value) of its seed-0 sweep runs over the select keys
    for s in specs:
        if s.role == "sweep" and s.method in NOT_THEIRS:
            # tuning on seed 0; other seeds only for the chosen setting (or a former choice's, finished)
            assert (s.seed in d.select_seeds or not set(s.sweeps) & set(d.select) or s.run_dir in chosen
                    or s.done), s.run_dir
            points[s.method] |= {(k, str(v)) for k, v in s.sweeps.items() if k in d.select}
    everything = points["alterrec"]
    for method, skipped in NOT_THEIRS.items():
        theirs = {(k, v) for k, v in everything if k not in skipped and f"{k}={v}" not in skipped}
        assert points[method] == theirs, method
    assert len(everything) == 15 and {f"{k}={v}" for k, v in everything} > PER_NETWORK
    assert set(d.select) == {k for k, _ in everything}
    # The base runs have every seed; seeds 1-2 of a chosen switch come once seed 0 has been compared.
    assert {s.seed for s in specs if s.role == "method" and s.method == "id_only"} == {0, 1, 2}
    # Run order: each tuned method's seed-0 candidates and its chosen setting's other seeds, method by method
    # (AlterRec first), then the peers, then the later rounds, then the rest (the sensitivity sweeps, seeds 1-2 no
    # choice needs).
    first = [i for i, s in enumerate(specs) if s.role != "peer" and s.method in NOT_THEIRS and s.tuning_round == 1 and (
        s.run_dir in chosen or s.seed == 0 and not (s.extra and not {*s.sweeps, *s.combined} & set(d.select)))]
    peers = [i for i, s in enumerate(specs) if s.role == "peer" and s.tuning_round == 1]
    later = [i for i, s in enumerate(specs) if s.tuning_round > 1 and (s.seed in d.select_seeds or s.run_dir in chosen)]
    assert first + peers + later == list(range(len(first) + len(peers) + len(later)))
    assert [specs[i].method for i in first] == sorted((specs[i].method for i in first), key=d.methods.index)
    # Round 2 tries on AlterRec's winner what lost alone against the base, the alternation's own stopping too.
    assert any(specs[i].combined.get("train.reject_worse") for i in later if specs[i].method == "alterrec")
    # RecBole's SASRec is tuned too: its own settings, one at a time, through the peer's --set.
    sasrec = {s.run_dir.name: s.command for s in specs if s.method == "SASRec" and not s.combined}
    assert len(sasrec) == 7 and "SASRec-s0" in sasrec
    # Once those have run, the switches that beat its base run together: only switches it ran one at a time.
    singles = {(k, str(v)) for s in specs if s.method == "SASRec" and not s.combined for k, v in s.sweeps.items()}
    for s in specs:
        if s.method == "SASRec" and s.combined:
            assert len(s.combined) >= 2 and {(k, str(v)) for k, v in s.combined.items()} <= singles, s.run_dir
    cmd = sasrec["SASRec-dropout=0.1-s0"]
    assert cmd[cmd.index("--set"):cmd.index("--seed")] == ["--set", "hidden_dropout_prob=0.1",
                                                            "--set", "attn_dropout_prob=0.1"]


def test_a_sweep_point_no_method_takes_is_an_error(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(textwrap.dedent('''
        [[dataset]]
        name = "default"
        config = "configs/default.toml"
        methods = ["id_only", "text_only"]
        [[dataset.sweep]]
        key = "logits"
        variants = { cosine = ["model.id_logit=cosine"] }
    '''))
    with pytest.raises(ConfigError, match=r"grid.toml: sweep logits = cosine fits no method: .*id_logit"):
        expand(load_grid(grid))


def test_a_runs_recorded_command_holds_no_path_of_this_machine():
    cmd = [sys.executable, "-m", "alterrec_dist.train", "--out", str(PROJECT_ROOT / "results/paper/d/x-s0"),
           "--set", "eval.alpha_sweep=[0.0,1.0]"]
    assert shown_command(cmd) == ("python -m alterrec_dist.train --out results/paper/d/x-s0 "
                                  "--set 'eval.alpha_sweep=[0.0,1.0]'")


def test_a_grid_with_combine_adds_the_combination_once_its_switches_have_run(tmp_path):
    grid_file = tiny_peer_grid(tmp_path, '''
        methods = ["id_only"]
        select = ["train.m_max", "train.m_gap"]
        [[dataset.sweep]]
        key = "train.m_max"
        values = [30]
        [[dataset.sweep]]
        key = "train.m_gap"
        values = [1]''')
    grid = load_grid(grid_file)
    specs = expand(grid)
    assert not any(s.combined for s in specs)
    for s in specs:  # every single switch beats its base on validation
        s.run_dir.mkdir(parents=True)
        valid = 0.05 + 0.01 * bool(s.extra)
        result = ({"valid": {"ndcg@10": valid}} if s.role == "peer"
                  else {"selection": "id/ndcg@10", "valid": {"id": {"ndcg@10": valid}}})
        (s.run_dir / s.done_file).write_text(json.dumps(result))
    combined = {s.run_dir.relative_to(grid.out): s.command for s in expand(grid) if s.combined}
    assert set(combined) == {Path("d/id_only-combined-s0"), Path("d/peers/P-combined-s0")}
    cmd = combined[Path("d/id_only-combined-s0")]
    assert cmd[cmd.index("train.m_max=30") - 1:cmd.index("--out")] == ["--set", "train.m_max=30",
                                                                        "--set", "train.m_gap=1"]
    assert combined[Path("d/peers/P-combined-s0")][1:-4] == [f"{tmp_path}/peer.py", "--set", "a=1", "--set", "b=2"]


def test_a_choice_made_mid_grid_sends_its_other_seeds_ahead_of_the_next_method_and_the_peers(tmp_path):
    grid = load_grid(tiny_peer_grid(tmp_path, '''
        methods = ["id_only", "text_only"]
        select = ["train.m_max"]
        [[dataset.sweep]]
        key = "train.m_max"
        values = [30]'''))
    names = lambda: [s.run_dir.name for s in expand(grid)]  # noqa: E731
    assert names() == ["id_only-s0", "id_only-m_max=30-s0", "text_only-s0", "text_only-m_max=30-s0",
                       "P-s0", "P-a=1-s0", "P-b=2-s0", "id_only-s1", "text_only-s1"]
    for s in expand(grid)[:2]:  # ID only's seed 0 has run: the switch is better on validation
        s.run_dir.mkdir(parents=True)
        valid = 0.05 + 0.01 * bool(s.extra)
        (s.run_dir / "summary.json").write_text(json.dumps({"selection": "id/ndcg@10",
                                                            "valid": {"id": {"ndcg@10": valid}}}))
    assert names()[2:] == ["id_only-m_max=30-s1", "text_only-s0", "text_only-m_max=30-s0",
                           "P-s0", "P-a=1-s0", "P-b=2-s0", "id_only-s1", "text_only-s1"]


def test_round_two_runs_after_the_peers_and_its_winner_then_runs_on_the_other_seeds(tmp_path):
    grid = load_grid(tiny_peer_grid(tmp_path, '''
        rounds = 2
        methods = ["id_only"]
        select = ["train.m_max", "train.m_gap", "train.patience"]
        [[dataset.sweep]]
        key = "train.m_max"
        values = [30]
        [[dataset.sweep]]
        key = "train.m_gap"
        values = [1]
        [[dataset.sweep]]
        key = "train.patience"
        values = [3]'''))

    def finish(name: str, valid: float) -> None:
        [s] = [s for s in expand(grid) if s.run_dir.name == name]
        s.run_dir.mkdir(parents=True)
        (s.run_dir / "summary.json").write_text(json.dumps({"selection": "id/ndcg@10",
                                                            "valid": {"id": {"ndcg@10": valid}}}))
    for name, valid in [("id_only-s0", 0.05), ("id_only-m_max=30-s0", 0.06), ("id_only-m_gap=1-s0", 0.06),
                        ("id_only-patience=3-s0", 0.04), ("id_only-combined-s0", 0.07)]:
        finish(name, valid)
    todo = lambda: [s.run_dir.name for s in expand(grid) if not s.done]  # noqa: E731
    # round 1's winner stands (its other seed first) while round 2 waits behind the peers
    assert todo() == ["id_only-combined-s1", "P-s0", "P-a=1-s0", "P-b=2-s0", "id_only-round2-patience=3-s0",
                      "id_only-s1"]
    finish("id_only-round2-patience=3-s0", 0.08)
    assert todo() == ["P-s0", "P-a=1-s0", "P-b=2-s0", "id_only-round2-patience=3-s1", "id_only-s1"]


def test_configs_scientific_holds_what_the_paper_grid_chose_for_alterrec():
    """configs/scientific.toml is the grid's base (configs/scientific_paper.toml) with the grid's own settings
    (epoch budget, alpha chosen on validation) and AlterRec's candidate chosen on validation (the base until
    the grid has chosen), so `--config configs/scientific.toml` runs the headline setting."""
    grid = load_grid(PROJECT_ROOT / "configs/experiments/paper.toml")
    [d] = [d for d in grid.datasets if d.name == "scientific"]
    choice = choose(expand(grid), d, "alterrec")
    chosen = method_config(d, "alterrec", choice.runs[0].extra if choice else [])
    assert asdict(load_config(PROJECT_ROOT / "configs/scientific.toml")) == asdict(chosen)


def test_the_carryover_check_runs_configs_scientific_as_it_is_on_other_data():
    """configs/experiments/carryover.toml checks whether scientific.toml's settings carry: each method's config
    there is scientific.toml's but for the data, the method, and only what that method needs to take it at all."""
    grid = load_grid(PROJECT_ROOT / "configs/experiments/carryover.toml")
    [d] = grid.datasets
    specs = expand(grid)
    assert sorted(s.run_dir.name for s in specs) == sorted(
        [f"{m}-s{seed}" for m in ("alterrec", "id_only", "nfrec_sum") for seed in (0, 1, 2)] + ["SASRec-s0"])
    base = asdict(load_config(PROJECT_ROOT / "configs/scientific.toml"))
    needs = {"alterrec": {}, "id_only": {("train", "reject_worse"): False},
             "nfrec_sum": {("train", "reject_worse"): False, ("model", "text_logits"): "dot"}}
    for method, own in needs.items():
        cfg = asdict(method_config(d, method))
        differ = {(section, key): value for section, values in cfg.items() for key, value in values.items()
                  if base[section][key] != value}
        assert differ == {("data", "path"): "data/synth-sparse", **({("train", "method"): method}
                                                                   if method != "alterrec" else {}), **own}, method


def test_a_run_made_under_an_earlier_range_is_stale_not_a_stop(tmp_path):
    """A finished run whose config.toml an earlier version accepted (alpha_sweep [0.0, 0.5, 0.5, 1.0], before
    repeated values were refused) stopped --dry-run, --report-only and every run of the grid, even once the grid
    was fixed, naming no file. It is a run made otherwise than the grid now asks: stale."""
    from alterrec_dist.common.config import to_toml

    grid = load_grid(one_dataset_grid(tmp_path / "grid.toml", 'methods = ["alterrec"]\n'
                                      'set = ["eval.alpha_sweep=[0.0,0.5,1.0]"]'))
    spec = expand(grid)[0]  # seed 0
    spec.run_dir.mkdir(parents=True)
    old = load_config(None, ["eval.alpha_sweep=[0.0,0.5,1.0]"])
    old.eval.alpha_sweep = [0.0, 0.5, 0.5, 1.0]  # as the earlier version wrote it
    (spec.run_dir / "config.toml").write_text(to_toml(old))
    (spec.run_dir / "summary.json").write_text("{}")
    assert settings_differ(spec)["eval.alpha_sweep"] == ([0.0, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0])


def test_a_sweep_value_with_a_slash_cannot_put_a_run_outside_its_dataset(tmp_path):
    grid = one_dataset_grid(tmp_path / "grid.toml", '''
        methods = []
        [[dataset.peer]]
        name = "P"
        command = ["true"]
        [[dataset.peer.sweep]]
        key = "path"
        values = ["../../../escape"]
    ''')
    with pytest.raises(ConfigError, match=r"the run directory .* of 'P' is not one name under its dataset's"):
        expand(load_grid(grid))


def test_a_variants_key_is_a_free_label_and_an_out_inside_a_dataset_is_refused(tmp_path):
    """A variants sweep's key names its points (dots and a section's name too), not a setting; an `out` inside a
    dataset started every run to fail, each after the runner had written its lock and log into the dataset."""
    for label in ("cos.v2", "train.lr"):  # a variants sweep's key is a free label, dots and a section's name too
        variants = one_dataset_grid(tmp_path / "variants.toml", f'''
            methods = ["id_only"]
            [[dataset.sweep]]
            key = "{label}"
            variants = {{ a = ["model.dropout=0.2"] }}
        ''')
        assert any(s.run_dir.name.endswith("=a-s0") for s in expand(load_grid(variants)))
    inside = one_dataset_grid(tmp_path / "inside.toml", 'methods = ["id_only"]\nset = ["data.path=%s"]' % tmp_path)
    with pytest.raises(ConfigError, match=r"out .*/runs lies in the data of dataset 'd'"):
        expand(load_grid(inside))
