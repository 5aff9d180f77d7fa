"""The two few-shot splits of CIFAR-100 (100 classes of 600 images, 32 x 32), from the files
users already have:

- **CIFAR-FS** (Bertinetto et al. 2019, ``cifar_fs``): classes split at random, 64 / 16 / 20;
- **FC100** (Oreshkin et al. 2018, ``fc100``): split by superclass, 60 / 20 / 20 classes (12 / 4 /
  4 superclasses), so that test classes share little with the training ones.

Layouts (``dataset.layout``; ``auto`` looks in that order):

- ``metaoptnet``: MetaOptNet's ``CIFAR_FS_{train,val,test}.pickle`` / ``FC100_{train,val,test}.pickle``
  (``data`` uint8 ``[N, 32, 32, 3]``, ``labels``: CIFAR-100 fine label ids, named here by
  CIFAR-100's class names);
- ``folders``: Bertinetto et al.'s class folders ``data/<class>/<image>.png`` with the class
  lists ``splits/bertinetto/{train,val,test}.txt`` (FC100: ``splits/fc100/``, or
  ``dataset.split_lists``).

Channel statistics: MetaOptNet's (pixel mean 129.38, 124.11, 112.48; std 68.21, 65.43, 70.46).
Augmentation: pad-and-crop (4 px) by default, as MetaOptNet. Memory: 60,000 x 3 x 32 x 32 bytes
= 184 MB.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from metamm_cli.data.benchmark import ImageBenchmark
from metamm_cli.data.layouts import ClassFolders, DataLabelsPickle

# CIFAR-100's fine label names, by label id (the dataset's meta file, ``fine_label_names``).
FINE = ("apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
        "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
        "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
        "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
        "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
        "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower "
        "sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale "
        "willow_tree wolf woman worm").split()


def fine_name(label: int) -> str:
    return FINE[label] if 0 <= label < len(FINE) else f"label_{label:03d}"


MEAN = tuple(v / 255 for v in (129.37731888, 124.10583864, 112.47758569))
STD = tuple(v / 255 for v in (68.20947949, 65.43124043, 70.45866994))


class _Cifar(ImageBenchmark):
    PREFIX = ""
    LISTS = "splits/bertinetto"
    MEAN, STD = MEAN, STD

    def __init__(self, root: str, layout: str = "auto", split_lists: Optional[str] = None, image_size: int = 32,
                 check_classes: bool = True, augment: Optional[Mapping] = None, normalize: bool = True,
                 class_embeddings: Optional[str] = None, storage: str = "auto", cache: bool = True,
                 cache_dir: Optional[str] = None, modalities: Optional[Sequence[str]] = None):
        files = {s: f"{self.PREFIX}_{s}.pickle" for s in ("train", "val", "test")}
        self.LAYOUTS = {"metaoptnet": DataLabelsPickle(files, fine_name),
                        "folders": ClassFolders("data", split_lists or self.LISTS)}
        super().__init__(root, layout, image_size, check_classes, augment, normalize, class_embeddings,
                         storage, cache, cache_dir, modalities)


class CifarFS(_Cifar):
    name = "cifar_fs"
    TITLE = "CIFAR-FS"
    HOME = "MetaOptNet's pickles or Bertinetto et al.'s class folders"
    PREFIX = "CIFAR_FS"
    CLASSES = {"train": 64, "val": 16, "test": 20}


class FC100(_Cifar):
    name = "fc100"
    TITLE = "FC100"
    HOME = "MetaOptNet's pickles, or class folders with your FC100 class lists"
    PREFIX = "FC100"
    LISTS = "splits/fc100"
    CLASSES = {"train": 60, "val": 20, "test": 20}
