"""The one trainer loop, for every algorithm: setup, the step, and the periodic events (log,
validate, checkpoint, stop). What a checkpoint holds is RunState's (runstate.py). It knows
nothing about any algorithm."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from metamm_cli import ConfigError
from metamm_cli.algorithms import accuracy, build_algorithm
from metamm_cli.checkpoint import (VERSION, clean_orphans, load_checkpoint, mismatch, save_checkpoint,
                                   write_atomic)
from metamm_cli.config import check_ranges
from metamm_cli.data.episodes import EpisodeSampler
from metamm_cli.device import autocast_for, enum_name, make_deterministic, resolve_device, seed_everything
from metamm_cli.evaluate import evaluate
from metamm_cli.runstate import (RUNNING, RunState, StopSignals, find_resume, finite_json, mark_running,
                                 flat, merge_resume, record_run)

log = logging.getLogger("metamm")


class Diverged(ConfigError):
    """A non-finite loss or gradient under trainer.on_nan=stop."""


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


@dataclass
class Run:
    cfg: DictConfig
    run_dir: Path
    device: torch.device
    algo: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    train_sampler: EpisodeSampler
    val_sampler: EpisodeSampler
    val_tasks: int
    autocast: Any
    state: RunState
    writer: Any = None
    bar: Any = None
    saved_step: int = -1
    last: Optional[Dict[str, float]] = None
    train_time: float = 0.0
    window: float = 0.0  # training seconds since the last log point

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def stored_config(self) -> Dict:
        return OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)


# -- setup ----------------------------------------------------------------------------------------

def resume_state(cfg: DictConfig) -> Optional[Dict]:
    """The checkpoint ``trainer.resume`` names (null: none)."""
    path = find_resume(cfg.trainer.resume, Path(cfg.output_root) / cfg.task_name)
    return None if path is None else load_checkpoint(path, key="trainer.resume", versions=(VERSION,))


def setup(cfg: DictConfig, run_dir: Path, overrides: List[str], ckpt: Optional[Dict]) -> Run:
    changes = []
    if ckpt is not None:
        cfg, changes = merge_resume(ckpt["config"], cfg, overrides)
    check_ranges(cfg)
    T, E = cfg.trainer, cfg.episode
    device = resolve_device(T.device)
    seed_everything(cfg.seed)
    make_deterministic(T.deterministic)
    dataset = instantiate(cfg.dataset, _convert_="all")
    train_sampler = EpisodeSampler(dataset.split("train", device), E.way, E.shot, E.query,
                                   T.meta_batch, seed=cfg.seed, split_name="train")
    val_tasks = min(T.val_episodes, cfg.eval.tasks_per_batch)
    val_sampler = EpisodeSampler(dataset.split("val", device), E.way, E.shot, E.query,
                                 val_tasks, seed=cfg.seed + 1, split_name="val")
    algo = build_algorithm(cfg, dataset).to(device)
    optimizer = torch.optim.Adam([p for p in algo.parameters() if p.requires_grad], lr=T.lr,
                                 weight_decay=T.weight_decay, fused=True)  # fused: skips on device
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (
        0.5 * (1 + math.cos(math.pi * min(s, T.max_steps) / max(T.max_steps, 1)))
        if enum_name(T.scheduler) == "cosine" else 1.0))
    scaler = torch.amp.GradScaler(device.type, enabled=enum_name(T.amp) == "fp16")
    state = RunState({"model": algo, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler},
                     train_sampler, device)
    run = Run(cfg, run_dir, device, algo, optimizer, scheduler, scaler, train_sampler, val_sampler,
              val_tasks, autocast_for(device, T.amp), state)
    if ckpt is not None:
        restore(run, ckpt, changes)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_orphans(run.ckpt_dir)
    mark_running(run_dir)
    write_atomic(run_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(run.stored_config()).encode()))
    record_run(run_dir, overrides, device, state.step if ckpt else None, changes)
    if T.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        run.writer = SummaryWriter(str(run_dir / "tb"), purge_step=state.step + 1 if ckpt else None)
    amp = enum_name(T.amp)
    if device.type == "cpu" and amp != "none":
        log.warning(f"trainer.amp={amp} on the CPU is emulated and often several times slower than "
                    f"fp32; use trainer.amp=none unless you are testing AMP")
    log.info(f"{dataset.describe()} | {E.way}-way {E.shot}-shot {E.query}-query | "
             f"{type(algo).__name__} + {type(algo.model.fusion).__name__} on {device} (amp {amp}) | "
             f"run dir {run_dir}")
    return run


def restore(run: Run, ckpt: Dict, changes: List[str]) -> None:
    try:
        run.state.load(ckpt)
    except (RuntimeError, ValueError, KeyError) as e:
        why = mismatch(run.algo, ckpt["model"])
        changed = ", ".join(c.split(": ")[1] for c in changes)
        raise ConfigError(f"trainer.resume={ckpt['path']}: the checkpoint does not fit this config "
                          f"({why}{f'; changed: {changed}' if changed else ''})") from e
    for line in changes:
        log.info(line)
    log.info(f"resumed from {ckpt['path']} at step {run.state.step}")
    old_best = Path(ckpt["path"]).parent / "best.pt"
    if old_best.is_file() and old_best.parent.resolve() != run.ckpt_dir.resolve():  # another folder: complete on its own
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(old_best, run.ckpt_dir / "best.pt")


# -- the step -------------------------------------------------------------------------------------

def train_step(run: Run) -> None:
    """One optimizer step. A non-finite loss or gradient skips the update on the device
    (fused Adam's found_inf, as a GradScaler does) and is counted, without a host sync."""
    T, S = run.cfg.trainer, run.state
    episode = run.train_sampler.sample()
    run.optimizer.zero_grad(set_to_none=True)
    loss, acc = meta_backward(run.algo, episode, T.task_chunk or T.meta_batch, run.autocast, run.scaler)
    if run.scaler.is_enabled():
        run.scaler.unscale_(run.optimizer)  # the scaler itself skips steps with non-finite gradients
    grads = [p.grad for p in run.algo.parameters() if p.grad is not None]
    norm = (torch.nn.utils.clip_grad_norm_(run.algo.parameters(), T.grad_clip) if T.grad_clip
            else torch.nn.utils.get_total_norm(grads))
    bad = ~torch.isfinite(loss) if run.scaler.is_enabled() else ~torch.isfinite(loss + norm)
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)
    else:
        run.optimizer.found_inf = bad.float()
        run.optimizer.step()
        del run.optimizer.found_inf
    run.scaler.update()
    run.scheduler.step()
    S.step += 1
    S.sums += torch.stack([torch.where(bad, 0, loss), torch.where(bad, 0, acc),
                           (~bad).to(loss.dtype) * T.meta_batch]).float()
    S.tasks += T.meta_batch
    S.first_bad = torch.where(bad & (S.first_bad < 0), S.step, S.first_bad)
    S.bad += bad.long()


