"""Batch scoring on real trained runs: metrics EQUAL to summary.json, output, streaming, Ray Data."""
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tqdm import tqdm

from alterrec_dist import batch_score, export
from alterrec_dist.common.errors import ConfigError
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.serve import batch_runners
from alterrec_dist.serve.search import Searcher
from tests.serve.test_export import cli, trained_run
from alterrec_dist.serve.batch_input import iter_tables, local_batches, session_columns, table_to_rows
from alterrec_dist.serve.batch_output import OrderedMetrics, ParquetOut, compare, score_rows
from alterrec_dist.serve.batch_runners import run_local
from alterrec_dist.serve.export_dir import load_export, load_scoring_model
from alterrec_dist.serve.from_run import load_run
from alterrec_dist.serve.queries import encode_sessions


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory, "alterrec")


@pytest.fixture(scope="module")
def scored(run, tmp_path_factory):
    """`--split test` in process: (output table, the metrics report)."""
    d = tmp_path_factory.mktemp("scored")
    code = batch_score.main(["--run", str(run), "--split", "test", "--out", str(d / "test.parquet"),
                             "--metrics-out", str(d / "m.json"), "--no-ray"])
    assert code == 0
    return pq.read_table(d / "test.parquet"), json.loads((d / "m.json").read_text())


def assert_equals_summary(report: dict, run, split: str = "test") -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert report["metrics"] == summary[split]  # every kind, every metric and n: exact float equality
    if split == "test":
        assert report["longtail"] == summary["longtail"]
    assert report["summary_equal"] is True and report["summary_differences"] == []


def test_metrics_equal_summary_exactly(scored, run):
    """(c) Hits/NDCG/MRR@10/20 of id, text, fused and fused@0.7 == summary.json's test metrics."""
    _, report = scored
    assert set(report["metrics"]) == {"id", "text", "fused", "fused@0.7"}
    assert_equals_summary(report, run)


def test_the_metrics_report_records_what_made_the_scores(scored, run):
    """It held the metrics alone: no run, split, top or model (reviewer finding); a run records its config, an
    export its provenance."""
    _, report = scored
    model = json.loads((run / "model" / "manifest.json").read_text())
    assert report["command"][:3] == ["python", "-m", "alterrec_dist.batch_score"] and "--split" in report["command"]
    assert report["input"]["split"] == "test" and report["top"] == 20 and report["served"] == "fused@0.7"
    assert report["model"]["run"]["path"] == str(run.resolve())
    assert report["model"]["run"]["model_files_sha256"] == model["files"]
    assert report["input"]["data"] == report["model"]["dataset"]["path"]


def test_valid_split_equals_summary_too(run, tmp_path, capsys):
    capsys.readouterr()
    assert batch_score.main(["--run", str(run), "--split", "valid", "--out", str(tmp_path / "v.parquet"),
                             "--metrics-out", str(tmp_path / "m.json"), "--top", "3"]) == 0
    assert_equals_summary(json.loads((tmp_path / "m.json").read_text()), run, "valid")
    # the output says which kind its top lists rank by: the alpha the run chose (0.7), not eval.alpha (0.3)
    out = capsys.readouterr().out.splitlines()
    assert "top 3 by fused@0.7 ->" in out[0] and out[-1] == f"metrics -> {tmp_path / 'm.json'}"
    assert [line.split()[0] for line in out if line.endswith("(served: the top lists' score)")] == ["fused@0.7"]


