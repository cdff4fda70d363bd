"""The layout keeps itself: imports flow app -> pipelines -> emloc, each part imports only what its rules allow,
and no two modules import each other (directly or round a longer loop).

Every import counts: at module level, inside functions (lazy) and under `if TYPE_CHECKING:`, because each one is
a dependency a reader has to follow. The parts and what each may import are in `ALLOWED`; a backend is any
package the run machine's registry names, so a new model family gets the backend rules by its registry line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("emloc", "pipelines", "app")
BACKEND = "<backend>"  # stands for every registered backend package
# part -> the parts it may import (a part may always import itself)
ALLOWED = {
    "emloc": set(),
    "pipelines": set(),  # the package docstring only
    "pipelines.runner": {"emloc"},
    "pipelines.diffusion_common": {"emloc", "pipelines.runner"},  # what FLUX.1 and FLUX.2 share, family-neutral
    BACKEND: {"emloc", "pipelines.runner", "pipelines.diffusion_common"},
    # the planner knows families only through the registry (registry.PLANNING), never by importing one
    "pipelines.planner": {"emloc", "pipelines.runner"},
    "pipelines.demo": {"emloc", "pipelines.runner", "pipelines.diffusion_common", BACKEND},
    "app": {"pipelines", "pipelines.runner", "pipelines.planner", "pipelines.demo", "pipelines.diffusion_common",
            BACKEND},
}


def module_files(root: Path, tops=TOP) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the top-level packages."""
    found = {}
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `name` (at `path`) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
            targets.update(b for b in bases if b.split(".")[0] in TOP)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] not in TOP:
                continue
            for alias in node.names:  # `from pkg import submodule` depends on the submodule itself
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
    return {t for t in targets if t in modules and t != name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def backend_packages() -> set[str]:
    from pipelines.runner.registry import BACKENDS

    return {target.partition(":")[0].rpartition(".")[0] for target in BACKENDS.values()}


def part_of(module: str, backends: set[str]) -> str:
    for package in sorted(backends, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return BACKEND
    for part in sorted(ALLOWED, key=len, reverse=True):
        if part != BACKEND and (module == part or module.startswith(part + ".")):
            if part == "pipelines" and module != "pipelines":
                return "<unplaced>"  # a module straight in pipelines/, or a package with no rules yet
            return part
    return "<unplaced>"


def flow_violations(graph: dict[str, set[str]], backends: set[str]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        part = part_of(module, backends)
        if part == "<unplaced>":
            bad.append(f"{module}: not in any part; put it in a package of pipelines/ and give that package rules")
            continue
        for target in sorted(targets):
            other = part_of(target, backends)
            if part == BACKEND and other == BACKEND:
                same = next(p for p in backends if module == p or module.startswith(p + "."))
                if not (target == same or target.startswith(same + ".")):
                    bad.append(f"{module} imports {target}: a backend never imports another backend")
                continue
            if other != part and other not in ALLOWED[part]:
                bad.append(f"{module} imports {target}: {part} may import only {sorted(ALLOWED[part]) or 'itself'}")
    return bad


def test_no_two_modules_import_each_other():
    assert cycles(import_graph()) == []


def test_imports_follow_the_layout():
    assert flow_violations(import_graph(), backend_packages()) == []


def test_every_part_of_pipelines_is_a_package():
    loose = sorted(p.name for p in (ROOT / "pipelines").glob("*.py") if p.name != "__init__.py")
    assert loose == [], "modules straight in pipelines/ belong in one of its packages"
    for package in (ROOT / "pipelines").iterdir():
        if package.is_dir() and package.name != "__pycache__":
            doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
            assert doc and "import" in doc, f"pipelines/{package.name}/__init__.py must say what it may import"


@pytest.fixture
def tangled_tree(tmp_path: Path) -> Path:
    """A tree with every fault the checks look for: a loop, a backend importing another, emloc importing up."""
    files = {
        "emloc/__init__.py": "", "emloc/a.py": "from pipelines.runner import x\n",
        "app/__init__.py": "",
        "pipelines/__init__.py": "", "pipelines/runner/__init__.py": "",
        "pipelines/runner/machine.py": "def f():\n    from . import stages\n",
        "pipelines/runner/stages.py": "from .machine import Run\n",
        "pipelines/one/__init__.py": "", "pipelines/one/backend.py": "from pipelines.two import backend\n",
        "pipelines/two/__init__.py": "", "pipelines/two/backend.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_the_checks_catch_a_tangled_tree(tangled_tree: Path):
    graph = import_graph(tangled_tree)
    assert cycles(graph) == [["pipelines.runner.machine", "pipelines.runner.stages"]]
    bad = flow_violations(graph, {"pipelines.one", "pipelines.two"})
    assert any(b.startswith("emloc.a imports pipelines.runner") for b in bad)
    assert any(b.startswith("pipelines.one.backend imports pipelines.two") and "another backend" in b for b in bad)
