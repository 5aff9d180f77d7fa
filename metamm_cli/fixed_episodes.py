"""Fixed-episode evaluation (``eval.episodes_file=F``): published protocols often fix their test
episodes. ``F`` is a JSON file::

    {"root": DIR, "episodes": [{"support": [S, ...], "query": [S, ...]}, ...]}

with each sample ``S`` = ``{"label": NAME, "image": "a/b.png", "audio": "c.wav", ...}``: paths are
relative to ``root`` (a relative ``root`` is relative to the JSON file; without ``root``, the
JSON file's folder); a modality absent from a sample is masked. Files are decoded by the
checkpoint's dataset (:meth:`MultimodalDataset.decode`), so with its preprocessing. Episodes may
differ in way and shot: each runs as its own task.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch

from metamm_cli import ConfigError
from metamm_cli.data.base import MultimodalDataset
from metamm_cli.data.episodes import Episode, gather_modalities


def load_episodes_file(path: str) -> tuple[Path, List[dict]]:
    """``(root, episodes)`` of an episodes file, its structure checked."""
    key = f"eval.episodes_file={path}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: no such file")
    try:
        spec = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: not valid JSON ({e})") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("episodes"), list) or not spec["episodes"]:
        raise ConfigError(f'{key}: expected {{"root": DIR, "episodes": [{{"support": [...], '
                          f'"query": [...]}}, ...]}} with at least one episode')
    root = spec.get("root")
    if root is None:
        root = "."  # "root": null or absent: the JSON file's folder
    if not isinstance(root, str) or not root.strip():
        raise ConfigError(f"{key}: \"root\" must be a folder path (a string), got {root!r}")
    root = Path(root).expanduser()
    root = root if root.is_absolute() else file.parent / root
    for i, ep in enumerate(spec["episodes"]):
        if not isinstance(ep, dict) or not all(isinstance(ep.get(k), list) and ep[k]
                                               for k in ("support", "query")):
            raise ConfigError(f"{key}: episode {i} needs non-empty 'support' and 'query' lists")
        for part in ("support", "query"):
            for s in ep[part]:
                if not isinstance(s, dict) or "label" not in s:
                    raise ConfigError(f"{key}: episode {i}: every {part} sample needs a 'label'")
    return root, spec["episodes"]


class EpisodeBuilder:
    """Turns the samples of an episodes file into one-task :class:`Episode` s on ``device``,
    decoding each file once."""

    def __init__(self, dataset: MultimodalDataset, root: Path, device, key: str):
        self.dataset, self.root, self.device, self.key = dataset, root, device, key
        self.names = list(dataset.modalities)
        self.cache: Dict[tuple, torch.Tensor] = {}

    def _decode(self, modality: str, rel: str) -> torch.Tensor:
        if (modality, rel) not in self.cache:
            path = self.root / rel
            if not path.is_file():
                raise ConfigError(f"{self.key}: file not found: {path}")
            x = self.dataset.decode(modality, str(path))
            spec = self.dataset.modalities[modality]
            if tuple(x.shape) != tuple(spec.shape):
                raise ConfigError(f"{self.key}: {path} decodes to shape {list(x.shape)}, the "
                                  f"checkpoint's {modality} has {list(spec.shape)}")
            self.cache[(modality, rel)] = x
        return self.cache[(modality, rel)]

    def samples(self, samples: List[dict], where: str):
        data = {m: [] for m in self.names}
        present = []
        for s in samples:
            extra = [k for k in s if k != "label" and k not in self.names]
            if extra:
                raise ConfigError(f"{self.key}: {where}: modality '{extra[0]}' is not one of the "
                                  f"checkpoint's dataset modalities {self.names}")
            row = []
            for m in self.names:
                if s.get(m):
                    data[m].append(self._decode(m, str(s[m])))
                    row.append(True)
                else:
                    data[m].append(None)
                    row.append(False)
            if not any(row):
                raise ConfigError(f"{self.key}: {where}: a sample (label {s['label']}) names no "
                                  f"file of the modalities {self.names}")
            present.append(row)
        out = {}
        for m in self.names:
            ref = next(x for x in data[m] if x is not None) if any(x is not None for x in data[m]) \
                else torch.zeros(self.dataset.modalities[m].shape, dtype=_stored_dtype(self.dataset, m))
            out[m] = torch.stack([x if x is not None else torch.zeros_like(ref) for x in data[m]])[None]
        present_t = torch.tensor(present, dtype=torch.bool)[None]
        idx = torch.arange(len(samples))[None]
        inputs = gather_modalities({m: x[0] for m, x in out.items()}, idx, present_t)
        transform = self.dataset.transform("test")  # as evaluation episodes see their inputs
        return (inputs if transform is None else transform(inputs, 2)), present_t

    def episode(self, ep: dict, i: int) -> Episode:
        classes = list(dict.fromkeys(str(s["label"]) for s in ep["support"]))
        for s in ep["query"]:
            if str(s["label"]) not in classes:
                raise ConfigError(f"{self.key}: episode {i}: query label '{s['label']}' is absent "
                                  f"from the support set {classes}")
        support, s_pre = self.samples(ep["support"], f"episode {i}")
        query, q_pre = self.samples(ep["query"], f"episode {i}")
        label = {c: j for j, c in enumerate(classes)}
        s_lab = torch.tensor([[label[str(s["label"])] for s in ep["support"]]])
        q_lab = torch.tensor([[label[str(s["label"])] for s in ep["query"]]])
        dev = self.device
        return Episode({m: x.to(dev) for m, x in support.items()}, s_pre.to(dev), s_lab.to(dev),
                       {m: x.to(dev) for m, x in query.items()}, q_pre.to(dev), q_lab.to(dev),
                       torch.arange(len(classes), device=dev)[None])


def _stored_dtype(dataset: MultimodalDataset, modality: str) -> torch.dtype:
    return dataset.modalities[modality].dtype


def summary(episodes: List[dict]) -> str:
    """``1 fixed episode, 1500-way 1-shot 2-query, chance 0.07%`` (ranges where episodes differ)."""
    def span(values) -> str:
        lo, hi = min(values), max(values)
        return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"

    ways, shots, queries = [], [], []
    for ep in episodes:
        classes = list(dict.fromkeys(str(s["label"]) for s in ep["support"]))
        ways.append(len(classes))
        shots.append(len(ep["support"]) / len(classes))
        queries.append(len(ep["query"]) / len(classes))
    chance = sum(100 / w for w in ways) / len(ways)
    return (f"{len(episodes)} fixed episode{'s' if len(episodes) > 1 else ''}, {span(ways)}-way "
            f"{span(shots)}-shot {span(queries)}-query, chance {chance:.2f}%")


def evaluate_episodes_file(algo, dataset: MultimodalDataset, path: str, device,
                           autocast) -> tuple[torch.Tensor, str]:
    """Per-episode accuracies (percent, ``[E]``) of ``algo`` on the episodes of ``path``, and the
    file's setting in words (:func:`summary`)."""
    from metamm_cli.algorithms import accuracy

    key = f"eval.episodes_file={path}"
    root, episodes = load_episodes_file(path)
    builder = EpisodeBuilder(dataset, root, device, key)
    was_training = algo.training
    algo.eval()
    accs = []
    with torch.no_grad():
        for i, ep in enumerate(episodes):
            episode = builder.episode(ep, i)
            try:
                with autocast():
                    _, logits = algo(episode)
            except ConfigError as e:
                raise ConfigError(f"{key}: episode {i} ({episode.way}-way): {e}") from e
            accs.append(accuracy(logits, episode.query_labels))
    algo.train(was_training)
    return torch.cat(accs), summary(episodes)
