"""Where a small machine's threads go in a sweep: the whole wall time of ``metamm train -m`` (the
real CLI, a subprocess, as users run it) for J jobs of the default experiment (seed=0..J-1), run
by each launcher arm, the arms interleaved (a, b, c, a, b, c, ...), medians of ``--repeats``.

    python scripts/bench_sweep_threads.py [--jobs 4] [--steps 200] [--repeats 2] [--arms a b c]
                                          [--n-jobs 2] [--threads 2] [--out FILE] [key=value ...]

- ``a`` ``hydra/launcher=joblib hydra.launcher.n_jobs=--n-jobs``: that many worker processes side
  by side, each with CPUs / n_jobs torch threads (trainer.threads left null: metamm's job share,
  scale/launch.py ``job_share``; on 2 cores and n_jobs=2, 1 thread each).
- ``b`` ``hydra/launcher=basic trainer.threads=--threads``: the jobs one after another in the
  CLI's own process (Hydra's basic launcher), each with ``--threads`` threads.
- ``c`` ``hydra/launcher=joblib hydra.launcher.n_jobs=1 trainer.threads=--threads``: one worker
  process, the jobs one after another, ``--threads`` threads each (b's threads, a's launcher).

Each sweep runs from a fresh temporary working directory with ``hydra.sweep.dir`` there (deleted
at the end unless ``--keep``). Validation only at the last step (``trainer.val_every=--steps``,
``--val-episodes`` episodes), no TensorBoard, no progress bar. Besides the wall time, each job's
metrics.json (``train_time_s``: its training steps, ``wall_time_s``: start-up included,
``episodes_per_s``: steady state) and run.json (the torch threads it ran with) are read.
Extra ``key=value`` overrides go to every arm. Prints JSON and writes it to ``--out`` if given.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import emit  # (also puts the repository on sys.path)

from metamm_cli.runs import layout  # noqa: E402

ARMS = {"a": "joblib n_jobs={n_jobs}, CPUs/n_jobs threads each (auto)",
        "b": "basic (one process, jobs one after another), {threads} threads each",
        "c": "joblib n_jobs=1 (jobs one after another in one worker), {threads} threads each"}


def metamm_command():
    """The ``metamm`` entry point of this interpreter's environment (else ``python -m metamm_cli``)."""
    exe = Path(sys.executable).parent / "metamm"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("metamm")
    return [found] if found else [sys.executable, "-m", "metamm_cli"]


def arm_overrides(arm: str, args) -> list:
    if arm == "a":
        return ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.n_jobs}"]
    if arm == "b":
        return ["hydra/launcher=basic", f"trainer.threads={args.threads}"]
    return ["hydra/launcher=joblib", "hydra.launcher.n_jobs=1", f"trainer.threads={args.threads}"]


def common_overrides(args) -> list:
    seeds = ",".join(str(s) for s in range(args.jobs))
    return [f"seed={seeds}", "trainer.device=cpu", f"trainer.max_steps={args.steps}",
            f"trainer.val_every={args.steps}", f"trainer.val_episodes={args.val_episodes}",
            f"trainer.log_every={args.steps}", f"trainer.ckpt_every={args.steps}",
            "trainer.progress=false", "trainer.tensorboard=false", *args.extra]


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def jobs_of(sweep: Path) -> dict:
    """What the sweep's run folders recorded: per job its threads, times and speed; sums."""
    jobs = []
    for folder in sorted(p for p in sweep.iterdir() if p.is_dir() and (p / layout.METRICS).is_file()):
        m, info = read_json(folder / layout.METRICS) or {}, read_json(folder / layout.RUN_INFO) or {}
        jobs.append({"job": folder.name, "threads": info.get("threads"), "step": m.get("step"),
                     "train_time_s": m.get("train_time_s"), "wall_time_s": m.get("wall_time_s"),
                     "episodes_per_s": m.get("episodes_per_s")})

    def total(key):
        values = [j[key] for j in jobs if j[key] is not None]
        return round(sum(values), 2) if values else None

    speeds = sorted(j["episodes_per_s"] for j in jobs if j["episodes_per_s"] is not None)
    return {"jobs_done": len(jobs), "threads": sorted({j["threads"] for j in jobs if j["threads"] is not None}),
            "train_time_s_sum": total("train_time_s"), "job_wall_time_s_sum": total("wall_time_s"),
            "episodes_per_s_median": round(speeds[len(speeds) // 2], 2) if speeds else None,
            "per_job": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in j.items()} for j in jobs]}


