"""Issue #25 item 1: captioning with the embedded model never imports transformers (a second of start-up):
`Captioner()` and a caption, and `gitfast caption`, in fresh processes; the captions stay those of
transformers' GitForCausalLM.generate with its own processor."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from gitfast.captioning import images
from gitfast.defaults import EMBEDDED_MODEL, EXAMPLES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PICTURES = sorted(str(p) for p in EXAMPLES.iterdir())[:4]

CAPTIONER = """
import json, sys
from gitfast import Captioner
results = Captioner(device="cpu").caption(sys.argv[1:], max_new_tokens=12)
print(json.dumps({"transformers": sorted(m for m in sys.modules if m.split(".")[0] == "transformers"),
                  "results": [[list(r.token_ids), r.text, r.error] for r in results]}))
"""
CLI = """
import sys
from gitfast.tools.cli import main
status = main(["caption", *sys.argv[1:]])
print("transformers imported:", sorted(m for m in sys.modules if m.split(".")[0] == "transformers"), file=sys.stderr)
sys.exit(status)
"""


def fresh_python(code, *args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def test_captioner_on_the_embedded_model_never_imports_transformers_and_captions_as_transformers():
    run = fresh_python(CAPTIONER, *PICTURES)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["transformers"] == []

    import transformers
    from test_captioner import expected

    reference = (transformers.GitForCausalLM.from_pretrained(str(EMBEDDED_MODEL)).eval(),
                 transformers.AutoProcessor.from_pretrained(str(EMBEDDED_MODEL)))
    for path, (ids, text, error) in zip(PICTURES, out["results"]):
        assert error is None, error
        assert (ids, text) == expected(reference, images.read(path), max_new_tokens=12), path
    assert all(text for _, text, _ in out["results"])


@pytest.mark.parametrize("dtype", [[], ["--dtype", "auto"]], ids=["default dtype", "auto (reads config.json)"])
def test_gitfast_caption_never_imports_transformers(tmp_path, dtype):
    out = tmp_path / "captions.jsonl"
    run = fresh_python(CLI, PICTURES[0], "--out", str(out), "--quiet", "--device", "cpu", *dtype, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "transformers imported: []" in run.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 1 and records[0]["caption"] and records[0]["error"] is None


def test_a_checkpoint_without_generation_config_never_imports_transformers(tmp_path):
    """As the microsoft/git-* checkpoints are published: the generation settings come from config.json."""


    folder = tmp_path / "ckpt"
    shutil.copytree(EMBEDDED_MODEL, folder)
    (folder / "generation_config.json").unlink()
    out = tmp_path / "captions.jsonl"
    run = fresh_python(CLI, PICTURES[0], "--model", str(folder), "--out", str(out), "--quiet", "--device", "cpu",
                       cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "transformers imported: []" in run.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 1 and records[0]["caption"] and records[0]["error"] is None
