"""Episodes -> mean accuracy with a 95% confidence interval; shared by validation and `metamm eval`."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from metamm_cli import ConfigError
from metamm_cli.errors import is_oom
from metamm_cli.algorithms import MetaAlgorithm, accuracy, build_algorithm, load_weights
from metamm_cli.models.memory_format import apply_layout
from metamm_cli.runs.checkpoint import load_checkpoint
from metamm_cli.config import TrainConfig, check_ranges
from metamm_cli.data.base import MultimodalDataset, build_dataset, describe_changes
from metamm_cli.data.episodes import EpisodeSampler, build_sampler
from metamm_cli.device import autocast_for, enum_name, resolve_device, set_threads
from metamm_cli.runs import layout

log = logging.getLogger("metamm")


def per_second(rate: float) -> str:
    """A rate with three significant digits: 0.512, 12.3, 324 (never '1' for 1.4)."""
    return f"{rate:.3g}" if abs(rate) < 1000 else f"{rate:,.0f}"


def mean_ci95(accs: torch.Tensor) -> Dict[str, float]:
    """Mean and the half-width of its normal 95% interval, 1.96 * std / sqrt(n)."""
    accs = accs.double().cpu()
    n = accs.numel()
    ci = 1.96 * accs.std(unbiased=True).item() / math.sqrt(n) if n > 1 else 0.0
    return {"accuracy": accs.mean().item(), "ci95": ci, "episodes": n}


def evaluate(algo: MetaAlgorithm, sampler: EpisodeSampler, episodes: int, tasks_per_batch: int,
             autocast=contextlib.nullcontext, progress: bool = False, world=None) -> Dict[str, float]:
    """Run ``episodes`` episodes (the sampler is re-seeded, so every call sees the same ones);
    distributed (``world``), each rank runs its share of every batch and the accuracies are
    gathered, so every rank gets the result one process would."""
    from metamm_cli.scale.distributed import SINGLE, gather_tasks

    world = world or SINGLE
    from tqdm import tqdm

    bar = tqdm(total=episodes, disable=not progress, desc="eval", unit="episode", leave=False)
    was_training = algo.training
    algo.eval()
    sampler.reset()
    accs, bad = [], []
    try:
        with torch.no_grad():
            for start in range(0, episodes, tasks_per_batch):
                n = min(tasks_per_batch, episodes - start)
                part = world.part(n) if world.distributed else None
                episode = sampler.sample(n, part=part)
                if episode.num_tasks:
                    with autocast():
                        _, logits = algo(episode)
                    acc, nan = accuracy(logits, episode.query_labels), (~torch.isfinite(logits)).flatten(1).any(1)
                else:  # a rank with no task of this (last, short) batch
                    acc = nan = episode.query_labels.new_zeros(0, dtype=torch.float32)
                accs.append(gather_tasks(acc, n, world))
                bad.append(gather_tasks(nan.float(), n, world) > 0)
                bar.update(n)
    except Exception as e:  # noqa: BLE001 - only memory errors are translated
        if is_oom(e):
            raise ConfigError(f"out of memory while evaluating {tasks_per_batch} episodes at once: "
                              f"lower eval.tasks_per_batch") from e
        raise
    finally:
        bar.close()
        algo.train(was_training)
    nonfinite = int(torch.cat(bad).sum())
    if nonfinite:  # argmax over NaN scores would be counted as answers: a silently wrong accuracy
        raise ConfigError(f"{nonfinite} of {episodes} evaluation episodes produced non-finite scores "
                          f"(NaN/inf): the model or the inputs of the {sampler.split_name} split are broken; "
                          f"no accuracy is reported")
    return mean_ci95(torch.cat(accs))


def missing_sweep(algo: MetaAlgorithm, cfg: DictConfig, dataset, split: str, device,
                  autocast=contextlib.nullcontext) -> Dict[str, list]:
    """``eval.missing_sweep``: accuracy at each rate with every modality missing at that rate
    together (``all``, the robustness curve; with two or more modalities), then with each one
    missing alone, the others present (``eval.missing_each=false``: the ``all`` curve only); the same episodes (same seed) for every point, and
    nested masks (a sample missing at 0.25 is missing at 0.5). Printed as a table."""
    V, rates = cfg.eval, [float(r) for r in cfg.eval.missing_sweep]
    names = list(dataset.modalities)
    keys = (["all"] if len(names) > 1 else []) + (names if V.missing_each or len(names) == 1 else [])
    curves = {}
    for key in keys:
        curves[key] = []
        for r in rates:
            sampler = build_sampler(cfg, dataset, split, device, V.tasks_per_batch, V.seed, {key: r})
            curves[key].append({"rate": r, **evaluate(algo, sampler, V.episodes, V.tasks_per_batch,
                                                       autocast)})
    print(f"accuracy with modalities missing at each rate (all: every modality at once; 95% CI, "
          f"{V.episodes} episodes each):")
    print("rate    " + "".join(f"{m:>16}" for m in curves))
    for i, r in enumerate(rates):
        print(f"{r:<8.2f}" + "".join(f"{c[i]['accuracy']:>9.2f} +- {c[i]['ci95']:<4.2f}"
                                     for c in curves.values()))
    return curves


def apply_overrides(stored: dict, cfg: DictConfig, overrides: list) -> DictConfig:
    """The checkpoint's config, its ``eval.*`` settings included (a preset's ``eval.episodes:
    1000`` stays 1000), with the keys the user overrode on the command line taken from ``cfg``
    (already composed and type-checked by Hydra).

    Evaluation episodes are ``eval.way``/``shot``/``query`` (null: ``episode.*``). So that
    ``metamm eval --ckpt RUN episode.way=10`` still means "evaluate 10-way" when the run stored
    an ``eval.way`` (a preset that trains 60-way and tests 5-way), an ``episode.X`` given on the
    command line without ``eval.X`` also sets ``eval.X``. (The model is built for the training
    way the checkpoint records, whatever ``episode.way`` says.)"""
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), stored)
    given = {}
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.package or o.key_or_group.replace("/", ".")
        if key in ("ckpt", "hydra") or key.startswith("hydra."):
            continue
        if o.is_delete() or key == "exp" or key.startswith("_global_"):
            raise ConfigError(f"{o.input_line}: at eval time override keys or groups, not {o.key_or_group}")
        given[key] = OmegaConf.select(cfg, key)
    for k in ("way", "shot", "query"):
        if f"episode.{k}" in given and f"eval.{k}" not in given:
            given[f"eval.{k}"] = given[f"episode.{k}"]
    for key, value in given.items():
        OmegaConf.update(merged, key, value, merge=False)
    return merged


def setting(cfg: DictConfig) -> str:
    """The evaluation setting in words: ``5-way 1-shot 15-query, support [image] -> query
    [audio], missing audio 0.5, chance 20.00%``; way, shot and query of the evaluation episodes
    (``eval.*``, else ``episode.*``)."""
    from metamm_cli.data.episodes import episode_shape

    E = cfg.episode
    shape, _ = episode_shape(cfg, "test")
    way = shape["way"]
    text = f"{way}-way {shape['shot']}-shot {shape['query']}-query"
    support, query = E.get("support_modalities"), E.get("query_modalities")
    if support or query:
        text += f", support {list(support) if support else 'all'} -> query {list(query) if query else 'all'}"
    rates = {m: r for m, r in (OmegaConf.select(cfg, "missing.test") or {}).items() if r}
    if rates:
        text += ", missing " + " ".join(f"{m} {r:g}" for m, r in rates.items())
    return text + f", chance {100 / way:.2f}%"


NEUTRAL_KEYS = ("trainer.device", "trainer.progress", "trainer.threads", "eval.tasks_per_batch",
                "eval.missing_sweep", "eval.missing_each", "ckpt", "hydra", "output_root")  # they do not change what is measured


def to_tensorboard(report: Dict, overrides: list) -> None:
    """An evaluation of a run's own test setting goes into that run's TensorBoard: ``acc/test``
    (beside acc/train and acc/val; the hparams table's test column) and the missing-modality
    curves ``test/missing/<modality>`` (x: rate in %), at the run's last step."""
    from metamm_cli.runs.record import TEST_ACC, TEST_CI95, read_json, tb_folder
    from metamm_cli.runs.resume import run_dir_of

    run = run_dir_of(Path(report["ckpt"]))
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if run is None or report.get("accuracy") is None or not report["config"]["trainer"].get("tensorboard", True) \
            or any(not k.startswith(NEUTRAL_KEYS) for k in keys):
        return
    from torch.utils.tensorboard import SummaryWriter

    step = read_json(run / layout.METRICS).get("step") or report.get("step") or 0
    with SummaryWriter(str(tb_folder(run))) as writer:
        writer.add_scalar(TEST_ACC, report["accuracy"], step)
        writer.add_scalar(TEST_CI95, report["ci95"], step)
        for m, points in (report.get("missing_sweep") or {}).items():
            for p in points:
                writer.add_scalar(f"test/missing/{m}", p["accuracy"], round(100 * p["rate"]))


def typed_keys(overrides: list) -> Dict[str, str]:
    """{config key: the key the user typed}: ``episode.way|shot|query`` given without ``eval.*``
    set ``eval.*`` too (:func:`apply_overrides`), so what is said about ``eval.way`` is said
    about ``episode.way``, the key on the command line."""
    given = {str(o).split("=", 1)[0].lstrip("+~") for o in overrides}
    return {f"eval.{k}": f"episode.{k}" for k in ("way", "shot", "query")
            if f"episode.{k}" in given and f"eval.{k}" not in given}


def keys_as_typed(fn):
    """``fn(cfg, overrides, ...)``'s one-line errors name the keys as the user typed them (:func:`typed_keys`)."""
    @functools.wraps(fn)
    def wrapper(cfg, overrides, *args, **kwargs):
        aliases = typed_keys(overrides)
        try:
            return fn(cfg, overrides, *args, **kwargs)
        except ConfigError as e:
            text = re.sub(r"(?<![\w.])eval\.(?:way|shot|query)(?!\w)", lambda m: aliases.get(m[0], m[0]), str(e))
            if text == str(e):
                raise
            raise ConfigError(text) from e
    return wrapper


@keys_as_typed
def rebuild(cfg: DictConfig, overrides: list, state: Dict) -> Tuple[DictConfig, MultimodalDataset, MetaAlgorithm, torch.device]:
    """A checkpoint's model and data as `metamm eval` rebuilds them: (its config with the keys in
    ``overrides`` taken from ``cfg`` (:func:`apply_overrides`), checked; the dataset with the
    preprocessing it learned; the algorithm with its weights, on the config's device; the device).
    Weights or data that do not fit are one line naming the checkpoint."""
    if "config" not in state or "model" not in state:
        raise ConfigError(f"--ckpt {state['path']}: checkpoint lacks its config or weights")
    from metamm_cli.runs.checkpoint import non_finite

    bad = non_finite(state["model"])
    if bad:
        raise ConfigError(f"--ckpt {state['path']}: {len(bad)} weight tensors are not finite (NaN/inf: "
                          f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the run diverged")
    run_cfg = apply_overrides(state["config"], cfg, overrides)
    check_ranges(run_cfg)
    device = resolve_device(run_cfg.trainer.device)
    set_threads(run_cfg.trainer.threads)
    data = state.get("data") or {}
    if not data.get("state") and state.get("version", 1) < 3:
        log.warning(f"--ckpt {state['path']}: written by an older metamm without the data's learned "
                    f"preprocessing; it is learned again from today's files")
    dataset = build_dataset(run_cfg.dataset, data.get("state"))
    changed = describe_changes(data.get("fingerprint"), dataset.fingerprint())
    if changed:
        log.warning(f"data changed: {changed}; this evaluation uses today's files")
    if "ensemble" in state:  # a per-modality ensemble (robustness.py): its members' own models
        from metamm_cli.algorithms.ensemble import ensemble_from
        algo = ensemble_from(state, run_cfg, dataset).to(device)
    else:
        algo = build_algorithm(run_cfg, dataset, way=state["config"]["episode"]["way"]).to(device)
        load_weights(algo, state["model"], f"--ckpt {state['path']}")
        shape = state.get("layout")  # the run's measured layout: the same values, faster
        if shape:
            apply_layout(algo, shape["memory_format"], shape["embed_chunk"])
    return run_cfg, dataset, algo, device


@keys_as_typed
def evaluate_checkpoint(cfg: DictConfig, overrides: list, out_dir: Path,
                        state: Optional[Dict] = None, filename: str = layout.eval_file(), quiet: bool = False) -> Dict:
    """`metamm eval`: rebuild the model from the checkpoint's config, run the test episodes,
    write the report to ``out_dir / filename`` (and, for the run's own test setting, into its
    TensorBoard). ``state`` is the already-loaded checkpoint, if the caller has it; ``quiet``:
    the caller prints the result."""
    state = state or load_checkpoint(cfg.ckpt, prefer=layout.BEST)
    run_cfg, dataset, algo, device = rebuild(cfg, overrides, state)
    V = run_cfg.eval
    split = enum_name(V.split)
    if enum_name(V.task) == "retrieval":  # cross-modal retrieval instead of episodes
        from metamm_cli.retrieval import retrieval_report
        return retrieval_report(algo, dataset.split(split, device), run_cfg, state, out_dir / filename)
    autocast = autocast_for(device, run_cfg.trainer.amp)
    extra = {}
    described = setting(run_cfg)
    if V.episodes_file:  # fixed episodes from a JSON file instead of sampled ones
        from metamm_cli.fixed_episodes import evaluate_episodes_file

        accs, shapes = evaluate_episodes_file(algo, dataset, V.episodes_file, device, autocast)
        result, split = mean_ci95(accs), f"episodes_file {V.episodes_file}"
        extra["episode_accuracies"] = accs.tolist()
        described = shapes
    else:
        sampler = build_sampler(run_cfg, dataset, split, device, V.tasks_per_batch, V.seed)
        result = evaluate(algo, sampler, V.episodes, V.tasks_per_batch, autocast,
                          progress=run_cfg.trainer.progress)
        if V.missing_sweep:
            extra["missing_sweep"] = missing_sweep(algo, run_cfg, dataset, split, device, autocast)
    report = {**result, "split": split, "setting": described, "ckpt": state["path"], "step": state.get("step"),
              **extra, "config": OmegaConf.to_container(run_cfg, resolve=True, enum_to_str=True)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / filename).write_text(json.dumps(report, indent=2))
    if not V.episodes_file:
        to_tensorboard(report, overrides)
    if quiet:
        return report
    line = (f"accuracy: {result['accuracy']:.2f} +- {result['ci95']:.2f} "
            f"(95% CI, {result['episodes']} episodes{'' if V.episodes_file else ' of the ' + split + ' split'}; "
            f"{described})")
    if logging.getLogger().handlers:  # under Hydra: the console and eval.log
        log.info(line)
    else:
        print(line)
    log.info(f"wrote {out_dir / filename}")
    return report


EVAL_USAGE = """usage: metamm eval --ckpt PATH [key=value ...]

Evaluates a checkpoint on fixed test episodes (eval.seed) and prints the mean accuracy with its
95% confidence interval; writes eval.json and eval.log to outputs/evals/<time>_<run>/.

  --ckpt PATH   a checkpoint (.pt) or a run folder (its checkpoints/best.pt). Required.
  key=value     changes the checkpoint's own config: episode.way=10, eval.split=val,
                eval.episodes=600, trainer.device=cpu, trainer.progress=false, ...
                (encoder, fusion and algorithm keys must match the weights).

`metamm train --help` lists the config groups and keys."""


def parse_eval_args(argv: List[str]) -> Tuple[List[str], Optional[str]]:
    """``metamm eval``'s arguments: (the overrides, the ``--ckpt`` path) from ``--ckpt PATH``,
    ``--ckpt=PATH`` or ``ckpt=PATH``; help and config printing need no checkpoint."""
    out, ckpt, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--ckpt" or arg.startswith("--ckpt="):
            if arg == "--ckpt":
                if i + 1 >= len(argv) or not argv[i + 1] or argv[i + 1].startswith("-"):
                    raise ConfigError("--ckpt needs a path: metamm eval --ckpt PATH [key=value ...]")
                ckpt, i = argv[i + 1], i + 2
            else:
                ckpt, i = arg.split("=", 1)[1], i + 1
            continue
        if arg.startswith(("ckpt=", "+ckpt=")):
            ckpt = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    if any(a in ("-h", "--help", "--hydra-help", "-c", "--cfg", "--info") for a in out):
        ckpt = ckpt or "null"
    elif not ckpt:
        raise ConfigError("--ckpt is required: metamm eval --ckpt PATH [key=value ...]")
    return out, ckpt


def app_overrides(ckpt: str, state: Optional[Dict]) -> List[str]:
    """What `metamm eval` adds to the user's overrides: ``+ckpt=PATH`` (quoted: Hydra's grammar
    would read characters such as '=' or ',' in a path) and, for a loaded checkpoint, the
    output folder ``${output_root}/evals/<time>_<run>``."""
    quoted = "'" + ckpt.replace("\\", "\\\\").replace("'", "\\'") + "'"
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in layout.run_name(Path(ckpt)))
    where = [f"hydra.run.dir=${{output_root}}/evals/${{now:%Y-%m-%d_%H-%M-%S_%f}}_{name}"] if state else []
    return [f"+ckpt={quoted}"] + where


def eval_task(cfg: DictConfig, state: Optional[Dict] = None) -> Dict:
    """`metamm eval` inside its Hydra app: the report, written into the app's output folder."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    if state is None and cfg.get("ckpt"):
        state = load_checkpoint(cfg.ckpt, prefer=layout.BEST)
    return evaluate_checkpoint(cfg, list(hc.overrides.task), Path(hc.runtime.output_dir), state)
