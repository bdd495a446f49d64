"""Hub ids resolved with `huggingface_hub`, as transformers resolves them: downloaded on first use into
the Hugging Face cache (only the files gitfast reads), then served from it.

Online: one model-info call lists the revision's files; gitfast picks its own (config, generation
config, processor and tokenizer files, and one set of weights: `model.safetensors`, else the
safetensors index and its shards, else the `.bin` equivalents) and fetches each with
`hf_hub_download` (the hub's progress bars, ETag checks and cache layout; a cached file is not fetched
again, unless `force_download=True`). `subfolder` reads the checkpoint from that folder of the repo,
and `use_safetensors` picks the weights as transformers does (None: safetensors, else `.bin`; True:
safetensors only; False: `.bin` only). Offline (`local_files_only=True`, or `HF_HUB_OFFLINE=1` when
huggingface_hub was imported or now) or with the hub unreachable: the cached snapshot of the
revision, else a `HubError` that says how to get it. `HF_ENDPOINT` set after import is honoured too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, List, Optional


class HubError(ValueError):
    """A hub id that cannot be resolved, with the reason (`loading.resolve` raises it as CheckpointError)."""

# Weight file names (loading.py imports them from here).
SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# What gitfast (GitConfig, GenerationConfig, AutoProcessor for GIT) reads besides the weights.
SIDE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "added_tokens.json")


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline(local_files_only: bool = False) -> bool:
    from huggingface_hub import constants

    return bool(local_files_only or constants.HF_HUB_OFFLINE or _truthy(os.environ.get("HF_HUB_OFFLINE")))


def _endpoint() -> Optional[str]:
    return (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None


def weight_files(use_safetensors: Optional[bool] = None) -> tuple:
    """The weight file names `use_safetensors` allows, in the order they are preferred."""
    safe, pickled = (SAFE_SINGLE, SAFE_INDEX), (BIN_SINGLE, BIN_INDEX)
    return safe if use_safetensors else pickled if use_safetensors is False else safe + pickled


def files_to_fetch(repo_files: Iterable[str], use_safetensors: Optional[bool] = None) -> List[str]:
    """The side files present, plus one set of weights (index files; their shards come after)."""
    present = set(repo_files)
    wanted = [f for f in SIDE_FILES if f in present]
    for weights in weight_files(use_safetensors):
        if weights in present:
            return wanted + [weights]
    return wanted


def shard_files(index_file: Path) -> List[str]:
    """The weight files a sharded checkpoint's index names (its `weight_map` values), sorted. Each must
    be a file name inside the checkpoint's folder: an absolute path or one going up (`../x`) is
    refused, like a malformed index, with a HubError naming the file and the field."""
    try:
        index = json.loads(Path(index_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HubError(f"cannot read the weight index {index_file}: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise HubError(f"the weight index {index_file} has no \"weight_map\" object (tensor name -> file name), "
                       "or it is empty")
    files = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise HubError(f"the weight index {index_file}: weight_map[{tensor!r}] is {name!r}, not a file name")
        if not _inside_folder(name):
            raise HubError(f"the weight index {index_file}: weight_map[{tensor!r}] is {name!r}, which is not "
                           "inside the checkpoint's folder; shards are only read from there")
        files.add(name)
    return sorted(files)


def _inside_folder(name: str) -> bool:
    """True for a relative path that stays below its folder (checked by its text: the hub cache's
    files are links into its blob store, so where a link points says nothing)."""
    parts = name.split("/")
    return not os.path.isabs(name) and ".." not in parts and "" not in parts


def resolve_hub_id(repo_id: str, *, revision: Optional[str] = None, cache_dir=None, token=None,
                   local_files_only: bool = False, subfolder: str = "", force_download: bool = False,
                   use_safetensors: Optional[bool] = None) -> Path:
    """The snapshot folder of `repo_id` at `revision` (its `subfolder` when given), downloading what
    gitfast needs when allowed."""
    from huggingface_hub.utils import validate_repo_id
    from huggingface_hub.errors import HFValidationError

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"{repo_id!r} is neither a local folder nor a model id on the Hugging Face hub "
                              f"(namespace/name): {exc}") from exc
    cache_dir = None if cache_dir is None else str(cache_dir)
    if offline(local_files_only):
        why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"
        return _cached(repo_id, revision, cache_dir, f"downloading is off ({why})", subfolder)
    try:
        return _download(repo_id, revision, cache_dir, token, subfolder, force_download, use_safetensors)
    except _Unreachable as exc:
        return _cached(repo_id, revision, cache_dir, f"the hub could not be reached ({exc})", subfolder)


class _Unreachable(Exception):
    """No answer from the hub (connection, timeout, server error): the cache may still serve."""


def _download(repo_id: str, revision: Optional[str], cache_dir, token, subfolder: str = "",
              force_download: bool = False, use_safetensors: Optional[bool] = None) -> Path:
    try:
        import httpx2 as httpx  # huggingface_hub 2.x
    except ImportError:
        import httpx  # huggingface_hub 1.x
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    endpoint, rev = _endpoint(), revision or "main"
    subfolder = (subfolder or "").strip("/")
    prefix, where = (f"{subfolder}/", f" folder {subfolder!r}") if subfolder else ("", "")

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder or None, revision=rev, cache_dir=cache_dir,
                                    token=token, endpoint=endpoint, force_download=force_download))

    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=rev, token=token)
        listed = (s.rfilename[len(prefix):] for s in info.siblings or [] if s.rfilename.startswith(prefix))
        names = files_to_fetch(listed, use_safetensors)
        if "config.json" not in names:
            raise HubError(f"hub model {repo_id!r} (revision {rev}){where} has no config.json: "
                           "not a transformers checkpoint")
        allowed = weight_files(use_safetensors)
        if not any(n in names for n in allowed):
            only = "" if use_safetensors is None else f" (use_safetensors={use_safetensors})"
            raise HubError(f"hub model {repo_id!r} (revision {rev}){where} has no weights{only}: expected "
                           f"{' or '.join(allowed)}")
        folder = None
        for name in names:
            path = fetch(name)
            folder = path.parent
            if name in (SAFE_INDEX, BIN_INDEX):
                for shard in shard_files(path):
                    fetch(shard)
        return folder
    except RevisionNotFoundError as exc:
        raise HubError(f"hub model {repo_id!r} has no revision {rev!r}") from exc
    except GatedRepoError as exc:
        raise HubError(f"hub model {repo_id!r} is gated: accept its terms on the hub, then pass "
                              f"token= (or log in with `hf auth login`)") from exc
    except RepositoryNotFoundError as exc:
        raise HubError(f"{repo_id!r} is neither a local folder nor a model on the Hugging Face hub "
                              f"(or it is private: pass token=, or log in with `hf auth login`)") from exc
    except (httpx.ConnectError, httpx.TimeoutException, OfflineModeIsEnabled) as exc:
        raise _Unreachable(f"{type(exc).__name__}: {exc}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubError(f"hub model {repo_id!r} refused access (HTTP {status}): pass token= "
                                  "(or log in with `hf auth login`)") from exc
        if status is not None and status >= 500:
            raise _Unreachable(f"HTTP {status}") from exc
        raise HubError(f"cannot download {repo_id!r} (revision {rev}): {exc}") from exc


def _cached(repo_id: str, revision: Optional[str], cache_dir, why: str, subfolder: str = "") -> Path:
    """The cached snapshot folder (found through its config.json), else the clear error."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "config.json", subfolder=(subfolder or "").strip("/") or None,
                                    revision=revision, cache_dir=cache_dir, local_files_only=True)).parent
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        rev = f" at revision {revision!r}" if revision else ""
        raise HubError(
            f"{repo_id!r} is neither a local folder nor a model in the local Hugging Face cache{rev}, and "
            f"{why}: run once with network access (gitfast downloads it), or fetch it with "
            f"`hf download {repo_id}`, or pass the checkpoint's folder."
        ) from exc
