"""Every algorithm's training step against the per-task loop a researcher would write, side by
side in one process: metamm's step as it runs now (``execution=auto``, ``trainer.memory_format``
and ``trainer.embed_chunk`` resolved as a run resolves them: measured, cached), metamm's step as
it ran before the layout work (``today``: contiguous, whole batches, conv-BN-ReLU-pool), and

- for the optimization-based algorithms, learn2learn's clone-and-adapt loop over tasks
  (``meta_loss_loop``: ``torch.autograd.grad(create_graph=True)`` per task);
- for the others, easyfsl's loop: one episode at a time through the same model, forward and
  backward per episode, the gradients accumulated;

both baselines contiguous with the papers' layer order, as learn2learn and easyfsl users run them.

    python scripts/bench_algorithms.py [--device cpu] [--small] [--tasks 8] [--repeats 5]
                                       [--amp bf16] [--only maml,protonet] [--no-protocol] [key=value ...]

Setting (the issue's): conv4 (64 channels) on 28x28 single-channel images (the synthetic set's
image modality alone), 5-way 1-shot 15-query; the optimization-based rows at one inner step (and
five with ``--inner 1 5``); and ``protonet[60w1s5q]``, ProtoNet's paper protocol (one 60-way
1-shot 5-query episode per step). A step = forward + backward + Adam step of one meta-batch,
timed after a warm-up, round-robin (fair on a shared machine: the baselines' rows, then
metamm's, behind one untimed baseline step so that no baseline follows another memory layout),
median of ``--repeats``. Prints JSON: per algorithm the three step times, metamm's ratio to each, the
execution and layout metamm chose, tasks/s, peak CUDA memory, device, settings. ``--small``: 16
channels.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _common import compose_config, measure

from metamm_cli.algorithms import build_algorithm, registered
from metamm_cli.algorithms.functional import resolve_execution
from metamm_cli.algorithms.maml import MAML, meta_loss_loop
from metamm_cli.data.base import build_dataset
from metamm_cli.data.episodes import EpisodeSampler
from metamm_cli.device import autocast_for, resolve_device
from metamm_cli.models.memory_format import apply_layout, choose

# every shipped episodic algorithm but the cross-modal one (no loop baseline), the MAML family first: declared on the classes
ALGORITHMS = dict(sorted(((n, c) for n, c in registered().items() if c.family != "cross-modal" and c.episodic),
                         key=lambda nc: not nc[1].inner_loop))


def execution_of(algo, device) -> str:
    if isinstance(algo, MAML):
        return resolve_execution(algo.execution, device)
    return "loop" if getattr(algo, "looped", lambda d: False)(device) else "batch"


def papers_block_order(module: torch.nn.Module) -> torch.nn.Module:
    """conv-BN-ReLU-pool, as the papers (and the loops users write) run the blocks that metamm
    runs as conv-BN-pool-ReLU (the same values)."""
    pools = (torch.nn.MaxPool1d, torch.nn.MaxPool2d)
    for m in module.modules():
        if isinstance(m, torch.nn.Sequential):
            keys = list(m._modules)
            for a, b in zip(keys, keys[1:]):
                if isinstance(m._modules[a], pools) and isinstance(m._modules[b], torch.nn.ReLU):
                    m._modules[a], m._modules[b] = m._modules[b], m._modules[a]
    return module


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, nargs="+", default=[1])
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--only", default=None, help="comma-separated algorithm names")
    ap.add_argument("--no-protocol", action="store_true", help="leave out the ProtoNet paper-protocol row")
    args, overrides = ap.parse_known_args()
    width = 16 if args.small else 64
    base = ["dataset.modalities=[image]", "dataset.image_size=28", "encoder/image=conv4", f"encoder.dim={width}",
            f"encoder.image.hidden={width}", "episode.way=5", "episode.shot=1", "episode.query=15",
            f"trainer.meta_batch={args.tasks}", f"trainer.amp={args.amp}", f"trainer.device={args.device}"]
    names = [a for a in ALGORITHMS if not args.only or a in args.only.split(",")]
    rows = [(name, inner, []) for name in names for inner in (args.inner if ALGORITHMS[name].inner_loop else [None])]
    if "protonet" in names and not args.no_protocol:  # the paper protocol: one 60-way 1-shot 5-query episode
        rows.append(("protonet", "60w1s5q", ["episode.way=60", "episode.query=5", "trainer.meta_batch=1"]))
    steps, built = {}, {}
    for name, inner, protocol in rows:
        extra = [f"algorithm={name}"] + ([f"algorithm.inner_steps={inner}"] if isinstance(inner, int) else []) + protocol
        label = f"{name}[steps={inner}]" if isinstance(inner, int) else f"{name}[{inner}]" if inner else name
        cfg = compose_config([*base, *extra, *overrides])
        device = resolve_device(cfg.trainer.device)
        tasks = cfg.trainer.meta_batch
        torch.manual_seed(0)
        dataset = build_dataset(cfg.dataset)
        E = cfg.episode
        episode = EpisodeSampler(dataset.split("train", device), E.way, E.shot, E.query, tasks).sample()
        autocast = autocast_for(device, args.amp)
        for kind in ("loop", "today", "metamm"):
            # the loop baseline calls the model one task at a time: embed it in one call per task
            cfg_k = compose_config([*base, *extra, *overrides] + (
                ["algorithm.execution=batch"] if kind == "loop" and "execution" in cfg.algorithm
                and not ALGORITHMS[name].inner_loop else []))
            torch.manual_seed(0)
            algo = build_algorithm(cfg_k, dataset).to(device).train()
            if kind == "metamm":
                shape = choose(cfg_k, algo.model, dataset.modalities, algo.embed_batch(cfg_k, device), device,
                               algo.differentiates_twice)
            else:
                shape = {"memory_format": "contiguous", "embed_chunk": 0}
                papers_block_order(algo)
            apply_layout(algo, shape["memory_format"], shape["embed_chunk"], algo.differentiates_twice)
            opt = torch.optim.Adam([p for p in algo.parameters() if p.requires_grad], lr=1e-4)
            scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

            def step(algo=algo, opt=opt, kind=kind, scaler=scaler, autocast=autocast, name=name, episode=episode):
                opt.zero_grad(set_to_none=True)
                if kind != "loop":
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
            built[f"{label}/{kind}"] = (f"{execution_of(algo, device)}, {shape['memory_format']}"
                                        f"{', pieces of %d' % shape['embed_chunk'] if shape['embed_chunk'] else ''}"
                                        if kind != "loop" else
                                        "learn2learn loop" if ALGORITHMS[name].query_meta_loss else "per-episode loop")
        built[f"{label}/tasks"] = tasks
    # Grouped by kind, contiguous first, behind an untimed contiguous step: a step that follows
    # one in another memory layout pays for the switch (measured: up to 1.4x), so each round
    # switches layout only into metamm's rows, never into a baseline's.
    order = {"loop": 0, "today": 1, "metamm": 2}
    steps = dict(sorted(steps.items(), key=lambda kv: order[kv[0].rsplit("/", 1)[1]]))
    first = next(iter(steps.values()))
    timed = measure({"_switch": first, **steps}, device, args.repeats, warmup=2)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python scripts/bench_algorithms.py " + " ".join(sys.argv[1:]),
              "settings": {"tasks_per_step": args.tasks, "episode": "5-way 1-shot 15-query",
                           "encoder": f"conv4, {width} channels, 28x28x1", "amp": args.amp,
                           "repeats": args.repeats, "overrides": overrides}, "rows": {}}
    for label in dict.fromkeys(k.rsplit("/", 1)[0] for k in steps if k != "_switch"):
        mine, today, loop = (timed[f"{label}/{k}"] for k in ("metamm", "today", "loop"))
        result["rows"][label] = {
            "metamm_ms": round(mine["step_ms"], 2), "metamm_execution": built[f"{label}/metamm"],
            "today_ms": round(today["step_ms"], 2), "loop_ms": round(loop["step_ms"], 2), "loop": built[f"{label}/loop"],
            "loop_over_metamm": round(loop["step_ms"] / mine["step_ms"], 3),
            "today_over_metamm": round(today["step_ms"] / mine["step_ms"], 3),
            "metamm_tasks_per_s": round(built[f"{label}/tasks"] / (mine["step_ms"] / 1000), 1),
            "metamm_peak_mem_mib": mine["peak_mem_mib"] and round(mine["peak_mem_mib"], 1)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
