"""Robustness to missing modalities as a result: the per-modality ensemble baseline and the
summaries of a robustness curve (accuracy against the rate at which every modality goes
missing, ``eval.missing_sweep``'s ``all`` curve).

- The per-modality ensemble (:class:`metamm_cli.algorithms.ensemble.PerModalityEnsemble`):
  the single-modality models of a sweep, with no training of their own, scoring each query on
  the modalities it has. ``metamm compare --eval`` builds one per seed from runs that each kept
  one modality (``dataset.modalities=[...]``) of the same dataset (:func:`make_ensembles`) as a
  folder holding a checkpoint, so that ``metamm eval`` and ``metamm compare`` treat it as any
  run. This module imports no torch at import time (``metamm compare`` reads tables without it).
- :func:`relative_robustness` and :func:`effective_robustness`: MultiBench's summaries (Liang
  et al., NeurIPS 2021 Datasets and Benchmarks, ``eval_scripts/robustness.py``).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from metamm_cli.runs import layout
from pathlib import Path
from typing import Dict, List, Optional, Sequence


log = logging.getLogger("metamm")


# -- the summaries of a curve

def _points(curve: Sequence[Dict]) -> List[tuple]:
    pts = sorted((float(p["rate"]), float(p["accuracy"])) for p in curve if p.get("accuracy") is not None)
    return pts


def relative_robustness(curve: Sequence[Dict]) -> Optional[float]:
    """The area under the accuracy-rate curve (trapezoids) over the span of the rates, in
    accuracy points: the mean accuracy over the rates from the cleanest to the most missing.
    MultiBench's ``relative_robustness_helper`` is the same trapezoid area over its 11 noise
    levels in steps of 0.1 (then max-min normalised across the methods compared, which depends
    on that set; here the area itself is kept)."""
    pts = _points(curve)
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return None
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0])


def effective_robustness(curve: Sequence[Dict], late: Sequence[Dict]) -> Optional[float]:
    """Accuracy above the late-fusion curve shifted to the same clean accuracy: with ``f`` this
    curve and ``l`` late fusion's at the same rates, the trapezoid mean over the rates of
    ``f(r) - (l(r) + f(r_0) - l(r_0))``, in accuracy points (MultiBench's
    ``effective_robustness_helper`` sums the same differences over its levels). None when the
    two curves were not measured at the same rates."""
    f, lf = _points(curve), _points(late)
    if len(f) < 2 or [x for x, _ in f] != [x for x, _ in lf]:
        return None
    shift = f[0][1] - lf[0][1]
    return relative_robustness([{"rate": x, "accuracy": y - (ly + shift)} for (x, y), (_, ly) in zip(f, lf)])


# -- the per-modality ensemble

def single_modality(run: Dict) -> Optional[str]:
    """The one modality a run kept (``dataset.modalities`` of its resolved config), or None."""
    mods = ((run.get("config") or {}).get("dataset") or {}).get("modalities")
    if isinstance(mods, list) and len(mods) == 1 and isinstance(mods[0], str):
        return mods[0]
    return None


def make_ensembles(runs: List[Dict], out=None) -> List[Path]:
    """One ensemble folder per group of finished single-modality runs of the same dataset and
    seed covering two or more modalities (a compare's runs, ``compare.load_run`` dicts), beside
    them (their common folder), named ``ensemble_<m1>+<m2>_seed<k>``; kept while newer than
    its members' checkpoints. Returns the folders."""
    groups: Dict[tuple, Dict[str, Dict]] = {}
    for run in runs:
        m = single_modality(run)
        if m is None or run["status"] not in ("finished", "finished early", "stopped"):
            continue
        if not (Path(run["path"]) / layout.CHECKPOINTS / layout.BEST).is_file():
            continue
        dataset = (run["config"].get("dataset") or {}).get("_target_")
        key = (dataset, run["seed"], json.dumps(run["config"].get("eval"), sort_keys=True, default=str))
        group = groups.setdefault(key, {})
        if m in group:  # two candidates for one modality: ambiguous, take neither silently
            log.warning(f"ensemble: two {m}-only runs for seed {run['seed']} ({group[m]['name']}, {run['name']}): "
                        f"the first is used")
            continue
        group[m] = run
    folders = []
    for (_, seed, _), group in groups.items():
        if len(group) < 2:
            continue
        folders.append(write_ensemble(group, seed))
        if out is not None:
            print(f"per-modality ensemble of {', '.join(group)} (seed {seed}): {folders[-1]}", file=out)
    return folders


def write_ensemble(group: Dict[str, Dict], seed) -> Path:
    """The ensemble folder of ``group`` ({modality: run}): ``ensemble.json``, ``config.yaml`` (the
    first member's config with the union of the modalities), ``.hydra/`` (the overrides the
    members share, plus ``fusion=ensemble``) and ``checkpoints/best.pt`` holding every member's
    checkpoint (self-contained)."""
    import yaml

    from metamm_cli.runs.checkpoint import load_checkpoint, save_checkpoint
    from metamm_cli.data.base import build_dataset
    from omegaconf import OmegaConf

    runs = list(group.values())
    first = runs[0]
    names = build_dataset(OmegaConf.create({**first["config"]["dataset"], "modalities": None})).modality_names()
    mods = [m for m in names if m in group]
    folder = Path(os.path.commonpath([r["path"] for r in runs])) / f"ensemble_{'+'.join(mods)}_seed{seed}"
    ckpt = folder / layout.CHECKPOINTS / layout.BEST
    sources = [Path(r["path"]) / layout.CHECKPOINTS / layout.BEST for r in runs]
    if ckpt.is_file() and all(ckpt.stat().st_mtime >= s.stat().st_mtime for s in sources):
        return folder
    config = copy.deepcopy(first["config"])
    config["dataset"]["modalities"] = mods
    config["fusion"] = {"_target_": "ensemble"}
    members, states = {}, []
    for m in mods:
        state = load_checkpoint(Path(group[m]["path"]), prefer=layout.BEST)
        members[m] = {"config": state["config"], "model": state["model"], "path": group[m]["path"],
                      "step": state.get("step")}
        states.append((state.get("data") or {}).get("state"))
    shared = [o for o in first["overrides"] if all(o in r["overrides"] for r in runs)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / layout.HYDRA).mkdir(exist_ok=True)
    (folder / layout.HYDRA / layout.OVERRIDES).write_text(yaml.safe_dump([*shared, "fusion=ensemble"]))
    (folder / layout.CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / layout.ENSEMBLE).write_text(json.dumps({"members": {m: group[m]["path"] for m in mods},
                                                    "seed": seed, "modalities": mods}, indent=2))
    data = {"state": states[0]} if all(s == states[0] for s in states) else {}
    save_checkpoint(ckpt, {"config": config, "ensemble": members, "model": {}, "data": data, "step": 0})
    return folder


def missing_sweep(run: Dict) -> Dict[str, list]:
    """The run's ``missing_sweep`` curves: from eval.json, else the first eval-NAME.json with one."""
    for name in sorted(run["tests"]):  # "" (eval.json) sorts first
        sweep = (run["tests"][name] or {}).get("missing_sweep")
        if sweep:
            return sweep
    return {}


def robust_curve(run: Dict) -> List[Dict]:
    """The run's robustness curve: accuracy against the rate of every modality missing at once."""
    return missing_sweep(run).get("all") or []


def is_late(run: Dict) -> bool:
    """A late-fusion run (``fusion=late``): the reference of effective robustness."""
    return str(((run.get("config") or {}).get("fusion") or {}).get("_target_", "")).endswith(".Late")
