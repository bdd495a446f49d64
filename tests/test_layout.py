"""The house's shape: every module imports on its own, no import cycle (function-local imports
included), no module grows past the size a newcomer can read in one sitting, and no function past
what one screen shows (the training tools aside)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gitfast

PACKAGE = Path(gitfast.__file__).parent
MAX_LINES = 350
MAX_FUNCTION_LINES = 60


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


_IMPORT_EACH = r"""
import importlib, os, sys
import numpy, PIL.Image, torch, transformers  # third-party only: no gitfast module is loaded here
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:  # a child with nothing of gitfast imported yet
        try:
            importlib.import_module(name)
        except BaseException as exc:
            sys.stderr.write(f"{name}: {type(exc).__name__}: {exc}\n")
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone():
    """Each module imported first, in a process of its own (forked from an interpreter that has loaded
    torch and transformers but nothing of gitfast), so none depends on another having been imported."""
    names = [m for m, _ in _modules()]
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_import_check_catches_a_module_that_needs_another_first(tmp_path):
    pkg = tmp_path / "needy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import sys\nsys.modules['needy.b'].x\n")  # works only after needy.b
    (pkg / "b.py").write_text("x = 1\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    ok = subprocess.run([sys.executable, "-c", _IMPORT_EACH, "needy.b"], env=env, capture_output=True, text=True)
    bad = subprocess.run([sys.executable, "-c", _IMPORT_EACH, "needy.b", "needy.a"], env=env, capture_output=True,
                         text=True)
    assert ok.returncode == 0 and bad.returncode == 1 and "needy.a" in bad.stderr


def test_modules_stay_small():
    big = {m: n for m, p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by idea): {big}"


def test_functions_stay_short():
    long = {}
    for name, path in _modules():
        if name.startswith("gitfast.training"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - first + 1 > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = node.end_lineno - first + 1
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into steps): {long}"
