"""Every algorithm at an equal, stated training budget on the same data, then test accuracy.

    python scripts/algorithm_table.py [--steps 2000] [--meta-batch 16] [--algorithms a,b]
                                      [--out DIR] [key=value ...]

Each algorithm (every configs/algorithm/*.yaml, with its YAML defaults, plus the named
variants below) trains ``--steps`` optimizer steps of ``--meta-batch`` tasks with `metamm`'s own
train() (validation every ``--val-every`` steps, best.pt kept), then best.pt is scored by
`metamm eval`'s evaluate_checkpoint on ``eval.episodes`` test episodes of unseen classes (mean
and 95% CI). Default data: the synthetic multimodal set, 5-way 1-shot 15-query, concat fusion;
pass e.g. ``dataset=omniglot`` where such a dataset config exists. Prints JSON with a Markdown
table; stdout carries the JSON alone.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import compose_config

from metamm_cli.config import config_dir
from metamm_cli.evaluate import evaluate_checkpoint
from metamm_cli.train import train

VARIANTS = {  # extra rows: the named options
    "protonet[cosine]": ["algorithm=protonet", "algorithm.distance=cosine"],
    "finetune[cosine] (Baseline++)": ["algorithm=finetune", "algorithm.head=cosine"],
    "relation[ce]": ["algorithm=relation", "algorithm.loss=ce"],
    "matching[fce]": ["algorithm=matching", "algorithm.fce=true"],
}


def settings():
    rows = {p.stem: [f"algorithm={p.stem}"] for p in sorted(Path(config_dir()).glob("algorithm/*.yaml"))}
    rows.update(VARIANTS)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps per algorithm")
    ap.add_argument("--meta-batch", type=int, default=16, help="tasks per step")
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--algorithms", default=None, help="comma-separated rows (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="algorithm_table_"))
    rows_def = settings()
    names = args.algorithms.split(",") if args.algorithms else list(rows_def)
    budget = [f"trainer.max_steps={args.steps}", f"trainer.meta_batch={args.meta_batch}",
              f"trainer.val_every={min(args.val_every, args.steps)}",
              f"trainer.ckpt_every={args.steps}", f"trainer.log_every={min(50, args.steps)}",
              "trainer.progress=false", "trainer.tensorboard=false", f"seed={args.seed}"]
    rows = {}
    for name in names:
        if name not in rows_def:
            raise SystemExit(f"--algorithms: unknown row {name!r}; known: {', '.join(rows_def)}")
        ov = [*rows_def[name], *budget, *overrides]
        run_dir = out / name.replace("[", "_").replace("]", "").replace(" ", "_").replace("(", "").replace(")", "")
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            metrics = train(compose_config(ov), run_dir=run_dir)
            seconds = time.perf_counter() - start
            eval_ov = [o for o in overrides if o.startswith("eval.")]
            ecfg = compose_config([f"+ckpt={run_dir / 'checkpoints' / 'best.pt'}", *eval_ov], name="eval")
            test = evaluate_checkpoint(ecfg, eval_ov, run_dir / "eval")
        rows[name] = {"test_acc": test["accuracy"], "test_ci95": test["ci95"],
                      "test_episodes": test["episodes"], "best_val_acc": metrics["best_val_acc"],
                      "train_s": seconds, "episodes_per_s": metrics["episodes_per_s"],
                      "device": metrics["device"], "overrides": rows_def[name]}
        print(f"{name}: {test['accuracy']:.2f} +- {test['ci95']:.2f}", file=sys.stderr)
    cfg = compose_config([*budget, *overrides])
    E = cfg.episode
    table = ["| algorithm | test accuracy ± 95% CI | train time (s) | episodes/s |", "|---|---|---|---|"]
    for name, r in rows.items():
        table.append(f"| {name} | {r['test_acc']:.2f} ± {r['test_ci95']:.2f} | {r['train_s']:.0f} | "
                     f"{r['episodes_per_s'] or 0:.0f} |")
    print(json.dumps({"budget": {"steps": args.steps, "meta_batch": args.meta_batch,
                                 "tasks": args.steps * args.meta_batch},
                      "episode": f"{E.way}-way {E.shot}-shot {E.query}-query",
                      "dataset": cfg.dataset._target_, "eval_episodes": cfg.eval.episodes,
                      "overrides": overrides, "out": str(out), "rows": rows, "table": table}, indent=2))
    print("\n".join(table), file=sys.stderr)


if __name__ == "__main__":
    main()
