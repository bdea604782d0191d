"""bench/late_fusion.py on real trained runs: each run alone is its served score, which equals its summary.json
(a run whose model and summary disagree is refused in one line, exit 2, no report); a pair's alpha is chosen on
validation among 0..1, so the fused validation NDCG@10 is never below either run's alone."""
import json

import pytest

from alterrec_dist.common.cli import run_cli
from bench import late_fusion
from tests.serve.test_export import run_with_summary_off, trained_run


def main(args: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        run_cli(late_fusion.main, args)
    return e.value.code


@pytest.mark.slow
def test_a_pair_is_fused_on_validation_and_reported(tmp_path_factory, tmp_path):
    alterrec = trained_run(tmp_path_factory, "alterrec")
    id_only = trained_run(tmp_path_factory, "id-only", ["train.method=id_only"])
    out = tmp_path / "LATE.md"
    assert main(["--pair", "AlterRec + ID only", str(alterrec), str(id_only),
                 "--reference", "AlterRec", str(alterrec), "--out", str(out)]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    pair = saved["pairs"]["AlterRec + ID only"][0]
    a = json.loads((alterrec / "summary.json").read_text())
    b = json.loads((id_only / "summary.json").read_text())
    # each run alone is what it serves: AlterRec at its chosen alpha (0.7; eval.alpha 0.3), ID only its ID score
    for m in ("hit@10", "ndcg@10"):
        assert pair["alone"]["a"]["test"][m] == pytest.approx(a["alpha"]["test"][m], abs=1e-6)
        assert pair["alone"]["b"]["test"][m] == pytest.approx(b["test"]["id"][m], abs=1e-6)
    assert pair["valid"]["ndcg@10"] >= max(pair["alone"][r]["valid"]["ndcg@10"] for r in ("a", "b"))
    assert pair["alpha"] in late_fusion.ALPHAS
    text = out.read_text()
    assert f"--pair 'AlterRec + ID only' {alterrec} {id_only}" in text
    assert "| AlterRec + ID only | 1 |" in text and "| AlterRec (reference: summary.json) | 1 |" in text
    assert saved["references"]["AlterRec"] == [{"valid": a["alpha"]["valid"], "test": a["alpha"]["test"]}]


def test_model_and_summary_that_disagree_are_refused(tmp_path_factory, tmp_path, capsys):
    copy = run_with_summary_off(trained_run(tmp_path_factory, "alterrec"), tmp_path, "test")
    out = tmp_path / "LATE.md"
    assert main(["--pair", "x", str(copy), str(copy), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(copy) in err and "test ndcg@10" in err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_runs_of_other_data_are_refused_before_scoring(tmp_path_factory, tmp_path, capsys):
    """A pair of runs on two datasets was scored in full, then failed as a tensor size mismatch (or, with two
    datasets of one size, was fused silently); their dataset.json records now refuse it first (reviewer finding)."""
    import shutil
    run = trained_run(tmp_path_factory, "alterrec")
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("checkpoints"))
    record = json.loads((other / "dataset.json").read_text())
    name = sorted(record["sha256"])[0]
    record["sha256"][name] = "0" * 64  # trained on a dataset whose file differs
    (other / "dataset.json").write_text(json.dumps(record))
    out = tmp_path / "LATE.md"
    assert main(["--pair", "x", str(run), str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {other}: trained on other data than {run} (not the same {name})"
    assert not out.exists()
