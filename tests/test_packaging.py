"""What a user installs: the sdist carries every tracked file a build or the tests need, and a wheel
built from that sdist carries every module of gitfast (a non-editable install sees nothing else).

Built without the extension (GITFAST_SKIP_EXTENSION=1) to stay quick; CI builds the wheel with it,
installs it into a fresh environment and runs it from outside the checkout (.ci/wheel_check.sh).
"""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tracked_files(expand_links=True):
    """The repository's tracked files, with the link gitfast/kernels expanded to its files."""
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = set()
    for name in out.stdout.splitlines():
        path = REPO / name
        if expand_links and path.is_symlink() and path.is_dir():
            files |= {f"{name}/{p.relative_to(path)}" for p in path.rglob("*") if p.is_file()
                      and "__pycache__" not in p.parts}
        else:
            files.add(name)
    return {name for name in files if not name.startswith(".")}  # .ci/, .gitignore: CI and git only


def _build(args, src, out_dir):
    env = dict(os.environ, GITFAST_SKIP_EXTENSION="1")
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", *args, "--outdir", str(out_dir), str(src)],
                         cwd=out_dir, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _wheel_files(path):
    with zipfile.ZipFile(path) as whl:
        return set(whl.namelist())


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist members, [wheel members]) from a copy of the tracked files (no build leftovers): the sdist
    and a wheel built from it (`python -m build`), and a wheel built from the tree (`pip wheel .`)."""
    src = tmp_path_factory.mktemp("src")
    for name in _tracked_files(expand_links=False):
        dest = src / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_symlink():
            dest.symlink_to(os.readlink(REPO / name))
        else:
            shutil.copy2(REPO / name, dest)
    via_sdist, from_tree = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("wheel")
    _build([], src, via_sdist)
    _build(["--wheel"], src, from_tree)
    (sdist,) = via_sdist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        sdist_files = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    wheels = [_wheel_files(w) for w in (*via_sdist.glob("*.whl"), *from_tree.glob("*.whl"))]
    assert len(wheels) == 2
    return sdist_files, wheels


def test_sdist_carries_every_tracked_file(dists):
    sdist_files, _ = dists
    missing = sorted(_tracked_files() - sdist_files)
    assert not missing, f"the sdist lacks {len(missing)} tracked files, e.g. {missing[:10]}"


def test_wheel_carries_every_module_and_asset(dists):
    _, wheels = dists
    want = set()
    for folder, dirs, files in os.walk(REPO / "gitfast", followlinks=True):  # into kernels/ too
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = Path(folder).relative_to(REPO).as_posix()
        want |= {f"{rel}/{name}" for name in files if not name.endswith((".so", ".pyc"))}
    want |= {f"gitfast/bench/{p.name}" for p in (REPO / "bench").glob("*.py")}
    assert "gitfast/kernels/attention.py" in want and "gitfast/serving/engine.py" in want
    for wheel_files in wheels:
        missing = sorted(want - wheel_files)
        assert not missing, f"the wheel lacks {len(missing)} files of gitfast, e.g. {missing[:10]}"
        # the top-level names a wheel installs: gitfast only (never a `kernels` beside it)
        assert {name.split("/")[0] for name in wheel_files if not name.startswith("gitfast-")} == {"gitfast"}
