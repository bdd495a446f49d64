"""README's first two commands are what CI runs."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    install, test = block[0], block[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci
    assert ci.index(install) < ci.index(test)
    assert "torch==2.13.0" in install  # CI must take the CPU build on disk, never a CUDA download
