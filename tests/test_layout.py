"""The house's shape: every module imports on its own, no import cycle (function-local imports
included), and no module grows past the size a newcomer can read in one sitting."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import gitfast

PACKAGE = Path(gitfast.__file__).parent
MAX_LINES = 350


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if "assets" in path.parts:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _imports(name: str, path: Path):
    """gitfast modules `name` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gitfast"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.startswith("gitfast"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def test_no_import_cycle():
    modules = dict(_modules())
    graph = {m: {i for i in _imports(m, p) if i in modules and i != m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is not a cycle worth refusing; none do today
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_a_cycle_is_detected(tmp_path, monkeypatch):
    """The checker above finds a cycle hidden in a function-local import."""
    pkg = tmp_path / "gitfast"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()


def test_every_module_imports_alone():
    """Each module in a fresh interpreter of its own (8 at a time), so none depends on another having
    been imported first."""
    names = [m for m, _ in _modules()]
    procs = []
    failures = []
    for i in range(0, len(names), 8):
        batch = [subprocess.Popen([sys.executable, "-c", f"import {m}"], stderr=subprocess.PIPE, text=True)
                 for m in names[i:i + 8]]
        procs.extend(zip(names[i:i + 8], batch))
        for m, p in zip(names[i:i + 8], batch):
            err = p.communicate(timeout=300)[1]
            if p.returncode:
                failures.append(f"{m}: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
    assert not failures, failures


def test_modules_stay_small():
    big = {m: n for m, p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by idea): {big}"
