"""The one trainer loop, for every algorithm: episodes on the device, AMP, TensorBoard,
periodic validation, atomic checkpoints and resume. It knows nothing about any algorithm."""
from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from metamm_cli import ConfigError
from metamm_cli.algorithms import accuracy, build_algorithm
from metamm_cli.checkpoint import load_checkpoint, save_checkpoint
from metamm_cli.config import check_ranges
from metamm_cli.data.episodes import build_sampler
from metamm_cli.device import autocast_for, enum_name, resolve_device, seed_everything
from metamm_cli.evaluate import evaluate

log = logging.getLogger("metamm")


def find_resume(cfg: DictConfig, run_dir: Path) -> Optional[Path]:
    """``trainer.resume``: null, true (this task's newest ``last.pt``) or a checkpoint/run path."""
    resume = cfg.trainer.resume
    if resume in (None, False, "", "false", "null"):
        return None
    if resume is True or resume == "true":
        runs = Path(cfg.output_root) / cfg.task_name
        found = sorted((p for p in runs.glob("*runs/**/checkpoints/last.pt")
                        if run_dir.resolve() not in p.resolve().parents),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"trainer.resume=true: no checkpoints/last.pt under {runs}/ to resume")
        return found[-1]
    return Path(str(resume))


def _flat(cfg: Dict, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def meta_backward(algo, episode, chunk: int, autocast=contextlib.nullcontext, scaler=None):
    """Forward and backward the meta-batch ``chunk`` tasks at a time (bounding memory); the
    gradients are those of the mean loss over all tasks. Returns the summed task losses and
    accuracies, still on the device."""
    T = episode.num_tasks
    loss_sum = acc_sum = 0
    for start in range(0, T, chunk):
        part = episode.tasks(start, start + chunk)
        with autocast():
            loss, logits = algo(part)
        scaled = loss * (part.num_tasks / T)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum = loss_sum + loss.detach() * part.num_tasks
        acc_sum = acc_sum + accuracy(logits.detach(), part.query_labels).sum()
    return loss_sum, acc_sum


def train(cfg: DictConfig, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Train ``cfg.algorithm`` on ``cfg.dataset``; returns (and writes) the final metrics."""
    check_ranges(cfg)
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir = Path(run_dir)
    T, E = cfg.trainer, cfg.episode
    device = resolve_device(T.device)
    seed_everything(cfg.seed)
    resume_path = find_resume(cfg, run_dir)

    dataset = instantiate(cfg.dataset, _convert_="all")
    train_sampler = build_sampler(cfg, dataset, "train", device, T.meta_batch, cfg.seed)
    val_tasks = min(T.val_episodes, cfg.eval.tasks_per_batch)
    val_sampler = build_sampler(cfg, dataset, "val", device, val_tasks, cfg.seed + 1)
    algo = build_algorithm(cfg, dataset).to(device)
    optimizer = torch.optim.Adam([p for p in algo.parameters() if p.requires_grad],
                                 lr=T.lr, weight_decay=T.weight_decay)
    autocast = autocast_for(device, T.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=enum_name(T.amp) == "fp16")
    step, best, best_step = 0, float("-inf"), 0
    if resume_path is not None:
        state = load_checkpoint(resume_path, key="trainer.resume")
        resume_path = Path(state["path"])
        try:
            algo.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"trainer.resume={resume_path}: checkpoint does not fit this config "
                              f"({str(e).splitlines()[0][:100]})") from e
        scaler.load_state_dict(state["scaler"])
        step, best, best_step = state["step"], state["best_val_acc"], state["best_step"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        try:
            train_sampler.generator.set_state(state["rng"]["sampler"])
        except RuntimeError:  # a CUDA generator's state does not fit a CPU one (or back)
            log.warning("resuming on another device: episodes will differ from an uninterrupted run")
        random.setstate(state["rng"]["python"])
        log.info(f"resumed from {state['path']} at step {step}")

    stored_cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(stored_cfg))
    ckpt_dir = run_dir / "checkpoints"
    if resume_path is not None and (resume_path.parent / "best.pt").is_file():
        ckpt_dir.mkdir(parents=True, exist_ok=True)  # the new run folder is complete on its own
        shutil.copy2(resume_path.parent / "best.pt", ckpt_dir / "best.pt")

    def save(name: str) -> None:
        save_checkpoint(ckpt_dir / name, {
            "step": step, "best_val_acc": best, "best_step": best_step, "config": stored_cfg,
            "model": algo.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "sampler": train_sampler.generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                    "python": random.getstate()}})

    writer = None
    if T.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir / "tb"))
    log.info(f"{dataset.describe()} | {E.way}-way {E.shot}-shot {E.query}-query | "
             f"{type(algo).__name__} + {type(algo.model.fusion).__name__} on {device} | run dir {run_dir}")

    chunk = T.task_chunk or T.meta_batch
    loss_sum = torch.zeros((), device=device)
    acc_sum = torch.zeros((), device=device)
    seen, total_eps, total_time = 0, 0, 0.0
    last: Dict[str, float] = {}
    val: Optional[Dict[str, float]] = None
    bar = tqdm(total=T.max_steps, initial=step, disable=not T.progress, dynamic_ncols=True,
               desc="train", leave=False)
    algo.train()
    tick = time.perf_counter()
    try:
        while step < T.max_steps:
            episode = train_sampler.sample()
            optimizer.zero_grad(set_to_none=True)
            loss_total, acc_total = meta_backward(algo, episode, chunk, autocast, scaler)
            loss_sum += loss_total
            acc_sum += acc_total
            if T.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(algo.parameters(), T.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            seen += T.meta_batch
            bar.update()
            if step % T.log_every == 0 or step == T.max_steps:
                elapsed = time.perf_counter() - tick  # .item() below is the only host sync
                last = {"train/loss": loss_sum.item() / seen, "train/acc": acc_sum.item() / seen,
                        "episodes_per_s": seen / elapsed}
                total_eps, total_time = total_eps + seen, total_time + elapsed
                loss_sum.zero_(), acc_sum.zero_()
                seen, tick = 0, time.perf_counter()
                bar.set_postfix(loss=f"{last['train/loss']:.3f}", acc=f"{last['train/acc']:.1f}",
                                eps=f"{last['episodes_per_s']:.0f}")
                if writer:
                    for k, v in last.items():
                        writer.add_scalar(k, v, step)
            paused = time.perf_counter()  # validation and checkpoints are not training time
            if step % T.val_every == 0 or step == T.max_steps:
                val = evaluate(algo, val_sampler, T.val_episodes, val_tasks, autocast)
                if writer:
                    writer.add_scalar("val/acc", val["accuracy"], step)
                    writer.add_scalar("val/acc_ci95", val["ci95"], step)
                log.info(f"step {step}: val acc {val['accuracy']:.2f} +- {val['ci95']:.2f}"
                         + (f" | train loss {last['train/loss']:.3f} acc {last['train/acc']:.1f}"
                            f" | {last['episodes_per_s']:.0f} episodes/s" if last else ""))
                if val["accuracy"] > best:
                    best, best_step = val["accuracy"], step
                    save("best.pt")
            if step % T.ckpt_every == 0 or step == T.max_steps:
                save("last.pt")
            tick += time.perf_counter() - paused
    except KeyboardInterrupt:
        bar.close()
        save("last.pt")
        log.warning(f"interrupted at step {step}; checkpoint saved, resume with "
                    f"trainer.resume={ckpt_dir / 'last.pt'}")
        raise SystemExit(130)
    bar.close()
    if val is None:  # nothing left to train (max_steps reached): still report validation
        val = evaluate(algo, val_sampler, T.val_episodes, val_tasks, autocast)
        if not (ckpt_dir / "last.pt").exists():
            save("last.pt")
    metrics = {"step": step, "val_acc": val["accuracy"], "val_acc_ci95": val["ci95"],
               "val_episodes": val["episodes"], "best_val_acc": max(best, val["accuracy"]),
               "best_step": best_step if best >= val["accuracy"] else step,
               "train_loss": last.get("train/loss"), "train_acc": last.get("train/acc"),
               "episodes_per_s": total_eps / total_time if total_time else None,
               "train_time_s": total_time, "device": str(device), "run_dir": str(run_dir),
               "resumed_from": str(resume_path) if resume_path else None}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if writer:
        writer.add_hparams(_flat(stored_cfg), {"hparam/val_acc": metrics["val_acc"],
                                               "hparam/best_val_acc": metrics["best_val_acc"]},
                           run_name=".")
        writer.close()
    print(f"run directory: {run_dir}")
    print(f"final validation accuracy: {val['accuracy']:.2f} +- {val['ci95']:.2f} "
          f"(95% CI, {val['episodes']} episodes, step {step})")
    return metrics
