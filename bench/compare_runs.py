"""Mean ± std of test metrics over seeds, from run directories alone (their summary.json).

    python bench/compare_runs.py runs/scientific/alterrec-s* -- runs/scientific/id_only-s*

Groups are separated by `--`; each group is labelled by its runs' train.method. The score kind a
group is judged on is its selection part (fused for AlterRec, id for id_only, ...), at the config's
`eval.alpha` (the grid's report gives the fused score at the alpha each run chose on validation).
"""
import statistics
import sys
from pathlib import Path

from alterrec_dist.common.cli import run_cli
from alterrec_dist.common.config import METRICS, read_toml
from alterrec_dist.common.errors import ConfigError
from alterrec_dist.common.files import read_json
from alterrec_dist.common.methods import score_and_metric

def group_row(run_dirs: list[Path]) -> str:
    summaries = [read_json(d / "summary.json") for d in run_dirs]
    method = read_toml(run_dirs[0] / "config.toml", "run config")["train"]["method"]
    kind = score_and_metric(summaries[0]["selection"])[0]
    cells = []
    for m in METRICS:
        values = [s["test"][kind][m] for s in summaries]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
    epochs = ",".join(str(s["best_epoch"]) for s in summaries)
    return f"| {method} ({kind}) | {len(run_dirs)} | {' | '.join(cells)} | {epochs} |"


def groups_of(argv: list[str]) -> list[list[Path]]:
    """The run directories between `--` separators; an empty group (a stray `--`) is an error."""
    groups, current = [], []
    for arg in [*argv, "--"]:
        if arg != "--":
            current.append(Path(arg))
            continue
        if not current:
            raise ConfigError("give run directories, groups separated by -- (an empty group here)")
        groups.append(current)
        current = []
    return groups


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    print(f"| method (scores) | seeds | {' | '.join(METRICS)} | best epochs |")
    print("|---|---|" + "---|" * len(METRICS) + "---|")
    for g in groups_of(argv):
        print(group_row(sorted(g)))
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
