"""The one trainer loop, for every algorithm: setup, the step, and the periodic events (log,
validate, checkpoint, stop). What a checkpoint holds is RunState's (runstate.py). It knows
nothing about any algorithm."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from metamm_cli import ConfigError
from metamm_cli.algorithms import accuracy, build_algorithm
from metamm_cli.checkpoint import keep_last, save_checkpoint
from metamm_cli.claim import claim, release
from metamm_cli.config import check_ranges
from metamm_cli.data.base import build_dataset, describe_changes
from metamm_cli.data.episodes import build_sampler
from metamm_cli.device import (autocast_for, enum_name, is_oom, make_deterministic, make_scheduler, resolve_device,
                               seed_everything, set_threads, warn_amp)
from metamm_cli.evaluate import evaluate, per_second
from metamm_cli.record import finite_json, flat, open_folder, tensorboard, write_metrics
from metamm_cli.resume import finished, merge_resume, resume_state
from metamm_cli.runstate import Diverged, Run, RunState, restore, stop_now
from metamm_cli.signals import StopSignals

log = logging.getLogger("metamm")


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


def setup(cfg: DictConfig, run_dir: Path, overrides: List[str], ckpt: Optional[Dict]) -> Run:
    changes = []
    if ckpt is not None:
        cfg, changes = merge_resume(ckpt["config"], cfg, overrides)
    check_ranges(cfg)
    T, E = cfg.trainer, cfg.episode
    device = resolve_device(T.device)
    threads = set_threads(T.threads)
    seed_everything(cfg.seed)
    make_deterministic(T.deterministic)
    stored = (ckpt or {}).get("data") or {}
    dataset = build_dataset(cfg.dataset, stored.get("state"))  # a resumed run keeps its preprocessing
    fingerprint = dataset.fingerprint()
    changed = describe_changes(stored.get("fingerprint"), fingerprint) if ckpt is not None else None
    if changed:
        log.warning(f"resume: {changed}")
    train_sampler = build_sampler(cfg, dataset, "train", device, T.meta_batch, cfg.seed)
    val_tasks = min(T.val_episodes, cfg.eval.tasks_per_batch)
    val_sampler = build_sampler(cfg, dataset, "val", device, val_tasks, cfg.seed + 1)
    algo = build_algorithm(cfg, dataset).to(device)
    optimizer = torch.optim.Adam([p for p in algo.parameters() if p.requires_grad], lr=T.lr,
                                 weight_decay=T.weight_decay, fused=True)  # fused: skips on device
    scheduler = make_scheduler(optimizer, enum_name(T.scheduler), T.max_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=enum_name(T.amp) == "fp16")
    modules = {"model": algo, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    state = RunState(modules, train_sampler, device, {"state": dataset.state_dict(), "fingerprint": fingerprint})
    run = Run(cfg, run_dir, device, algo, optimizer, scheduler, scaler, train_sampler, val_sampler,
              val_tasks, autocast_for(device, T.amp), state, dataset=dataset)
    if ckpt is not None:
        restore(run, ckpt, changes)
    open_folder(run, overrides, changes, resumed=ckpt is not None)
    amp = warn_amp(device, T.amp)
    log.info(f"{dataset.describe()} | {E.way}-way {E.shot}-shot {E.query}-query | "
             f"{type(algo).__name__} + {type(algo.model.fusion).__name__} on {device} (amp {amp}, "
             f"{threads} CPU thread{'s' if threads > 1 else ''}) | run dir {run_dir}")
    return run


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
    S.record(loss, acc, bad, T.meta_batch, episode.index)


LARGE_INPUT = 1e4  # an input value beyond this (data normalised to a few units) is named as a culprit


def bad_inputs(run: Run) -> str:
    """What the inputs of the first non-finite step looked like: the samples holding non-finite
    or huge values, named (the data, not the learning rate, is then to blame), or their range."""
    index = run.state.first_bad_index
    if index is None or int(index.min()) < 0:
        return ""
    split, rows = run.train_sampler.split, torch.unique(index.flatten())
    culprits, largest = [], 0.0
    for i, (m, x) in enumerate(split.data.items()):
        if not x.is_floating_point():
            continue
        v = x[rows].float().flatten(1)
        present = split.present[rows, i]
        finite = torch.isfinite(v).all(1)
        size = v.nan_to_num(0, 0, 0).abs().amax(1)
        largest = max(largest, float(size[present].max()) if bool(present.any()) else 0.0)
        for r in torch.nonzero(present & (~finite | (size > LARGE_INPUT))).flatten().tolist():
            what = "non-finite values" if not bool(finite[r]) else f"values up to {float(size[r]):.3g}"
            culprits.append(f"{m} of {run.dataset.describe_sample('train', int(rows[r]))} holds {what}")
    if culprits:
        more = f" (and {len(culprits) - 1} more)" if len(culprits) > 1 else ""
        return f"caused by its inputs: {culprits[0]}{more}; fix or remove them (not a learning-rate problem)"
    return f"its inputs were finite (largest |value| {largest:.3g}): lower trainer.lr or set trainer.grad_clip"


def check_divergence(run: Run) -> None:
    """At log, validation and checkpoint points (they sync anyway): stop or report skips."""
    bad, first = (int(v) for v in torch.stack([run.state.bad, run.state.first_bad]).tolist())
    if bad == 0:
        return
    last = run.ckpt_dir / "last.pt"
    if enum_name(run.cfg.trainer.on_nan) == "stop":
        good = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
        raise Diverged(f"non-finite loss or gradient at step {first} (trainer.on_nan=stop), "
                       f"{bad_inputs(run)}; {good}; trainer.on_nan=skip skips such steps")
    log.warning(f"step {run.state.step}: {bad} updates skipped so far (non-finite loss or gradient, "
                f"first at step {first}, {bad_inputs(run)}; trainer.on_nan=skip)")


def log_train(run: Run) -> None:
    run.episodes += run.state.tasks
    run.last, run.window = run.state.take_log(run.window), 0.0
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{run.last['train/loss']:.3f}", acc=f"{run.last['train/acc']:.1f}")
    writer = tensorboard(run)
    if writer:
        for k, v in run.last.items():
            writer.add_scalar(k, v, run.state.step)


def validate(run: Run) -> Dict[str, float]:
    S, T = run.state, run.cfg.trainer
    val = evaluate(run.algo, run.val_sampler, T.val_episodes, run.val_tasks, run.autocast)
    S.history.append(finite_json({"step": S.step, "val_acc": val["accuracy"], "val_acc_ci95": val["ci95"],
                                  "train_loss": (run.last or {}).get("train/loss")}))
    writer = tensorboard(run)
    if writer:
        writer.add_scalar("val/acc", val["accuracy"], S.step)
        writer.add_scalar("val/acc_ci95", val["ci95"], S.step)
    last = run.last
    log.info(f"step {S.step}: val acc {val['accuracy']:.2f} +- {val['ci95']:.2f}"
             + (f" | train loss {last['train/loss']:.3f} acc {last['train/acc']:.1f}"
                f" | {per_second(last['episodes_per_s'])} episodes/s" if last else ""))
    if val["accuracy"] > S.best:
        S.best, S.best_step = val["accuracy"], S.step
        save_checkpoint(run.ckpt_dir / "best.pt", S.state_dict(run.stored_config()))
    run.val = {**val, "step": S.step}
    return run.val


def checkpoint(run: Run) -> None:
    """last.pt, and with trainer.keep_last=N also step_XXXXXXXX.pt, of which the N newest stay."""
    save_checkpoint(run.ckpt_dir / "last.pt", run.state.state_dict(run.stored_config()))
    run.saved_step = run.state.step
    keep_last(run.ckpt_dir, run.state.step, run.cfg.trainer.keep_last)


def periodic(run: Run, stopping: bool, tick: float) -> None:
    """After a step: its time, then the divergence check, log, validate, checkpoint, each when due
    (a stop request makes a checkpoint due)."""
    T, step = run.cfg.trainer, run.state.step
    due = [step == T.max_steps or step % every == 0 for every in (T.log_every, T.val_every, T.ckpt_every)]
    due[2] = due[2] or stopping
    if any(due) and run.device.type == "cuda":
        torch.cuda.synchronize()  # only at event points: the time below is honest
    run.timed(time.perf_counter() - tick)
    if any(due):
        check_divergence(run)
    if due[0]:
        log_train(run)
    if due[1]:
        validate(run)
    if due[2]:
        checkpoint(run)


def train(cfg: DictConfig, run_dir: Optional[Path] = None, overrides: Optional[List[str]] = None,
          ckpt: Optional[Dict] = None) -> Dict[str, Any]:
    """Train ``cfg.algorithm`` on ``cfg.dataset`` (or continue ``ckpt``, the checkpoint that
    ``trainer.resume`` names); returns (and writes) the final metrics."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        overrides = list(HydraConfig.get().overrides.task) if overrides is None else overrides
    run_dir, overrides = Path(run_dir), overrides or []
    claim(run_dir, f"trainer.resume={cfg.trainer.resume}" if cfg.trainer.resume else "train")
    run = None
    try:
        ckpt = ckpt or resume_state(cfg)
        done = finished(ckpt, cfg, overrides) if ckpt is not None else None
        if done is not None:
            return done
        run = setup(cfg, run_dir, overrides, ckpt)
        T = run.cfg.trainer
        run.bar = tqdm(total=T.max_steps, initial=run.state.step, disable=not T.progress,
                       dynamic_ncols=True, desc="train", leave=False)
        with StopSignals() as stop:
            while run.state.step < T.max_steps:
                tick = time.perf_counter()
                try:
                    train_step(run)
                except Exception as e:  # noqa: BLE001 - only memory errors are translated
                    if is_oom(e):
                        raise ConfigError(out_of_memory(run)) from e
                    raise
                run.bar.update()
                periodic(run, stop.signum is not None, tick)
                if stop.signum is not None and run.state.step < T.max_steps:
                    run.bar.close()
                    stop_now(run, stop.signum)
        run.bar.close()
        return finish(run)
    finally:
        if run is not None and run.writer:
            run.writer.close()
        release(run_dir)


