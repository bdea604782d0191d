"""The experiment runner: a real (tiny) grid through the normal driver, resumed, and reported."""
import json
import textwrap

import pytest

from alterrec_dist.common.errors import ConfigError
from alterrec_dist.experiments import main
from alterrec_dist.grid.grid_file import load_grid
from alterrec_dist.grid.plan import expand
from tests.tiny_data import tiny_dataset

pytestmark = pytest.mark.slow

PEER = '''
import argparse, json, pathlib
p = argparse.ArgumentParser(); p.add_argument("--seed"); p.add_argument("--out")
p.add_argument("--set", action="append", default=[]); a = p.parse_args()
m = {"hit@10": 0.5, "hit@20": 0.6, "ndcg@10": 0.3, "ndcg@20": 0.35, "mrr@20": 0.2}
if a.set == ["width=2"]:  # the better setting on validation (and worse on test)
    m = {**m, "ndcg@10": 0.31}
out = pathlib.Path(a.out); out.mkdir(parents=True, exist_ok=True)
(out / "result.json").write_text(json.dumps({"valid": m, "test": {**m, "hit@10": 0.4 if a.set else 0.5},
                                             "best_epoch": 1, "command": "peer",
                                             "resumed": (out / "resume.pth").exists()}))
'''


def write_grid(tmp_path):
    (tmp_path / "peer.py").write_text(PEER)
    tiny_dataset(tmp_path / "tiny")  # the runner's mechanics, not the methods' quality: each run is mostly start-up
    grid = tmp_path / "grid.toml"
    grid.write_text(textwrap.dedent(f'''
        title = "A tiny grid"
        out = "{tmp_path}/runs"
        report = "{tmp_path}/docs/RESULTS.md"
        images = "{tmp_path}/docs/img"
        jobs = 2
        seeds = [0]
        [[dataset]]
        name = "default"
        config = "configs/default.toml"
        methods = ["alterrec", "nfrec_sum", "id_only", "text_only"]
        set = ["data.path={tmp_path}/tiny", "train.m_max=3", "train.m_random=1", "train.m_gap=1", "train.k1=2",
               "train.k2=20", "train.global_batch_size=24", "model.dim=16"]
        method_set = {{ alterrec = ["eval.alpha_sweep=[0.0,0.5,1.0]"] }}
        select = ["logits"]
        [[dataset.sweep]]
        key = "train.k2"
        values = [10, 20]   # 20 is the grid's: it reuses the alterrec run
        method = "alterrec"
        [[dataset.sweep]]   # no method: every method that takes it (NFRec's one fused network does not)
        key = "logits"
        variants = {{ cosine = ["model.id_logits=cosine", "model.text_logits=cosine", "model.id_temperature=0.07",
                                "model.text_temperature=0.07"] }}
        [[dataset.peer]]
        name = "Peer"
        command = ["{{python}}", "{tmp_path}/peer.py"]
        [[dataset.peer.sweep]]
        key = "width"
        values = [2, 3]
        [[dataset.anchor]]
        name = "Published"
        "hit@10" = 0.9
        source = "somewhere"
    '''))
    return grid


