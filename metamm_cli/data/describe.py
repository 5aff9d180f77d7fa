"""``metamm data``: what a dataset yields, split by split (classes, samples, the smallest class,
how often each modality is present), and whether the episodes fit every split."""
from __future__ import annotations

from omegaconf import DictConfig

from metamm_cli.data.base import SPLITS, build_dataset
from metamm_cli.data.episodes import build_sampler

USAGE = ("usage: metamm data [dataset=NAME] [dataset.KEY=VALUE ...] [episode.way=N ...]\n"
         "Prints each split's classes, samples and modality presence, and checks that the\n"
         "episode (way, shot + query) fits every split.")


def describe(cfg: DictConfig) -> None:
    """Print the dataset of ``cfg`` split by split; an episode that does not fit a split is a
    one-line error naming the key."""
    dataset = build_dataset(cfg.dataset)
    E = cfg.episode
    print(dataset.describe())
    names = list(dataset.modalities)
    print(f"{'split':<6} {'classes':>8} {'samples':>8} {'min/class':>9}  present: " + " ".join(names))
    for split in SPLITS:
        d = dataset.split(split)
        counts = d.class_counts()
        share = " ".join(f"{100 * d.present[:, i].float().mean():.0f}%".rjust(len(m))
                         for i, m in enumerate(names))
        print(f"{split:<6} {d.num_classes:>8} {len(d.labels):>8} {int(counts.min()):>9}  "
              f"present: {share}")
        build_sampler(cfg, dataset, split, "cpu", 1, 0)  # checks feasibility (eval.* for val/test)
    print(f"episodes: {E.way}-way {E.shot}-shot {E.query}-query fit every split")
