"""bench/recbole_files.py: the project's layout back as RecBole's files, exactly what `prepare recbole` read, with
every item in RecBole's catalog; bench/recbole_peer.py takes the files' prefix as the dataset's name."""
import importlib.util
import json
import subprocess
import sys

import pytest

from alterrec_dist.common.config import PROJECT_ROOT
from alterrec_dist.prepare import main as prepare
from bench.recbole_files import main as recbole_files
from tests.data.test_prepare import write_recbole
from tests.test_bench_recbole_peer import write_tiny_split


def load_peer_script():
    spec = importlib.util.spec_from_file_location("recbole_peer", PROJECT_ROOT / "bench/recbole_peer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # standard library only at its top level
    return script


def test_the_files_prepare_read_come_back_byte_for_byte(tmp_path):
    src = write_recbole(tmp_path / "src", name="X")
    prepare(["recbole", "--path", str(src), "--name", "X", "--out", str(tmp_path / "data"), "--no-progress"])
    recbole_files(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "back"), "--name", "X"])
    for name in ["X.train.inter", "X.valid.inter", "X.test.inter", "X.item2index"]:
        assert (tmp_path / "back" / name).read_text() == (src / name).read_text(), name
    assert (tmp_path / "back" / "X.item").read_text() == "item_id:token\n0\n1\n2\n3\n4\n"
    expect = load_peer_script().check_data(tmp_path / "back", "SASRec")
    assert expect == {"name": "X", "items": 5, "rows": {"train": 3, "valid": 1, "test": 1}, "catalog": True}


def test_an_existing_output_is_refused_in_one_line(tmp_path):
    src = write_recbole(tmp_path / "src", name="X")
    prepare(["recbole", "--path", str(src), "--name", "X", "--out", str(tmp_path / "data"), "--no-progress"])
    (tmp_path / "back").mkdir()
    r = subprocess.run([sys.executable, "-m", "bench.recbole_files", "--data", str(tmp_path / "data"),
                        "--out", str(tmp_path / "back")], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "output exists" in r.stderr
    assert list((tmp_path / "back").iterdir()) == []


def test_the_peer_needs_exactly_one_train_file(tmp_path):
    script = load_peer_script()
    with pytest.raises(script.BadInput, match="needs one <name>.train.inter, has 0"):
        script.check_data(tmp_path, "SASRec")
    for name in ("A", "B"):
        (tmp_path / f"{name}.train.inter").write_text("")
    with pytest.raises(script.BadInput, match="has 2"):
        script.check_data(tmp_path, "SASRec")


@pytest.mark.slow
def test_recbole_ranks_the_whole_catalog_also_items_no_row_names(tmp_path):
    """Item 30 is in no row: RecBole learns its catalog from the rows unless NAME.item lists every item, and the
    driver's split check (every index 0..V-1 in RecBole's catalog) fails the run without it."""
    src = tmp_path / "src"
    write_tiny_split(src)
    with open(src / "Scientific.item2index", "a") as f:
        f.write("A30\t30\n")
    prepare(["recbole", "--path", str(src), "--out", str(tmp_path / "data"), "--no-progress"])
    recbole_files(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "back")])

    def sasrec(out):
        return subprocess.run(
            [sys.executable, str(PROJECT_ROOT / "bench/recbole_peer.py"), "--model", "SASRec", "--data",
             str(tmp_path / "back"), "--seed", "0", "--out", str(out), "--epochs", "2", "--batch-size", "64",
             "--set", "hidden_size=16", "--set", "inner_size=32"], capture_output=True, text=True, cwd=PROJECT_ROOT,
            timeout=1200)

    r = sasrec(tmp_path / "whole")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert result["dataset_stats"]["item_num_with_padding"] == 32 and result["config"]["load_col"]["item"] == ["item_id"]
    (tmp_path / "back" / "data.item").unlink()  # the prefix: --data's directory name
    r = sasrec(tmp_path / "rows-only")
    assert r.returncode == 1 and "item_num 31 != 31 + padding" in r.stderr
