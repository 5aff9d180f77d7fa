"""ResNet-12, the backbone of most published few-shot numbers on miniImageNet, tieredImageNet,
CIFAR-FS and FC100 (Oreshkin et al. 2018, TADAM; Lee et al. 2019, MetaOptNet; Ye et al. 2020,
FEAT; LibFewShot), with DropBlock (Ghiasi et al. 2018).

Reference code: github kjunelee/MetaOptNet ``models/ResNet12_embedding.py`` (also FEAT's and
LibFewShot's copy): four residual blocks, each three conv3x3-BN-LeakyReLU(0.1) layers (the last
without its activation until the residual is added), a 1x1 conv + BN shortcut, LeakyReLU, 2x2
max-pooling; widths 64-160-320-640 (``wide=false``: TADAM's 64-128-256-512). Blocks 1-2 end with
dropout at ``drop_rate``; blocks 3-4 with DropBlock at ``drop_rate`` (block ``dropblock_size``: 5
on 84 px ImageNet derivatives, 2 on 32 px CIFAR derivatives; clipped to the feature map),
ramped in linearly over the first ``dropblock_ramp`` optimizer steps, as the reference code's
``1 - drop_rate / (20 * 2000) * num_batches_tracked`` keep rate (20,000 steps of two forwards
each). The readout averages the last map over space (640-d, FEAT/LibFewShot) or flattens it
(``readout=flatten``: 640 x 5 x 5 = 16,000-d at 84 px, MetaOptNet's "no global average
pooling"); the output width must equal ``encoder.dim``.

Everything is plain tensor ops, so ``torch.func.vmap`` batches it over tasks (the MAML family);
the random masks come from torch's global generator (``vmap(randomness="different")``: each task
its own masks, as in the per-task loop). The trainer tells the DropBlock layers how many steps
are done through :meth:`DropBlock.on_train_step` (a plain attribute: no state-dict keys, no host
sync, and a resumed run picks the step up again).
"""
from __future__ import annotations

from typing import Annotated, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.config import Range
from metamm_cli.data.episodes import ModalitySpec
from metamm_cli.models.encoders import _need, check_readout, read_out

WIDE = (64, 160, 320, 640)
NARROW = (64, 128, 256, 512)


def block_mask(shape, gamma: float, block: int, device, dtype) -> torch.Tensor:
    """DropBlock's keep mask ``[B, C, H, W]``: seeds Bernoulli(``gamma``) on the
    ``(H - block + 1) x (W - block + 1)`` positions where a whole block fits, each zeroing the
    ``block x block`` square below and right of it (MetaOptNet's ``_compute_block_mask``)."""
    B, C, H, W = shape
    seeds = (torch.rand(B, C, H - block + 1, W - block + 1, device=device) < gamma).to(dtype)
    covered = F.max_pool2d(F.pad(seeds, (block - 1,) * 4), block, stride=1)  # [B, C, H, W]
    return 1 - covered


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018) at rate ``rate`` ramped in over ``ramp`` steps: the drop
    rate at step ``s`` is ``rate * min(1, s / ramp)``; ``gamma = p / block^2 * f^2 / (f - block
    + 1)^2`` for an ``f x f`` map, and the kept activations are rescaled by
    ``numel / kept`` (MetaOptNet's code). ``block=1`` is plain dropout with the same ramp."""

    def __init__(self, rate: float, block: int, ramp: int):
        super().__init__()
        self.rate, self.block, self.ramp = float(rate), int(block), max(int(ramp), 0)
        self.step = 0

    def on_train_step(self, step: int) -> None:
        """The number of optimizer steps done (set by the trainer before each step)."""
        self.step = int(step)

    def current_rate(self) -> float:
        return self.rate if self.ramp == 0 else self.rate * min(1.0, self.step / self.ramp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.current_rate()
        if not self.training or p <= 0:
            return x
        f = x.shape[-1]
        b = min(self.block, f, x.shape[-2])
        gamma = p / b ** 2 * f ** 2 / (f - b + 1) ** 2
        mask = block_mask(x.shape, gamma, b, x.device, x.dtype)
        return x * mask * (mask.numel() / mask.sum().clamp_min(1))


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


class ResBlock(nn.Module):
    """Three conv3x3-BN(-LeakyReLU 0.1) layers, a 1x1 conv + BN shortcut, LeakyReLU after the
    sum, 2x2 max-pooling, then ``drop`` (dropout or DropBlock)."""

    def __init__(self, cin: int, cout: int, drop: Optional[nn.Module]):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.conv3, self.bn3 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        out = F.leaky_relu(out + self.shortcut(x), 0.1)
        return self.drop(F.max_pool2d(out, 2))


class ResNet12(nn.Module):
    """``[C, H, W]`` images -> ``[dim]``: see the module docstring. ``widths`` (four ints)
    overrides ``wide`` (tests use narrow nets); ``dropblock_size=null`` picks 5, or 2 for images
    of 32 px or less (the CIFAR derivatives)."""

    def __init__(self, spec: ModalitySpec, dim: int = 640, wide: bool = True,
                 widths: Optional[Sequence[int]] = None, drop_rate: Annotated[float, Range("in [0, 1)")] = 0.1,
                 dropblock_size: Optional[int] = None, dropblock_ramp: int = 20000,
                 readout: str = "mean"):
        super().__init__()
        _need(spec, 3, "resnet12")
        check_readout(readout)
        widths = list(widths) if widths is not None else list(WIDE if wide else NARROW)
        if len(widths) != 4 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ConfigError(f"encoder.image.widths={widths}: four positive integers (null: "
                              f"{list(WIDE)}, or {list(NARROW)} with wide=false)")
        size = min(spec.shape[1:])
        if size < 16:
            raise ConfigError(f"encoder resnet12 needs images of at least 16 px (four 2x2 poolings), "
                              f"got {list(spec.shape[1:])}")
        block = dropblock_size if dropblock_size is not None else (2 if size <= 32 else 5)
        if block < 1:
            raise ConfigError(f"encoder.image.dropblock_size={dropblock_size}: must be >= 1 or null")
        h, w = spec.shape[1], spec.shape[2]
        for _ in range(4):
            h, w = h // 2, w // 2
        out = widths[-1] * (h * w if readout == "flatten" else 1)
        if dim != out:
            raise ConfigError(f"encoder.dim={dim}: resnet12 with widths {widths} and readout={readout} "
                              f"gives {out}-d embeddings at {spec.shape[1]}x{spec.shape[2]} px; set "
                              f"encoder.dim={out}")
        drops = [nn.Dropout(drop_rate) if drop_rate > 0 else None] * 2 + \
                [DropBlock(drop_rate, block, dropblock_ramp) if drop_rate > 0 else None for _ in range(2)]
        chans = [spec.shape[0]] + widths
        self.blocks = nn.Sequential(*[ResBlock(a, b, d) for a, b, d in zip(chans, chans[1:], drops)])
        self.readout = readout
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return read_out(self.blocks(x), self.readout)
