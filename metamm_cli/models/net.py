"""The multimodal embedding network: one encoder per modality, an optional mapping of each
modality into one shared space, then the fusion."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.config import instantiate_checked
from metamm_cli.data.base import MultimodalDataset

MAPPINGS = ("none", "linear", "mlp")


def to_format(x: torch.Tensor, fmt) -> torch.Tensor:
    """A 4-d float batch in ``fmt`` (not under torch.func transforms, where layouts are the
    transform's business); anything else unchanged."""
    if fmt is torch.contiguous_format or x.dim() != 4 or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return x
    return x.contiguous(memory_format=fmt)



class Mapping(nn.Module):
    """``mapping=none|linear|mlp``: one projection per modality ``[B, dim] -> [B, dim]`` into a
    space shared by all modalities (identity, linear, or Linear-ReLU-Linear with ``hidden``
    units), so that embeddings of different modalities can be compared directly (cross-modal
    episodes, retrieval, contrastive alignment)."""

    def __init__(self, modalities, dim: int, kind: str = "none", hidden: int = 128):
        super().__init__()
        if kind not in MAPPINGS:
            raise ConfigError(f"mapping.kind={kind}: must be one of {', '.join(MAPPINGS)}")
        self.kind = kind

        def proj() -> nn.Module:
            if kind == "linear":
                return nn.Linear(dim, dim)
            return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

        self.proj = nn.ModuleDict({m: proj() for m in modalities}) if kind != "none" else None

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.proj is None:
            return features
        return {m: self.proj[m](x) for m, x in features.items()}


class MultimodalNet(nn.Module):
    """``(inputs: {m: [B, *shape_m]}, present: [B, M]) -> [B, out_dim]``; :meth:`encode` gives
    the per-modality (mapped) embeddings the fusion combines."""

    def __init__(self, encoders: Dict[str, nn.Module], fusion: nn.Module,
                 mapping: Optional[nn.Module] = None):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        if mapping is not None:
            self.mapping = mapping
        self.out_dim = fusion.out_dim
        self.memory_format = torch.contiguous_format  # of 4-d inputs (models.memory_format.apply_layout)

    def to_shared(self, feats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per-modality embeddings mapped into the shared space (unchanged without a mapping)."""
        return self.mapping(feats) if hasattr(self, "mapping") else feats

    def features(self, inputs: Dict[str, torch.Tensor], shared: bool = True) -> Dict[str, torch.Tensor]:
        feats = {m: enc(to_format(inputs[m], self.memory_format)) for m, enc in self.encoders.items()}
        return self.to_shared(feats) if shared else feats

    def encode(self, inputs: Dict[str, torch.Tensor], present: torch.Tensor,
               shared: bool = True) -> Dict[str, torch.Tensor]:
        """Per-modality embeddings for inputs of any leading shape ``[*lead, ...]`` ->
        ``{m: [*lead, dim]}`` (an absent modality's entry is computed from its placeholder), in
        the shared space, or (``shared=False``) each encoder's own."""
        lead = present.shape[:-1]
        flat = {m: x.reshape(-1, *x.shape[len(lead):]) for m, x in inputs.items()}
        return {m: f.reshape(*lead, -1) for m, f in self.features(flat, shared).items()}

    def forward(self, inputs: Dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        return self.fusion(self.features(inputs), present)


def build_model(cfg: DictConfig, dataset: MultimodalDataset) -> MultimodalNet:
    """Instantiate ``encoder.<modality>`` for each modality of the dataset (where there is none,
    the encoder of its kind: ``encoder.vector`` for CUB's ``attributes``, ``encoder.tokens`` for
    its ``text``), ``mapping`` (if any), then ``fusion``."""
    encoders = {}
    for m, spec in dataset.modalities.items():
        key = m if m in cfg.encoder else spec.kind
        if key not in cfg.encoder or key in ("dim", "init"):
            raise ConfigError(f"encoder.{m}: no encoder configured for modality '{m}' nor its kind '{spec.kind}' "
                              f"(add encoder/{m}=NAME; configured: {[k for k in cfg.encoder if k not in ('dim', 'init')]})")
        encoders[m] = instantiate_checked(cfg.encoder[key], f"encoder.{key}", spec=spec, dim=cfg.encoder.dim)
    mods = list(dataset.modalities)
    mapping_cfg = cfg.get("mapping")
    mapping = None
    if mapping_cfg is not None and mapping_cfg.get("kind", "none") != "none":
        mapping = instantiate_checked(mapping_cfg, "mapping", modalities=mods, dim=cfg.encoder.dim)
    fusion = instantiate_checked(cfg.fusion, "fusion", modalities=mods, dim=cfg.encoder.dim)
    return MultimodalNet(encoders, fusion, mapping)
