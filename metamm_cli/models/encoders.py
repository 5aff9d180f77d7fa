"""Per-modality encoders ``[B, *shape_m] -> [B, dim]``.

Each takes the modality's :class:`ModalitySpec` (``spec``) and the common output width
``dim``; all are plain conv/linear stacks, so ``torch.func.vmap`` batches them over tasks.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.data.episodes import ModalitySpec


def _block(conv: type, pool: type, bn: type, cin: int, cout: int, k: int) -> nn.Sequential:
    """conv-BN-ReLU-maxpool as the papers write it, run as conv-BN-maxpool-ReLU: the same values
    and gradients (ReLU is monotone, so it commutes with the max), on a quarter of the elements.
    The layers keep their positions in the state dict (ReLU and pooling hold no weights)."""
    return nn.Sequential(conv(cin, cout, k, padding=k // 2), bn(cout), pool(2), nn.ReLU())


def _strided_block(cin: int, cout: int, k: int) -> nn.Sequential:
    """conv kxk with stride 2 (padding k//2: 28 -> 14 -> 7 -> 4 -> 2, the sizes of TensorFlow's
    'SAME'), BatchNorm, ReLU; no pooling (Finn et al. 2017's Omniglot network)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=2, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())


def _need(spec: ModalitySpec, rank: int, name: str, float_input: bool = True) -> None:
    if len(spec.shape) != rank or spec.dtype.is_floating_point != float_input:
        kind = "float" if float_input else "integer"
        raise ConfigError(f"encoder {name} needs {kind} inputs of rank {rank}, "
                          f"got shape {list(spec.shape)} {spec.dtype}")


class Conv4(nn.Module):
    """Four conv3x3-BN-ReLU-maxpool blocks (Vinyals et al. 2016; Snell et al. 2017), then global
    average pooling, for images ``[C, H, W]``. ``pool=stride``: each block's convolution has
    stride 2 instead of a 2x2 max-pool (conv-BN-ReLU; Finn et al. 2017's and Nichol et al.
    2018's Omniglot networks, github cbfinn/maml ``--max_pool=False``), then the same average
    over space; its feature maps are 14, 7, 4, 2 on 28x28 inputs (max-pool: 14, 7, 3, 1).

    ``readout=flatten``: the last feature map flattened instead of averaged, the embedding of the
    ProtoNet, MAML and CloserLook papers on 84x84 images (64 channels x 5 x 5 = 1600-d); the last
    block then has ``dim / (h * w)`` channels (``encoder.dim=1600`` at 84 px: 64)."""

    def __init__(self, spec: ModalitySpec, dim: int = 64, hidden: int = 64, depth: int = 4,
                 pool: str = "max", readout: str = "mean"):
        super().__init__()
        _need(spec, 3, "conv4")
        if pool not in ("max", "stride"):
            raise ConfigError(f"encoder.image.pool={pool}: must be max (2x2 max-pooling) or stride "
                              f"(stride-2 convolutions)")
        check_readout(readout)
        depth = min(depth, int(math.log2(min(spec.shape[1:]))))
        shrink = (lambda s: s // 2) if pool == "max" else (lambda s: (s + 1) // 2)
        h, w = spec.shape[1:]
        for _ in range(depth):
            h, w = shrink(h), shrink(w)
        last = dim
        if readout == "flatten":
            if dim % (h * w):
                raise ConfigError(f"encoder.dim={dim}: conv4 with readout=flatten ends on a {h}x{w} map at "
                                  f"{spec.shape[1]}x{spec.shape[2]} px; encoder.dim must be a multiple of "
                                  f"{h * w} (channels x {h} x {w}, e.g. {64 * h * w} for 64 channels)")
            last = dim // (h * w)
        widths = [spec.shape[0]] + [hidden] * (depth - 1) + [last]
        self.pool, self.readout = pool, readout
        blocks = [_block(nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, a, b, 3) if pool == "max"
                  else _strided_block(a, b, 3) for a, b in zip(widths, widths[1:])]
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return read_out(self.net(x), self.readout)


READOUTS = ("mean", "flatten")


def check_readout(readout: str) -> None:
    if readout not in READOUTS:
        raise ConfigError(f"encoder.image.readout={readout}: must be mean (average over space) or "
                          f"flatten (the last feature map flattened)")


def read_out(x: torch.Tensor, readout: str) -> torch.Tensor:
    """A feature map ``[B, C, h, w]`` -> ``[B, C]`` (``mean`` over space) or ``[B, C*h*w]``."""
    return x.flatten(-3) if readout == "flatten" else x.mean(dim=(-2, -1))


class Conv1d(nn.Module):
    """1-D conv stack (kernel 7, stride-2 pooling) with global average pooling, for signals
    ``[C, L]`` such as raw audio; a cheap stand-in for spectrogram CNNs."""

    def __init__(self, spec: ModalitySpec, dim: int = 64, hidden: int = 64, depth: int = 4,
                 kernel: int = 7):
        super().__init__()
        _need(spec, 2, "conv1d")
        depth = min(depth, int(math.log2(spec.shape[1])))
        widths = [spec.shape[0]] + [hidden] * (depth - 1) + [dim]
        self.net = nn.Sequential(*[_block(nn.Conv1d, nn.MaxPool1d, nn.BatchNorm1d, a, b, kernel)
                                   for a, b in zip(widths, widths[1:])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=-1)


class TokenConv(nn.Module):
    """Token sequences ``[L]`` (int): embedding, two 1-D convs, global max pooling
    (Kim 2014 style); order-aware but shift-invariant."""

    def __init__(self, spec: ModalitySpec, dim: int = 64, hidden: int = 64, embed: int = 32):
        super().__init__()
        _need(spec, 1, "tokens", float_input=False)
        if not spec.vocab:
            raise ConfigError("encoder tokens needs a dataset modality with a vocab size")
        self.embed = nn.Embedding(spec.vocab, embed)
        self.net = nn.Sequential(nn.Conv1d(embed, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv1d(hidden, dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.embed(x).transpose(-1, -2)).amax(dim=-1)


class MLP(nn.Module):
    """Flatten, then a two-layer MLP: feature vectors, or a quick baseline for any float modality."""

    def __init__(self, spec: ModalitySpec, dim: int = 64, hidden: int = 128):
        super().__init__()
        if not spec.dtype.is_floating_point:
            raise ConfigError(f"encoder mlp needs float inputs, got {spec.dtype}")
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(spec.shape), hidden), nn.ReLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class StrokesConv(nn.Module):
    """Pen trajectories ``[L, 3]`` (x, y, pen state): the :class:`Conv1d` stack over time with
    the three coordinates as channels (Ha & Eck 2018 use recurrent nets; a 1-D conv is the
    cheap, order-aware alternative)."""

    def __init__(self, spec: ModalitySpec, dim: int = 64, hidden: int = 64, depth: int = 4,
                 kernel: int = 5):
        super().__init__()
        _need(spec, 2, "strokes_conv")
        length, channels = spec.shape
        self.conv = Conv1d(ModalitySpec((channels, length)), dim, hidden, depth, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(-1, -2))


class StrokesGRU(nn.Module):
    """Pen trajectories ``[L, 3]``: a GRU (Cho et al. 2014) over the point deltas
    ``(dx, dy, pen)``, written as a loop of plain linear ops (no cuDNN kernel), so
    ``torch.func.vmap`` and MAML's functional calls batch it over tasks; the hidden states are
    mean-pooled over time, then projected to ``dim``."""

    def __init__(self, spec: ModalitySpec, dim: int = 64, hidden: int = 64):
        super().__init__()
        _need(spec, 2, "strokes_gru")
        self.hidden = hidden
        self.inp = nn.Linear(spec.shape[1], 3 * hidden)
        self.rec = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = torch.cat([x[..., :1, :2] * 0, x[..., 1:, :2] - x[..., :-1, :2]], dim=-2)
        gates_x = self.inp(torch.cat([delta, x[..., 2:]], dim=-1))  # [B, L, 3H]
        h = torch.zeros(x.shape[:-2] + (self.hidden,), dtype=gates_x.dtype, device=x.device)
        total = torch.zeros_like(h)
        for t in range(x.shape[-2]):
            xr, xz, xn = gates_x[..., t, :].chunk(3, dim=-1)
            hr, hz, hn = self.rec(h).chunk(3, dim=-1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            total = total + h
        return self.out(total / x.shape[-2])
