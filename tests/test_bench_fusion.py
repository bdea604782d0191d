"""bench/fusion_rules.py on a real trained AlterRec run: its linear rule is the engine's (summary.json's
fused metrics at the chosen alpha), every rule is reported, and a run whose model and summary disagree
is refused in one line, exit 2, with no report written."""
import json

import pytest
import torch

from alterrec_dist.common.cli import run_cli
from bench import fusion_rules
from tests.serve.test_export import run_with_summary_off, trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory, "alterrec")


def test_linear_rule_is_the_engines_and_every_rule_is_reported(run, tmp_path):
    results = fusion_rules.run_rules(run)
    chosen = json.loads((run / "summary.json").read_text())["alpha"]
    assert results["linear"]["alpha"] == chosen["chosen"]
    for split in ("valid", "test"):
        for m in ("hit@10", "ndcg@10"):
            assert results["linear"][split][m] == pytest.approx(chosen[split][m], abs=1e-6)
    assert set(results) == set(fusion_rules.RULES)
    # binned's coordinate ascent starts at linear's choice, so on validation it can only match or beat it
    assert results["binned"]["valid"]["ndcg@10"] >= results["linear"]["valid"]["ndcg@10"]

    out = tmp_path / "FUSION.md"
    with pytest.raises(SystemExit) as e:
        run_cli(fusion_rules.main, [str(run), "--out", str(out)])
    assert e.value.code == 0
    text = out.read_text()
    assert f"python -m bench.fusion_rules {run}" in text
    assert all(f"| {rule} |" in text for rule in fusion_rules.RULES) and "Best on validation" in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["runs"][str(run)]["linear"]["alpha"] == chosen["chosen"]


def test_model_and_summary_that_disagree_are_refused(run, tmp_path, capsys):
    copy = run_with_summary_off(run, tmp_path, "test")
    out = tmp_path / "FUSION.md"
    with pytest.raises(SystemExit) as e:
        run_cli(fusion_rules.main, [str(copy), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert str(copy) in err and "test ndcg@10" in err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_ranks_follow_the_engines_order_where_scores_tie():
    # items 0-2 share the target's score (the text network scores items with the same text the same): the
    # engine puts the smaller ids first, so target 2 ranks 3rd and target 0 1st; item 3 scores below
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    assert fusion_rules.hit_ndcg(scores, torch.tensor([2, 2]))["ndcg@10"] == pytest.approx(0.5)
    assert fusion_rules.hit_ndcg(scores, torch.tensor([0, 0]))["ndcg@10"] == pytest.approx(1.0)
    # and rrf's per-item ranks: the same order, ranks from 1
    rr = fusion_rules.reciprocal_rank(scores[:1])
    assert torch.equal(rr, 1 / (fusion_rules.RRF_K + torch.tensor([[1.0, 2.0, 3.0, 4.0]])))