def test_grid_runs_resumes_and_reports(tmp_path, capsys):
    grid_path = write_grid(tmp_path)
    specs = expand(load_grid(grid_path))
    assert len(specs) == 11  # 4 methods + 1 k2 point + cosine logits for 3 of the 4 methods + 1 peer, 2 tuned
    assert not any("nfrec_sum-logits" in str(s.run_dir) for s in specs)
    assert main(["--grid", str(grid_path)]) == 0
    assert all(s.done for s in specs)
    cmd = (tmp_path / "runs/default/alterrec-k2=10-s0/command.txt").read_text()
    assert "--set train.k2=10" in cmd and "--set train.method=alterrec" in cmd and "alpha_sweep" in cmd
    assert "alpha_sweep" not in (tmp_path / "runs/default/id_only-s0/command.txt").read_text()
    cmd = (tmp_path / "runs/default/text_only-logits=cosine-s0/command.txt").read_text()
    assert "--set model.text_logits=cosine --set model.id_temperature=0.07" in cmd

    report = (tmp_path / "docs/RESULTS.md").read_text()
    assert report.startswith("# A tiny grid\n")
    remake = f"`python -m alterrec_dist.experiments --grid {grid_path} --report-only` rewrites this file"
    assert remake in report.splitlines()[2]  # the command that remakes it, whichever runner wrote it
    for heading in ("Table 1", "Table 2", "Fig. 3", "Fig. 5", "Fig. 6", "Fig. 7", "### Runs"):
        assert heading in report, heading
    assert "| Published (published) | – | 0.9000 |" in report
    # its three configurations tried, each one's validation score, the one chosen
    assert "| Peer | 3 | base: 0.3000, width = 2: 0.3100, width = 3: 0.3000 | **width = 2** |" in report
    assert "| Peer (peer, RecBole) | 1 | 0.4000 |" in report  # the chosen setting's test, though worse
    assert "| k2 | 10 | 20 |" in report
    for method in ("AlterRec (fused)", "ID only (id)", "Text only (text)"):
        assert f"| {method} | logits = cosine | 1 |" in report, method
    # Each method chose base or cosine on validation, and Table 1 reports the chosen run's test metrics.
    chosen = [line for line in report.splitlines() if line.startswith("| ID only | 2 | base: ")]  # 2 tried
    assert len(chosen) == 1 and "logits = cosine: " in chosen[0], chosen
    scores = dict(part.split(": ") for part in chosen[0].split(" | ")[2].split(", "))
    run = "id_only-s0" if float(scores["base"]) >= float(scores["logits = cosine"]) else "id_only-logits=cosine-s0"
    overrides = "none" if run == "id_only-s0" else "`model.id_logits=cosine`"
    assert f"| **{'base' if run == 'id_only-s0' else 'logits = cosine'}** | {overrides}" in chosen[0], chosen
    summary = json.loads((tmp_path / f"runs/default/{run}/summary.json").read_text())
    assert f"| ID only (id) | 1 | {summary['test']['id']['hit@10']:.4f} |" in report
    pngs = sorted(p.name for p in (tmp_path / "docs/img").iterdir())
    assert pngs == ["default_alterrec_curves.png", "default_longtail.png", "default_nfrec_imbalance.png",
                    "default_sensitivity.png"]

    # A half-finished run (no summary.json) goes on from its newest checkpoint, a half-finished peer from the
    # state it left in its directory; the finished ones are not run.
    (tmp_path / "runs/default/id_only-s0/summary.json").unlink()
    peer_dir = tmp_path / "runs/default/peers/Peer-s0"
    (peer_dir / "result.json").unlink()
    (peer_dir / "resume.pth").write_text("")
    lines = (tmp_path / "runs/default/id_only-s0/metrics.jsonl").read_text()
    before = (tmp_path / "runs/default/alterrec-s0/summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["--grid", str(grid_path)]) == 0
    out = capsys.readouterr().out
    assert "9 of 11 runs already done; 2 to run, 0 under way here" in out and "id_only-s0" in out
    assert json.loads((peer_dir / "result.json").read_text())["resumed"]  # its directory was left to it
    assert (tmp_path / "runs/default/id_only-s0/summary.json").exists()
    assert "resuming from" in (tmp_path / "runs/default/id_only-s0.log").read_text()  # not started again
    assert (tmp_path / "runs/default/id_only-s0/metrics.jsonl").read_text() == lines
    assert (tmp_path / "runs/default/alterrec-s0/summary.json").stat().st_mtime_ns == before

    # The report alone: rewritten from the run directories, nothing trained.
    (tmp_path / "docs/RESULTS.md").unlink()
    assert main(["--grid", str(grid_path), "--report-only"]) == 0
    remade = (tmp_path / "docs/RESULTS.md").read_text()
    assert remade.split("\n", 3)[3] == report.split("\n", 3)[3] and remake in remade.splitlines()[2]


def test_bad_grid_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="grid file not found"):
        load_grid(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[dataset]]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: \[\[dataset\]\] entry misses key 'config'"):
        load_grid(bad)


GOOD_DATASET = '[[dataset]]\nname = "x"\nconfig = "c.toml"\nmethods = ["alterrec", "id_only"]\n'


@pytest.mark.parametrize("text, message", [
    # each was a traceback, or was silently ignored, or failed only after other runs had trained
    ("seeds = 3\n" + GOOD_DATASET, "bad.toml: seeds must be a list, got 3"),
    ("seed = [5]\n" + GOOD_DATASET, "bad.toml: unknown key 'seed'"),
    ("jobs = 0\n" + GOOD_DATASET, "bad.toml: jobs must be >= 1, got 0"),
    ("seeds = [0, -1]\n" + GOOD_DATASET, "bad.toml: seeds must be a list of seeds"),
    (GOOD_DATASET + 'sets = ["train.k1=3"]\n', "bad.toml: [[dataset]] 'x': unknown key 'sets'"),
    (GOOD_DATASET + 'rounds = "two"\n', "bad.toml: [[dataset]] 'x': rounds must be an integer, got 'two'"),
    (GOOD_DATASET.replace('"id_only"', '"alterek"'), "bad.toml: [[dataset]] 'x': unknown method(s) 'alterek'"),
    (GOOD_DATASET + '[[dataset.sweep]]\nvalues = [1]\n',
     "bad.toml: [[dataset]] 'x': a [[dataset.sweep]] entry without its key"),
])
def test_grid_keys_and_types_are_checked_before_any_run(tmp_path, text, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_grid(bad)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_jobs_below_one_is_refused(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text(GOOD_DATASET)
    with pytest.raises(ConfigError, match="--jobs must be >= 1, got 0"):
        main(["--grid", str(grid), "--jobs", "0", "--dry-run"])
