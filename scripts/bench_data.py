"""Data speed: Omniglot (Vinyals split, all 32,460 PNGs) first load and cached load, and the
episode sampler's throughput on CPU. Prints JSON.

    python scripts/bench_data.py [--root ../shared/data/omniglot] [--tasks 32 100] [--seconds 3]

First load = decode every PNG and build the three splits, with an empty cache folder (a fresh
temporary one); cached load = a new dataset object reading the same cache folder. Sampler:
5-way 1-shot 15-query episodes of the train split (4112 classes), ``tasks`` episodes per
``sample()`` call (one meta-batch), repeated for ``--seconds``; episodes/s = tasks x calls / time.
Each episode's images are gathered and converted to float (80 x 28 x 28 per episode).
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

from metamm_cli.data.episodes import EpisodeSampler  # noqa: E402
from metamm_cli.data.omniglot import Omniglot  # noqa: E402


def load(root: str, cache_dir: str) -> float:
    t = time.perf_counter()
    ds = Omniglot(root, split="vinyals", cache_dir=cache_dir)
    for s in ("train", "val", "test"):
        ds.split(s)
    return time.perf_counter() - t, ds


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    default = Path(os.environ.get("METAMM_DATA", repo.parent / "shared" / "data")) / "omniglot"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(default))
    ap.add_argument("--tasks", type=int, nargs="+", default=[32, 100])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"device": args.device if args.device != "cpu" else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
           "torch_threads": torch.get_num_threads(), "root": args.root,
           "date": time.strftime("%Y-%m-%d", time.gmtime())}
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
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
