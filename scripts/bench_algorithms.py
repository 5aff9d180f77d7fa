"""Every algorithm's training step, side by side in one process, plus a per-task-loop MAML
baseline (learn2learn's clone-and-adapt pattern, ``meta_loss_loop``).

    python scripts/bench_algorithms.py [--small] [--tasks 32] [--repeats 10] [--amp bf16]
                                       [--only a,b] [key=value ...]

Setting (the issue's): conv4 (64 channels) on 28x28 single-channel images (the synthetic set's
image modality alone), 5-way 1-shot 15-query, meta-batch 32; the optimization-based rows at one
inner step and at five. A step = forward + backward + Adam step of one meta-batch, timed after
a warm-up, rows interleaved round-robin (fair on a shared machine), median of ``--repeats``.
Prints JSON: tasks/s, step time, peak CUDA memory, device, settings. ``--small``: meta-batch 4,
3 repeats, 16 channels (CI-friendly on CPU).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from _common import compose_config, measure
from hydra.utils import instantiate

from metamm_cli.algorithms import build_algorithm
from metamm_cli.algorithms.functional import resolve_execution
from metamm_cli.algorithms.maml import meta_loss_loop
from metamm_cli.data.episodes import EpisodeSampler
from metamm_cli.device import autocast_for, resolve_device

OPTIMIZATION = ("maml", "fomaml", "anil", "metasgd", "reptile")
OTHERS = ("protonet", "matching", "relation", "siamese", "gnn", "hypernet", "finetune")


def rows(small: bool):
    out = {}
    for name in OPTIMIZATION:
        for steps in (1, 5):
            out[f"{name}[steps={steps}]"] = ([f"algorithm={name}", f"algorithm.inner_steps={steps}"], False)
    for execution in ("vmap", "loop"):  # what execution=auto chooses between
        out[f"maml[steps=1,execution={execution}]"] = (["algorithm=maml", f"algorithm.execution={execution}"], False)
    for name in OTHERS:
        out[name] = ([f"algorithm={name}"], False)
    out["maml_l2l_loop[steps=1]"] = (["algorithm=maml", "algorithm.inner_steps=1"], True)
    out["maml_l2l_loop[steps=5]"] = (["algorithm=maml", "algorithm.inner_steps=5"], True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--only", default=None, help="comma-separated row names")
    args, overrides = ap.parse_known_args()
    tasks = args.tasks or (4 if args.small else 32)
    repeats = args.repeats or (3 if args.small else 10)
    width = 16 if args.small else 64
    base = ["dataset.modalities=[image]", "dataset.image_size=28", "encoder/image=conv4",
            f"encoder.dim={width}", f"encoder.image.hidden={width}", "episode.way=5", "episode.shot=1",
            "episode.query=15", f"trainer.meta_batch={tasks}", f"trainer.amp={args.amp}"]
    table = rows(args.small)
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only.split(",")}
        if not table:
            raise SystemExit(f"--only {args.only}: no such row; rows: {', '.join(rows(args.small))}")
    built = {}
    for name, (ov, l2l) in table.items():
        cfg = compose_config([*base, *ov, *overrides])
        device = resolve_device(cfg.trainer.device)
        torch.manual_seed(0)
        dataset = instantiate(cfg.dataset, _convert_="all")
        E = cfg.episode
        episode = EpisodeSampler(dataset.split("train", device), E.way, E.shot, E.query, tasks).sample()
        algo = build_algorithm(cfg, dataset).to(device).train()
        opt = torch.optim.Adam([p for p in algo.parameters() if p.requires_grad], lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        autocast = autocast_for(device, args.amp)

        def step(algo=algo, opt=opt, episode=episode, autocast=autocast, scaler=scaler, l2l=l2l):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = meta_loss_loop(algo, episode) if l2l else algo(episode)[0]
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        execution = getattr(algo, "execution", None)
        built[name] = (step, "l2l loop" if l2l else execution and resolve_execution(execution, device))
    timed = measure({k: step for k, (step, _) in built.items()}, device, repeats, warmup=2)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "settings": {"tasks_per_step": tasks, "episode": "5-way 1-shot 15-query",
                           "encoder": f"conv4, {width} channels, 28x28x1", "amp": args.amp,
                           "repeats": repeats, "small": args.small, "overrides": overrides},
              "date": time.strftime("%Y-%m-%d"), "rows": {}}
    for name, t in timed.items():
        ms = t["step_ms"]
        result["rows"][name] = {"step_ms": round(ms, 2), "tasks_per_s": round(tasks / (ms / 1000), 1),
                                "peak_mem_mib": t["peak_mem_mib"] and round(t["peak_mem_mib"], 1),
                                "execution": built[name][1]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
