"""Mean ± std of test metrics over seeds, from run directories alone (their summary.json).

    python bench/compare_runs.py runs/scientific/alterrec-s* -- runs/scientific/id_only-s*

Groups are separated by `--`; each group is labelled by its runs' train.method. The score kind a
group is judged on is its selection part (fused for AlterRec, id for id_only, ...).
"""
import json
import statistics
import sys
import tomllib
from pathlib import Path

METRICS = ("hit@10", "hit@20", "ndcg@10", "ndcg@20", "mrr@20")


def group_row(run_dirs: list[Path]) -> str:
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    method = tomllib.loads((run_dirs[0] / "config.toml").read_text())["train"]["method"]
    kind = summaries[0]["selection"].split("/")[0]
    cells = []
    for m in METRICS:
        values = [s["test"][kind][m] for s in summaries]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
    epochs = ",".join(str(s["best_epoch"]) for s in summaries)
    return f"| {method} ({kind}) | {len(run_dirs)} | {' | '.join(cells)} | {epochs} |"


def main(argv: list[str]) -> None:
    groups, current = [], []
    for arg in argv:
        if arg == "--":
            groups.append(current)
            current = []
        else:
            current.append(Path(arg))
    groups.append(current)
    print(f"| method (scores) | seeds | {' | '.join(METRICS)} | best epochs |")
    print("|---|---|" + "---|" * len(METRICS) + "---|")
    for g in groups:
        print(group_row(sorted(g)))


if __name__ == "__main__":
    main(sys.argv[1:])