def run_sweep(cmd: list, workdir: Path, sweep: Path, timeout: float) -> dict:
    """One ``metamm train -m`` from ``workdir``: its wall seconds and its jobs' records."""
    workdir.mkdir(parents=True)
    log = workdir / "cli.log"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run([*cmd, f"hydra.sweep.dir={sweep}"], cwd=workdir, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"metamm exited {proc.returncode} ({' '.join(cmd)}):\n{tail}")
    return {"wall_s": round(wall, 2), **jobs_of(sweep)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4, help="jobs of the sweep (seed=0..J-1)")
    ap.add_argument("--steps", type=int, default=200, help="trainer.max_steps of each job")
    ap.add_argument("--val-episodes", type=int, default=20, help="the one (final) validation's episodes")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=["a", "b", "c"])
    ap.add_argument("--n-jobs", type=int, default=2, help="arm a's hydra.launcher.n_jobs")
    ap.add_argument("--threads", type=int, default=2, help="arms b and c's trainer.threads")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one sweep may take")
    ap.add_argument("--keep", action="store_true", help="keep the temporary sweep folders")
    ap.add_argument("--out", default=None)
    args, args.extra = ap.parse_known_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    base = [*metamm_command(), "train", "-m", *common_overrides(args)]
    commands = {arm: base + arm_overrides(arm, args) for arm in args.arms}
    root = Path(tempfile.mkdtemp(prefix="bench_sweep_threads_"))
    started = time.time()
    runs = {arm: [] for arm in args.arms}
    try:
        for rep in range(args.repeats):
            for arm in args.arms:  # interleaved: a, b, c, a, b, c, ... (fair on a shared machine)
                work = root / f"{arm}{rep}"
                runs[arm].append(run_sweep(commands[arm], work, work / "sweep", args.timeout))
                print(json.dumps({"arm": arm, "repeat": rep, "wall_s": runs[arm][-1]["wall_s"],
                                  "threads": runs[arm][-1]["threads"]}), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    arms = {}
    for arm, reps in runs.items():
        walls = sorted(r["wall_s"] for r in reps)
        arms[arm] = {"launcher": ARMS[arm].format(n_jobs=args.n_jobs, threads=args.threads),
                     "command": shlex.join(["metamm", *commands[arm][len(metamm_command()):],
                                            "hydra.sweep.dir=<tmp>/sweep"]),
                     "wall_s": [r["wall_s"] for r in reps], "median_wall_s": walls[len(walls) // 2],
                     "repeats": reps}
    fastest = min(arms, key=lambda a: arms[a]["median_wall_s"])
    best = arms[fastest]["median_wall_s"]
    out = {"device": f"cpu ({cpus} cores)", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
           "command": shlex.join(["python", "scripts/bench_sweep_threads.py", *sys.argv[1:]]),
           "settings": {"experiment": "default (configs/train.yaml)", "jobs": args.jobs, "steps": args.steps,
                        "val_episodes": args.val_episodes, "repeats": args.repeats, "n_jobs": args.n_jobs,
                        "threads": args.threads, "extra_overrides": args.extra,
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                        "wall": "whole `metamm train -m` subprocess, start-up and sweep summary included"},
           "arms": arms, "fastest": fastest,
           "median_wall_over_fastest": {a: round(v["median_wall_s"] / best, 3) for a, v in arms.items()},
           "seconds": round(time.time() - started, 1), "kept": str(root) if args.keep else None}
    emit(out, args.out)


if __name__ == "__main__":
    main()
