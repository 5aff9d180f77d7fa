"""Modality fusions ``(features: {m: [B, dim]}, present: [B, M] bool) -> [B, out_dim]``.

Every fusion honours the presence mask: a missing modality's features (computed from a
zero placeholder) never enter the result, so a sample with any subset of modalities gets a
valid embedding. A new fusion is a subclass here (or in any importable module) plus a YAML
file in ``configs/fusion/`` naming it in ``_target_``.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from metamm_cli import ConfigError


class Fusion(nn.Module):
    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__()
        self.modalities, self.dim, self.out_dim = list(modalities), dim, dim

    def stack(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([features[m] for m in self.modalities], dim=-2)  # [B, M, dim]


def masked_softmax(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to present entries (absent ones get weight 0)."""
    logits = logits.float().masked_fill(~present, torch.finfo(torch.float32).min)
    return logits.softmax(dim=-1) * present


class Concat(Fusion):
    """Concatenation (early/feature-level fusion). An absent modality is replaced by a learned
    per-modality 'missing' embedding rather than zeros, so the model can tell absent from small."""

    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__(modalities, dim)
        self.out_dim = dim * len(self.modalities)
        self.missing = nn.Parameter(torch.zeros(len(self.modalities), dim))

    def forward(self, features, present):
        x = self.stack(features)
        x = torch.where(present[..., None], x, self.missing.to(x.dtype))
        return x.flatten(-2)


class Weighted(Fusion):
    """Learned scalar weight per modality, softmax-renormalised over the modalities present."""

    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__(modalities, dim)
        self.logits = nn.Parameter(torch.zeros(len(self.modalities)))

    def forward(self, features, present):
        w = masked_softmax(self.logits.expand(present.shape), present)
        return (w[..., None].to(features[self.modalities[0]].dtype) * self.stack(features)).sum(-2)


class Gated(Fusion):
    """Sample-dependent gates (in the spirit of gated multimodal units, Arevalo et al. 2017): a
    linear score per modality feature, softmax over the modalities present."""

    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__(modalities, dim)
        self.score = nn.Linear(dim, 1)

    def forward(self, features, present):
        x = self.stack(features)
        w = masked_softmax(self.score(x).squeeze(-1), present)
        return (w[..., None].to(x.dtype) * x).sum(-2)


class Attention(Fusion):
    """Modality tokens (feature + learned modality embedding) attend to each other with absent
    tokens masked out as keys (Vaswani et al. 2017); a residual, layer norm, then the mean of
    the present tokens."""

    def __init__(self, modalities: Sequence[str], dim: int, heads: int = 4):
        super().__init__(modalities, dim)
        if dim % heads:
            raise ConfigError(f"fusion.heads={heads} must divide encoder.dim={dim}")
        self.heads = heads
        self.type_embed = nn.Parameter(torch.zeros(len(self.modalities), dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, features, present):
        x = self.stack(features) + self.type_embed.to(features[self.modalities[0]].dtype)
        *lead, M, D = x.shape
        q, k, v = self.qkv(x).view(*lead, M, 3, self.heads, D // self.heads).unbind(-3)
        scores = torch.einsum("...qhd,...khd->...hqk", q, k) / (D // self.heads) ** 0.5
        attn = masked_softmax(scores, present[..., None, None, :]).to(v.dtype)
        y = torch.einsum("...hqk,...khd->...qhd", attn, v).reshape(*lead, M, D)
        y = self.norm(x + self.proj(y))
        w = present[..., None].to(y.dtype)
        return (y * w).sum(-2) / w.sum(-2).clamp_min(1)
