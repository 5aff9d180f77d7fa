"""MAML's executions: one vmap'ed functional_call/grad program (``execution=vmap``), the
algorithm's per-task loop (``execution=loop``, what ``auto`` picks on CPU) and the learn2learn-
style reference loop (``meta_loss_loop``), timed interleaved in one process (fair on a shared CPU).

All compute the same second-order meta-gradient on the same episodes:
    python scripts/bench_maml.py [--tasks 32] [--amp bf16] [key=value ...]
prints JSON: step time, episodes/s, peak CUDA memory, and the largest gradient differences.
"""
from __future__ import annotations

import argparse
import json

import torch
from _common import compose_config, measure
from hydra.utils import instantiate

from metamm_cli.algorithms import build_algorithm
from metamm_cli.algorithms.maml import meta_loss_loop
from metamm_cli.data.episodes import EpisodeSampler
from metamm_cli.device import autocast_for, resolve_device


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

    def with_execution(execution):
        def run():
            algo.execution = execution
            return algo(episode)[0]
        return lambda: grads(run)

    steps = {"batched_vmap": with_execution("vmap"), "task_loop": with_execution("loop"),
             "reference_loop": lambda: grads(lambda: meta_loss_loop(algo, episode))}
    ref = steps["reference_loop"]()
    scale = max(g.abs().max().item() for g in ref)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "tasks": args.tasks,
              "amp": args.amp, "episode": f"{E.way}-way {E.shot}-shot {E.query}-query",
              "inner_steps": cfg.algorithm.inner_steps, "overrides": overrides,
              "auto_picks": "vmap" if device.type == "cuda" else "loop", "max_abs_grad": scale}
    for name in ("batched_vmap", "task_loop"):
        result[f"max_abs_grad_diff_{name}"] = max((a.float() - b.float()).abs().max().item()
                                                  for a, b in zip(steps[name](), ref))
    for name, m in measure(steps, device, args.repeats).items():
        m["episodes_per_s"] = args.tasks / (m["step_ms"] / 1000)
        result[name] = m
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