@pytest.mark.slow
def test_a_resume_that_changes_the_eval_shape_scores_as_the_metrics_were_measured(run, tmp_path):
    """eval.batch_size and eval.tile_rows may change on --resume; batch scoring then read config.toml's new ones,
    not those the summary's metrics were measured in, and printed NOT equal (a reviewer's cosine run: 10 of 277
    test ranks differed, float ties that tiles of another width round otherwise)."""
    import os
    import subprocess
    import sys

    from alterrec_dist.common.config import PROJECT_ROOT

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WORLD_SIZE", "RANK", "MASTER_ADDR")}
    resumed = subprocess.run([sys.executable, "-m", "alterrec_dist.train", "--launcher", "torchrun", "--resume",
                              str(copy), "--set", "eval.tile_rows=7", "--set", "eval.batch_size=100"],
                             cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env=env,
                             stdin=subprocess.DEVNULL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "tile_rows = 7" in (copy / "config.toml").read_text()  # as the resume asked
    bundle = load_run(copy)
    assert (bundle.eval_batch_size, bundle.tile_rows) == (512, 0)  # as the run measured its metrics
    assert batch_score.main(["--run", str(copy), "--split", "test", "--out", str(tmp_path / "t.parquet"),
                             "--metrics-out", str(tmp_path / "m.json")]) == 0
    assert_equals_summary(json.loads((tmp_path / "m.json").read_text()), copy)


def test_output_rows_ranks_and_top_lists(scored, run):
    table, _ = scored
    data = Dataset(load_run(run).provenance["dataset"]["path"])
    test = data.read_sessions("test")
    assert table.num_rows == test.num_rows == 1976
    assert table["example"].to_pylist() == list(range(1976))
    assert table["session"].to_pylist() == test["session"].to_pylist()
    assert table["target"].to_pylist() == test["target"].to_pylist()
    items = np.stack(table["items"].to_numpy(zero_copy_only=False))
    assert items.shape == (1976, 20)
    ids = data.items()["item_id"].to_pylist()
    assert table["item_ids"].to_pylist() == [[ids[i] for i in row] for row in items]
    scores = np.stack(table["scores"].to_numpy(zero_copy_only=False))
    assert (np.diff(scores, axis=1) <= 0).all()
    parts = [np.stack(table[c].to_numpy(zero_copy_only=False)) for c in ("id_scores", "text_scores")]
    # the top lists are the served score's: the run chose alpha 0.7 on validation (eval.alpha is 0.3)
    assert json.loads((run / "summary.json").read_text())["alpha"]["chosen"] == 0.7
    np.testing.assert_allclose(scores, 0.7 * parts[0] + 0.3 * parts[1], rtol=1e-5, atol=1e-6)
    # the served kind's rank of the target agrees with where it sits in the top-20
    rank = table["rank_fused@0.7"].to_numpy()
    target = table["target"].to_numpy()
    for r, t, row in zip(rank, target, items):
        if r <= 20:
            assert row[r - 1] == t
        else:
            assert t not in row


def test_input_without_targets_streams_in_bounded_batches(scored, run, tmp_path, monkeypatch):
    """Sessions without `target`, over two files of several row groups: the same top lists, no metrics,
    and the files are only ever read in batches of at most eval.batch_size rows."""
    table, _ = scored
    test = Dataset(load_run(run).provenance["dataset"]["path"]).read_sessions("test").drop(["target"])
    pq.write_table(test.slice(0, 700), tmp_path / "a.parquet", row_group_size=300)
    pq.write_table(test.slice(700), tmp_path / "b.parquet", row_group_size=250)
    seen = []
    real = score_rows

    def spy(bundle, rows, top, has_target):
        seen.append(len(rows))
        return real(bundle, rows, top, has_target)

    def whole_file(*a, **k):
        raise AssertionError("read a whole file")

    def load_then_trap(**spec):  # the model's own files may be read whole; the input files may not
        bundle = load_scoring_model(**spec)
        monkeypatch.setattr(pq, "read_table", whole_file)
        monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
        return bundle
    monkeypatch.setattr(batch_runners, "score_rows", spy)
    monkeypatch.setattr(batch_score, "load_scoring_model", load_then_trap)
    code = batch_score.main(["--run", str(run), "--input", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"),
                             "--out", str(tmp_path / "out.parquet"), "--metrics-out", str(tmp_path / "m.json")])
    monkeypatch.undo()
    assert code == 0
    assert max(seen) <= 512 and sum(seen) == 1976
    out = pq.read_table(tmp_path / "out.parquet")
    assert "target" not in out.column_names and not any(c.startswith("rank_") for c in out.column_names)
    assert out["example"].to_pylist() == list(range(1976))
    assert out["items"].to_pylist() == table["items"].to_pylist()
    assert "metrics" not in json.loads((tmp_path / "m.json").read_text())


def test_top_lists_are_the_exact_search(scored, run):
    table, _ = scored
    bundle = load_run(run)
    files = Dataset(bundle.provenance["dataset"]["path"]).session_files("test")
    first = 0
    for t in iter_tables(files, session_columns(files), bundle.eval_batch_size):
        rows = table_to_rows(t, first, bundle.max_len, bundle.num_items, "t")
        q = encode_sessions(bundle, local_batches(rows, bundle.eval_batch_size, bundle.world))
        _, items, _ = Searcher(bundle).search(q, 20)
        expected = items[:len(rows)].numpy()
        got = np.stack(table["items"].slice(first, len(rows)).to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(got, expected)
        first += len(rows)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(run, tmp_path, capsys):
    out = tmp_path / "out.parquet"
    code, _, err = cli("batch_score", ["--run", str(run), "--input", str(tmp_path / "nope.parquet"), "--out", str(out)],
                       capsys)
    assert code == 2 and "input not found" in err and err.count("\n") == 1
    pq.write_table(pa.table({"history": [[1, 2], [3, 5000]], "target": [1, 2]}), tmp_path / "bad.parquet")
    code, _, err = cli("batch_score", ["--run", str(run), "--input", str(tmp_path / "bad.parquet"), "--out", str(out)],
                       capsys)
    assert code == 2 and "history item outside 0..1999" in err and err.count("\n") == 1
    pq.write_table(pa.table({"items": [[1, 2]]}), tmp_path / "nohist.parquet")
    code, _, err = cli("batch_score", ["--run", str(run), "--input", str(tmp_path / "nohist.parquet"), "--out", str(out)],
                       capsys)
    assert code == 2 and "no `history` column" in err
    code, _, err = cli("batch_score", ["--run", str(tmp_path), "--split", "test", "--out", str(out)], capsys)
    assert code == 2 and "no config.toml" in err
    assert list(tmp_path.glob("*out*")) == []


def run_dataset_copy(run: Path, out: Path) -> Path:
    return Path(shutil.copytree(json.loads((run / "dataset.json").read_text())["path"], out))


def test_outputs_beside_what_is_read_can_be_written_again_and_none_goes_inside_it(run, tmp_path, capsys):
    """An output inside an export's or a dataset's directory was written once and then refused on every rerun
    ("lies in the input"), and the next `export --overwrite` or `prepare --overwrite` deleted it without a word.
    It is refused from the first time now; one beside them is written again and again, and a --metrics-out beside
    a new --out directory is written (it was refused: "its directory does not exist")."""
    exp, data = tmp_path / "exp", run_dataset_copy(run, tmp_path / "ds")
    assert cli("export", ["--run", str(run), "--out", str(exp)], capsys)[0] == 0
    for n in range(2):
        argv = ["--export", str(exp), "--data", str(data), "--split", "test", "--out", str(tmp_path / "s.parquet"),
                "--metrics-out", str(tmp_path / "metrics.json"), "--overwrite", "--no-ray"]
        assert cli("batch_score", argv, capsys)[0] == 0, n
    assert_equals_summary(json.loads((tmp_path / "metrics.json").read_text()), run)
    argv = ["--run", str(run), "--split", "test", "--out", str(tmp_path / "new" / "x" / "s.parquet"),
            "--metrics-out", str(tmp_path / "new" / "x" / "m.json"), "--no-ray"]
    assert cli("batch_score", argv, capsys)[0] == 0 and (tmp_path / "new" / "x" / "m.json").is_file()
    for out, metrics, inside in [(data / "scores.parquet", None, data), (tmp_path / "t.parquet", exp / "m.json", exp)]:
        argv = ["--export", str(exp), "--data", str(data), "--split", "test", "--out", str(out), "--no-ray"]
        code, _, err = cli("batch_score", argv + (["--metrics-out", str(metrics)] if metrics else []), capsys)
        assert code == 2 and f"lies in {inside}, which its next --overwrite replaces whole" in err, err
        assert not out.exists() and not (metrics and metrics.exists())
    code, _, err = cli("batch_score", ["--export", str(exp), "--data", str(data), "--split", "test", "--out",
                                       str(exp / "items.parquet"), "--overwrite", "--no-ray"], capsys)
    assert code == 2 and f"holds the input {exp / 'items.parquet'}" in err


def test_export_scored_on_a_damaged_dataset_is_one_line(run, tmp_path, capsys):
    """`--export E --split test --data D` compared D's item ids with a dataset never checked: a missing
    items.parquet was a FileNotFoundError traceback, exit 1."""
    exp, data = tmp_path / "exp", run_dataset_copy(run, tmp_path / "ds")
    assert cli("export", ["--run", str(run), "--out", str(exp)], capsys)[0] == 0
    (data / "items.parquet").unlink()
    code, _, err = cli("batch_score", ["--export", str(exp), "--data", str(data), "--split", "test",
                                       "--out", str(tmp_path / "s.parquet"), "--no-ray"], capsys)
    assert code == 2 and err.startswith(f"error: {data / 'items.parquet'}") and err.count("\n") == 1, err


def test_an_exports_moved_dataset_says_to_pass_data(run, tmp_path, capsys):
    """The export's recorded dataset gone: the error said only "no dataset manifest (make one with prepare or
    synth)", not that --data names where it is now."""
    exp = tmp_path / "exp"
    assert cli("export", ["--run", str(run), "--out", str(exp)], capsys)[0] == 0
    manifest = json.loads((exp / "manifest.json").read_text())
    manifest["dataset"]["path"] = str(tmp_path / "moved-away")
    (exp / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli("batch_score", ["--export", str(exp), "--split", "test", "--out", str(tmp_path / "s.parquet"),
                                       "--no-ray"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {tmp_path / 'moved-away'}") and err.rstrip().endswith(
        f"the export {exp} names it: pass --data with where it is now")


def test_indices_of_any_number_type_are_read_and_ids_are_refused(tmp_path):
    """Numbers are read as indices: a whole float target (pandas' after a NaN) and a fixed-size list history, as
    before the ids were refused; text (an id) and booleans (a flag) are refused, which were cast and scored."""
    from alterrec_dist.common.errors import DataError
    from alterrec_dist.serve.batch_input import check_input

    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"history": pa.array([[1, 2], [3, 4]], pa.list_(pa.uint16(), 2)),
                             "target": pa.array([4.0, 5.0])}), numbers)
    assert check_input([numbers], session_columns([numbers]), num_items=10) == 2
    decimals = tmp_path / "decimals.parquet"  # as some SQL exports write whole numbers
    pq.write_table(pa.table({"history": pa.array([[1, 2]], pa.list_(pa.decimal128(38, 0))),
                             "target": pa.array([3], pa.decimal128(38, 0))}), decimals)
    assert check_input([decimals], session_columns([decimals]), num_items=10) == 1
    for name, column, kind in [("history", pa.array([["1", "2"]], pa.list_(pa.large_string())), "large_string"),
                               ("target", pa.array([True]), "bool")]:  # an id, a "clicked" flag
        other = tmp_path / f"{kind}.parquet"
        pq.write_table(pa.table({"history": pa.array([[1, 2]]), name: column}), other)
        with pytest.raises(DataError, match=f"column {name} holds {kind}, not item indices"):
            session_columns([other])


def test_a_run_whose_config_an_earlier_version_accepted_still_serves(run, tmp_path):
    """A run trained when repeated alpha_sweep values (or a temperature below 1e-4, or dim 1) were accepted could
    no longer be served from its directory (its export still could): its config.toml was held to today's ranges."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    config = copy / "config.toml"
    text = config.read_text()
    assert "alpha_sweep = [0.7]" in text and "text_temperature = 0.5" in text
    config.write_text(text.replace("alpha_sweep = [0.7]", "alpha_sweep = [0.7, 0.7]"))
    assert load_run(copy).served == "fused@0.7"
    # a value no version took (a damaged file) is still refused, in one line naming it: not a ZeroDivisionError
    config.write_text(text.replace("text_temperature = 0.5", "text_temperature = 0.0"))
    with pytest.raises(ConfigError, match=rf"{config}: model.text_temperature must be a finite number > 0"):
        load_run(copy)


def test_metrics_detect_a_different_model(run, tmp_path):
    """The comparison can fail: a wrong alpha changes the fused metrics and is reported unequal."""
    bundle = load_run(run)
    bundle.weights["fused"] = [0.31, 0.69]
    metrics = OrderedMetrics(bundle.kinds, bundle.eval_batch_size, bundle.popularity, bundle.longtail_bins)
    out = ParquetOut(tmp_path / "o.parquet")
    run_local(bundle, Dataset(bundle.provenance["dataset"]["path"]).session_files("test"), out, 20, metrics,
              tqdm(disable=True))
    out.commit()
    summary = json.loads((run / "summary.json").read_text())
    diffs = compare(metrics.finish(), summary, "test")
    assert diffs and all(d.startswith(("fused/", "longtail fused")) for d in diffs)


def test_scoring_shows_its_progress_in_sessions(run, tmp_path, monkeypatch, capsys):
    """batch_score said nothing until the end: 1 min 46 s for 118,560 sessions in a reviewer's run."""
    bars = []

    class Recorded(tqdm):  # as on a terminal: a bar where stderr is not one is off
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False})
            bars.append(self)

    monkeypatch.setattr(batch_runners, "tqdm", Recorded)
    argv = ["--run", str(run), "--split", "test", "--out", str(tmp_path / "o.parquet"), "--no-ray"]
    assert cli("batch_score", argv, capsys)[0] == 0
    sessions = pq.read_metadata(tmp_path / "o.parquet").num_rows
    assert [(bar.desc, bar.total, bar.n) for bar in bars] == [("scoring", sessions, sessions)]


