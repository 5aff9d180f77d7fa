"""Every paper-protocol preset (``configs/exp/paper/``) trained at toy scale, to check that each
one learns: validation and test accuracy against chance.

    python scripts/toy_presets.py [--only NAME,...] [--out FILE.json] [key=value ...]

Each preset runs through `metamm`'s own train() in this process (one CPU thread, the CPU unless
``trainer.device=...`` is given), with its protocol kept (data, split, rotations, episodes at
train and test, algorithm, optimizer and schedule shape) and only the scale reduced: narrower
networks (``encoder.dim``/``encoder.image.hidden`` 16), a few dozen steps, smaller meta-batches,
fewer validation and test episodes (TOY below, per family). Schedules keyed to ``max_steps``
(Reptile's linear meta step) run their whole course over the toy budget; those keyed to step
counts (ProtoNet's halving every 2000 steps) do not act. Validation once at the end of the
budget (best.pt = the final model), then trainer.test=true scores best.pt on the test split.

Prints JSON (stdout carries the JSON alone): per preset its overrides and command, validation
and test accuracy (95% CI), chance (100 / test way), the margin over chance, steps, seconds;
with the device, threads, torch version and date. Needs the Omniglot zips ($METAMM_DATA/omniglot).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import compose_config

from metamm_cli.config import config_dir
from metamm_cli.train import train

COMMON = ["encoder.dim=16", "encoder.image.hidden=16", "trainer.threads=1", "trainer.progress=false",
          "trainer.tensorboard=false", "trainer.test=true", "eval.tasks_per_batch=50"]
# Per family: steps, meta-batch (where the protocol has one above 1), validation/test episodes,
# and (Reptile) fewer test-time inner steps. The protocol's other keys are kept.
TOY = {
    "protonet": ["trainer.max_steps=40", "trainer.val_episodes=50", "eval.episodes=100"],
    "matching": ["trainer.max_steps=60", "trainer.val_episodes=50", "eval.episodes=100"],
    "relation": ["trainer.max_steps=150", "trainer.val_episodes=100", "eval.episodes=200"],
    "maml": ["trainer.max_steps=60", "trainer.meta_batch=4", "trainer.val_episodes=100", "eval.episodes=200"],
    "metasgd": ["trainer.max_steps=150", "trainer.meta_batch=4", "trainer.val_episodes=100", "eval.episodes=200"],
    "reptile": ["trainer.max_steps=60", "trainer.meta_batch=2", "algorithm.inner_steps_eval=10",
                "trainer.val_episodes=50", "eval.episodes=100"],
}
# Per preset, replacing the family's step count. Relation Net's MSE loss first sits on the
# all-zero plateau (every score 0: loss 1/N, chance accuracy), at this width for ~300 steps at
# 5-way 5-shot, ~500 at 20-way 1-shot and ~2300 at 20-way 5-shot, then learns; Meta-SGD's
# learned inner rates start small ([0.005, 0.1]) and need ~300 steps at 20-way 1-shot.
TOY_STEPS = {"relation_5w5s": 600, "relation_20w1s": 1200, "relation_20w5s": 3000, "metasgd_20w1s": 400}


def presets():
    return sorted(p.stem for p in (Path(config_dir()) / "exp" / "paper").glob("*.yaml")
                  if not p.stem.startswith("_"))


def run_one(name: str, out: Path, extra):
    family = name.split("_")[0]
    toy = TOY[family]
    if name in TOY_STEPS:
        toy = [o for o in toy if not o.startswith("trainer.max_steps=")] + [f"trainer.max_steps={TOY_STEPS[name]}"]
    steps = next(int(o.split("=")[1]) for o in toy if o.startswith("trainer.max_steps="))
    overrides = [f"+exp=paper/{name}", *COMMON, *toy, f"trainer.val_every={steps}",
                 f"trainer.log_every={steps}", f"trainer.ckpt_every={steps}", *extra]
    cfg = compose_config(overrides)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # train()'s own lines: not into the JSON
        metrics = train(cfg, run_dir=out / name, overrides=overrides)
    seconds = time.perf_counter() - start
    report = json.loads((out / name / "eval.json").read_text())
    way = cfg.eval.way or cfg.episode.way
    chance = 100.0 / way
    return {"preset": f"paper/{name}", "overrides": overrides[1:],
            "command": "metamm train " + " ".join(overrides),
            "setting": report["setting"], "steps": metrics["step"],
            "val_acc": metrics["val_acc"], "val_acc_ci95": metrics["val_acc_ci95"],
            "test_acc": report["accuracy"], "test_acc_ci95": report["ci95"], "test_episodes": report["episodes"],
            "chance": chance, "margin_over_chance": report["accuracy"] - chance,
            "paper": cfg.preset.paper.accuracy, "seconds": round(seconds, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated preset names (protonet_5w1s,...)")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    ap.add_argument("--runs", default=None, help="folder for the run folders (default: a temporary one)")
    args, extra = ap.parse_known_args()
    torch.set_num_threads(1)
    names = args.only.split(",") if args.only else presets()
    unknown = [n for n in names if n not in presets()]
    if unknown:
        sys.exit(f"toy_presets.py: unknown presets {unknown}; choose among {presets()}")
    out = Path(args.runs or tempfile.mkdtemp(prefix="toy_presets_"))
    started = time.perf_counter()
    rows = []
    for name in names:
        rows.append(run_one(name, out, extra))
        print(f"{name}: test {rows[-1]['test_acc']:.1f} (chance {rows[-1]['chance']:.1f}) "
              f"in {rows[-1]['seconds']} s", file=sys.stderr)
    device = next((o.split("=", 1)[1] for o in extra if o.startswith("trainer.device=")), "cpu (auto)")
    result = {
        "what": "every paper preset at toy scale: learns (test accuracy vs chance)",
        "command": "python scripts/toy_presets.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": 1, "torch": torch.__version__, "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "total_seconds": round(time.perf_counter() - started, 1),
        "all_above_chance": all(r["margin_over_chance"] > 0 for r in rows),
        "min_margin_over_chance": min(r["margin_over_chance"] for r in rows),
        "presets": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
