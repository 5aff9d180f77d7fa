"""Meta-algorithms: a new one is a MetaAlgorithm subclass plus configs/algorithm/NAME.yaml."""
from __future__ import annotations

from typing import Optional

import torch
from omegaconf import DictConfig

from metamm_cli import ConfigError
from metamm_cli.config import instantiate_checked
from metamm_cli.algorithms.base import MetaAlgorithm, accuracy
from metamm_cli.crossmodal import attach, restrict
from metamm_cli.data.base import MultimodalDataset
from metamm_cli.models.net import build_model

__all__ = ["MetaAlgorithm", "accuracy", "build_algorithm"]


def build_algorithm(cfg: DictConfig, dataset: MultimodalDataset, way: Optional[int] = None) -> MetaAlgorithm:
    """Model (encoders + fusion) from the config, wrapped by ``algorithm._target_``; ``way`` is
    the training way (a checkpoint's, when evaluating at another way); ``num_classes`` is the
    number of classes of the training split."""
    algo = instantiate_checked(cfg.algorithm, "algorithm", model=build_model(cfg, dataset),
                               way=way or cfg.episode.way, num_classes=dataset.num_classes("train"))
    trained = way or cfg.episode.way
    test_way = cfg.get("eval", {}).get("way") or cfg.episode.way
    if test_way != trained and algo.fixed_way():  # at start-up, not at the first validation
        key = "episode.way" if cfg.episode.way != trained else "eval.way"
        raise ConfigError(f"{key}={test_way} is impossible: {algo.fixed_way()}; evaluate at the training way: "
                          + (f"episode.way={trained}" if key == "episode.way" else f"eval.way=null or {trained}"))
    if getattr(algo.model.fusion, "level", "sample") == "prototype" and not getattr(algo, "prototype_fusion", False):
        raise ConfigError(f"fusion={type(algo.model.fusion).__name__.lower()} works on prototypes and "
                          f"has no sample embedding: use a metric algorithm (protonet), not "
                          f"{type(algo).__name__}")
    hide_class_level(algo, dataset)
    return attach(algo, cfg, list(dataset.modalities))  # cross-modal episodes, align.weight


def hide_class_level(algo: MetaAlgorithm, dataset: MultimodalDataset) -> None:
    """Class-level modalities (side information such as class attribute vectors: the same value
    for every sample of a class) are shown with the support set only: a query carrying its class's
    vector would give its label away. A forward pre-hook clears their presence in every query."""
    specs = dataset.modalities
    level = torch.tensor([s.level == "class" for s in specs.values()])
    if not bool(level.any()):
        return
    if bool(level.all()):
        raise ConfigError(f"dataset.modalities={list(specs)}: class-level side information alone cannot "
                          f"classify queries; add a sample modality (e.g. image)")
    algo.register_forward_pre_hook(lambda module, args: (restrict(args[0], None, ~level), *args[1:]))
