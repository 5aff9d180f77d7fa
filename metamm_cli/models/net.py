"""The multimodal embedding network: one encoder per modality, then the fusion."""
from __future__ import annotations

from typing import Dict

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.data.base import MultimodalDataset


class MultimodalNet(nn.Module):
    """``(inputs: {m: [B, *shape_m]}, present: [B, M]) -> [B, out_dim]``."""

    def __init__(self, encoders: Dict[str, nn.Module], fusion: nn.Module):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.out_dim = fusion.out_dim

    def forward(self, inputs: Dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        return self.fusion({m: enc(inputs[m]) for m, enc in self.encoders.items()}, present)


def build_model(cfg: DictConfig, dataset: MultimodalDataset) -> MultimodalNet:
    """Instantiate ``encoder.<modality>`` for each modality of the dataset, then ``fusion``."""
    encoders = {}
    for m, spec in dataset.modalities.items():
        if m not in cfg.encoder:
            raise ConfigError(f"encoder.{m}: no encoder configured for modality '{m}' "
                              f"(add encoder/{m}=NAME; configured: {[k for k in cfg.encoder if k != 'dim']})")
        encoders[m] = instantiate(cfg.encoder[m], spec=spec, dim=cfg.encoder.dim)
    fusion = instantiate(cfg.fusion, modalities=list(dataset.modalities), dim=cfg.encoder.dim)
    return MultimodalNet(encoders, fusion)
