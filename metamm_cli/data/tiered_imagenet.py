"""tieredImageNet (Ren et al. 2018): 608 ImageNet classes in 34 categories, 351 / 97 / 160
train / validation / test classes (20 / 6 / 8 categories), 779,165 images at 84 x 84, from the
files users already have. Layouts (``dataset.layout``; ``auto`` looks in that order):

- ``l2l``: Ren et al.'s ``{train,val,test}_images_png.pkl`` (PNG-encoded images) with
  ``{split}_labels.pkl`` (``label_specific``, ``label_specific_str``), as learn2learn reads them
  (also from a ``tiered-imagenet/`` folder under ``root``);
- ``metaoptnet``: MetaOptNet's ``{train,val,test}_images.npz`` (``images``) with the same
  ``{split}_labels.pkl``; streamed from the archive, never whole in memory.

At 84 px the set is 16.5 GB of uint8 (train 9.5 GB), so each split is decoded once into a raw
file in the cache and memory-mapped from there (``storage=auto``); episodes read the pages they
touch. On a GPU a split moves to the device only where it fits (half its free memory).
Channel statistics: MetaOptNet's (miniImageNet's).
"""
from __future__ import annotations

from pathlib import Path

from metamm_cli.data.benchmark import ImageBenchmark
from metamm_cli.data.layouts import Layout, NpzImages, PngPickle
from metamm_cli.data.mini_imagenet import MiniImageNet


class _Nested(Layout):
    """A layout read from ``root`` or, where learn2learn puts it, ``root/tiered-imagenet``."""

    def __init__(self, inner, sub: str = "tiered-imagenet"):
        self.inner, self.sub = inner, sub
        self.name, self.doc = inner.name, inner.doc

    def at(self, root: Path) -> Path:
        return root / self.sub if not self.inner.detect(root) and self.inner.detect(root / self.sub) else root

    def detect(self, root):
        return self.inner.detect(root) or self.inner.detect(root / self.sub)

    def split_files(self, root, split):
        return self.inner.split_files(self.at(root), split)

    def read(self, root, split):
        return self.inner.read(self.at(root), split)


class TieredImageNet(ImageBenchmark):
    name = "tiered_imagenet"
    TITLE = "tieredImageNet"
    HOME = "Ren et al.'s or MetaOptNet's files"
    LAYOUTS = {"l2l": _Nested(PngPickle()), "metaoptnet": _Nested(NpzImages())}
    CLASSES = {"train": 351, "val": 97, "test": 160}
    MEAN, STD = MiniImageNet.MEAN, MiniImageNet.STD
    MAPPED = True
