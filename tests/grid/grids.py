"""Grid files the grid tests share: small grids on the default data, their runs beside them."""
import textwrap
from pathlib import Path


def id_only_grid(tmp_path: Path, *lines: str) -> tuple[Path, Path]:
    """A grid file of ID only on the default data (`lines` added to its dataset), and its report, which holds
    "the last report"."""
    grid, report = tmp_path / "grid.toml", tmp_path / "RESULTS.md"
    report.write_text("the last report\n")
    grid.write_text(textwrap.dedent(f'''
        out = "{tmp_path}/runs"
        report = "{report}"
        [[dataset]]
        name = "default"
        config = "configs/default.toml"
        methods = ["id_only"]
    ''') + "\n".join(lines) + "\n")
    return grid, report


def tiny_peer_grid(tmp_path, dataset: str) -> Path:
    """A grid of `dataset`'s methods and sweeps and a peer with two switches, whose runs are a stand-in
    script that writes its result (every switch better on validation, two together more)."""
    (tmp_path / "peer.py").write_text(textwrap.dedent('''
        import argparse, json, os, pathlib, time
        p = argparse.ArgumentParser(); p.add_argument("--seed"); p.add_argument("--out")
        p.add_argument("--set", action="append", default=[]); a = p.parse_args()
        m = dict.fromkeys(("hit@10", "hit@20", "ndcg@10", "ndcg@20"), 0.3 + 0.01 * len(a.set))  # each switch helps
        pathlib.Path(a.out).mkdir(parents=True)
        with open(pathlib.Path(__file__).with_name("ran.txt"), "a") as ran:  # who ran, for the tests
            ran.write(pathlib.Path(a.out).name + "\\n")
        with open(pathlib.Path(__file__).with_name("pids.txt"), "a") as pids:
            pids.write(f"{os.getpid()}\\n")
        time.sleep(float(os.environ.get("PEER_SECONDS", "0")))
        tmp = pathlib.Path(a.out) / "result.json.tmp"  # atomic, as bench/recbole_peer.py writes it: the runner
        tmp.write_text(json.dumps({"valid": m, "test": m}))  # reads a finished run's result while others still run
        os.replace(tmp, tmp.with_suffix(""))
    '''))
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(textwrap.dedent(f'''
        out = "{tmp_path}/runs"
        jobs = 2
        seeds = [0, 1]
        [[dataset]]
        name = "d"
        config = "configs/default.toml"
        select_seeds = [0]
        combine = true
        {textwrap.indent(textwrap.dedent(dataset), " " * 8).strip()}
        [[dataset.peer]]
        name = "P"
        command = ["{{python}}", "{tmp_path}/peer.py"]
        seeds = [0]
        [[dataset.peer.sweep]]
        key = "a"
        values = [1]
        [[dataset.peer.sweep]]
        key = "b"
        values = [2]
    '''))
    return grid_file


def one_dataset_grid(grid: Path, dataset: str, head: str = "", name: str = "d") -> Path:
    """A grid file at `grid` of one dataset `name` on configs/default.toml, its runs beside the file: `head`
    lines before the dataset, `dataset` lines in it."""
    grid.write_text(f'out = "{grid.parent}/runs"\n{head}\n[[dataset]]\nname = "{name}"\n'
                    f'config = "configs/default.toml"\n{textwrap.dedent(dataset)}\n')
    return grid
