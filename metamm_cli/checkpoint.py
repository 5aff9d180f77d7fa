"""Checkpoints: written atomically (temporary file, fsync, rename), validated on load."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

from metamm_cli import ConfigError

FORMAT = "metamm-checkpoint"
VERSION = 1


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Write ``state`` so that ``path`` holds either the old or the new checkpoint, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, key: str = "--ckpt", prefer: str = "last.pt") -> Dict[str, Any]:
    """Load a metamm checkpoint on the CPU (tensors only, no arbitrary pickles). ``path`` may be
    a run folder, which means its ``checkpoints/<prefer>``."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / prefer, path / prefer):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise ConfigError(f"{key} {path}: a folder without checkpoints/{prefer}")
    if not path.is_file():
        raise ConfigError(f"{key} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises anything on a foreign file
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise ConfigError(f"{key} {path}: not a readable metamm checkpoint "
                          f"({type(e).__name__}: {first})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{key} {path}: not a metamm checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise ConfigError(f"{key} {path}: checkpoint version {state.get('version')} is not supported "
                          f"(this metamm reads version {VERSION})")
    state["path"] = str(path)
    return state
