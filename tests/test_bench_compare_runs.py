"""bench/compare_runs.py (bench/SCIENTIFIC.md's first table) on the committed records."""
import pytest

from alterrec_dist.common.config import PROJECT_ROOT
from alterrec_dist.common.errors import ConfigError, DataError
from bench import compare_runs

RUNS = PROJECT_ROOT / "results" / "paper" / "scientific"


def test_a_row_per_group_and_bad_arguments_are_one_line(capsys, tmp_path):
    assert compare_runs.main([str(RUNS / "id_only-s0"), str(RUNS / "id_only-s1"), "--", str(RUNS / "alterrec-s0")]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split(" | ")[:2] for r in rows] == [["| id_only (id)", "2"], ["| alterrec (fused)", "1"]]
    # a stray `--` was an IndexError, a directory without summary.json a bare traceback (reviewer finding)
    with pytest.raises(ConfigError, match="an empty group"):
        compare_runs.main([str(RUNS / "id_only-s0"), "--"])
    with pytest.raises(DataError, match=r"summary.json: missing"):
        compare_runs.main([str(tmp_path)])