def test_ray_with_a_gpu_index_gives_each_actor_its_one_gpu_and_loads_nothing_on_a_gpu_here(run, tmp_path,
                                                                                           monkeypatch):
    """--ray --device cuda:1 crashed every actor (Ray shows each its one GPU, as cuda:0) and loaded a model copy on
    a GPU in this process, which only reads the model's metadata under Ray (reviewer finding). Ray's actors need
    GPUs, so a spy takes the place of the Ray runner: what it is handed is what the actors would load."""
    class Handed(Exception):
        pass

    def spy(spec, bundle, *rest):
        raise Handed(spec, bundle.device)

    monkeypatch.setattr(batch_runners, "run_ray", spy)
    with pytest.raises(Handed) as handed:
        batch_score.main(["--run", str(run), "--split", "test", "--out", str(tmp_path / "o.parquet"), "--ray",
                          "--device", "cuda:1"])
    spec, here = handed.value.args
    assert spec == {"run": str(run), "export": None, "data": None, "device": "cuda"} and here == torch.device("cpu")
    assert not (tmp_path / "o.parquet").exists()


# -- slow: Ray Data, a 2-process run with the transformer encoder, NFRec and id_only -------------------

@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="Ray finds this machine's GPU")
def test_ray_with_cuda_on_a_cluster_without_gpus_is_one_line(run, tmp_path, capsys):
    """This process no longer needs a GPU of its own for --ray --device cuda (its model loads on the CPU), so a
    cluster without one is refused here: Ray Data waited for the actors' GPUs without a word."""
    pytest.importorskip("ray")
    code, _, err = cli("batch_score", ["--run", str(run), "--split", "test", "--out", str(tmp_path / "o.parquet"),
                                       "--ray", "--device", "cuda"], capsys)
    assert code == 2 and err.splitlines()[-1] == ("error: --device cuda: the Ray cluster has no GPU for the scoring "
                                                  "actors (--device cpu scores on its CPUs)")  # after Ray's own lines
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own DataContext deprecations
def test_ray_data_path_equals_summary_and_in_process_output(scored, run, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    actors, run_ray = [], batch_runners.run_ray
    monkeypatch.setattr(batch_runners, "run_ray", lambda *a: actors.append(a[6]) or run_ray(*a))
    code = batch_score.main(["--run", str(run), "--split", "test", "--out", str(tmp_path / "ray.parquet"),
                             "--metrics-out", str(tmp_path / "m.json"), "--ray", "--ray-actors", "1"])
    assert code == 0
    assert actors == [1]  # as asked (with --device cuda, each actor is a GPU)
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["ray"] is True
    assert_equals_summary(report, run)
    table, _ = scored
    assert pq.read_table(tmp_path / "ray.parquet").equals(table)


@pytest.mark.slow
@pytest.mark.parametrize("name,overrides,nproc", [
    ("w2-transformer", ["model.encoder=transformer", "model.text_hidden=32", "model.item_layernorm=true",
                        "model.dim=32"], 2),
    ("nfrec-concat", ["train.method=nfrec_concat"], 1),
    ("id-only", ["train.method=id_only"], 1),
])
def test_other_runs_equal_summary(tmp_path_factory, tmp_path, capsys, name, overrides, nproc):
    """A 2-process run (shard layout, per-rank eval slices, transformer, MLP and LayerNorm rows),
    NFRec (one network, parts) and id_only: export, then batch metrics from the export == summary."""
    run = trained_run(tmp_path_factory, name, overrides, nproc)
    assert export.main(["--run", str(run), "--out", str(tmp_path / "export")]) == 0
    assert batch_score.main(["--export", str(tmp_path / "export"), "--split", "test", "--out",
                             str(tmp_path / "o.parquet"), "--metrics-out", str(tmp_path / "m.json")]) == 0
    assert_equals_summary(json.loads((tmp_path / "m.json").read_text()), run)
    bundle = load_export(tmp_path / "export")
    assert bundle.world == nproc
    if name == "nfrec-concat":
        assert bundle.weights["fused"] == [1.0, 1.0] and bundle.scales == [1.0, 1.0]
    if name == "id-only":  # it serves its own score: no kind weighs in its never-trained text network
        assert bundle.weights == {"id": [1.0, 0.0], "fused": [1.0, 0.0]}
        test = json.loads((run / "summary.json").read_text())["test"]
        assert set(test) == {"id", "fused"} and test["fused"] == test["id"]
        scored = pq.read_table(tmp_path / "o.parquet")
        assert scored["text_scores"].null_count == len(scored) > 0  # not the untrained text network's scores
        assert scored["id_scores"].equals(scored["scores"])
        # recommend shows the score it ranks by and the ID score it is, not the text network's
        code, out, _ = cli("recommend", ["--export", str(tmp_path / "export"), "--session",
                                         ",".join(bundle.item_ids[:3])], capsys)
        header, *rows = out.splitlines()[1:]
        assert code == 0 and header.split() == ["rank", "item_id", "fused", "id", "item", "text"] and len(rows) == 10
        assert all(r.split()[2] == r.split()[3] for r in rows)
