"""A population of N members trained as one vmapped program (``hydra/launcher=population``)
against the same N runs as separate processes, the way Hydra's joblib launcher runs them.

    python scripts/bench_population.py [--device cpu] [--members 1 2 4 8 16] [--only protonet,maml]
                                       [--tasks 2] [--repeats 3] [--small] [--jobs 2] [key=value ...]

Setting (the issue's): conv4 (64 channels; ``--small``: 16) on 28x28 single-channel images (the
synthetic set's image modality alone), 5-way 1-shot 15-query, ``--tasks`` tasks per member and
step, Adam; MAML second order with one inner step. A step = every member's forward + backward +
optimizer step, timed after a warm-up, median of ``--repeats``.

- ``population``: one process (all its CPU threads, or the GPU), the N members' step as one
  vmapped program (scale/population.py ``Population.step``).
- ``processes`` (the baseline): N separate runs as the joblib launcher with ``n_jobs=--jobs``
  runs them: ``--jobs`` processes at a time, each with CPUs / jobs torch threads (on a GPU: each
  its own process on the same GPU). Measured: ``--jobs`` worker processes running side by side,
  each timing its own training step (``train.train_step``, the normal trainer); the N runs then
  take ``ceil(N / jobs)`` such steps one after another. Process start-up and data loading are not
  counted (they would add to the baseline only).
- ``sequential`` (a second baseline, timed round-robin with the population in the same process):
  N times one run's training step with the population's threads, the basic launcher's cost.

Prints JSON (device, settings, per algorithm and N: both step times and the speed-up) and
writes it to ``--out`` if given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import compose_config, emit

from metamm_cli.device import resolve_device
from metamm_cli.scale.population import Member, Population
from metamm_cli.train import setup, train_step

ALGORITHMS = {"protonet": ["algorithm=protonet"], "maml": ["algorithm=maml", "algorithm.inner_steps=1"]}


def overrides(args, algo: str, seed: int, threads: int):
    width = 16 if args.small else 64
    return ["dataset.modalities=[image]", "dataset.image_size=28", "encoder/image=conv4", f"encoder.dim={width}",
            f"encoder.image.hidden={width}", "episode.way=5", "episode.shot=1", "episode.query=15",
            f"trainer.meta_batch={args.tasks}", f"trainer.device={args.device}", "trainer.tensorboard=false",
            "trainer.progress=false", f"trainer.threads={threads}", f"seed={seed}", *ALGORITHMS[algo], *args.extra]


def make_runs(args, algo: str, n: int, threads: int):
    runs = []
    for seed in range(n):
        cfg = compose_config(overrides(args, algo, seed, threads))
        folder = Path(tempfile.mkdtemp(prefix="bench_population_"))
        runs.append(Member(cfg, folder, [], None, run=setup(cfg, folder, [], None)))
    return runs


def timed(step, device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``step()`` after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def timed_together(steps, device, repeats: int, warmup: int = 2):
    """Median seconds of each step function, timed round-robin (fair on a shared machine)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[k].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def worker(args) -> None:
    """One run alone (a joblib job): its training step's median time, as JSON on stdout."""
    (m,) = make_runs(args, args.worker, 1, args.threads)
    print(json.dumps({"step_s": timed(lambda: train_step(m.run), m.run.device, args.repeats)}))


def processes(args, algo: str, jobs: int, threads: int) -> float:
    """``jobs`` worker processes side by side; the median of their step times."""
    cmd = [sys.executable, __file__, "--worker", algo, "--threads", str(threads), "--device", args.device,
           "--tasks", str(args.tasks), "--repeats", str(args.repeats)] + (["--small"] if args.small else []) + args.extra
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
             for _ in range(jobs)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1])["step_s"] for p in procs]
    return sorted(outs)[len(outs) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--members", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--only", default=None, help="comma-separated: protonet,maml")
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="the joblib launcher's n_jobs (baseline)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args, args.extra = ap.parse_known_args()
    if args.worker:
        return worker(args)
    device = resolve_device(args.device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or cpus
    share = max(1, cpus // args.jobs)
    started = time.time()
    results = {}
    for algo in [a for a in ALGORITHMS if not args.only or a in args.only.split(",")]:
        one = processes(args, algo, 1, threads)  # N = 1: a run alone with every thread
        side = processes(args, algo, args.jobs, share) if max(args.members) > 1 else one
        rows = []
        for n in args.members:
            members = make_runs(args, algo, n, threads)
            pop = Population(members)
            (alone,) = make_runs(args, algo, 1, threads)
            times = timed_together({"population": lambda: pop.step(False),
                                    "alone": lambda: train_step(alone.run)}, device, args.repeats)
            population_s, sequential_s = times["population"], n * times["alone"]
            baseline_s = one if n == 1 else math.ceil(n / args.jobs) * side
            rows.append({"members": n, "population_step_ms": round(1000 * population_s, 2),
                         "processes_step_ms": round(1000 * baseline_s, 2),
                         "speedup_vs_processes": round(baseline_s / population_s, 2),
                         "sequential_step_ms": round(1000 * sequential_s, 2),
                         "speedup_vs_sequential": round(sequential_s / population_s, 2)})
            print(json.dumps({"algorithm": algo, **rows[-1]}), file=sys.stderr, flush=True)
        results[algo] = {"rows": rows, "process_step_ms_alone": round(1000 * one, 2),
                         f"process_step_ms_{args.jobs}_side_by_side": round(1000 * side, 2)}
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpus} cores)",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
           "command": " ".join(["python", "scripts/bench_population.py", *sys.argv[1:]]),
           "settings": {"encoder": f"conv4 {16 if args.small else 64} channels", "episode": "5-way 1-shot 15-query",
                        "tasks_per_member": args.tasks, "optimizer": "adam", "maml": "second order, 1 inner step",
                        "population_threads": threads, "jobs": args.jobs, "threads_per_job": share,
                        "repeats": args.repeats},
           "sequential": f"N x one run's train_step in this process ({threads} threads), timed round-robin with the population",
           "baseline": (f"N separate runs as joblib n_jobs={args.jobs} runs them: {args.jobs} processes side by "
                        f"side with {share} thread(s) each, ceil(N/{args.jobs}) of their measured steps one after "
                        f"another (N=1: one process with {threads} threads); start-up not counted"),
           "results": results, "seconds": round(time.time() - started, 1)}
    emit(out, args.out)


if __name__ == "__main__":
    main()
