"""Export of a real trained run: files and manifest, fused-index equality with the engine, round trip.

The runs are real trainings (`python -m alterrec_dist.train --launcher torchrun`) on shards/default's
2,000 items, text features and test split, with the train split cut to its first rows so a run takes
seconds. `trained_run` caches each run for the pytest session (the other export test modules reuse it).
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from alterrec_dist import export
from alterrec_dist.common import files
from alterrec_dist.common.config import PROJECT_ROOT, load_config
from alterrec_dist.common.errors import DataError
from alterrec_dist.common.files import file_sha256
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.data.layout import DatasetWriter
from alterrec_dist.data.reader import SessionReader
from alterrec_dist.eval.evaluate import Scorer, count_above_target, kind_weights, session_queries
from alterrec_dist.model.networks import build_networks
from alterrec_dist.parallel.comm import Comm
from alterrec_dist.parallel.saved import load_model
from alterrec_dist.parallel.table import ShardedItemTable
from alterrec_dist.serve import export_dir
from alterrec_dist.serve.export_dir import load_export, write_export
from alterrec_dist.serve.from_run import load_run, served_kind
from alterrec_dist.serve.queries import Queries, encode_sessions, session_batch

PY = sys.executable
SOURCE = PROJECT_ROOT / "shards" / "default"
TRAIN_ROWS = 3072
# a text logit scale != 1, alpha != 0.5 and a swept kind, so every weight and scale is exercised
# The paper's settings (the default's item LayerNorm puts scores near 100, past the 1e-6 absolute
# tolerances below) and 12 steps an epoch.
BASE = ["train.m_max=2", "model.text_temperature=0.5", "eval.alpha=0.3", "eval.alpha_sweep=[0.7]",
        "eval.batch_size=512", "model.item_layernorm=false", "train.global_batch_size=256"]


def small_default(base: Path) -> Path:
    """shards/default with its train split cut to the first TRAIN_ROWS rows (items, features, valid
    and test splits unchanged)."""
    out = base / "default-small"
    return out if (out / "manifest.json").exists() else copy_dataset(SOURCE, out, TRAIN_ROWS)


def copy_dataset(source: Path, out: Path, train_rows: int | None = None, features: np.ndarray | None = None,
                 item_ids: list[str] | None = None) -> Path:
    """A new dataset (its own manifest and checksums) from `source`: its train split cut to `train_rows`, its text
    features replaced by `features`, its item ids by `item_ids`."""
    src = Dataset(source)
    items = src.items()
    with DatasetWriter(out) as w:
        for split in ("train", "valid", "test"):
            t = src.read_sessions(split)
            if split == "train" and train_rows is not None:
                t = t.slice(0, train_rows)
            w.add_sessions(split, t["history"], t["target"].to_numpy(), t["user"].to_pylist(), t["session"].to_pylist())
        w.set_items(items["item_id"].to_pylist() if item_ids is None else item_ids, items["text"].to_pylist())
        w.add_text_features(src.text_features() if features is None else features)
        w.set_has_text(src.has_text())
        w.commit(source={"kind": "subset", "of": str(source), "train_rows": train_rows}, text_model="copied")
    return out


def trained_run(tmp_path_factory, name: str, overrides: list[str] = (), nproc: int = 1) -> Path:
    """A real training run on the small default data, trained once per pytest session."""
    base = tmp_path_factory.getbasetemp()
    run = base / "export-runs" / name
    if (run / "summary.json").exists():
        return run
    data = small_default(base)
    sets = [f"data.path={data}", f"trainer.num_workers={nproc}", *BASE, *overrides]
    launcher = [PY, "-m", "alterrec_dist.train"] if nproc == 1 else [
        PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "alterrec_dist.train"]
    cmd = [*launcher, "--launcher", "torchrun", *[a for s in sets for a in ("--set", s)], "--out", str(run)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WORLD_SIZE", "RANK", "MASTER_ADDR")}
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900, env=env,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def run_with_summary_off(run: Path, tmp_path: Path, split: str) -> Path:
    """A copy of `run` (model and files, no checkpoints) whose summary.json's chosen-alpha ndcg@10 on `split` is
    0.01 off what its model scores: a model and summary that are not one run."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    summary = json.loads((copy / "summary.json").read_text())
    summary["alpha"][split]["ndcg@10"] += 0.01
    (copy / "summary.json").write_text(json.dumps(summary))
    return copy


