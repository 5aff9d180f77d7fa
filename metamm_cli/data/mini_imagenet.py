"""miniImageNet (Vinyals et al. 2016; the split of Ravi & Larochelle 2017): 100 ImageNet classes
of 600 images, 64 / 16 / 20 train / validation / test, at 84 x 84, from the files users already
have (metamm never downloads it). Layouts (``dataset.layout``, ``auto`` looks in that order):

- ``l2l``: learn2learn's ``mini-imagenet-cache-{train,validation,test}.pkl`` (``image_data``,
  ``class_dict``);
- ``csv``: Ravi & Larochelle's ``{train,val,test}.csv`` (``filename,label``) with ``images/``
  (LibFewShot's layout; the JPEGs are decoded and resized once);
- ``metaoptnet``: MetaOptNet's ``miniImageNet_category_split_train_phase_train.pickle``,
  ``miniImageNet_category_split_val.pickle``, ``miniImageNet_category_split_test.pickle``
  (``data``, ``labels``, ``catname2label``);
- ``closer``: CloserLook's ``base.json``, ``val.json``, ``novel.json`` with the images they name.

Channel statistics: MetaOptNet's and FEAT's (pixel mean 120.40, 115.59, 104.54; std 70.68,
68.28, 72.55). Memory: 60,000 x 3 x 84 x 84 bytes = 1.27 GB (train 0.81 GB).
"""
from __future__ import annotations

from metamm_cli.data.benchmark import ImageBenchmark
from metamm_cli.data.layouts import ClassDictPickle, CsvImages, DataLabelsPickle, JsonLists

_SPLIT = "miniImageNet_category_split_{}.pickle"


class MiniImageNet(ImageBenchmark):
    name = "mini_imagenet"
    TITLE = "miniImageNet"
    HOME = "learn2learn's, MetaOptNet's or CloserLook's files, or Ravi & Larochelle's CSVs with the ImageNet images"
    LAYOUTS = {
        "l2l": ClassDictPickle("mini-imagenet-cache-{split}.pkl", {"train": "train", "val": "validation", "test": "test"}),
        "csv": CsvImages(),
        "metaoptnet": DataLabelsPickle({"train": _SPLIT.format("train_phase_train"), "val": _SPLIT.format("val"),
                                        "test": _SPLIT.format("test")}),
        "closer": JsonLists(),
    }
    CLASSES = {"train": 64, "val": 16, "test": 20}
    MEAN = tuple(v / 255 for v in (120.39586422, 115.59361427, 104.54012653))
    STD = tuple(v / 255 for v in (70.68188272, 68.27635443, 72.54505529))
