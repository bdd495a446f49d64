import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be chosen
# before triton is first imported, hence here at the top of the test session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# A test build of the extension in place of gitfast._C (tests/avx512_emulation.py)
if os.environ.get("GITFAST_TEST_EXTENSION"):
    from avx512_emulation import install

    install(os.environ["GITFAST_TEST_EXTENSION"])


def pytest_sessionstart(session):
    # The tests compare gitfast's tokens with transformers' generate; before 5.18 that is wrong for
    # GIT once its KV cache is used, so a run there would blame gitfast for transformers' bug (and
    # before 5.24 the drop-in's API and sampling differ: gitfast/checkpoint/compat.py).
    from gitfast.checkpoint.compat import transformers_problem

    problem = transformers_problem()
    if problem is not None:
        pytest.exit(f"refusing to compare with this transformers: {problem}", returncode=3)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random GIT checkpoint with tokenizer and processor files (tests/image_factory.py), shared
    read-only by the captioning, CLI, shard, worker, Ray, memory and resume tests."""
    from image_factory import make_checkpoint

    return make_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture
def fresh_decision(monkeypatch):
    """`fresh_decision(kind, env_var)`: a backend_choice decision made anew in the test (its forcing
    variable unset), and forgotten again after it, so the next user measures as a new process does."""
    from gitfast import backend_choice

    kinds = []

    def fresh(kind, env_var):
        monkeypatch.delenv(env_var, raising=False)
        backend_choice.forget(kind)
        kinds.append(kind)

    yield fresh
    for kind in kinds:
        backend_choice.forget(kind)


@pytest.fixture
def forced_fp32(monkeypatch):
    """force(name, band): an fp32 Linear band's decision (gitfast.fp32_backends) made as its environment
    variable naming `name` does, whatever this CPU would measure; the process's own decisions come back
    afterwards."""
    from gitfast import backend_choice, fp32_backends

    def force(name, band=fp32_backends.NARROW):
        monkeypatch.setenv(band.env, name)
        backend_choice.forget(band.kind)
        assert fp32_backends.decide(band) == name
    yield force
    for band in fp32_backends.BANDS:
        backend_choice.forget(band.kind)
