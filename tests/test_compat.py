"""The transformers floor: 5.0-5.17 generate wrong GIT tokens once the KV cache is used; the suite
passes from 5.24 on (gitfast/checkpoint/compat.py says why)."""
import os
import subprocess
import sys

import pytest

from gitfast.checkpoint import compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_versions_before_the_fix_are_refused_by_name():
    for version in ("4.46.0", "5.0.0", "5.17.0", "5.18.0.dev0"):
        problem = compat.transformers_problem(version)
        assert problem and version in problem and "transformers>=5.24" in problem
        with pytest.raises(ImportError, match="position ids"):
            compat.check_transformers(version)
    for version in ("5.18.0", "5.23.0", "5.24.0.dev0"):
        with pytest.raises(ImportError, match="is_activation_checkpointing"):
            compat.check_transformers(version)
    for version in ("5.24.0", "5.24.1", "6.0.0"):
        assert compat.transformers_problem(version) is None
    compat.check_transformers()  # the installed one (the tests need it fixed too)


def test_the_package_floor_is_the_checked_one():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    assert f"transformers>={compat.MIN_TRANSFORMERS}" in deps


def _run_with_transformers(version, code):
    fake = f"import transformers; transformers.__version__ = {version!r}\n"
    return subprocess.run([sys.executable, "-c", fake + code], cwd=os.path.join(ROOT, "tests"),
                          capture_output=True, text=True, timeout=300)


def test_the_test_session_refuses_an_old_transformers():
    done = _run_with_transformers("5.17.0", "import sys, pytest; sys.exit(pytest.main("
                                  "['-q', '-p', 'no:cacheprovider', 'test_compat.py::test_the_package_floor_is_the_checked_one']))")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "refusing to compare" in done.stdout + done.stderr and "5.17.0" in done.stdout + done.stderr


def test_the_drop_in_refuses_an_old_transformers_at_import():
    done = _run_with_transformers("5.17.0", "import gitfast.drop_in")
    assert done.returncode != 0 and "ImportError: gitfast needs transformers>=5.24, found 5.17.0" in done.stderr
    assert _run_with_transformers("5.24.0", "import gitfast.drop_in").returncode == 0
