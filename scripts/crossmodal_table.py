"""Cross-modal few-shot accuracy (support in one modality, query in another, both ways) and
cross-modal retrieval (recall@1/5/10, mAP, by class and by instance) for a few training recipes.

    python scripts/crossmodal_table.py [--seeds 0] [--pairs image:audio,audio:image]
        [--recipe NAME="key=value ..." ...] [--out DIR] [key=value ...]

Trailing key=value overrides go to every training run (dataset, budget); ``eval.*`` ones also
to every evaluation. Default recipes (all ProtoNet, ``mapping=linear``, ``fusion=mean``):
``shared`` (ordinary multimodal episodes), ``shared+align`` (plus ``align.weight=0.5``) and, per
pair ``A:B``, ``episodes A->B`` (cross-modal episodes: support A, query B). ``--pairs`` defaults
to every ordered pair of the dataset's modalities. Prints JSON (and a Markdown table on stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _common import compose_config
from hydra.utils import instantiate

from metamm_cli.evaluate import evaluate_checkpoint
from metamm_cli.train import train

SHARED = ["fusion=mean", "mapping=linear"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated")
    ap.add_argument("--pairs", default=None, help="comma-separated A:B ordered modality pairs")
    ap.add_argument("--recipe", action="append", help='NAME="train overrides" (repeatable)')
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or tempfile.mkdtemp(prefix="crossmodal_table_"))
    modalities = list(instantiate(compose_config(overrides).dataset, _convert_="all").modalities)
    pairs = ([tuple(p.split(":")) for p in args.pairs.split(",")] if args.pairs
             else list(itertools.permutations(modalities, 2)))
    if args.recipe:
        recipes = {n: r.split() for n, _, r in (s.partition("=") for s in args.recipe)}
    else:
        recipes = {"shared": SHARED, "shared+align": SHARED + ["align.weight=0.5"]}
        for a, b in pairs:
            recipes[f"episodes {a}->{b}"] = SHARED + [f"episode.support_modalities=[{a}]",
                                                     f"episode.query_modalities=[{b}]"]
    eval_ov = [o for o in overrides if o.startswith("eval.")]
    rows = {}
    for name, recipe in recipes.items():
        runs = []
        for seed in args.seeds:
            run_dir = out / name.replace(" ", "_").replace(">", "") / f"seed{seed}"
            ckpt = f"+ckpt={run_dir / 'checkpoints' / 'best.pt'}"
            res = {"seed": seed}
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
                train(compose_config([*recipe, f"seed={seed}", "trainer.progress=false", *overrides]),
                      run_dir=run_dir)
                for a, b in pairs:
                    ov = [f"episode.support_modalities=[{a}]", f"episode.query_modalities=[{b}]", *eval_ov]
                    r = evaluate_checkpoint(compose_config([ckpt, *ov], name="eval"), ov,
                                            run_dir / f"fewshot_{a}_{b}")
                    res[f"fewshot {a}->{b}"] = {"acc": r["accuracy"], "ci95": r["ci95"]}
                    ov = ["eval.task=retrieval", f"eval.query_modality={a}", f"eval.gallery_modality={b}", *eval_ov]
                    r = evaluate_checkpoint(compose_config([ckpt, *ov], name="eval"), ov,
                                            run_dir / f"retrieval_{a}_{b}")
                    res[f"retrieval {a}->{b}"] = {"class": r["class"], "instance": r["instance"]}
            runs.append(res)
        summary = {}
        for a, b in pairs:
            accs = [r[f"fewshot {a}->{b}"]["acc"] for r in runs]
            summary[f"fewshot {a}->{b}"] = {"mean": statistics.mean(accs),
                                            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
            for kind in ("class", "instance"):
                rs = [r[f"retrieval {a}->{b}"][kind] for r in runs if r[f"retrieval {a}->{b}"][kind]]
                if rs:
                    summary[f"retrieval {a}->{b} {kind}"] = {k: statistics.mean(x[k] for x in rs)
                                                            for k in ("recall@1", "recall@5", "recall@10", "mAP")}
        rows[name] = {"overrides": recipe, "summary": summary, "runs": runs}
    table = ["| recipe | pair | few-shot acc (mean over seeds, ± 95% CI of seed 0) | retrieval by instance R@1/5/10 | by class R@1/5/10, mAP |",
             "|---|---|---|---|---|"]
    for name, row in rows.items():
        for a, b in pairs:
            s, first = row["summary"], row["runs"][0]
            inst = s.get(f"retrieval {a}->{b} instance")
            cls = s.get(f"retrieval {a}->{b} class")
            fmt = lambda r, extra=False: ("/".join(f"{r[k]:.1f}" for k in ("recall@1", "recall@5", "recall@10"))
                                          + (f", {r['mAP']:.1f}" if extra else "")) if r else "-"
            table.append(f"| {name} | {a}->{b} | {s[f'fewshot {a}->{b}']['mean']:.2f} "
                         f"± {first[f'fewshot {a}->{b}']['ci95']:.2f} | {fmt(inst)} | {fmt(cls, True)} |")
    print(json.dumps({"overrides": overrides, "seeds": args.seeds, "pairs": pairs, "out": str(out),
                      "rows": rows, "table": table}, indent=2))
    print("\n".join(table), file=sys.stderr)


if __name__ == "__main__":
    main()
