"""`from_pretrained`'s `subfolder`, `force_download` and `use_safetensors`, honoured as transformers
honours them (they used to be accepted and dropped): against the local hub of test_hub_download (the
real huggingface_hub client, 127.0.0.1 only) and on local folders."""
import io
import shutil

import pytest
import torch
from safetensors.torch import load_file

import gitfast
from gitfast.defaults import EMBEDDED_MODEL
from gitfast.checkpoint.loading import CheckpointError
from test_hub_download import MAIN_SHA, NEEDED, Hub, _embedded_files
from test_hub_download import hub  # noqa: F401 - the fixture, over this module's `served`

WORDS = "git.embeddings.word_embeddings.weight"


def _bin(weights):
    buf = io.BytesIO()
    torch.save(weights, buf)
    return buf.getvalue()


def _shifted():
    """The embedded weights with every float tensor moved by one: which file was read shows."""
    weights = load_file(str(EMBEDDED_MODEL / "model.safetensors"))
    return {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}


@pytest.fixture(scope="module")
def served():
    hub = Hub()
    files = _embedded_files()
    refs = {"main": MAIN_SHA, MAIN_SHA: MAIN_SHA}
    nested = {"README.md": b"two models", **{f"git/{k}": v for k, v in files.items()}}
    hub.repos["org/nested"] = (refs, {MAIN_SHA: nested}, None)
    hub.repos["org/both"] = (refs, {MAIN_SHA: {**files, "pytorch_model.bin": _bin(_shifted())}}, None)
    only_bin = {k: v for k, v in files.items() if k != "model.safetensors"}
    hub.repos["org/bin-only"] = (refs, {MAIN_SHA: {**only_bin, "pytorch_model.bin": _bin(_shifted())}}, None)
    yield hub
    hub.server.shutdown()


def _words(model):
    return model.get_input_embeddings().weight


def test_subfolder_reads_the_checkpoint_from_that_folder_of_the_repo(hub):
    with pytest.raises(CheckpointError, match="has no config.json"):
        gitfast.GitForCausalLM.from_pretrained("org/nested", cache_dir=hub.cache)
    model = gitfast.GitForCausalLM.from_pretrained("org/nested", subfolder="git", cache_dir=hub.cache)
    assert hub.fetched("org/nested") == {f"git/{name}" for name in NEEDED}
    assert torch.equal(_words(model), _words(gitfast.GitForCausalLM.from_pretrained(EMBEDDED_MODEL)))
    hub.requests.clear()
    again = gitfast.GitForCausalLM.from_pretrained("org/nested", subfolder="git", cache_dir=hub.cache,
                                                   local_files_only=True)
    assert hub.requests == [] and torch.equal(_words(again), _words(model))


def test_subfolder_of_a_local_folder(tmp_path):
    shutil.copytree(EMBEDDED_MODEL, tmp_path / "git")
    model = gitfast.GitForCausalLM.from_pretrained(tmp_path, subfolder="git")
    assert torch.equal(_words(model), _words(gitfast.GitForCausalLM.from_pretrained(EMBEDDED_MODEL)))
    with pytest.raises(CheckpointError, match="no subfolder 'nope'"):
        gitfast.GitForCausalLM.from_pretrained(tmp_path, subfolder="nope")


def test_force_download_fetches_cached_files_again(hub):
    gitfast.GitForCausalLM.from_pretrained("org/git-shapes", cache_dir=hub.cache)
    hub.requests.clear()
    gitfast.GitForCausalLM.from_pretrained("org/git-shapes", cache_dir=hub.cache)
    assert hub.fetched("org/git-shapes") == set()  # cached: checked, not fetched
    gitfast.GitForCausalLM.from_pretrained("org/git-shapes", cache_dir=hub.cache, force_download=True)
    assert hub.fetched("org/git-shapes") == NEEDED


def test_use_safetensors_picks_the_weights_as_transformers_does(hub):
    shifted = _shifted()[WORDS]
    default = gitfast.GitForCausalLM.from_pretrained("org/both", cache_dir=hub.cache)
    assert "model.safetensors" in hub.fetched("org/both") and "pytorch_model.bin" not in hub.fetched("org/both")
    assert not torch.equal(_words(default), shifted)
    hub.requests.clear()
    pickled = gitfast.GitForCausalLM.from_pretrained("org/both", cache_dir=hub.cache, use_safetensors=False)
    assert hub.fetched("org/both") == {"pytorch_model.bin"}  # the side files are cached by now
    assert torch.equal(_words(pickled), shifted)
    assert torch.equal(_words(gitfast.GitForCausalLM.from_pretrained("org/bin-only", cache_dir=hub.cache)), shifted)
    with pytest.raises(CheckpointError, match=r"has no weights \(use_safetensors=True\)"):
        gitfast.GitForCausalLM.from_pretrained("org/bin-only", cache_dir=hub.cache, use_safetensors=True)


def test_use_safetensors_on_a_local_folder(tmp_path):
    shutil.copytree(EMBEDDED_MODEL, tmp_path / "m")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(_bin(_shifted()))
    shifted = _shifted()[WORDS]
    load = gitfast.GitForCausalLM.from_pretrained
    assert not torch.equal(_words(load(tmp_path / "m")), shifted)
    assert not torch.equal(_words(load(tmp_path / "m", use_safetensors=True)), shifted)
    assert torch.equal(_words(load(tmp_path / "m", use_safetensors=False)), shifted)
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .* \(use_safetensors=True\)"):
        gitfast.GitForCausalLM.from_pretrained(tmp_path / "m", use_safetensors=True)
    (tmp_path / "m" / "pytorch_model.bin").unlink()
    shutil.copy(EMBEDDED_MODEL / "model.safetensors", tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"\(use_safetensors=False\): expected pytorch_model.bin"):
        gitfast.GitForCausalLM.from_pretrained(tmp_path / "m", use_safetensors=False)
