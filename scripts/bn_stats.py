"""ProtoNet with per-task BatchNorm statistics (``algorithm.bn_stats=task``, the default) against
statistics over the whole meta-batch (``bn_stats=batch``), same seeds, same budget.

    python scripts/bn_stats.py [--steps 30] [--meta-batch 8] [--seeds 0,1,2] [--algorithm protonet]
                               [--out DIR] [key=value ...]

Each (mode, seed) trains ``--steps`` optimizer steps of ``--meta-batch`` tasks with `metamm`'s own
train() (one thread; validation only at the end), then the final checkpoint is scored by `metamm
eval`'s evaluate_checkpoint on ``eval.episodes`` test episodes (mean and 95% CI). The two modes of
a seed see the same initial weights and the same episodes. Default data: the synthetic multimodal
set (conv4 and conv1d encoders, both with BatchNorm), 5-way 1-shot 15-query. Prints JSON (stdout
carries the JSON alone): per mode and seed, and the mean over seeds and of the paired differences.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import compose_config

from metamm_cli.evaluate import evaluate_checkpoint
from metamm_cli.train import train

MODES = ("task", "batch")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--meta-batch", type=int, default=8, help="tasks per step")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--algorithm", default="protonet", help="a metric algorithm (one with bn_stats)")
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args()
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="bn_stats_"))
    seeds = [int(s) for s in args.seeds.split(",")]
    budget = [f"algorithm={args.algorithm}", f"trainer.max_steps={args.steps}",
              f"trainer.meta_batch={args.meta_batch}", f"trainer.val_every={args.steps}",
              f"trainer.ckpt_every={args.steps}", f"trainer.log_every={args.steps}",
              "trainer.progress=false", "trainer.tensorboard=false", "trainer.threads=1",
              "trainer.device=cpu"]
    eval_ov = [o for o in overrides if o.startswith("eval.")]
    runs = {m: {} for m in MODES}
    start_all = time.perf_counter()
    for seed in seeds:
        for mode in MODES:  # interleaved: both modes of a seed see the same machine load
            run_dir = out / f"{mode}_seed{seed}"
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                cfg = compose_config([*budget, f"algorithm.bn_stats={mode}", f"seed={seed}", *overrides])
                metrics = train(cfg, run_dir=run_dir)
                seconds = time.perf_counter() - start
                ecfg = compose_config([f"+ckpt={run_dir / 'checkpoints' / 'last.pt'}", *eval_ov], name="eval")
                test = evaluate_checkpoint(ecfg, eval_ov, run_dir / "eval")
            runs[mode][seed] = {"test_acc": round(test["accuracy"], 2), "test_ci95": round(test["ci95"], 2),
                                "test_episodes": test["episodes"], "val_acc": metrics.get("val_acc"),
                                "train_s": round(seconds, 1)}
            print(f"bn_stats={mode} seed={seed}: {test['accuracy']:.2f} +- {test['ci95']:.2f}", file=sys.stderr)
    summary = {}
    for mode in MODES:
        accs = [runs[mode][s]["test_acc"] for s in seeds]
        summary[mode] = {"mean_test_acc": round(statistics.mean(accs), 2),
                         "sd_over_seeds": round(statistics.stdev(accs), 2) if len(accs) > 1 else None}
    diffs = [runs["task"][s]["test_acc"] - runs["batch"][s]["test_acc"] for s in seeds]
    summary["task_minus_batch"] = {"per_seed": [round(d, 2) for d in diffs],
                                   "mean": round(statistics.mean(diffs), 2)}
    cfg = compose_config([*budget, *overrides])
    E = cfg.episode
    print(json.dumps({
        "what": f"{args.algorithm}, algorithm.bn_stats=task vs batch",
        "command": "python scripts/bn_stats.py " + " ".join(sys.argv[1:]),
        "device": f"cpu, torch {torch.__version__}, 1 thread per run",
        "date": time.strftime("%Y-%m-%d"),
        "budget": {"steps": args.steps, "meta_batch": args.meta_batch, "tasks": args.steps * args.meta_batch},
        "episode": f"{E.way}-way {E.shot}-shot {E.query}-query", "dataset": cfg.dataset._target_,
        "modalities": list(cfg.dataset.modalities), "eval_episodes": cfg.eval.episodes,
        "overrides": overrides, "seeds": seeds, "runs": runs, "summary": summary,
        "total_s": round(time.perf_counter() - start_all, 1), "out": str(out)}, indent=2))


if __name__ == "__main__":
    main()