# -- periodic events ------------------------------------------------------------------------------

def check_divergence(run: Run) -> None:
    """At log, validation and checkpoint points (they sync anyway): stop or report skips."""
    bad, first = (int(v) for v in torch.stack([run.state.bad, run.state.first_bad]).tolist())
    if bad == 0:
        return
    last = run.ckpt_dir / "last.pt"
    if enum_name(run.cfg.trainer.on_nan) == "stop":
        good = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
        raise Diverged(f"non-finite loss or gradient at step {first} (trainer.on_nan=stop); {good}; "
                       f"lower trainer.lr or set trainer.grad_clip, or trainer.on_nan=skip")
    log.warning(f"step {run.state.step}: {bad} updates skipped so far (non-finite loss or gradient, "
                f"first at step {first}; trainer.on_nan=skip)")


def log_train(run: Run) -> None:
    S, elapsed = run.state, run.window
    loss, acc, good = S.sums.tolist()
    run.last = {"train/loss": loss / good if good else float("nan"),
                "train/acc": acc / good if good else float("nan"),
                "episodes_per_s": S.tasks / elapsed if elapsed > 0 else float("nan")}
    S.sums.zero_()
    S.tasks, run.window = 0, 0.0
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{run.last['train/loss']:.3f}", acc=f"{run.last['train/acc']:.1f}")
    if run.writer:
        for k, v in run.last.items():
            run.writer.add_scalar(k, v, S.step)


