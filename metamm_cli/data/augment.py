"""The image pipeline of the few-shot field, batched on the device, and the per-split input
transform a dataset attaches to its splits (:meth:`MultimodalDataset.transform`).

:class:`ImagePipeline` takes float images in [0, 1] of any leading shape ``[*lead, C, H, W]``
(a whole meta-batch: ``[T, N*(K+Q), C, H, W]``) and, in one batched call:

- training (``random``, with a generator): a random crop, either ``crop=resized``
  (torchvision's ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))``: an area fraction
  and a log-uniform aspect ratio per image, the box clipped to the image instead of torchvision's
  ten retries) or ``crop=pad`` (``RandomCrop(size, padding=pad)``: a shift of up to ``pad``
  pixels, zero fill), a horizontal flip with probability 0.5 (both by one ``grid_sample``), then
  colour jitter (``ColorJitter(j, j, j)``: brightness, contrast and saturation factors uniform in
  ``[1 - j, 1 + j]``, applied in that fixed order; torchvision shuffles the order per image);
- evaluation: resize by ``test_resize`` (1.15: 84 -> 96 px) then the centre crop back to the
  image size (``Resize(96) + CenterCrop(84)``; one ``grid_sample`` samples the same points,
  several times faster on a CPU than ``interpolate`` then crop);
- always: ``(x - mean) / std`` with the dataset's channel statistics.

The random numbers come from the generator handed in: the episode sampler's, so the episodes
and their augmentation are reproducible and resume exactly (the generator's state is in every
checkpoint). ``full=(tasks, start)`` draws the numbers of a whole meta-batch of ``tasks`` tasks
and uses rows ``start:start+T`` (a rank's share in distributed training: every rank's generator
moves alike).

:class:`Transforms` maps modality names to such callables (``image``: the pipeline; ``text``:
:class:`PickView`, one of several stored captions per sample).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from metamm_cli import ConfigError
from metamm_cli.config import Range, check_value

CROPS = ("resized", "pad", "none")
Full = Optional[Tuple[int, int]]


def uniform(lead: Tuple[int, ...], n: int, generator: torch.Generator, device, full: Full) -> torch.Tensor:
    """``[*lead, n]`` uniforms in [0, 1); with ``full=(tasks, start)`` drawn for ``tasks`` rows of
    the first dim and rows ``start:start + lead[0]`` kept."""
    if full is None:
        return torch.rand(*lead, n, generator=generator, device=device)
    tasks, start = full
    u = torch.rand(tasks, *lead[1:], n, generator=generator, device=device)
    return u[start:start + lead[0]]


class ImagePipeline:
    """See the module docstring. ``size``: the stored image size (output = input size)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], random: bool = False,
                 crop: str = "resized", pad: int = 8, jitter: float = 0.4, flip: bool = True,
                 test_resize: float = 1.15, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), key: str = "dataset.augment"):
        if crop not in CROPS:
            raise ConfigError(f"{key}.crop={crop}: must be resized (random resized crop), pad "
                              f"(pad-and-crop) or none")
        for name, value, declared in (("jitter", jitter, Range("in [0, 1)")), ("test_resize", test_resize, Range(">= 1")),
                                      ("pad", pad, Range(">= 0"))):
            check_value(f"{key}.{name}", value, declared)
        self.mean, self.std = torch.tensor(list(mean)), torch.tensor(list(std))
        self.random, self.crop, self.pad, self.jitter, self.flip = random, crop, int(pad), float(jitter), flip
        self.test_resize, self.scale, self.ratio = float(test_resize), scale, ratio

    def __call__(self, x: torch.Tensor, lead: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 full: Full = None) -> torch.Tensor:
        """``lead`` (the number of leading dims) is not needed: images are the last three."""
        lead, (C, H, W) = x.shape[:-3], x.shape[-3:]
        flat = x.reshape(-1, C, H, W)
        if self.random and generator is not None:
            u = uniform(tuple(lead), 8, generator, x.device, full).reshape(-1, 8).to(x.dtype)
            flat = self.colour(self.geometry(flat, u[:, :5]), u[:, 5:])
        elif self.test_resize > 1:  # the points a bilinear resize to round(1.15 s) then centre crop reads
            sx = flat.new_full((len(flat),), W / round(W * self.test_resize))
            sy = flat.new_full((len(flat),), H / round(H * self.test_resize))
            flat = resample(flat, sx, torch.zeros_like(sx), sy, torch.zeros_like(sy))
        scale = (1 / self.std).to(x.device, x.dtype).view(C, 1, 1)
        shift = (-self.mean / self.std).to(x.device, x.dtype).view(C, 1, 1)
        return torch.addcmul(shift, flat, scale).reshape(x.shape)  # (x - mean) / std in one pass

    def geometry(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The random crop and flip of each image by one affine ``grid_sample``: the output's
        normalised coordinate ``o`` samples the input at ``s * o + t`` per axis."""
        H, W = x.shape[-2:]
        if self.crop == "resized":
            area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
            lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
            r = torch.exp(lo + (hi - lo) * u[:, 1])
            w = torch.sqrt(area * r).clamp(max=1.0)  # fractions of the image's width, height
            h = torch.sqrt(area / r).clamp(max=1.0)
            cx = (1 - w) * (2 * u[:, 2] - 1)  # the box centre, uniform where the box fits
            cy = (1 - h) * (2 * u[:, 3] - 1)
            sx, sy = w, h
        elif self.crop == "pad":
            p = self.pad
            dx = torch.floor(u[:, 2] * (2 * p + 1)) - p  # integer shifts in [-pad, pad]
            dy = torch.floor(u[:, 3] * (2 * p + 1)) - p
            sx = sy = torch.ones_like(dx)
            cx, cy = 2 * dx / W, 2 * dy / H
        else:
            sx = sy = torch.ones_like(u[:, 0])
            cx = cy = torch.zeros_like(u[:, 0])
        if self.flip:
            sx = torch.where(u[:, 4] < 0.5, -sx, sx)
        if self.crop == "none" and not self.flip:
            return x.clone()
        return resample(x, sx, cx, sy, cy)

    def colour(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation, each by a factor uniform in ``[1 - j, 1 + j]``
        (torchvision's definitions: blend with black, the image's mean grey, its own grey)."""
        j = self.jitter
        if j == 0:
            return x
        f = (1 - j + 2 * j * u).view(-1, 3, 1, 1, 1).unbind(1)  # [B, 1, 1, 1] each
        x = x.mul(f[0]).clamp_(0, 1)
        mean = grey(x).mean(dim=(-3, -2, -1), keepdim=True)
        x.mul_(f[1]).add_((1 - f[1]) * mean).clamp_(0, 1)  # in place on our own copy
        if x.shape[1] == 3:
            g = grey(x)  # before x changes
            x.mul_(f[2]).addcmul_(g, 1 - f[2]).clamp_(0, 1)
        return x


def grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma ``[B, 1, H, W]`` of RGB ``[B, 3, H, W]`` (greyscale images: themselves)."""
    if x.shape[1] == 1:
        return x
    return (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)


def resample(x: torch.Tensor, sx, tx, sy, ty) -> torch.Tensor:
    """``x [B, C, H, W]`` sampled (bilinear, zero outside) where output pixel ``(i, j)``, in
    normalised coordinates ``(v_i, u_j)``, reads ``(sy * v_i + ty, sx * u_j + tx)`` (per image
    ``[B]``: an axis-aligned affine map, what ``affine_grid`` builds, without its matmul)."""
    B, _, H, W = x.shape
    u = (2 * torch.arange(W, device=x.device, dtype=x.dtype) + 1) / W - 1
    v = (2 * torch.arange(H, device=x.device, dtype=x.dtype) + 1) / H - 1
    gx = (sx[:, None] * u + tx[:, None])[:, None, :].expand(B, H, W)
    gy = (sy[:, None] * v + ty[:, None])[:, :, None].expand(B, H, W)
    grid = torch.stack([gx, gy], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class PickView:
    """A sample stored with ``V`` alternatives (``[*lead, V, *shape]``, e.g. Reed et al.'s ten
    captions per CUB image) -> one of them per sample, drawn uniformly from the generator (the
    first without one). Inputs already holding one view (``[*lead, *shape]``, fixed-episode
    files) pass unchanged; ``rank`` is the rank of one view."""

    def __init__(self, rank: int = 1):
        self.rank = rank

    def __call__(self, x: torch.Tensor, lead: int, generator: Optional[torch.Generator] = None,
                 full: Full = None) -> torch.Tensor:
        if x.dim() != lead + 1 + self.rank:
            return x
        shape = x.shape[:lead]
        V = x.shape[lead]
        if generator is None:
            pick = torch.zeros(shape, dtype=torch.long, device=x.device)
        else:
            pick = (uniform(tuple(shape), 1, generator, x.device, full)[..., 0] * V).long().clamp(max=V - 1)
        index = pick.view(*shape, 1, *([1] * self.rank)).expand(*shape, 1, *x.shape[lead + 1:])
        return torch.gather(x, lead, index).squeeze(lead)


class Transforms:
    """``{modality: fn(x, lead, generator, full)}``, applied to gathered inputs
    ``{m: [*lead, ...]}`` (``lead`` leading dims; modalities without one pass unchanged)."""

    def __init__(self, per_modality: Mapping[str, Callable]):
        self.per_modality = dict(per_modality)

    def __call__(self, inputs: Dict[str, torch.Tensor], lead: int,
                 generator: Optional[torch.Generator] = None, full: Full = None) -> Dict[str, torch.Tensor]:
        out = dict(inputs)
        for m, fn in self.per_modality.items():
            if m in out:
                out[m] = fn(out[m], lead, generator, full)
        return out
