"""Checkpoints: folders, hub cache, safetensors/sharded/.bin, round trips, and refusals that name the problem."""
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import gitfast
from gitfast.checkpoint.loading import CheckpointError
from git_factory import make_hf_model, pixels

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf():
    return make_hf_model("hd32")


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(d)
    return d


def same_outputs(fm, hf):
    px = pixels("hd32", 2)
    assert torch.equal(fm.generate(pixel_values=px, max_new_tokens=6), hf.generate(pixel_values=px, max_new_tokens=6))


def test_round_trip_safetensors(hf, saved):
    fm = gitfast.GitForCausalLM.from_pretrained(saved)
    same_outputs(fm, hf)
    assert fm.dtype == torch.float32 and fm.device.type == "cpu"


def test_dtype_argument(saved):
    fm = gitfast.GitForCausalLM.from_pretrained(saved, torch_dtype=torch.bfloat16)
    assert fm.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        gitfast.GitForCausalLM.from_pretrained(saved, dtype="float8")


def test_sharded_safetensors(hf, tmp_path):
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    same_outputs(gitfast.GitForCausalLM.from_pretrained(tmp_path), hf)


def test_pytorch_bin_loaded_weights_only(hf, saved, tmp_path):
    for f in ("config.json", "generation_config.json"):
        (tmp_path / f).write_bytes((saved / f).read_bytes())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    same_outputs(gitfast.GitForCausalLM.from_pretrained(tmp_path), hf)
    # a pickle that runs code is refused by weights_only loading
    torch.save({"x": torch.zeros(1), "evil": Path("/")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        gitfast.GitForCausalLM.from_pretrained(tmp_path)


def test_hub_id_from_local_cache(hf, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--microsoft--git-tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    hf.save_pretrained(snap)
    (cache / "models--microsoft--git-tiny" / "refs").mkdir()
    (cache / "models--microsoft--git-tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    same_outputs(gitfast.GitForCausalLM.from_pretrained("microsoft/git-tiny", cache_dir=str(cache)), hf)
    with pytest.raises(CheckpointError, match="microsoft/git-not-cached"):
        gitfast.GitForCausalLM.from_pretrained("microsoft/git-not-cached", cache_dir=str(cache))


def test_gitfast_save_loads_in_transformers(hf, saved, tmp_path):
    fm = gitfast.GitForCausalLM.from_pretrained(saved)
    fm.save_pretrained(tmp_path)
    back = transformers.GitForCausalLM.from_pretrained(tmp_path).eval()
    for k, v in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k



def test_core_model_save_pretrained(hf, saved, tmp_path):
    """gitfast's own `GitModel` (what the Captioner and the drop-in's `.model` / `base_model` hold) saves
    the whole network as a transformers checkpoint; both libraries load it back unchanged."""
    core = gitfast.checkpoint.loading.load_checkpoint(saved).model
    core.save_pretrained(tmp_path)
    back = transformers.GitForCausalLM.from_pretrained(tmp_path).eval()
    for k, v in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    again, info = gitfast.GitForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    same_outputs(again, hf)

def _copy(saved, dst):
    for f in saved.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return load_file(str(dst / "model.safetensors"))


def test_missing_tensor_named(saved, tmp_path):
    w = _copy(saved, tmp_path)
    del w["git.encoder.layer.1.attention.self.key.bias"]
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors: git\.encoder\.layer\.1\.attention\.self\.key\.bias"):
        gitfast.GitForCausalLM.from_pretrained(tmp_path)


def test_unexpected_tensor_named(saved, tmp_path):
    w = _copy(saved, tmp_path)
    w["git.extra_head.weight"] = torch.zeros(3)
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: git\.extra_head\.weight"):
        gitfast.GitForCausalLM.from_pretrained(tmp_path)


def test_wrong_shape_named(saved, tmp_path):
    w = _copy(saved, tmp_path)
    w["git.embeddings.position_embeddings.weight"] = torch.zeros(10, 64)
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"wrong shape for git\.embeddings\.position_embeddings\.weight \(10, 64\)"):
        gitfast.GitForCausalLM.from_pretrained(tmp_path)


def test_not_git_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="'bert' model, not GIT"):
        gitfast.GitForCausalLM.from_pretrained(tmp_path)


def test_no_weights_and_missing_folder(saved, tmp_path):
    (tmp_path / "config.json").write_bytes((saved / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="no weights"):
        gitfast.GitForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        gitfast.GitForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="neither a local folder"):
        gitfast.GitForCausalLM.from_pretrained(str(tmp_path / "nope"))


def test_unknown_from_pretrained_argument(saved):
    with pytest.raises(TypeError, match="bogus"):
        gitfast.GitForCausalLM.from_pretrained(saved, bogus=True)


_SHADOW_CHECK = """
import importlib.util, os, sys
spec = importlib.util.find_spec("kernels")
origin = spec.origin if spec is not None else None
# a namespace portion (no __init__.py) has no origin; an installed package lives outside the repo
assert origin is None or not os.path.realpath(origin).startswith(sys.argv[1] + os.sep), origin
import transformers, gitfast
from transformers import GitForCausalLM
gitfast.GitForCausalLM, gitfast.Captioner
import gitfast.kernels.api
print("ok", origin)
"""


@pytest.mark.parametrize("where", [".", "tests", "bench"])
def test_kernels_folder_never_shadows_hf_kernels(where):
    # `kernels` is also Hugging Face's package, which transformers >= 5.25 imports. From the
    # repository root (or tests/, bench/: any folder Python puts first on sys.path) the top-level
    # `kernels/` folder must never be what `import kernels` finds, nor break importing gitfast.
    assert not (REPO / "kernels" / "__init__.py").exists() and not (REPO / "kernels.py").exists()
    out = subprocess.run([sys.executable, "-c", _SHADOW_CHECK, str(REPO)], cwd=REPO / where,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    try:
        importlib.metadata.distribution("kernels")  # HF kernels, which transformers >= 5.25 installs
    except importlib.metadata.PackageNotFoundError:
        return  # nothing installed to outrank (transformers 5.24 without HF kernels)
    assert "site-packages" in out.stdout or "dist-packages" in out.stdout, out.stdout  # found HF's


def test_pipeline_same_output_as_transformers(hf, tmp_path):
    from PIL import Image
    from transformers import BertTokenizerFast, CLIPImageProcessor, GitProcessor, pipeline

    words = ["[PAD]"] + [f"w{i}" for i in range(1, 101)] + ["[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    words += [f"x{i}" for i in range(150 - len(words))]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), model_input_names=["input_ids", "attention_mask"])
    proc = GitProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 40},
                                                           crop_size={"height": 40, "width": 40}), tokenizer=tok)
    img = Image.new("RGB", (64, 48), (200, 30, 90))
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    task = "image-text-to-text" if int(transformers.__version__.split(".")[0]) >= 5 else "image-to-text"
    outs = []
    for model in (hf, fm):
        pipe = pipeline(task, model=model, processor=proc)
        outs.append(pipe(images=img, text="w5", generate_kwargs={"max_new_tokens": 5}))
    assert outs[0] == outs[1]


_AUTO = """
import sys, torch, transformers, gitfast
from PIL import Image
path, proc = sys.argv[1], transformers.AutoProcessor.from_pretrained(sys.argv[1])
img = Image.new("RGB", (64, 48), (200, 30, 90))
def run():
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    pipe = transformers.pipeline("image-text-to-text", model=path, processor=proc)
    return type(model).__module__, type(pipe.model).__module__, pipe(images=img, text="w5", generate_kwargs={"max_new_tokens": 5})
before = run()
gitfast.register_auto_classes()
gitfast.register_auto_classes()
after = run()
print(before[:2], after[:2], before[2] == after[2])
"""


def test_register_auto_classes(hf, tmp_path):
    """Opting in, `AutoModelForCausalLM` and a pipeline named by path build gitfast's class, with the same
    output; importing gitfast alone changes nothing (a fresh process: the registration is process-wide)."""
    from transformers import BertTokenizerFast, CLIPImageProcessor, GitProcessor

    words = ["[PAD]"] + [f"w{i}" for i in range(1, 101)] + ["[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    words += [f"x{i}" for i in range(150 - len(words))]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), model_input_names=["input_ids", "attention_mask"])
    GitProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40}),
                 tokenizer=tok).save_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-c", _AUTO, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    theirs, ours = "transformers.models.git.modeling_git", "gitfast.drop_in.causal_lm"
    assert last == f"('{theirs}', '{theirs}') ('{ours}', '{ours}') True", last
