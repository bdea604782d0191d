"""bench/joint_finetune.py on a real trained AlterRec run: epoch 0 is the run's saved model (its summary.json's
figures), a joint epoch changes both networks, the report and its command are written, and a run whose model
and summary disagree is refused in one line, exit 2, with no report written."""
import json

import pytest

from alterrec_dist.common.cli import run_cli
from bench import joint_finetune
from tests.serve.test_export import run_with_summary_off, trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory, "alterrec")


def test_starts_from_the_saved_model_and_trains_both_networks(run, tmp_path):
    out = tmp_path / "JOINT.md"
    with pytest.raises(SystemExit) as e:
        run_cli(joint_finetune.main, [str(run), "--lr", "1e-2", "--epochs", "1", "--out", str(out)])
    assert e.value.code == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    start, after = saved["lr"]["0.01"]
    summary = json.loads((run / "summary.json").read_text())
    assert start["alpha"] == summary["alpha"]["chosen"]
    assert start["test"]["ndcg@10"] == pytest.approx(summary["alpha"]["test"]["ndcg@10"], abs=1e-6)
    # one joint epoch at a large lr moves each network's own validation score
    assert after["valid_id"] != start["valid_id"] and after["valid_text"] != start["valid_text"]
    assert after["loss"] > 0
    text = out.read_text()
    assert f"python -m bench.joint_finetune {run} --lr 1e-2" in text and "| 0.01 | 1 |" in text


def test_model_and_summary_that_disagree_are_refused(run, tmp_path, capsys):
    copy = run_with_summary_off(run, tmp_path, "valid")
    out = tmp_path / "JOINT.md"
    with pytest.raises(SystemExit) as e:
        run_cli(joint_finetune.main, [str(copy), "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the evaluation's progress bars
    assert e.value.code == 2 and err.startswith("error: ")
    assert str(copy / "summary.json") in err and "valid ndcg@10" in err
    assert not out.exists() and not out.with_suffix(".json").exists()
