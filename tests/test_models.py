"""Encoders and fusions: shapes, and the presence mask (a missing modality never matters)."""
from __future__ import annotations

import pytest
import torch

from metamm_cli import ConfigError
from metamm_cli.data.episodes import ModalitySpec
from metamm_cli.models.encoders import MLP, Conv1d, Conv4, TokenConv
from metamm_cli.models.fusion import Attention, Concat, Gated, Weighted

MODS = ["image", "audio", "tokens"]
FUSIONS = [Concat, Weighted, Gated, Attention]


def test_encoders_shapes():
    cases = [(Conv4, ModalitySpec((1, 28, 28), kind="image"), torch.randn(5, 1, 28, 28)),
             (Conv4, ModalitySpec((3, 84, 84), kind="image"), torch.randn(2, 3, 84, 84)),
             (Conv1d, ModalitySpec((1, 128), kind="audio"), torch.randn(5, 1, 128)),
             (TokenConv, ModalitySpec((12,), torch.int64, "tokens", 32), torch.randint(32, (5, 12))),
             (MLP, ModalitySpec((7,)), torch.randn(5, 7))]
    for cls, spec, x in cases:
        assert cls(spec, dim=16)(x).shape == (x.shape[0], 16)
    with pytest.raises(ConfigError, match="conv4"):
        Conv4(ModalitySpec((128,)), dim=8)
    with pytest.raises(ConfigError, match="tokens"):
        TokenConv(ModalitySpec((1, 28, 28)), dim=8)


@pytest.mark.parametrize("cls", FUSIONS)
def test_fusion_ignores_missing_modalities(cls):
    torch.manual_seed(0)
    fusion = cls(MODS, 8)
    feats = {m: torch.randn(6, 8) for m in MODS}
    present = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1]]).bool()
    out = fusion(feats, present)
    assert out.shape == (6, fusion.out_dim) and torch.isfinite(out).all()
    garbage = {m: torch.where(present[:, i, None], f, 1e3 * torch.randn_like(f))
               for i, (m, f) in enumerate(feats.items())}
    torch.testing.assert_close(fusion(garbage, present), out)  # absent features never leak in
    out.sum().backward()
    assert all(p.grad is not None for p in fusion.parameters())


def test_weighted_renormalises_over_present():
    fusion = Weighted(MODS, 4)
    with torch.no_grad():
        fusion.logits.copy_(torch.tensor([0.0, 1.0, 2.0]))
    feats = {m: torch.full((1, 4), float(i)) for i, m in enumerate(MODS)}
    only_audio = fusion(feats, torch.tensor([[False, True, False]]))
    torch.testing.assert_close(only_audio, feats["audio"])
    w = torch.softmax(torch.tensor([0.0, 2.0]), 0)  # image and tokens present
    mixed = fusion(feats, torch.tensor([[True, False, True]]))
    torch.testing.assert_close(mixed, torch.full((1, 4), (w[1] * 2).item()))


def test_concat_uses_learned_missing_embedding():
    fusion = Concat(MODS, 2)
    with torch.no_grad():
        fusion.missing.copy_(torch.tensor([[7.0, 7.0], [8.0, 8.0], [9.0, 9.0]]))
    feats = {m: torch.zeros(1, 2) for m in MODS}
    out = fusion(feats, torch.tensor([[True, False, True]]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 8.0, 8.0, 0.0, 0.0]]))


def test_attention_heads_must_divide_dim():
    with pytest.raises(ConfigError, match="fusion.heads"):
        Attention(MODS, 10, heads=4)
