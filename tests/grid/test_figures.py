"""The report's figures (grid/figures.py): written whole, and what a killed report left is swept."""
import os

import matplotlib.pyplot as plt

from alterrec_dist.common.files import temp_sibling
from alterrec_dist.grid.figures import save


def test_a_figure_is_written_whole_and_a_killed_writers_leftover_is_swept(tmp_path):
    """A report killed while saving a figure left `NAME.png.tmp.png` (a fixed name no writer swept: an untracked
    file in docs/img). Figures are written as every other output is: a temp sibling named by the writer's pid,
    swept by the next writer once that pid is gone."""
    path = tmp_path / "img" / "curves.png"
    path.parent.mkdir()
    leftover = temp_sibling(path).with_name(temp_sibling(path).name.replace(str(os.getpid()), "4194303"))
    # (its writer died: no such pid; 4194303 is the largest Linux can give, past pid_max here)
    leftover.write_bytes(b"half a png")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save(fig, path)
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
