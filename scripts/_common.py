"""Shared by the scripts: compose a metamm config in-process (no subprocess, no run folder)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402

from metamm_cli.config import config_dir, register_schemas  # noqa: E402


def compose_config(overrides, name: str = "train"):
    register_schemas()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=list(overrides))
