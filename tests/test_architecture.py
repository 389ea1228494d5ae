"""The layers are visible and kept (issue 11): engine → core → experiments → study → cli, each
importing only from the layers below it, no import circle between modules of different
subpackages, and only the CLI knows about flags.

Every ``import`` is counted, including those inside functions (they are still dependencies);
imports under ``if TYPE_CHECKING:`` are not.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ntrl": ROOT / "ntrl", "ntrl.agents": ROOT / "agents", "ntrl.envs": ROOT / "envs"}
CORE = {"config", "properties", "tracker", "records", "wandb_sink", "train", "run_dirs", "verbose", "termination"}
# Lower number = lower layer. The policy networks come first (the engine recognises their
# structure); agents (REINFORCE, optimizers) and envs sit on the engine; the SB3 callback
# ntrl.agents.sb3 is an integration, at the experiments' layer.
LAYER = {"networks": 0, "engine": 1, "agents": 2, "envs": 2, "core": 3, "experiments": 4, "study": 5, "cli": 6}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if package == "ntrl" and path.parent.name in ("envs", "agents"):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "core"
    if module == "ntrl.agents.policies":
        return "networks"
    if module == "ntrl.agents.sb3":
        return "experiments"
    if parts[1] in ("engine", "experiments", "study", "agents", "envs"):
        return parts[1]
    if parts[1] == "cli":
        return "cli"
    if parts[1] == "population":  # beside the training loop (DESIGN.md): it trains the same configs
        return "core"
    assert parts[1] in CORE, f"{module} belongs to no layer; add it to a subpackage or to CORE"
    return "core"


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (ntrl's and others'), outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports_of(p) if i in mods and i != m} for m, p in mods.items()}


def test_every_module_is_in_a_layer():
    for m in modules():
        layer_of(m)


def test_lower_layers_import_nothing_from_higher_ones():
    bad = []
    for m, deps in graph().items():
        for d in deps:
            if d == "ntrl" or m == "ntrl":
                continue
            if LAYER[layer_of(d)] > LAYER[layer_of(m)]:
                bad.append(f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circle_between_modules_of_different_subpackages():
    g = graph()
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    for v in g:
        if v not in index:
            visit(v)
    circles = [sorted(c) for c in sccs if len(c) > 1 and len({layer_of(m) for m in c}) > 1]
    assert not circles, circles


def test_only_the_cli_knows_about_flags():
    for m, path in modules().items():
        if m == "ntrl.cli":
            continue
        flagged = {i for i in imports_of(path) if i.split(".")[0] in ("argparse", "tyro")}
        assert not flagged, f"{m} imports {flagged}; flags belong to ntrl.cli"


def test_readme_architecture_names_every_module():
    """A newcomer finds the file for any concept in one hop: every module has a line in the
    README's architecture tree (under its folder, or by its path)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    listed, folder = set(), ""
    for line in section.splitlines():
        if line.startswith("    ") and not line.startswith("      ") and line.strip():
            folder = line.split()[0].rstrip(",")
            if folder.endswith(".py"):  # a top-level module on a line of its own
                listed.add(folder)
        elif line.startswith("      ") and line.strip():
            entry = line.split()[0]
            listed.add(entry if "/" in entry else folder + entry)
    missing = [str(p.relative_to(ROOT)) for p in modules().values()
               if p.name != "__init__.py" and str(p.relative_to(ROOT)) not in listed]
    assert not missing, missing


def test_the_distribution_installs_every_package():
    """pyproject's explicit package list names every folder with an __init__.py: a package left
    out works in the editable install of a checkout and is missing from a real ``pip install``."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    present = {name for name in modules() if (ROOT / modules()[name]).name == "__init__.py"}
    assert present == declared, (present - declared, declared - present)
