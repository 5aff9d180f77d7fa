"""Meta-algorithms: a new one is a MetaAlgorithm subclass plus configs/algorithm/NAME.yaml."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.config import instantiate_checked
from metamm_cli.algorithms.base import MetaAlgorithm, accuracy
from metamm_cli.crossmodal import attach, restrict
from metamm_cli.data.base import MultimodalDataset
from metamm_cli.models.net import build_model

__all__ = ["MetaAlgorithm", "accuracy", "build_algorithm", "load_weights", "mismatch"]


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
    fusion = algo.model.fusion
    if getattr(fusion, "level", "sample") == "prototype" and not implements(algo, fusion.needs):
        users = "protonet" if fusion.needs == "scores" else "protonet, matching or relation"
        raise ConfigError(f"fusion={type(fusion).__name__.lower()} works on prototypes and has no sample "
                          f"embedding: use a metric algorithm that compares queries with classes "
                          f"({users}), not {type(algo).__name__}")
    if hasattr(fusion, "check"):  # a fusion's start-up checks of the setting it is used in
        fusion.check(cfg, list(dataset.modalities), shared=hasattr(algo.model, "mapping"))
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


def implements(algo: MetaAlgorithm, method: str) -> bool:
    """Whether ``algo`` overrides the base class's ``method`` (``class_scores``, ``scores``)."""
    own = getattr(type(algo), method, None)
    return own is not None and own is not getattr(MetaAlgorithm, method, None)


def mismatch(model: torch.nn.Module, weights: Dict[str, torch.Tensor]) -> str:
    """Why ``weights`` do not fit ``model``: the missing, unexpected and mis-shaped names."""
    own = model.state_dict()
    parts = []
    for label, names in (("missing", [k for k in own if k not in weights]),
                         ("unexpected", [k for k in weights if k not in own]),
                         ("shape differs", [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
                                            for k in own if k in weights
                                            and tuple(weights[k].shape) != tuple(own[k].shape)])):
        if names:
            parts.append(f"{label}: {', '.join(names[:3])}{f' (+{len(names) - 3} more)' if len(names) > 3 else ''}")
    return "; ".join(parts) or "the weights do not fit"


def load_weights(algo: nn.Module, weights: Dict[str, torch.Tensor], what: str) -> None:
    """``algo.load_state_dict(weights)``; weights that do not fit are one line naming ``what``
    (the checkpoint) and the missing, unexpected and mis-shaped names."""
    try:
        algo.load_state_dict(weights)
    except RuntimeError as e:
        raise ConfigError(f"{what}: its weights do not fit the model of its config (was an encoder, "
                          f"fusion or algorithm key changed? {mismatch(algo, weights)})") from e


def registered() -> Dict[str, type]:
    """Every shipped algorithm, ``{name: class}`` from ``configs/algorithm/NAME.yaml``'s
    ``_target_``: what tests, benchmarks and sweeps enumerate (a new algorithm is one file plus
    one YAML, and its declarations on the class say what it is and can do)."""
    from pathlib import Path

    import yaml
    from hydra.utils import get_class

    from metamm_cli.config import config_dir

    out = {}
    for path in sorted(Path(config_dir(), "algorithm").glob("*.yaml")):
        out[path.stem] = get_class(yaml.safe_load(path.read_text())["_target_"])
    return out