def validate(run: Run) -> Dict[str, float]:
    S, T = run.state, run.cfg.trainer
    val = evaluate(run.algo, run.val_sampler, T.val_episodes, run.val_tasks, run.autocast)
    S.history.append(finite_json({"step": S.step, "val_acc": val["accuracy"], "val_acc_ci95": val["ci95"],
                                  **{k.replace("/", "_"): v for k, v in (run.last or {}).items()
                                     if k != "episodes_per_s"}}))
    if run.writer:
        run.writer.add_scalar("val/acc", val["accuracy"], S.step)
        run.writer.add_scalar("val/acc_ci95", val["ci95"], S.step)
    last = run.last
    log.info(f"step {S.step}: val acc {val['accuracy']:.2f} +- {val['ci95']:.2f}"
             + (f" | train loss {last['train/loss']:.3f} acc {last['train/acc']:.1f}"
                f" | {last['episodes_per_s']:.0f} episodes/s" if last else ""))
    if val["accuracy"] > S.best:
        S.best, S.best_step = val["accuracy"], S.step
        save_checkpoint(run.ckpt_dir / "best.pt", S.state_dict(run.stored_config()))
    return val


def checkpoint(run: Run) -> None:
    """last.pt, and with trainer.keep_last=N also step_XXXXXXXX.pt, of which the N newest stay."""
    save_checkpoint(run.ckpt_dir / "last.pt", run.state.state_dict(run.stored_config()))
    run.saved_step = run.state.step
    keep = run.cfg.trainer.keep_last
    if keep:
        step_file = run.ckpt_dir / f"step_{run.state.step:08d}.pt"
        step_file.unlink(missing_ok=True)
        try:
            step_file.hardlink_to(run.ckpt_dir / "last.pt")
        except OSError:
            shutil.copy2(run.ckpt_dir / "last.pt", step_file)
        for old in sorted(run.ckpt_dir.glob("step_*.pt"))[:-keep]:
            old.unlink()


def due_events(run: Run, stopping: bool) -> List[bool]:
    """Which of log, validate, checkpoint are due after this step (a stop request: checkpoint)."""
    T, step = run.cfg.trainer, run.state.step
    end = step == T.max_steps
    log_, val, ckpt = (end or step % every == 0 for every in (T.log_every, T.val_every, T.ckpt_every))
    return [log_, val, ckpt or stopping]


def periodic(run: Run, due: List[bool]) -> None:
    """After a step: divergence check, log, validate, checkpoint, in that order; each when due."""
    if any(due):
        check_divergence(run)
    if due[0]:
        log_train(run)
    if due[1]:
        validate(run)
    if due[2]:
        checkpoint(run)


