"""The per-modality ensemble: the baseline a multimodal model must beat when modalities go
missing (``metamm compare`` builds it, :mod:`metamm_cli.compare.robustness`); evaluation only."""
from __future__ import annotations

import copy
from typing import Dict, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.algorithms.base import MetaAlgorithm
from metamm_cli.device import upcast
from metamm_cli.models.fusion import class_presence, row_floor, weighted_over


class PerModalityEnsemble(nn.Module):
    r"""The baseline a multimodal model must beat when modalities go missing: one model per
    modality, each trained on that modality alone, and no training of the ensemble itself.
    Member ``m`` scores a query on modality ``m`` against the classes whose support has it
    (its algorithm's ``class_scores``), as log-probabilities over those classes,

        s^m_{qc} = log softmax_{c' : h^m_{c'}} ( score_m(q^m, c') )_c ,

    and the ensemble averages them over the modalities that query ``q`` and class ``c`` both
    have (the geometric mean of the members' probabilities); a pair that shares none gets the
    lowest score of the query's row (chance: the ensemble cannot compare across modalities)."""

    def __init__(self, members: Dict[str, nn.Module], modalities: Sequence[str]):
        super().__init__()
        missing = [m for m in modalities if m not in members]
        if missing:
            raise ConfigError(f"the ensemble has no member for modality {missing[0]} (members: {sorted(members)})")
        self.members = nn.ModuleDict(members)
        self.modalities = list(modalities)

    def forward(self, episode):
        labels, way = episode.support_labels, episode.way
        per, ok = [], []
        for i, m in enumerate(self.modalities):
            member = self.members[m]
            sub = type(episode)({m: episode.support[m]}, episode.support_present[..., i:i + 1], labels,
                                {m: episode.query[m]}, episode.query_present[..., i:i + 1],
                                episode.query_labels, episode.classes, episode.index)
            zs, zq = member.embed_episode(sub)
            has = class_presence(sub.support_present, labels, way)[..., 0]  # [T, N]
            s = upcast(member.class_scores(zq, zs, sub.support_present[..., 0], labels, way))
            s = s.masked_fill(~has[:, None, :], torch.finfo(s.dtype).min).log_softmax(-1)
            per.append(s)
            ok.append(episode.query_present[..., i][:, :, None] & has[:, None, :])
        per, ok = torch.stack(per, -1), torch.stack(ok, -1)
        out, valid = weighted_over(per, ok, torch.ones(len(self.modalities), dtype=per.dtype, device=per.device))
        logits = row_floor(out, valid)
        return MetaAlgorithm.loss(logits, episode.query_labels), logits


def ensemble_from(state: Dict, cfg, dataset) -> PerModalityEnsemble:
    """The ensemble stored in an ensemble checkpoint (``state["ensemble"]``: each member's own
    checkpoint), its members rebuilt from their own configs over ``dataset`` (the union of
    their modalities, built from ``cfg``)."""
    from metamm_cli.algorithms import build_algorithm, implements, load_weights

    members = {}
    for m, member in state["ensemble"].items():
        view = copy.copy(dataset)  # the dataset as the member saw it: its one modality
        view._wanted = [m]
        member_cfg = OmegaConf.create(member["config"])
        algo = build_algorithm(member_cfg, view, way=member["config"]["episode"]["way"])
        load_weights(algo, member["model"], f"ensemble member {m} ({member.get('path')})")
        if not implements(algo, "class_scores") or getattr(algo.model.fusion, "level", "sample") != "sample":
            raise ConfigError(f"ensemble member {m} ({member.get('path')}): needs a metric algorithm "
                              f"(protonet, matching, relation) with a sample-level fusion")
        members[m] = algo
    return PerModalityEnsemble(members, list(dataset.modalities))


