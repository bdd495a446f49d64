"""Hub ids download like transformers: the real huggingface_hub client against a small hub on 127.0.0.1.

The server implements what huggingface_hub's `HfApi.model_info` and `hf_hub_download` call: model
info `GET /api/models/{repo}/revision/{rev}` (JSON with `sha` and `siblings`) and file resolve
`HEAD`/`GET /{repo}/resolve/{rev}/{file}` with `X-Repo-Commit`, `ETag` and `Content-Length`, hub
error codes (`X-Error-Code: RepoNotFound` / `RevisionNotFound` / `EntryNotFound`) otherwise. It serves
the embedded model's files and records every request, so the tests see exactly what was fetched.
No network beyond 127.0.0.1.
"""
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import gitfast
from gitfast.checkpoint import loading
from gitfast.defaults import EMBEDDED_MODEL
from gitfast.checkpoint.loading import CheckpointError

MAIN_SHA, V1_SHA, SHARDED_SHA = "a" * 40, "b" * 40, "c" * 40
TOKEN = "hf_localtesttoken"
NEEDED = {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
          "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"}


def _embedded_files():
    return {p.name: p.read_bytes() for p in EMBEDDED_MODEL.iterdir() if p.is_file()}


def _repos():
    main = _embedded_files()
    main["big-unrelated.bin"] = b"\0" * (8 << 20)   # must never be fetched
    main["pytorch_model.bin"] = b"not fetched: safetensors are preferred"
    v1 = dict(main)
    gen = json.loads(main["generation_config.json"])
    gen["max_length"] = 7                             # what tells the revisions apart
    v1["generation_config.json"] = json.dumps(gen).encode()
    sharded = {k: v for k, v in _embedded_files().items() if k != "model.safetensors"}
    weights = load_file(str(EMBEDDED_MODEL / "model.safetensors"))
    names = sorted(weights)
    half = len(names) // 2
    index = {"metadata": {}, "weight_map": {}}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gitfast-hub-test-{os.getpid()}-{shard}")
        save_file({n: weights[n].contiguous() for n in part}, path, metadata={"format": "pt"})
        with open(path, "rb") as f:
            sharded[shard] = f.read()
        os.unlink(path)
        index["weight_map"].update({n: shard for n in part})
    sharded["model.safetensors.index.json"] = json.dumps(index).encode()
    return {
        "org/git-shapes": ({"main": MAIN_SHA, "v1": V1_SHA, MAIN_SHA: MAIN_SHA, V1_SHA: V1_SHA},
                           {MAIN_SHA: main, V1_SHA: v1}, None),
        "org/private": ({"main": MAIN_SHA}, {MAIN_SHA: main}, TOKEN),
        "org/sharded": ({"main": SHARDED_SHA}, {SHARDED_SHA: sharded}, None),
    }


