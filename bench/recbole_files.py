"""A dataset in the project's layout written back as RecBole's pre-split atomic files, so that the RecBole peers
(bench/recbole_peer.py) run on data the grid never saw, e.g. a synthetic proxy for a dataset we do not have:

    python -m bench.recbole_files --data data/synth-sparse --out data/synth-sparse-recbole [--name NAME]
    python3 bench/recbole_peer.py --model SASRec --data data/synth-sparse-recbole --seed 0 --out ...

NAME (default: the dataset directory's name) is the files' prefix, which RecBole takes as the dataset's name:
NAME.{train,valid,test}.inter hold one line per session row (user_id: the row's session, else its user;
item_id_list: its history; item_id: its target), NAME.item2index the items' ids and indices, and NAME.item every
index, so RecBole's catalog is the whole catalog, also the items no row names (on a synthetic set many are).
`prepare recbole` reads these files back into the same dataset. OUT is written whole or not at all.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from alterrec_dist.common.cli import run_cli
from alterrec_dist.common.files import Staged, check_out
from alterrec_dist.data.dataset import Dataset
from alterrec_dist.data.layout import SPLITS

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


def inter_lines(rows: dict) -> str:
    """One line per row; RecBole's user_id is the sequence a row belongs to: its session, else its user, else
    the row alone (the sequential models score each line on its own history)."""
    lines = [HEADER]
    for n, (session, user, history, target) in enumerate(zip(rows["session"], rows["user"], rows["history"],
                                                             rows["target"])):
        owner = session if session is not None else user if user is not None else n
        lines.append(f"{owner}\t{' '.join(map(str, history))}\t{target}\n")
    return "".join(lines)


def write_recbole_files(data: Dataset, out: Path, name: str) -> None:
    items = data.items()
    with Staged(out) as staged:
        staged.tmp.mkdir()
        for split in SPLITS:
            rows = data.read_sessions(split).select(["history", "target", "user", "session"]).to_pydict()
            (staged.tmp / f"{name}.{split}.inter").write_text(inter_lines(rows))
        index = zip(items["item_id"].to_pylist(), items["item_idx"].to_pylist())
        (staged.tmp / f"{name}.item2index").write_text("".join(f"{item}\t{i}\n" for item, i in index))
        (staged.tmp / f"{name}.item").write_text("item_id:token\n" + "".join(f"{i}\n" for i in range(data.num_items)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset directory (the project's layout)")
    p.add_argument("--out", required=True, help="directory to write the RecBole files into")
    p.add_argument("--name", help="the files' prefix and RecBole's dataset name (default: --data's directory name)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    a = p.parse_args(argv)
    out = check_out(a.out, a.overwrite)
    data = Dataset(a.data)
    data.check()
    write_recbole_files(data, out, a.name or Path(a.data).resolve().name)
    print(f"recbole_files: {data.num_items:,} items, rows " + " / ".join(f"{data.num_rows(s):,}" for s in SPLITS)
          + f" -> {out}")


if __name__ == "__main__":
    run_cli(main)
