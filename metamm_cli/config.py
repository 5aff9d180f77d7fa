"""Structured-config schemas (types at composition) and range checks (at start-up).

Hydra merges the YAML files in ``configs/`` onto these dataclasses, so a wrong type
(``episode.way=abc``) or an unknown key (``episode.wya=5``) fails while composing; the
ranges that OmegaConf cannot express are checked by :func:`check_ranges`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from metamm_cli import ConfigError


class Device(enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Amp(enum.Enum):
    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


class OnNan(enum.Enum):
    stop = "stop"
    skip = "skip"


class Scheduler(enum.Enum):
    none = "none"
    cosine = "cosine"


class Split(enum.Enum):
    train = "train"
    val = "val"
    test = "test"


@dataclass
class EpisodeConfig:
    way: int = 5
    shot: int = 1
    query: int = 15


@dataclass
class TrainerConfig:
    device: Device = Device.auto
    amp: Amp = Amp.none
    max_steps: int = 1000
    meta_batch: int = 4
    task_chunk: Optional[int] = None  # tasks per forward/backward; None = whole meta-batch
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None
    log_every: int = 50
    val_every: int = 250
    val_episodes: int = 200
    ckpt_every: int = 250
    keep_last: int = 0  # step_XXXXXXXX.pt checkpoints kept besides last.pt/best.pt
    on_nan: OnNan = OnNan.stop  # non-finite loss/gradient: stop, or skip the update
    scheduler: Scheduler = Scheduler.none
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact resume
    resume: Any = None  # null | true (latest run of this task) | path to a .pt or run folder
    progress: bool = True
    tensorboard: bool = True


@dataclass
class EvalConfig:
    split: Split = Split.test
    episodes: int = 600
    tasks_per_batch: int = 50
    seed: int = 0


@dataclass
class TrainConfig:
    task_name: str = "default"
    seed: int = 0
    output_root: str = "outputs"
    dataset: Any = None
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    encoder: Any = None
    fusion: Any = None
    algorithm: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


def config_dir() -> str:
    """configs/ inside an installed wheel, else the repository's top-level configs/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise ConfigError(f"metamm's configs/ not found next to {here}; reinstall metamm")


_RANGES = [
    ("episode.way", lambda v: v >= 2, ">= 2"),
    ("episode.shot", lambda v: v >= 1, ">= 1"),
    ("episode.query", lambda v: v >= 1, ">= 1"),
    ("trainer.max_steps", lambda v: v >= 0, ">= 0"),
    ("trainer.meta_batch", lambda v: v >= 1, ">= 1"),
    ("trainer.task_chunk", lambda v: v is None or v >= 1, "null or >= 1"),
    ("trainer.lr", lambda v: v > 0, "> 0"),
    ("trainer.weight_decay", lambda v: v >= 0, ">= 0"),
    ("trainer.grad_clip", lambda v: v is None or v > 0, "null or > 0"),
    ("trainer.log_every", lambda v: v >= 1, ">= 1"),
    ("trainer.val_every", lambda v: v >= 1, ">= 1"),
    ("trainer.val_episodes", lambda v: v >= 1, ">= 1"),
    ("trainer.ckpt_every", lambda v: v >= 1, ">= 1"),
    ("trainer.keep_last", lambda v: v >= 0, ">= 0"),
    ("trainer.lr", lambda v: v < 3e38, "a float32 number (< 3e38)"),
    ("trainer.weight_decay", lambda v: v < 3e38, "a float32 number (< 3e38)"),
    ("trainer.grad_clip", lambda v: v is None or v < 3e38, "null or a float32 number (< 3e38)"),
    ("eval.episodes", lambda v: v >= 1, ">= 1"),
    ("eval.tasks_per_batch", lambda v: v >= 1, ">= 1"),
]


def check_ranges(cfg: DictConfig) -> None:
    for key, ok, allowed in _RANGES:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value} is out of range: must be {allowed}")
    modalities = OmegaConf.select(cfg, "dataset.modalities", default=None)
    if modalities is not None and len(modalities) == 0:
        raise ConfigError("dataset.modalities=[] is empty: name at least one modality, or null for all")
    for group in ("dataset", "fusion", "algorithm"):
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{group}: needs a config with a _target_ (pick one with {group}=NAME)")
