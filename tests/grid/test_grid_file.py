"""A grid file read and checked whole (grid/grid_file.py): mistakes refused before any run, in one line."""
import re

import pytest

from alterrec_dist.common.errors import ConfigError
from alterrec_dist.grid.grid_file import load_grid
from tests.grid.grids import one_dataset_grid


@pytest.mark.parametrize("report, refusal", [
    ("{grid}", "must be a Markdown file"),  # it replaced the grid file with the report
    ("configs/default.toml", "must be a Markdown file"),
    ("{tmp}/runs/d", "must be a Markdown file"),
    ("{tmp}/grid.md", "holds the input"),  # a grid file named .md
])
def test_a_report_that_would_replace_what_the_grid_reads_is_refused_before_any_run(tmp_path, report, refusal):
    grid = tmp_path / ("grid.md" if report.endswith("grid.md") else "grid.toml")
    one_dataset_grid(grid, 'methods = ["id_only"]', f'report = "{report.format(grid=grid, tmp=tmp_path)}"')
    text = grid.read_text()
    with pytest.raises(ConfigError, match=rf"{grid}: report.*{refusal}"):
        load_grid(grid)
    assert grid.read_text() == text


@pytest.mark.parametrize("dataset, peer", [("../escape", "P"), ("a/b", "P"), ("..", "P"), ("d", "../P"), ("d", "")])
def test_a_dataset_or_peer_name_that_is_not_a_plain_directory_name_is_refused(tmp_path, dataset, peer):
    """`name = "../escape"` put the dataset's runs, and their locks, outside the grid's out."""
    grid = one_dataset_grid(tmp_path / "grid.toml", f'''
        methods = ["id_only"]
        [[dataset.peer]]
        name = "{peer}"
        command = ["true"]
    ''', name=dataset)
    bad = dataset if dataset != "d" else peer
    with pytest.raises(ConfigError, match=rf"name '{re.escape(bad)}' must be a plain directory name"):
        load_grid(grid)


def test_grid_mistakes_that_surfaced_only_as_runs_started_are_refused_as_the_grid_is_read(tmp_path):
    """A sweep of an unknown setting was an AttributeError traceback; two datasets of one name shared their runs
    (the later entry's settings reported under both)."""
    sweep = one_dataset_grid(tmp_path / "sweep.toml", '''
        methods = ["id_only"]
        [[dataset.sweep]]
        key = "model.nosuchkey"
        values = [1, 2]
    ''')
    with pytest.raises(ConfigError, match=r"\[\[dataset.sweep\]\]: unknown key model.nosuchkey"):
        load_grid(sweep)
    twice = tmp_path / "twice.toml"
    twice.write_text(one_dataset_grid(tmp_path / "one.toml", 'methods = ["id_only"]').read_text()
                     + '[[dataset]]\nname = "d"\nconfig = "configs/default.toml"\nmethods = ["alterrec"]\n')
    with pytest.raises(ConfigError, match="two \\[\\[dataset\\]\\] entries are named 'd'"):
        load_grid(twice)
