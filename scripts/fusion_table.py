"""Single modalities vs. fusions on one config: train each, then test-evaluate best.pt under one
or more test-time conditions (e.g. missing-modality rates).

    python scripts/fusion_table.py [--seeds 0,1,2] [--fusions concat,mean,...] [--singles|--no-singles]
        [--test NAME="key=value key=value" ...] [--out DIR] [key=value ...]

Trailing key=value overrides go to every training run (the dataset, episode, trainer budget: the
same for every setting, so budgets are equal). ``--test`` names a test-time condition and its
eval overrides (repeatable; default one condition ``clean`` with none), e.g.
``--test "missing50=missing.test.image=0.5 missing.test.audio=0.5"``; for a single-modality
setting, overrides whose last key is a modality it does not have are dropped. ``eval.*``
overrides among the trailing ones apply at test time too. Each setting trains with metamm's own
train() and is scored by its own evaluate (eval.episodes episodes, mean and 95% CI); prints JSON
with a Markdown table (mean ± std over seeds).
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
from hydra.utils import instantiate

from metamm_cli.evaluate import evaluate_checkpoint
from metamm_cli.train import train

FUSIONS = "concat,attention,weighted,gated,mean,mlp,film,lowrank,graph,am3,late"


def parse_tests(specs):
    tests = {}
    for spec in specs or ["clean="]:
        name, _, rest = spec.partition("=")
        tests[name] = rest.split()
    return tests


def keep_for(overrides, kept, all_modalities):
    """Drop overrides whose last key component names a modality the setting does not have."""
    out = []
    for o in overrides:
        last = o.split("=", 1)[0].split(".")[-1]
        if last in all_modalities and last not in kept:
            continue
        out.append(o)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated")
    ap.add_argument("--out", default=None)
    ap.add_argument("--fusions", default=FUSIONS, help="comma-separated fusion names")
    ap.add_argument("--singles", action=argparse.BooleanOptionalAction, default=True,
                    help="also train one single-modality baseline per modality")
    ap.add_argument("--test", action="append", help='NAME="eval overrides" (repeatable)')
    args, overrides = ap.parse_known_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or tempfile.mkdtemp(prefix="fusion_table_"))
    tests = parse_tests(args.test)
    base = compose_config(overrides)
    modalities = list(instantiate(base.dataset, _convert_="all").modalities)
    settings = {}
    if args.singles:
        settings.update({f"{m} only": ([f"dataset.modalities=[{m}]"], [m]) for m in modalities})
    settings.update({f: ([f"fusion={f}"], modalities) for f in args.fusions.split(",") if f})
    eval_ov = [o for o in overrides if o.startswith("eval.")]
    rows = {}
    for name, (setting, kept) in settings.items():
        row = {"runs": []}
        for seed in args.seeds:
            ov = [*setting, f"seed={seed}", "trainer.progress=false", *overrides]
            run_dir = out / name.replace(" ", "_") / f"seed{seed}"
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
                metrics = train(compose_config(ov), run_dir=run_dir)
                seconds = time.perf_counter() - start
                run = {"seed": seed, "val_acc": metrics["val_acc"], "train_s": seconds,
                       "episodes_per_s": metrics["episodes_per_s"], "device": metrics["device"]}
                for test, tov in tests.items():
                    tov = keep_for(tov, kept, modalities) + eval_ov
                    ecfg = compose_config([f"+ckpt={run_dir / 'checkpoints' / 'best.pt'}", *tov], name="eval")
                    res = evaluate_checkpoint(ecfg, tov, run_dir / f"eval_{test}")
                    run[test] = {"acc": res["accuracy"], "ci95": res["ci95"], "overrides": tov}
            row["runs"].append(run)
        for test in tests:
            accs = [r[test]["acc"] for r in row["runs"]]
            row[test] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
        rows[name] = row
    head = "| setting | " + " | ".join(f"{t}: test acc (mean ± std over seeds) | {t}: per seed (± 95% CI)"
                                       for t in tests) + " |"
    table = [head, "|---|" + "---|---|" * len(tests)]
    for name, row in rows.items():
        cells = []
        for t in tests:
            per = ", ".join(f"{r[t]['acc']:.2f} ± {r[t]['ci95']:.2f}" for r in row["runs"])
            cells += [f"{row[t]['mean']:.2f} ± {row[t]['std']:.2f}", per]
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    best_single = {t: max((r[t]["mean"], n) for n, r in rows.items() if n.endswith(" only"))
                   for t in tests} if args.singles else {}
    print(json.dumps({"overrides": overrides, "seeds": args.seeds, "tests": tests, "out": str(out),
                      "eval_episodes": compose_config([f"+ckpt=x", *eval_ov], name="eval").eval.episodes,
                      "best_single": best_single, "rows": rows, "table": table}, indent=2))
    print("\n".join(table), file=sys.stderr)


if __name__ == "__main__":
    main()
