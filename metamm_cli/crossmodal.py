"""A shared space across modalities: cross-modal episodes and contrastive alignment.

- ``episode.support_modalities`` / ``episode.query_modalities`` restrict which modalities the
  support and the query of every episode may use (a presence-mask AND, :func:`restrict`):
  ``[image]`` / ``[audio]`` trains or tests "learn from pictures, recognise from sound". With a
  sample-level fusion such as ``mean`` and a ``mapping``, both land in one space.
- ``align.weight > 0`` adds ``weight *`` :func:`info_nce` (symmetric InfoNCE between the
  modalities of the same sample, CLIP-style, learned temperature) to any algorithm's loss;
  ``algorithm=align`` (:class:`metamm_cli.algorithms.align.AlignProtoNet`) trains with the alignment alone.

:func:`attach` installs both on any algorithm as forward hooks, so neither the trainer nor the
algorithms know about them and the checkpoint's keys do not change when only the modality
restriction is set (e.g. at ``metamm eval`` time).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.device import upcast
from metamm_cli.data.episodes import Episode


def modality_mask(names: Optional[Sequence[str]], modalities: Sequence[str], key: str) -> Optional[torch.Tensor]:
    """``[M]`` bool: which of ``modalities`` ``names`` keeps (None: all); unknown names fail."""
    if names is None:
        return None
    names = list(names)
    bad = [n for n in names if n not in modalities]
    if bad or not names:
        raise ConfigError(f"{key}={names}: each must be a modality of this dataset, one of {list(modalities)}")
    return torch.tensor([m in names for m in modalities])


def restrict(episode: Episode, support_keep: Optional[torch.Tensor],
             query_keep: Optional[torch.Tensor]) -> Episode:
    """The episode with ``support_present &= support_keep`` and ``query_present &= query_keep``
    (``[M]`` masks, None = unchanged). A sample left with no modality embeds as the fusion's
    empty input (zeros for ``mean``); datasets with missing modalities should keep that rare."""
    changes = {}
    if support_keep is not None:
        changes["support_present"] = episode.support_present & support_keep.to(episode.support_present.device)
    if query_keep is not None:
        changes["query_present"] = episode.query_present & query_keep.to(episode.query_present.device)
    return replace(episode, **changes) if changes else episode


def info_nce(za: torch.Tensor, zb: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (Oord et al. 2018; CLIP, Radford et al. 2021) within each task:
    ``za, zb [T, S, D]`` two modalities of the same ``S`` samples, ``valid [T, S]`` where both are
    present. With ``l_ij = scale * cos(za_i, zb_j)`` over valid ``i, j``,
    ``loss = mean_i ½(-log softmax_j(l_ij)[i] - log softmax_j(l_ji)[i])`` over valid ``i``."""
    logits = scale * F.normalize(upcast(za), dim=-1) @ F.normalize(upcast(zb), dim=-1).transpose(-1, -2)
    pair = valid[:, :, None] & valid[:, None, :]
    neg = torch.finfo(logits.dtype).min
    a2b = logits.masked_fill(~pair, neg).log_softmax(-1).diagonal(dim1=-2, dim2=-1)
    b2a = logits.masked_fill(~pair, neg).log_softmax(-2).diagonal(dim1=-2, dim2=-1)
    per = -(a2b + b2a) / 2
    return (per * valid).sum() / valid.sum().clamp_min(1)


class Alignment(nn.Module):
    """Symmetric InfoNCE between every pair of modalities of the episode's samples (support and
    query together), averaged over the pairs that co-occur; the temperature is learned
    (``log_scale``, initialised to ``log(1 / temperature)``, scale clamped to 100 as in CLIP)."""

    def __init__(self, temperature: float = 0.07):  # align.temperature: its range is declared in config.py
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def forward(self, feats: Dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """``feats {m: [T, S, D]}`` the per-modality embeddings of an episode's samples,
        ``present [T, S, M]`` -> the mean InfoNCE over the co-occurring pairs of modalities."""
        mods = list(feats)
        scale = self.log_scale.exp().clamp(max=100)
        losses = []
        for (i, a), (j, b) in itertools.combinations(enumerate(mods), 2):
            valid = present[..., i] & present[..., j]
            if bool(valid.any()):
                losses.append(info_nce(feats[a], feats[b], valid, scale))
        if not losses:  # no sample has two modalities: nothing to align (zero, still differentiable)
            return self.log_scale * 0
        return torch.stack(losses).mean()


def attach(algo: nn.Module, cfg: DictConfig, modalities: Sequence[str]) -> nn.Module:
    """Install the cross-modal restriction (``episode.*_modalities``) and the alignment term
    (``align.weight``) on ``algo`` as forward hooks; returns ``algo``."""
    E = cfg.episode
    support_keep = modality_mask(E.get("support_modalities"), modalities, "episode.support_modalities")
    query_keep = modality_mask(E.get("query_modalities"), modalities, "episode.query_modalities")
    align = cfg.get("align") or {}
    weight = float(align.get("weight", 0.0))  # its range is declared in config.py (check_ranges)
    if weight > 0:
        algo.alignment = Alignment(float(align.get("temperature", 0.07)))
    stash: Dict[str, Episode] = {}
    fusion_aux = hasattr(algo.model.fusion, "aux_loss")  # e.g. fusion=impute's predictors
    extra = weight > 0 or fusion_aux

    if support_keep is not None or query_keep is not None:
        def pre(module, args):
            if extra:
                stash["episode"] = args[0]
            return (restrict(args[0], support_keep, query_keep), *args[1:])
        algo.register_forward_pre_hook(pre)

    if extra:
        algo.reuse_features = True  # the hook below calls forget() after every forward

        def post(module, args, output):
            episode = stash.pop("episode", args[0])  # these terms see all of a sample's modalities
            if not module.training:
                return output
            loss, logits = output
            try:
                return loss + auxiliary_loss(module, episode, weight), logits
            finally:
                module.forget()
        algo.register_forward_hook(post)
    return algo


def auxiliary_loss(algo: nn.Module, episode: Episode, weight: float) -> torch.Tensor:
    """The terms added to an algorithm's training loss, from one more embedding of the episode's
    samples (support and query, per task as the algorithm embeds): ``weight *`` the alignment
    (``align.weight``) and the fusion's own ``aux_loss`` (``fusion=impute``'s predictors)."""
    present = episode.present
    feats = algo.model.to_shared(algo.episode_features(episode))
    total = 0
    if weight > 0:
        total = weight * algo.alignment(feats, present)
    aux = getattr(algo.model.fusion, "aux_loss", None)
    if aux is not None:
        term = aux(feats, present)
        total = total + term if term is not None else total
    return total
