"""The package's layout holds: imports point one way, no cycle, parallel code stays in parallel/.

    commands (the top-level modules) -> training / serve / grid -> eval -> parallel, model, data -> common

Read from the source (AST), so a wrong import fails here before it tangles anything.
"""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alterrec_dist"
# folder -> the folders its modules may import, besides their own
MAY_IMPORT = {
    "common": set(),
    "model": {"common"},
    "data": {"common"},
    "parallel": {"common"},
    "eval": {"common", "model", "data", "parallel"},
    "training": {"common", "model", "data", "parallel", "eval"},
    "serve": {"common", "model", "data", "parallel", "eval"},
    "grid": {"common"},
}
COLLECTIVES = {"all_gather", "all_gather_object", "all_reduce", "all_to_all", "all_to_all_single", "barrier",
               "broadcast", "broadcast_object_list", "reduce_scatter", "gather", "scatter", "send", "recv"}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("alterrec_dist",) + path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports (a `from package import module` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("alterrec_dist")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alterrec_dist"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
    return found & known


def folder(module: str) -> str | None:
    """The folder of a package module; None for a command (a top-level module)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


def test_every_folder_is_a_known_layer():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(MAY_IMPORT)


def test_imports_point_one_way():
    mods = modules()
    wrong = []
    for name, path in mods.items():
        src = folder(name)
        for target in imports_of(path, set(mods)):
            dst = folder(target)
            if target == "alterrec_dist":
                continue
            if dst is None:  # commands are entry points: nothing imports one, another command included
                wrong.append(f"{name} imports the command {target}")
            elif src is not None and dst != src and dst not in MAY_IMPORT[src]:
                wrong.append(f"{name} ({src}/) imports {target} ({dst}/)")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    mods = modules()
    graph = {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_collectives_are_called_only_through_comm():
    """Every byte between ranks is counted: torch.distributed's collectives appear in parallel/comm.py only."""
    calls = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "parallel" / "comm.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and isinstance(node.value, ast.Name) \
                    and node.value.id in ("dist", "dist_autograd"):
                calls.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not calls, "\n".join(calls)


def test_model_data_and_common_never_import_distributed():
    for path in [*(PACKAGE / "model").rglob("*.py"), *(PACKAGE / "data").rglob("*.py"), *(PACKAGE / "common").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.startswith("torch.distributed") for m in imported), path


def test_the_placement_rule_is_written_once():
    """`i mod W` (an owner test, a rank's ids as a strided range, or the largest shard's rows) only in
    parallel/table.py's `Placement`."""
    rule = re.compile(r"%\s*(?:self\.|comm\.|self\.comm\.)?(?:world|W)\b\s*==|"
                      r"arange\(\s*\w*rank\w*\s*,\s*[\w.]+\s*,\s*(?:self\.|comm\.)?(?:world|W)\b|"
                      r"-\(\s*-\s*[\w.]+\s*//\s*(?:self\.|comm\.|cfg\.trainer\.)?(?:world|W|num_workers)\b")
    found = [f"{p.relative_to(PACKAGE)}: {m.group(0)}" for p in PACKAGE.rglob("*.py")
             if p != PACKAGE / "parallel" / "table.py" for m in rule.finditer(p.read_text())]
    assert not found, "\n".join(found)
    assert rule.search("owned = ids % comm.world == comm.rank") and rule.search("torch.arange(rank, V, world)")
    assert rule.search("rows = -(-num_items // world)")
