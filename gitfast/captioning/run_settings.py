"""The settings that shape captions, recorded beside an output so that `--resume` cannot mix captions
made under different ones.

`--out FILE` records them in `FILE.settings.json`, `--out-dir DIR` in `DIR/gitfast-settings.json`:
the model (its resolved folder), max_new_tokens, num_beams, prompt, the dtype `--dtype` resolved
to on this run's devices (never "auto": that is bf16 on one CPU and fp32 on another) and, with
`--quantize`, the INT8 activations' bits and the LM head's precision this machine picked (the 8-bit
GEMM backends give the same integers, so which of them ran is not recorded). A resume whose
settings differ is refused, naming each difference, unless `--force`; an output made before
settings were recorded is resumed as it is and gets its record then.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .formats import OutputError
from .resumable import replace_with

FILE_SUFFIX, FOLDER_NAME = ".settings.json", "gitfast-settings.json"


class SettingsChanged(OutputError):
    """A resume asked for settings other than those its output was made with."""


def settings_path(out: Optional[str] = None, out_dir: Optional[str] = None) -> Optional[str]:
    if out_dir is not None:
        return os.path.join(out_dir, FOLDER_NAME)
    if out is None:
        return None
    return os.path.realpath(out) + FILE_SUFFIX


def check(path: str, settings: dict, *, resume: bool, force: bool) -> bool:
    """Raises SettingsChanged when a resume's settings differ from those recorded at `path`; True
    when `settings` should be (re)recorded."""
    if not resume or not os.path.isfile(path):
        return True
    try:
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot read the output's recorded settings {path}: {exc}") from None
    changed = [f"{k} {settings.get(k)!r} (was {before.get(k)!r})" for k in sorted(set(before) | set(settings))
               if before.get(k) != settings.get(k)]
    if changed and not force:
        raise SettingsChanged(f"--resume with other settings than the output was made with: {'; '.join(changed)}. "
                              "Its captions would mix both; write to a new output, or pass --force to mix them")
    return bool(changed)


def record(path: str, settings: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    replace_with(path, lambda f: f.write(json.dumps(settings, indent=1, ensure_ascii=True) + "\n"))
