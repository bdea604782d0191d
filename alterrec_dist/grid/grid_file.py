"""A grid file (`configs/experiments/*.toml`), read and checked whole before any run: the datasets, their
methods, seeds, sweeps, peers and tuning keys, and where its runs and report go."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alterrec_dist.common.config import PROJECT_ROOT, read_toml, setting_type, shown
from alterrec_dist.common.errors import ConfigError, DataError
from alterrec_dist.common.files import check_file_out, within
from alterrec_dist.common.methods import METHODS


@dataclass
class DatasetGrid:
    name: str
    title: str
    config: str
    methods: list[str]
    seeds: list[int]
    sets: list[str] = field(default_factory=list)
    method_sets: dict[str, list[str]] = field(default_factory=dict)
    prepare: list[str] = field(default_factory=list)
    note: str = ""
    sweeps: list[dict] = field(default_factory=list)
    peers: list[dict] = field(default_factory=list)
    anchors: list[dict] = field(default_factory=list)
    select: list[str] = field(default_factory=list)  # swept keys whose value each method picks on validation
    select_seeds: list[int] = field(default_factory=list)  # seeds the select sweeps run on; empty: all
    tuned: list[str] = field(default_factory=list)  # methods a sweep without method(s) tunes; empty: all
    combine: bool = False  # also try, per method and peer, the switches that beat its base, together
    rounds: int = 1        # up to this many rounds: each after the first, the winner with one more switch


@dataclass
class Grid:
    path: Path
    out: Path
    report: Path
    images: Path
    jobs: int
    threads: int
    datasets: list[DatasetGrid]
    title: str  # the report's heading


# A grid file's keys and the type of each value: a key not here is a typo (`sets` for `set`), not ignored.
GRID_KEYS = {"seeds": list, "dataset": list, "out": str, "report": str, "images": str, "jobs": int, "threads": int,
             "title": str}
DATASET_KEYS = {"name": str, "title": str, "config": str, "methods": list, "seeds": list, "set": list,
                "method_set": dict, "prepare": list, "note": str, "sweep": list, "peer": list, "anchor": list,
                "select": list, "select_seeds": list, "tuned": list, "combine": bool, "rounds": int}

TYPE_WORDS = {list: "a list", dict: "a table", str: "a string", int: "an integer", bool: "true or false"}


def _checked(table: dict, keys: dict[str, type], where: str) -> dict:
    """`table` with each key known and each value of its type (ConfigError in one line otherwise)."""
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(keys)})")
        typ = keys[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: {key} must be {TYPE_WORDS[typ]}, got {value!r}")
    for key in ("jobs", "threads", "rounds"):
        if table.get(key, 1) < 1:
            raise ConfigError(f"{where}: {key} must be >= 1, got {table[key]}")
    for key in ("seeds", "select_seeds"):
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in table.get(key, [])):
            raise ConfigError(f"{where}: {key} must be a list of seeds (integers >= 0), got {table[key]!r}")
    if "name" in table:
        _check_plain_name(table["name"], where)
    return table


def _check_plain_name(name: str, where: str) -> None:
    """A dataset's name is a directory under the grid's out, and a peer's starts its runs' directory names under
    it: `../x` put their runs, and their locks, outside it."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"{where}: name {name!r} must be a plain directory name (no '/', not '..')")


def load_grid(path: str | Path) -> Grid:
    """The grid file, checked whole before any run: every key known, every value of its type, every method
    and sweep named (a typo in the last method would otherwise surface after the others had trained)."""
    path = Path(path)
    doc = _checked(read_toml(path, "grid"), GRID_KEYS, str(path))
    seeds = doc.get("seeds", [0, 1, 2])
    datasets = []
    for i, d in enumerate(doc.get("dataset", []), 1):
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: [[dataset]] {i}: not a table")
        where = f"{path}: [[dataset]] {d.get('name', i)!r}"
        _checked(d, DATASET_KEYS, where)
        unknown = [m for m in d.get("methods", []) if m not in METHODS]
        if unknown:
            raise ConfigError(f"{where}: unknown method(s) {', '.join(map(repr, unknown))} "
                              f"(known: {', '.join(METHODS)})")
        if any(not isinstance(sw, dict) or "key" not in sw for sw in d.get("sweep", [])):
            raise ConfigError(f"{where}: a [[dataset.sweep]] entry without its key")
        for sw in d.get("sweep", []):
            if "variants" not in sw:  # a variants sweep's key is a free label; a values sweep's, a setting
                setting_type(*sw["key"].partition(".")[::2], f"{where}: [[dataset.sweep]]")
        for peer in d.get("peer", []):
            if not isinstance(peer, dict) or not isinstance(peer.get("name"), str):
                raise ConfigError(f"{where}: a [[dataset.peer]] entry without a name")
            _check_plain_name(peer["name"], f"{where}: [[dataset.peer]]")
        try:
            datasets.append(DatasetGrid(
                name=d["name"], title=d.get("title", d["name"]), config=d["config"], methods=d["methods"],
                seeds=d.get("seeds", seeds), sets=d.get("set", []), method_sets=d.get("method_set", {}),
                prepare=d.get("prepare", []),
                note=d.get("note", ""), sweeps=d.get("sweep", []), peers=d.get("peer", []),
                anchors=d.get("anchor", []), select=d.get("select", []), select_seeds=d.get("select_seeds", []),
                tuned=d.get("tuned", []), combine=d.get("combine", False),
                rounds=d.get("rounds", 1)))
        except KeyError as e:
            raise ConfigError(f"{path}: [[dataset]] entry misses key {e}") from None
    if not datasets:
        raise ConfigError(f"{path}: no [[dataset]] entries")
    names = [d.name for d in datasets]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:  # its runs go in out/<name>: the later entry's replaced the earlier's, in both sections
        raise ConfigError(f"{path}: two [[dataset]] entries are named {twice!r} (each names its runs' directory)")
    root = PROJECT_ROOT
    grid = Grid(path, root / doc.get("out", f"results/{path.stem}"),
                root / doc.get("report", "docs/RESULTS.md"), root / doc.get("images", "docs/img"),
                doc.get("jobs", 1), doc.get("threads", 1), datasets,
                doc.get("title", "Results: AlterRec against its baselines and peers, on real data"))
    _check_report(grid)
    return grid


def _check_report(grid: "Grid") -> None:
    """The report is a Markdown file the grid writes whole, and nothing it reads: `report` naming the grid
    file itself replaced it with the report, and the grid was gone."""
    if grid.report.suffix.lower() != ".md":
        raise ConfigError(f"{grid.path}: report {shown(grid.report)} must be a Markdown file (.md)")
    if within(grid.out, grid.report):  # holding the runs (a report inside out, beside them, is fine)
        raise ConfigError(f"{grid.path}: report {shown(grid.report)} holds the grid's runs ({shown(grid.out)})")
    try:
        check_file_out(grid.report, True, [grid.path, *(PROJECT_ROOT / d.config for d in grid.datasets)])
    except DataError as e:
        raise ConfigError(f"{grid.path}: report: {e}") from None
