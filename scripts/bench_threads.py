"""CPU threads: seconds for N training steps of the default experiment (ProtoNet, concat, 5-way
1-shot 15-query, meta_batch 2) with torch at 1 thread, at every CPU, and at what
``trainer.threads=null`` (auto) picks, with 0..k busy processes beside it (a shared machine).
Prints JSON, one row per (load, threads), candidates side by side in one process.

    python scripts/bench_threads.py [--steps 100] [--loads 0 2 4] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from _common import compose_config

import torch  # noqa: E402

from metamm_cli.algorithms import build_algorithm  # noqa: E402
from metamm_cli.data.base import build_dataset  # noqa: E402
from metamm_cli.data.episodes import build_sampler  # noqa: E402
from metamm_cli.device import auto_threads  # noqa: E402
from metamm_cli.train import meta_backward  # noqa: E402

BUSY = "while True: pass"


def seconds(cfg, dataset, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    algo = build_algorithm(cfg, dataset)
    opt = torch.optim.Adam(algo.parameters(), lr=cfg.trainer.lr)
    sampler = build_sampler(cfg, dataset, "train", torch.device("cpu"), cfg.trainer.meta_batch, 0)
    meta_backward(algo, sampler.sample(), cfg.trainer.meta_batch)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        meta_backward(algo, sampler.sample(), cfg.trainer.meta_batch)
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--loads", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = compose_config(["trainer.device=cpu", *args.overrides])
    dataset = build_dataset(cfg.dataset)
    cpus = len(os.sched_getaffinity(0))
    rows = []
    for load in args.loads:
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
        try:
            time.sleep(2 if load else 0)
            auto = auto_threads()
            for name, threads in (("1 thread", 1), (f"{cpus} threads (torch's default)", cpus),
                                  (f"auto ({auto})", auto)):
                s = seconds(cfg, dataset, threads, args.steps)
                rows.append({"busy_processes": load, "threads": name, "seconds": round(s, 2),
                             "steps_per_s": round(args.steps / s, 2)})
                print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            for p in busy:
                p.kill()
                p.wait()
    print(json.dumps({"cpus": cpus, "steps": args.steps, "overrides": args.overrides,
                      "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                      "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