def cli(module: str, args: list[str], capsys) -> tuple[int, str, str]:
    """Run a CLI's main through run_cli in this process: (exit code, stdout, stderr)."""
    from alterrec_dist.common.cli import run_cli
    mod = __import__(f"alterrec_dist.{module}", fromlist=["main"])
    capsys.readouterr()  # drop what the test printed before: only this command's output
    with pytest.raises(SystemExit) as e:
        run_cli(mod.main, args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def engine_results(run: Path, top: int, split: str = "test") -> dict:
    """The engine's own pieces in a real (one-process) gloo group: queries, ranks by
    count_above_target, and the top-`top` of its full score matrix by the fused score at the alpha the run
    chose on validation (what the model serves), per session of `split`."""
    assert not dist.is_initialized()
    init = run.parent / f".init-{run.name}-{os.getpid()}"
    init.unlink(missing_ok=True)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        cfg = load_config(run / "config.toml")
        comm = Comm()
        data = Dataset(cfg.resolve_path(cfg.data.path))
        _, states, x = load_model(run / "model")
        nets = build_networks(cfg.train.method, cfg.model, data.text_dim, cfg.data.max_len)
        for k, n in nets.items():
            n.load_state_dict(states[k])
            n.eval()
        V = data.num_items
        table = ShardedItemTable(V, cfg.model.dim, comm, data.text_features(np.arange(V)), cfg.model.init_std,
                                 cfg.train.seed)
        with torch.no_grad():
            table.x.copy_(x[table.global_ids])
        e = cfg.eval
        chosen = json.loads((run / "summary.json").read_text())["alpha"]["chosen"]
        served = "fused" if chosen == e.alpha else f"fused@{chosen:g}"
        scorer = Scorer.build(nets, table, kind_weights(cfg.train.method, e.alpha, tuple(e.alpha_sweep)), e.tile_rows)
        reader = SessionReader(data.session_files(split), rank=0, world_size=1, global_batch_size=e.batch_size,
                               max_len=cfg.data.max_len, seed=0, shuffle=False, drop_last=False)
        out = {"queries": [], "ranks": [], "top": [], "fused": []}
        with torch.no_grad():
            for batch in reader.epoch(0):
                qs = [comm.all_gather(q) for q in session_queries(nets, table, batch)]
                counts = count_above_target(comm, scorer, qs, batch.target, table.global_ids, e.tile_rows)
                parts = [(q @ m.T) * s for q, m, s in zip(qs, scorer.matrices, scorer.scales)]
                fused = sum(w * p for w, p in zip(scorer.weights[served], parts) if w)
                n = int(batch.valid.sum())
                out["queries"].append([q[:n] for q in qs])
                out["ranks"].append(1 + counts[:n])
                out["fused"].append(fused[:n])
                out["top"].append(torch.from_numpy(top_by_score(fused[:n].numpy(), top)))
        out["queries"] = [torch.cat(c) for c in zip(*out["queries"])]
        out["ranks"], out["top"], out["fused"] = (torch.cat(out[k]) for k in ("ranks", "top", "fused"))
        out["matrices"], out["kinds"] = scorer.matrices, list(scorer.weights)
        return out
    finally:
        dist.destroy_process_group()
        init.unlink(missing_ok=True)


def top_by_score(scores: np.ndarray, top: int) -> np.ndarray:
    """Per row, the first `top` item indices by (score desc, index asc)."""
    idx = np.arange(scores.shape[1])
    return np.stack([np.lexsort((idx, -row))[:top] for row in scores])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory, "alterrec")


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "alterrec"
    assert export.main(["--run", str(run), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def engine(run) -> dict:
    return engine_results(run, 20)


def test_export_files_and_manifest(run, exported):
    items = pq.read_table(exported / "items.parquet")
    assert items.column_names == ["item_idx", "item_id", "text", "popularity", "id_vec", "text_vec", "fused_vec"]
    V = items.num_rows
    assert items["item_idx"].to_pylist() == list(range(V))
    assert items["item_id"].to_pylist() == Dataset(SOURCE).items()["item_id"].to_pylist()
    vec = {c: np.stack(items[c].to_numpy(zero_copy_only=False)) for c in ("id_vec", "text_vec", "fused_vec")}
    np.testing.assert_array_equal(vec["fused_vec"], np.concatenate([vec["id_vec"], vec["text_vec"]], 1))
    m = json.loads((exported / "manifest.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert m["run"]["path"] == str(run.resolve())
    assert m["run"]["summary_best_epoch"] == summary["best_epoch"] == m["run"]["model_epoch"]
    assert m["run"]["model_manifest_sha256"] == file_sha256(run / "model" / "manifest.json")
    assert m["run"]["model_files_sha256"] == json.loads((run / "model" / "manifest.json").read_text())["files"]
    data = Path(m["dataset"]["path"])
    assert m["dataset"]["manifest_sha256"] == file_sha256(data / "manifest.json")
    assert m["dataset"]["items_sha256"] == file_sha256(data / "items.parquet")
    assert m["scoring"]["kinds"] == ["id", "text", "fused", "fused@0.7"]
    assert m["scoring"]["scales"] == [1.0, 2.0]  # text temperature 0.5
    assert m["scoring"]["weights"][2] == [0.3, 0.7]
    # it serves the alpha the run chose on validation, not eval.alpha; so does the run loaded directly
    assert summary["alpha"]["chosen"] == 0.7
    assert m["scoring"]["served"] == load_export(exported).served == load_run(run).served == "fused@0.7"
    assert {f: file_sha256(exported / f) for f in m["files"]} == m["files"]
    assert not list(exported.parent.glob(".*tmp*"))


def test_a_model_serves_the_alpha_it_was_chosen_with_without_its_summary(run, tmp_path):
    """A resume removes summary.json until it ends (it described the end being redone), and serving then fell back
    to eval.alpha: a Ctrl-C'd resume changed what the run's unchanged model served. The model records it."""
    model_alpha = json.loads((run / "model" / "manifest.json").read_text())["alpha"]
    assert model_alpha == json.loads((run / "summary.json").read_text())["alpha"]  # one choice, made at one epoch
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    (copy / "summary.json").unlink()
    assert load_run(copy).served == "fused@0.7"


def test_served_kind_is_the_chosen_alpha():
    weights = kind_weights("alterrec", 0.5, (0.5, 0.7))
    assert served_kind(None, 0.5, weights, "run") == "fused"  # no summary.json: eval.alpha
    assert served_kind({"best_epoch": 3}, 0.5, weights, "run") == "fused"  # no choice (no sweep, NFRec, lone)
    assert served_kind({"alpha": {"chosen": 0.5}}, 0.5, weights, "run") == "fused"
    assert served_kind({"alpha": {"chosen": 0.7}}, 0.5, weights, "run") == "fused@0.7"
    with pytest.raises(DataError, match="run: chosen alpha 0.9 is not among"):
        served_kind({"alpha": {"chosen": 0.9}}, 0.5, weights, "run")


def test_exported_vectors_are_the_engine_matrices(exported, engine):
    bundle = load_export(exported)
    for ours, theirs in zip(bundle.matrices, engine["matrices"]):
        assert torch.equal(ours, theirs)


def split_queries(bundle, split: str) -> list[torch.Tensor]:
    """Per score component, the queries of every session of `split`, encoded by the export's loader."""
    from alterrec_dist.serve.batch_input import iter_tables, local_batches, session_columns, table_to_rows
    files = Dataset(bundle.provenance["dataset"]["path"]).session_files(split)
    parts, first = [], 0
    for table in iter_tables(files, session_columns(files), bundle.eval_batch_size):
        rows = table_to_rows(table, first, bundle.max_len, bundle.num_items, split)
        q = encode_sessions(bundle, local_batches(rows, bundle.eval_batch_size, bundle.world))
        parts.append([p[:len(rows)] for p in q.parts])
        first += len(rows)
    return [torch.cat(c) for c in zip(*parts)]


def test_round_trip_queries_without_torch_distributed(exported, run, engine):
    """(e) The export's loader (no process group) encodes every test session to exactly the queries
    the engine computed in its gloo group; and so does loading the run directly."""
    assert not dist.is_initialized()
    for bundle in (load_export(exported), load_run(run)):
        queries = split_queries(bundle, "test")
        assert not dist.is_initialized()
        for ours, theirs in zip(queries, engine["queries"]):
            assert ours.shape == theirs.shape
            assert torch.equal(ours, theirs)


def test_fused_index_gives_the_engine_top_n(exported, engine):
    """(a) Against the engine's fused top-20 (its own Scorer, queries and full score matrix), for
    every test session: the exported vectors scored in the engine's float order give it exactly,
    order included. One inner product of fused_vec with the fused query (what an IP index serves)
    is the same score up to float rounding, so it may swap items whose engine scores are within
    rounding of each other (measured: 1 of 1,976 sessions, a 1-ulp pair); it must never do more."""
    bundle = load_export(exported)
    qs = Queries(engine["queries"], bundle.scales, bundle.served_weights)
    from alterrec_dist.serve.search import Searcher
    _, exact, _ = Searcher(bundle, "exact").search(qs, 20)
    assert torch.equal(exact, engine["top"])

    ip = qs.fused @ bundle.fused_vectors().T                               # (n, V): one inner product each
    err = (ip - engine["fused"]).abs().max().item()
    assert err < 1e-6
    raw = torch.from_numpy(top_by_score(ip.numpy(), 20))
    same = (raw == engine["top"]).all(1)
    print(f"fused-IP top-20 identical to the engine's for {int(same.sum())}/{len(same)} test sessions; "
          f"max |IP - engine| = {err:.2e}")
    assert same.float().mean() >= 0.99
    assert_only_near_ties(raw, engine)
    if importlib.util.find_spec("faiss"):
        _, flat, _ = Searcher(bundle, "faiss").search(qs, 20)
        assert_only_near_ties(flat, engine)


def assert_only_near_ties(items: torch.Tensor, engine: dict, tol: float = 1e-6) -> None:
    """Position by position, the engine's scores of `items` equal those of the engine's top-N within
    float rounding: any difference from the engine's list is a swap of near-tied items."""
    theirs = engine["fused"].gather(1, engine["top"])
    ours = engine["fused"].gather(1, items)
    assert (ours - theirs).abs().max().item() <= tol
    assert all(len(set(r.tolist())) == r.numel() for r in items)


def test_engine_order_ranks_equal_count_above_target(exported, engine):
    bundle = load_export(exported)
    data = Dataset(bundle.provenance["dataset"]["path"]).read_sessions("test")
    target = torch.from_numpy(data["target"].to_numpy().astype(np.int64))
    B, ranks = bundle.eval_batch_size, []
    for s in range(0, len(target), B):
        q = [p[s:s + B] for p in engine["queries"]]
        n = len(q[0])
        pad = B - n  # the engine's global batch shape, padded with copies of the first row
        q = [torch.cat([p, p[:1].expand(pad, -1)]) for p in q]
        t = torch.cat([target[s:s + n], target[s:s + 1].expand(pad)])
        counts, _ = bundle.scoring().run(q, 20, t)
        ranks.append(1 + counts[:n])
    assert torch.equal(torch.cat(ranks), engine["ranks"])


def test_cli_errors_are_one_line_exit_2(run, exported, tmp_path, capsys):
    code, _, err = cli("export", ["--run", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "run directory not found" in err
    nomodel = tmp_path / "nomodel"
    nomodel.mkdir()
    (nomodel / "config.toml").write_text((run / "config.toml").read_text())
    code, _, err = cli("export", ["--run", str(nomodel), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith("error: ") and "no model/" in err and err.strip().count("\n") == 0
    code, _, err = cli("export", ["--run", str(run), "--out", str(exported)], capsys)
    assert code == 2 and "output exists" in err
    assert not (tmp_path / "o").exists()


def test_data_with_other_items_is_refused(run, tmp_path, capsys):
    """--data is checked against the item side the run recorded (dataset.json): the same item count with other text
    features is one line, exit 2, nothing written; the same files elsewhere are the run's data."""
    data = Path(json.loads((run / "dataset.json").read_text())["path"])
    other = copy_dataset(data, tmp_path / "other", features=np.roll(Dataset(data).text_features(), 1, axis=0))
    code, _, err = cli("export", ["--run", str(run), "--data", str(other), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"not the items the model of {run} was trained on" in err and "text_features/part-00000.npy" in err
    assert not (tmp_path / "o").exists()
    shutil.copytree(data, tmp_path / "moved")
    assert load_run(run, tmp_path / "moved").provenance["dataset"]["path"] == str(tmp_path / "moved")


def test_corrupt_export_is_refused(exported, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    with open(copy / "tables" / "text_features.npy", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    with pytest.raises(DataError, match="text_features.npy: missing or corrupt"):
        load_export(copy)


@pytest.mark.parametrize("swap_at", ["verify", "files"])
def test_a_load_that_overlaps_a_replacement_reads_one_export(exported, tmp_path, monkeypatch, swap_at):
    """`export --overwrite` swaps the directory in two renames; a server loading it meanwhile paired the old
    manifest with the new files, silently (here, the swap before the checksums or after them), or, reading between
    the renames, failed as a raw FileNotFoundError. The manifest is read again after the files: such a load starts
    again and returns the export now there, whole."""
    from alterrec_dist.common.files import replace_into_place
    from alterrec_dist.serve import export_dir
    live, new = tmp_path / "live", tmp_path / "new"
    shutil.copytree(exported, live)
    shutil.copytree(exported, new)
    manifest = json.loads((new / "manifest.json").read_text())
    manifest["scoring"]["scales"] = [2 * v for v in manifest["scoring"]["scales"]]  # another export: other scales
    (new / "manifest.json").write_text(json.dumps(manifest))
    (new / "tables" / "text_features.npy").write_bytes((live / "tables" / "text_features.npy").read_bytes())
    real, swaps = getattr(export_dir, {"verify": "verify_files", "files": "load_encoders"}[swap_at]), []

    def swapping(*args):
        if not swaps:  # the first load is overtaken by the replacement: the directory is `new` from here on
            swaps.append(1)
            (live / "tables" / "text_features.npy").unlink()  # what a reader between the renames finds missing
            replace_into_place(new, live)
        return real(*args)
    monkeypatch.setattr(export_dir, real.__name__, swapping)
    bundle = load_export(live)
    assert swaps == [1] and bundle.scales == [float(v) for v in manifest["scoring"]["scales"]]


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping in this process holds the tensor's data, or None (the heap, an anonymous map)."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(a, 16) for a in line.split()[0].split("-"))
        if lo <= ptr < hi:
            parts = line.split(maxsplit=5)
            return parts[5] if len(parts) == 6 else None
    return None


def test_an_exports_item_tables_are_mapped_not_read_whole(exported):
    """Serving reads an export's ID table and text features only at a query's items, but every serving process
    read them whole (at 2M items x 384, 1.4 GB of features per process, three copies under batch_score's Ray)."""
    bundle = load_export(exported)
    assert mapped_file(bundle.features) == str(exported / export_dir.TEXT_FEATURES)
    assert mapped_file(bundle.x) == str(exported / export_dir.ID_ROWS)
    q = encode_sessions(bundle, [session_batch([[1, 2, 3]], bundle.max_len)])
    assert torch.isfinite(q.fused).all()


def test_failed_export_leaves_nothing(run, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(export_dir.pq, "write_table", boom)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'out'}: cannot write \(disk full\)$"):
        export.main(["--run", str(run), "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_loader_runs_in_a_plain_process(exported):
    """The export needs only the package's model code: a fresh interpreter that never touches
    torch.distributed loads it and encodes a session."""
    code = ("import sys, torch.distributed as d; from alterrec_dist.serve.export_dir import load_export; "
            "from alterrec_dist.serve.queries import encode_sessions, "
            "session_batch; b = load_export(sys.argv[1]); q = encode_sessions(b, [session_batch([[1, 2, 3]], b.max_len)]); "
            "assert not d.is_initialized(); print(q.fused.shape[1])")
    out = subprocess.run([PY, "-c", code, str(exported)], capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 128


def test_an_export_without_its_manifest_yet_is_waited_for_then_named(tmp_path, monkeypatch):
    """A store `export --overwrite` uploads the manifest last: a load during the upload failed at once with
    "make one with `python -m alterrec_dist.export`", which was wrong advice. It now waits for it (a second per
    attempt), then says the export may be mid-write."""
    (tmp_path / "exp" / "tables").mkdir(parents=True)
    (tmp_path / "exp" / "items.parquet").write_bytes(b"PAR1")  # files of an export still being written
    waits = []
    monkeypatch.setattr(files.time, "sleep", waits.append)
    with pytest.raises(DataError, match=r"exp/manifest.json: no export manifest: not an export .* or one being "
                                        r"written or replaced now \(load it again when that ends\)$"):
        load_export(tmp_path / "exp")
    assert waits == [1.0] * (files.LOAD_ATTEMPTS - 1)


def test_an_empty_path_is_no_input():
    """`--data "$DATA"` with DATA unset gives "": it was the current directory as an input, refusing any output
    under it."""
    from alterrec_dist.data.dataset import dataset_files
    assert export_dir.export_files("") == [] and dataset_files("") == []


def test_success_lines_go_to_stdout_as_every_command_s(run, tmp_path, capsys):
    """export and synth printed theirs on stderr, every other command on stdout (reviewer finding): a script's
    `out=$(python -m alterrec_dist.X ...)` read nothing from these two."""
    code, out, err = cli("export", ["--run", str(run), "--out", str(tmp_path / "x")], capsys)
    assert code == 0 and out.startswith("exported ") and str(tmp_path / "x") in out and "exported" not in err
    code, out, err = cli("synth", ["--items", "20", "--sessions", "40", "--text-features", "random-projection",
                                   "--out", str(tmp_path / "d"), "--no-progress"], capsys)
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'd'}" and "wrote" not in err


def test_a_run_trained_under_earlier_ranges_exports_and_serves_from_its_export(run, tmp_path):
    """A run trained before the 1e-4 temperature floor serves with --run and exports; its export was refused on
    loading, its settings held to today's ranges (reviewer finding), where a run's own are held to its version's."""
    old = tmp_path / "run"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    config = old / "config.toml"
    config.write_text(re.sub(r"(?m)^text_temperature = .*$", "text_temperature = 5e-05", config.read_text()))
    write_export(load_run(old), tmp_path / "x")
    assert load_export(tmp_path / "x").model_cfg.text_temperature == 5e-05