def out_of_memory(run: Run) -> str:
    T, E = run.cfg.trainer, run.cfg.episode
    size = E.way * (E.shot + E.query)
    chunk = T.task_chunk or T.meta_batch
    return (f"out of memory on {run.device} at step {run.state.step + 1}: {chunk} tasks x {size} samples "
            f"per forward pass do not fit; lower trainer.meta_batch ({T.meta_batch}) or set "
            f"trainer.task_chunk={max(1, chunk // 4)} (same gradients, less memory)"
            + ("" if enum_name(T.amp) != "none" or run.device.type == "cpu" else ", or trainer.amp=bf16"))


def finish(run: Run) -> Dict[str, Any]:
    S = run.state
    val = run.val if run.val and run.val["step"] == S.step else validate(run)
    if run.saved_step != S.step:
        checkpoint(run)
    metrics = write_metrics(run, val)
    if tensorboard(run):
        run.writer.add_hparams(flat(run.stored_config()), {f"hparam/{k}": metrics[k] or 0.0 for k in
                                                           ("val_acc", "best_val_acc")}, run_name=".", global_step=S.step)
    print(f"run directory: {run.run_dir}")
    print(f"final validation accuracy: {val['accuracy']:.2f} +- {val['ci95']:.2f} "
          f"(95% CI, {val['episodes']} episodes, step {S.step})")
    return metrics