class Hub:
    def __init__(self):
        self.repos = _repos()
        self.requests = []  # (method, path, authorization)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _error(self, status, code):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                payload = json.dumps({"error": code}).encode()
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(payload)

            def _serve(self, body):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
                parts = path.strip("/").split("/")
                api = parts[:2] == ["api", "models"]
                repo = "/".join(parts[2:4] if api else parts[0:2])
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound")
                refs, trees, token = hub.repos[repo]
                if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                    return self._error(401, "RepoNotFound")
                if api:  # /api/models/{ns}/{name}[/revision/{rev}]
                    rev = parts[5] if len(parts) > 5 else "main"
                    if rev not in refs:
                        return self._error(404, "RevisionNotFound")
                    sha = refs[rev]
                    info = {"id": repo, "sha": sha, "private": token is not None,
                            "siblings": [{"rfilename": f} for f in sorted(trees[sha])]}
                    return self._send(json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                if parts[2:3] != ["resolve"] or len(parts) < 5:
                    return self._error(404, "EntryNotFound")
                rev, filename = parts[3], "/".join(parts[4:])
                if rev not in refs:
                    return self._error(404, "RevisionNotFound")
                sha = refs[rev]
                if filename not in trees[sha]:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", sha)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = trees[sha][filename]
                etag = hashlib.sha256(data).hexdigest()
                self._send(data, {"X-Repo-Commit": sha, "ETag": f'"{etag}"'}, body)

            def _send(self, data, headers, body):
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fetched(self, repo):
        """Files downloaded (GET) from `repo`."""
        prefix = f"/{repo}/resolve/"
        return {p[len(prefix):].split("/", 1)[1] for m, p, _ in self.requests if m == "GET" and p.startswith(prefix)}


@pytest.fixture(scope="module")
def served():
    hub = Hub()
    yield hub
    hub.server.shutdown()


@pytest.fixture
def hub(served, tmp_path, monkeypatch):
    served.requests.clear()
    monkeypatch.setenv("HF_ENDPOINT", served.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    served.cache = str(tmp_path / "hf-home" / "hub")
    return served


def test_downloads_only_the_files_gitfast_needs_then_loads_offline(hub, monkeypatch):
    model = gitfast.GitForCausalLM.from_pretrained("org/git-shapes", cache_dir=hub.cache)
    assert hub.fetched("org/git-shapes") == NEEDED  # no big unrelated file, no .bin beside the safetensors
    assert ("GET", "/api/models/org/git-shapes/revision/main", None) in hub.requests
    reference = gitfast.GitForCausalLM.from_pretrained(EMBEDDED_MODEL)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name

    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = loading.load_checkpoint("org/git-shapes", cache_dir=hub.cache)
    assert hub.requests == []  # served from the cache, no request at all
    assert again.folder.parts[-2:] == ("snapshots", MAIN_SHA)
    assert loading.load_processor(again.folder).tokenizer.decode([5, 8]) == "one small"


def test_local_files_only_uncached_is_the_clear_error(hub):
    with pytest.raises(CheckpointError, match="neither a local folder nor a model in the local Hugging Face "
                                              "cache.*local_files_only=True"):
        gitfast.GitForCausalLM.from_pretrained("org/git-shapes", cache_dir=hub.cache, local_files_only=True)
    assert hub.requests == []


def test_offline_uncached_is_the_clear_error(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="neither a local folder nor a model in the local Hugging Face "
                                              "cache.*HF_HUB_OFFLINE=1"):
        loading.resolve("org/git-shapes", cache_dir=hub.cache)
    assert hub.requests == []


def test_revision_is_honoured(hub):
    v1 = loading.load_checkpoint("org/git-shapes", revision="v1", cache_dir=hub.cache)
    main = loading.load_checkpoint("org/git-shapes", cache_dir=hub.cache)
    assert v1.folder.name == V1_SHA and main.folder.name == MAIN_SHA
    assert v1.generation_config.max_length == 7 and main.generation_config.max_length != 7
    assert ("GET", "/api/models/org/git-shapes/revision/v1", None) in hub.requests
    assert loading.resolve("org/git-shapes", revision="v1", cache_dir=hub.cache, local_files_only=True).name == V1_SHA
    with pytest.raises(CheckpointError, match="no revision 'v2'"):
        loading.resolve("org/git-shapes", revision="v2", cache_dir=hub.cache)


def test_token_is_sent_as_authorization_header(hub):
    with pytest.raises(CheckpointError, match="pass token="):
        loading.resolve("org/private", cache_dir=hub.cache)
    hub.requests.clear()
    folder = loading.resolve("org/private", cache_dir=hub.cache, token=TOKEN)
    assert (folder / "model.safetensors").is_file()
    assert hub.requests and all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)


def test_sharded_safetensors_fetch_their_shards(hub):
    ck = loading.load_checkpoint("org/sharded", cache_dir=hub.cache)
    assert hub.fetched("org/sharded") == (NEEDED - {"model.safetensors"}) | {
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert sum(p.numel() for p in ck.model.parameters()) == 1_135_007


def test_unknown_repo_is_named(hub):
    with pytest.raises(CheckpointError, match="'org/nothing' is neither a local folder nor a model on the "
                                              "Hugging Face hub"):
        loading.resolve("org/nothing", cache_dir=hub.cache)


def test_cli_downloads_with_the_environments_hub(hub, tmp_path):
    """`gitfast caption --model ORG/NAME` in a fresh process: HF_ENDPOINT and HF_HOME as a user sets them."""
    out = tmp_path / "captions.jsonl"
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "cli-home"))
    example = str(EMBEDDED_MODEL.parent / "examples" / "shapes_00.png")
    run = subprocess.run([sys.executable, "-m", "gitfast.tools.cli", "caption", example, "--model", "org/git-shapes",
                          "--out", str(out), "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["caption"] == "two small white triangles at the top"
    assert (tmp_path / "cli-home" / "hub" / "models--org--git-shapes" / "snapshots" / MAIN_SHA / "vocab.txt").exists()
    assert hub.fetched("org/git-shapes") == NEEDED


def test_captioner_passes_token_and_local_files_only(hub):
    """The Captioner resolves hub ids with the same options as from_pretrained."""
    with pytest.raises(CheckpointError, match="local_files_only=True"):
        gitfast.Captioner("org/git-shapes", cache_dir=hub.cache, local_files_only=True)
    assert hub.requests == []
    cap = gitfast.Captioner("org/private", cache_dir=hub.cache, token=TOKEN, device="cpu")
    assert cap.caption(Image.new("RGB", (64, 64), "white"))[0].ok
