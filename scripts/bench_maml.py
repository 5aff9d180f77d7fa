"""Batched MAML (one vmap'ed functional_call/grad program) vs a Python loop over tasks.

Both compute the same second-order meta-gradient on the same episodes, in the same process:
    python scripts/bench_maml.py [--tasks 32] [--amp bf16] [key=value ...]
prints JSON: training steps per second, episodes/s, peak CUDA memory, and the largest
difference between the two meta-gradients.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from _common import compose_config
from hydra.utils import instantiate

from metamm_cli.algorithms import build_algorithm
from metamm_cli.algorithms.maml import maml_loss_loop
from metamm_cli.data.episodes import EpisodeSampler
from metamm_cli.device import autocast_for, resolve_device


def measure(step, device, repeats):
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"step_ms": 1000 * seconds, "peak_mem_mib": peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    args, overrides = ap.parse_known_args()
    cfg = compose_config(["algorithm=maml", *overrides])
    device = resolve_device(cfg.trainer.device)
    torch.manual_seed(0)
    dataset = instantiate(cfg.dataset, _convert_="all")
    E = cfg.episode
    episode = EpisodeSampler(dataset.split("train", device), E.way, E.shot, E.query,
                             args.tasks).sample()
    algo = build_algorithm(cfg, dataset).to(device)
    autocast = autocast_for(device, args.amp)
    params = [p for p in algo.parameters() if p.requires_grad]

    def grads(loss_fn):
        algo.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn()
        loss.backward()
        return [p.grad.detach().clone() for p in params]

    batched = lambda: grads(lambda: algo(episode)[0])  # noqa: E731
    loop = lambda: grads(lambda: maml_loss_loop(algo, episode))  # noqa: E731
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(batched(), loop()))
    scale = max(g.abs().max().item() for g in loop())
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "tasks": args.tasks, "amp": args.amp,
              "episode": f"{E.way}-way {E.shot}-shot {E.query}-query",
              "inner_steps": cfg.algorithm.inner_steps, "overrides": overrides}
    for name, step in (("batched_vmap", batched), ("python_loop", loop)):
        m = measure(step, device, args.repeats)
        m["episodes_per_s"] = args.tasks / (m["step_ms"] / 1000)
        result[name] = m
    result["speedup"] = result["python_loop"]["step_ms"] / result["batched_vmap"]["step_ms"]
    result["max_abs_grad_diff"] = diff
    result["max_abs_grad"] = scale
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
