"""Every algorithm's training step against the per-task loop a researcher would write, side by
side in one process: metamm's step (``execution=auto``: what it picks on this device) and

- for the optimization-based algorithms, learn2learn's clone-and-adapt loop over tasks
  (``meta_loss_loop``: ``torch.autograd.grad(create_graph=True)`` per task);
- for the others, easyfsl's loop: one episode at a time through the same model, forward and
  backward per episode, the gradients accumulated.

    python scripts/bench_algorithms.py [--device cpu] [--small] [--tasks 8] [--repeats 5]
                                       [--amp bf16] [--only maml,protonet] [key=value ...]

Setting (the issue's): conv4 (64 channels) on 28x28 single-channel images (the synthetic set's
image modality alone), 5-way 1-shot 15-query; the optimization-based rows at one inner step (and
five with ``--inner 1 5``). A step = forward + backward + Adam step of one meta-batch, timed
after a warm-up, rows interleaved round-robin (fair on a shared machine), median of
``--repeats``. Prints JSON: per algorithm metamm's and the loop's step time, their ratio, the
execution metamm chose, tasks/s, peak CUDA memory, device, settings. ``--small``: 16 channels.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from _common import compose_config, measure

from metamm_cli.algorithms import build_algorithm, registered
from metamm_cli.algorithms.functional import resolve_execution
from metamm_cli.algorithms.maml import MAML, meta_loss_loop
from metamm_cli.data.base import build_dataset
from metamm_cli.data.episodes import EpisodeSampler
from metamm_cli.device import autocast_for, resolve_device

# every shipped episodic algorithm but the cross-modal one (no loop baseline), the MAML family first: declared on the classes
ALGORITHMS = dict(sorted(((n, c) for n, c in registered().items() if c.family != "cross-modal" and c.episodic),
                         key=lambda nc: not nc[1].inner_loop))


def execution_of(algo, device) -> str:
    if isinstance(algo, MAML):
        return resolve_execution(algo.execution, device)
    return "loop" if getattr(algo, "looped", lambda d: False)(device) else "batch"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, nargs="+", default=[1])
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--only", default=None, help="comma-separated algorithm names")
    args, overrides = ap.parse_known_args()
    width = 16 if args.small else 64
    base = ["dataset.modalities=[image]", "dataset.image_size=28", "encoder/image=conv4", f"encoder.dim={width}",
            f"encoder.image.hidden={width}", "episode.way=5", "episode.shot=1", "episode.query=15",
            f"trainer.meta_batch={args.tasks}", f"trainer.amp={args.amp}", f"trainer.device={args.device}"]
    names = [a for a in ALGORITHMS if not args.only or a in args.only.split(",")]
    steps, built = {}, {}
    for name in names:
        for inner in (args.inner if ALGORITHMS[name].inner_loop else [None]):
            extra = [f"algorithm={name}"] + ([f"algorithm.inner_steps={inner}"] if inner else [])
            label = f"{name}[steps={inner}]" if inner else name
            cfg = compose_config([*base, *extra, *overrides])
            device = resolve_device(cfg.trainer.device)
            torch.manual_seed(0)
            dataset = build_dataset(cfg.dataset)
            E = cfg.episode
            episode = EpisodeSampler(dataset.split("train", device), E.way, E.shot, E.query, args.tasks).sample()
            autocast = autocast_for(device, args.amp)
            for kind in ("metamm", "loop"):
                # the loop baseline calls the model one task at a time: embed it in one call per task
                cfg_k = compose_config([*base, *extra, *overrides] + (
                    ["algorithm.execution=batch"] if kind == "loop" and "execution" in cfg.algorithm
                    and not ALGORITHMS[name].inner_loop else []))
                torch.manual_seed(0)
                algo = build_algorithm(cfg_k, dataset).to(device).train()
                opt = torch.optim.Adam([p for p in algo.parameters() if p.requires_grad], lr=1e-4)
                scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

                def step(algo=algo, opt=opt, kind=kind, scaler=scaler, autocast=autocast, name=name):
                    opt.zero_grad(set_to_none=True)
                    if kind == "metamm":
                        with autocast():
                            loss = algo(episode)[0]
                        scaler.scale(loss).backward()
                    elif ALGORITHMS[name].query_meta_loss:
                        with autocast():
                            loss = meta_loss_loop(algo, episode)
                        scaler.scale(loss).backward()
                    else:  # easyfsl: episode by episode, backward each
                        for t in range(episode.num_tasks):
                            with autocast():
                                loss = algo(episode.tasks(t, t + 1))[0] / episode.num_tasks
                            scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                steps[f"{label}/{kind}"] = step
                built[f"{label}/{kind}"] = execution_of(algo, device) if kind == "metamm" else (
                    "learn2learn loop" if ALGORITHMS[name].query_meta_loss else "per-episode loop")
    timed = measure(steps, device, args.repeats, warmup=2)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "settings": {"tasks_per_step": args.tasks, "episode": "5-way 1-shot 15-query",
                           "encoder": f"conv4, {width} channels, 28x28x1", "amp": args.amp,
                           "repeats": args.repeats, "overrides": overrides}, "rows": {}}
    for label in dict.fromkeys(k.rsplit("/", 1)[0] for k in steps):
        mine, loop = timed[f"{label}/metamm"], timed[f"{label}/loop"]
        result["rows"][label] = {
            "metamm_ms": round(mine["step_ms"], 2), "metamm_execution": built[f"{label}/metamm"],
            "loop_ms": round(loop["step_ms"], 2), "loop": built[f"{label}/loop"],
            "metamm_over_loop": round(mine["step_ms"] / loop["step_ms"], 3),
            "metamm_tasks_per_s": round(args.tasks / (mine["step_ms"] / 1000), 1),
            "metamm_peak_mem_mib": mine["peak_mem_mib"] and round(mine["peak_mem_mib"], 1)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
