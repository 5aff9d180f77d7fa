"""Single modalities vs. every fusion on the same config: train each, then test-evaluate best.pt.

    python scripts/fusion_table.py [--seeds 0 1 2] [--out DIR] [key=value ...]

Each setting trains with `metamm`'s own train() and is scored by its own evaluate on the test
split (eval.episodes episodes, mean and 95% CI); prints JSON with a Markdown table.
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

from _common import compose_config

from metamm_cli.evaluate import evaluate_checkpoint
from metamm_cli.train import train

SETTINGS = {
    "image only": ["dataset.modalities=[image]"],
    "audio only": ["dataset.modalities=[audio]"],
    "tokens only": ["dataset.modalities=[tokens]"],
    "concat": ["fusion=concat"],
    "attention": ["fusion=attention"],
    "weighted": ["fusion=weighted"],
    "gated": ["fusion=gated"],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings")
    args, overrides = ap.parse_known_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="fusion_table_"))
    rows = {}
    for name in args.only.split(","):
        runs = []
        for seed in args.seeds:
            ov = [*SETTINGS[name], f"seed={seed}", "trainer.progress=false", *overrides]
            run_dir = out / name.replace(" ", "_") / f"seed{seed}"
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
                metrics = train(compose_config(ov), run_dir=run_dir)
                seconds = time.perf_counter() - start
                ecfg = compose_config([f"+ckpt={run_dir / 'checkpoints' / 'best.pt'}"], name="eval")
                test = evaluate_checkpoint(ecfg, [], run_dir / "eval")
            runs.append({"seed": seed, "val_acc": metrics["val_acc"], "test_acc": test["accuracy"],
                         "test_ci95": test["ci95"], "train_s": seconds,
                         "episodes_per_s": metrics["episodes_per_s"], "device": metrics["device"]})
        accs = [r["test_acc"] for r in runs]
        rows[name] = {"test_acc_mean": statistics.mean(accs),
                      "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "runs": runs}
    table = ["| setting | test accuracy (mean ± std over seeds) | per seed (± 95% CI) |", "|---|---|---|"]
    for name, row in rows.items():
        per = ", ".join(f"{r['test_acc']:.2f} ± {r['test_ci95']:.2f}" for r in row["runs"])
        table.append(f"| {name} | {row['test_acc_mean']:.2f} ± {row['test_acc_std']:.2f} | {per} |")
    print(json.dumps({"overrides": overrides, "seeds": args.seeds, "out": str(out),
                      "eval_episodes": compose_config(overrides).eval.episodes, "rows": rows,
                      "table": table}, indent=2))
    print("\n".join(table), file=sys.stderr)


if __name__ == "__main__":
    main()