def write_metrics(run: Run, val: Optional[Dict], **extra) -> Dict[str, Any]:
    S = run.state
    last = run.last or {}
    metrics = finite_json({
        "step": S.step, "val_acc": val["accuracy"] if val else None,
        "val_acc_ci95": val["ci95"] if val else None, "val_episodes": val["episodes"] if val else None,
        "best_val_acc": S.best if S.history else None, "best_step": S.best_step,
        "train_loss": last.get("train/loss"), "train_acc": last.get("train/acc"),
        "episodes_per_s": last.get("episodes_per_s"), "train_time_s": run.train_time,
        "skipped_steps": int(S.bad), "device": str(run.device), "run_dir": str(run.run_dir),
        "history": S.history, **extra})
    write_atomic(run.run_dir / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    return metrics


def stop_now(run: Run, signum: int) -> None:
    name = signal.Signals(signum).name
    write_metrics(run, None, interrupted=name)
    log.warning(f"{name} at step {run.state.step}: checkpoint saved to {run.ckpt_dir / 'last.pt'}; "
                f"resume with: metamm train trainer.resume={run.run_dir}")
    raise SystemExit(128 + signum)


# -- the run --------------------------------------------------------------------------------------

def train(cfg: DictConfig, run_dir: Optional[Path] = None, overrides: Optional[List[str]] = None,
          ckpt: Optional[Dict] = None) -> Dict[str, Any]:
    """Train ``cfg.algorithm`` on ``cfg.dataset`` (or continue ``ckpt``, the checkpoint that
    ``trainer.resume`` names); returns (and writes) the final metrics."""
    if run_dir is None or overrides is None:
        from hydra.core.hydra_config import HydraConfig
        run_dir = run_dir or Path(HydraConfig.get().runtime.output_dir)
        overrides = list(HydraConfig.get().overrides.task) if overrides is None else overrides
    run_dir = Path(run_dir)
    ckpt = ckpt or resume_state(cfg)
    if ckpt is not None and ckpt["step"] >= max(merge_resume(ckpt["config"], cfg, overrides)[0].trainer.max_steps, 1):
        print(f"run {run_dir} already finished at step {ckpt['step']}: nothing to train "
              f"(raise trainer.max_steps to continue it)")
        done = Path(ckpt["path"]).parent.parent / "metrics.json"
        return json.loads(done.read_text()) if done.is_file() else {"step": ckpt["step"], "val_acc": None}
    run = setup(cfg, run_dir, overrides, ckpt)
    T = run.cfg.trainer
    try:
        run.bar = tqdm(total=T.max_steps, initial=run.state.step, disable=not T.progress,
                       dynamic_ncols=True, desc="train", leave=False)
        tick = time.perf_counter()
        with StopSignals() as stop:
            while run.state.step < T.max_steps:
                train_step(run)
                run.bar.update()
                due = due_events(run, stop.signum is not None)
                if any(due) and run.device.type == "cuda":
                    torch.cuda.synchronize()  # only at event points: the window's time is honest
                now = time.perf_counter()
                run.window, run.train_time = run.window + now - tick, run.train_time + now - tick
                periodic(run, due)
                if stop.signum is not None:
                    run.bar.close()
                    stop_now(run, stop.signum)
                tick = time.perf_counter()
        run.bar.close()
        return finish(run)
    finally:
        if run.writer:
            run.writer.close()
        (run_dir / RUNNING).unlink(missing_ok=True)


def val_of(run: Run) -> Dict[str, float]:
    h = run.state.history[-1]
    return {"accuracy": h["val_acc"], "ci95": h["val_acc_ci95"], "episodes": run.cfg.trainer.val_episodes}


def finish(run: Run) -> Dict[str, Any]:
    S = run.state
    if not S.history or S.history[-1]["step"] != S.step:
        validate(run)
    if run.saved_step != S.step:
        checkpoint(run)
    val = val_of(run)
    metrics = write_metrics(run, val)
    if run.writer:
        run.writer.add_hparams(flat(run.stored_config()), {"hparam/val_acc": metrics["val_acc"] or 0.0,
                                                           "hparam/best_val_acc": metrics["best_val_acc"] or 0.0},
                               run_name=".", global_step=S.step)
    print(f"run directory: {run.run_dir}")
    print(f"final validation accuracy: {val['accuracy']:.2f} +- {val['ci95']:.2f} "
          f"(95% CI, {val['episodes']} episodes, step {S.step})")
    return metrics
