"""Data speed, printed as JSON in one run.

    python scripts/bench_data.py [--root ../shared/data/omniglot] [--tasks 32 100] [--seconds 3]
                                 [--skip-omniglot] [--classes 20] [--steps 3] [--repeats 30]
                                 [--source-size 84]

Omniglot (Vinyals split, all 32,460 PNGs): first load and cached load, and the episode sampler's
throughput. First load = decode every PNG and build the three splits, with an empty cache folder
(a fresh temporary one); cached load = a new dataset object reading the same cache folder.
Sampler: 5-way 1-shot 15-query episodes of the train split (4112 classes), ``tasks`` episodes
per ``sample()`` call (one meta-batch), repeated for ``--seconds``; episodes/s = tasks x calls /
time. Each episode's images are gathered and converted to float (80 x 28 x 28 per episode).

84 px benchmark episodes (``mini_imagenet_84px``): a miniImageNet-shaped set written as JPEGs in
Ravi & Larochelle's CSV layout (``--classes`` classes of 40 images, random pixels, written at
``--source-size`` px: 84 as in the usual 84 px copies, ~400 for ImageNet's originals; no real
copy here), decoded to 84 x 84, then, side by side in this process, 5-way 1-shot 15-query episodes (4 tasks
per call) per second:

- ``cached``: ``MiniImageNet`` read from its cache (decoded once, uint8), the sampler's gather,
  no augmentation (the evaluation pipeline: resize 1.15 + centre crop + normalise);
  each loader is called ``--repeats`` times, round-robin with the others (fair on a shared
  machine), and its median call time gives episodes/s;
- ``cached_augmented``: the same with the training pipeline (random resized crop, jitter, flip,
  normalise: one batched call per meta-batch);
- ``per_item`` / ``per_item_augmented``: an episode as a loop over a ``torch.utils.data.Dataset``
  whose ``__getitem__`` opens, decodes and resizes one JPEG (and augments it alone), as easyfsl's
  and learn2learn's loaders do (one process, no worker pool).

Then one training step (forward, backward, Adam) on ``--device`` of ProtoNet 5-way 1-shot 15-query with
ResNet-12 (640-d) and with Conv4 (1600-d), at 84 px: the median of ``--steps`` steps, so the
loading figures can be read against a step.
On a loaded machine, ``--threads 1`` avoids intra-op threads waiting on busy cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from dataclasses import replace  # noqa: E402

from metamm_cli.data.episodes import EpisodeSampler  # noqa: E402
from metamm_cli.data.omniglot import Omniglot  # noqa: E402


def load(root: str, cache_dir: str) -> float:
    t = time.perf_counter()
    ds = Omniglot(root, split="vinyals", cache_dir=cache_dir)
    for s in ("train", "val", "test"):
        ds.split(s)
    return time.perf_counter() - t, ds


class PerItem(torch.utils.data.Dataset):
    """Decode per item, as easyfsl's and learn2learn's ``Dataset`` s do."""

    def __init__(self, files, labels, size, pipeline=None, generator=None):
        self.files, self.labels, self.size, self.pipeline, self.generator = files, labels, size, pipeline, generator

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from metamm_cli.data.decode import decode_image

        x = decode_image(self.files[i], self.size, 3).float().div_(255)
        if self.pipeline is not None:
            x = self.pipeline(x[None], generator=self.generator)[0]
        return x, self.labels[i]


def bench_84px(args) -> dict:
    """See the module docstring (``mini_imagenet_84px``)."""
    import numpy as np
    from PIL import Image

    from metamm_cli.data.augment import ImagePipeline
    from metamm_cli.data.mini_imagenet import MiniImageNet
    from scripts._common import compose_config, measure
    from metamm_cli.algorithms import build_algorithm

    out = {"source_size": args.source_size}
    with tempfile.TemporaryDirectory() as tmp:
        root, per = Path(tmp) / "mini", 40
        (root / "images").mkdir(parents=True)
        rng = np.random.default_rng(0)
        names = {s: [f"n{s[:2]}{c:06d}" for c in range(args.classes)] for s in ("train", "val", "test")}
        for s, classes in names.items():
            rows = ["filename,label"]
            for c in classes:
                for j in range(per if s == "train" else 16):
                    f = f"{c}{j:08d}.jpg"
                    pixels = rng.integers(0, 256, (args.source_size, args.source_size, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / "images" / f, quality=90)
                    rows.append(f"{f},{c}")
            (root / f"{s}.csv").write_text("\n".join(rows) + "\n")
        cache = Path(tmp) / "cache"
        t0 = time.perf_counter()
        MiniImageNet(str(root), cache_dir=str(cache), check_classes=False).split("train")
        out["first_load_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        ds = MiniImageNet(str(root), cache_dir=str(cache), check_classes=False)
        train = ds.split("train", args.device)
        out["cached_load_s"] = round(time.perf_counter() - t0, 3)
        out["train_images"], out["train_classes"] = len(train.labels), train.num_classes
        T = 4
        plain = EpisodeSampler(replace(train, transform=ds.transform("val")), 5, 1, 15, T, seed=0)
        augmented = EpisodeSampler(train, 5, 1, 15, T, seed=0)
        loaders = {"cached": plain.sample, "cached_augmented": augmented.sample}
        files = [root / "images" / ln.split(",")[0] for ln in (root / "train.csv").read_text().splitlines()[1:]]
        labels = [names["train"].index(ln.split(",")[1]) for ln in (root / "train.csv").read_text().splitlines()[1:]]
        g = torch.Generator().manual_seed(0)
        pipe = ImagePipeline(ds.MEAN, ds.STD, random=True)
        for key, dataset in (("per_item", PerItem(files, labels, 84)),
                             ("per_item_augmented", PerItem(files, labels, 84, pipe, g))):
            def episode(dataset=dataset):
                for _ in range(T):
                    classes = torch.randperm(args.classes, generator=g)[:5]
                    rows = [int(c) * per + int(j) for c in classes for j in torch.randperm(per, generator=g)[:16]]
                    torch.stack([dataset[i][0] for i in rows]).to(args.device)
            loaders[key] = episode
        calls = measure(loaders, torch.device(args.device), args.repeats)  # interleaved, median call
        for key, v in calls.items():
            out[key] = {"episodes_per_s": round(1000 * T / v["step_ms"], 1), "ms_per_episode": round(v["step_ms"] / T, 2)}
        out["speedup_cached_vs_per_item"] = round(out["cached"]["episodes_per_s"] / out["per_item"]["episodes_per_s"], 1)
        out["speedup_augmented_vs_per_item_augmented"] = round(
            out["cached_augmented"]["episodes_per_s"] / out["per_item_augmented"]["episodes_per_s"], 1)
        steps = {}
        one = EpisodeSampler(train, 5, 1, 15, 1, seed=0)
        for name, over in (("resnet12_640d", ["encoder/image=resnet12", "encoder.dim=640"]),
                           ("conv4_1600d", ["encoder.dim=1600", "encoder.image.hidden=64", "encoder.image.readout=flatten"])):
            cfg = compose_config(["dataset=mini_imagenet", f"dataset.root={root}", "dataset.check_classes=false",
                                  f"dataset.cache_dir={cache}", "algorithm=protonet", *over])
            algo = build_algorithm(cfg, ds).to(args.device)
            opt = torch.optim.Adam(algo.parameters(), 1e-3)
            episode = one.sample()

            def step(algo=algo, opt=opt, episode=episode):
                opt.zero_grad()
                algo(episode)[0].backward()
                opt.step()
            steps[name] = step
        timed = measure(steps, torch.device(args.device), args.steps)
        out["protonet_5w1s15q_step_ms"] = {k: round(v["step_ms"], 1) for k, v in timed.items()}
        out["augmented_episode_ms_vs_conv4_step_ms"] = [out["cached_augmented"]["ms_per_episode"],
                                                         out["protonet_5w1s15q_step_ms"]["conv4_1600d"]]
    return out


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    default = Path(os.environ.get("METAMM_DATA", repo.parent / "shared" / "data")) / "omniglot"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(default))
    ap.add_argument("--tasks", type=int, nargs="+", default=[32, 100])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip-omniglot", action="store_true", help="only the 84 px benchmark episodes")
    ap.add_argument("--classes", type=int, default=20, help="84 px set: classes per split")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per network")
    ap.add_argument("--repeats", type=int, default=30, help="84 px loaders: timed calls each, interleaved")
    ap.add_argument("--source-size", type=int, default=84, help="84 px set: the written JPEGs' size (84: "
                    "copies resized to 84 px; ImageNet's originals are ~400 px)")
    args = ap.parse_args()
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # progress: not in the JSON
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"device": args.device if args.device != "cpu" else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
           "torch_threads": torch.get_num_threads(), "root": args.root,
           "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if args.skip_omniglot:
        out["mini_imagenet_84px"] = bench_84px(args)
        print(json.dumps(out, indent=2))
        return
    with tempfile.TemporaryDirectory() as cache:
        out["first_load_s"], _ = load(args.root, cache)
        out["cached_load_s"], ds = load(args.root, cache)
    train = ds.split("train", args.device)
    out["train_classes"], out["train_images"] = train.num_classes, len(train.labels)
    sampler = {}
    for T in args.tasks:
        s = EpisodeSampler(train, 5, 1, 15, T, seed=0)
        s.sample()  # warm-up
        if args.device != "cpu":
            torch.cuda.synchronize()
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            ep = s.sample()
            calls += 1
        if args.device != "cpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        sampler[str(T)] = {"episodes_per_s": round(T * calls / dt), "calls": calls,
                           "episode_shape": list(ep.query["image"].shape[1:])}
    out["sampler_5w1s15q"] = sampler
    out["mini_imagenet_84px"] = bench_84px(args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
