"""The one trainer loop, for every algorithm: setup, the step, and the periodic events (log,
validate, checkpoint, stop). What a checkpoint holds is RunState's (runstate.py). It knows
nothing about any algorithm."""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from metamm_cli import ConfigError
from metamm_cli.errors import is_oom
from metamm_cli.algorithms import accuracy, build_algorithm
from metamm_cli.runs.checkpoint import keep_last, save_checkpoint
from metamm_cli.runs.claim import claim, release
from metamm_cli.config import check_ranges
from metamm_cli.data.base import build_dataset, describe_changes
from metamm_cli.data.episodes import build_sampler
from metamm_cli.device import (autocast_for, compile_model, enum_name, make_deterministic,
                               resolve_device, seed_everything, set_threads, warn_amp)
from metamm_cli.scale.distributed import all_reduce_step, barrier, local_share, snapshot, world
from metamm_cli.evaluate import evaluate, per_second
from metamm_cli.scale.launch import job_share, sweep_job
from metamm_cli.runs.pretrained import load_body
from metamm_cli.models.memory_format import apply_layout, choose, match_state_layout
from metamm_cli.optim import make_optimizer, make_scheduler
from metamm_cli.runs.record import (TAGS, VAL_ACC, VAL_CI95, Throughput, finite_json, hparams, open_folder, profiler,
                                    shown_hparams, tensorboard, write_hparams, write_metrics)
from metamm_cli.runs.resume import continue_job, finished, holds_a_run, hydra_quote, merge_resume, resume_command, resume_state
from metamm_cli.runs.state import Diverged, Run, RunState, restore
from metamm_cli.scale.search import Pruned, reporter
from metamm_cli.runs.signals import StopSignals
from metamm_cli.runs import layout

log = logging.getLogger("metamm")


def meta_backward(algo, episode, chunk: int, autocast=contextlib.nullcontext, scaler=None,
                  total: Optional[int] = None):
    """Forward and backward the meta-batch ``chunk`` tasks at a time (bounding memory); the
    gradients are those of the mean loss over ``total`` tasks (default: the episode's; in
    distributed training the whole meta-batch, of which the episode is this rank's share).
    Returns the summed task losses and accuracies, still on the device."""
    T = total or episode.num_tasks
    loss_sum = acc_sum = 0
    for start in range(0, episode.num_tasks, chunk):
        part = episode.tasks(start, start + chunk)
        with autocast():
            loss, logits = algo(part)
        scaled = loss * (part.num_tasks / T)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum = loss_sum + loss.detach() * part.num_tasks
        acc_sum = acc_sum + accuracy(logits.detach(), part.query_labels).sum()
    return loss_sum, acc_sum


def resolve_layout(cfg: DictConfig, algo, dataset, device: torch.device, ckpt: Optional[Dict],
                   measure: bool) -> Dict[str, Any]:
    """``trainer.memory_format`` and ``trainer.embed_chunk`` for this run: as set; where auto, a
    resumed run's own choice, else the measured (cached) one; ``measure=False`` (a population's
    members, torchrun ranks: one layout for all) or ``trainer.deterministic``: contiguous, whole
    batches."""
    T = cfg.trainer
    stored = (ckpt or {}).get("layout") or {}
    fmt = enum_name(T.memory_format)
    fmt = fmt if fmt != "auto" else stored.get("memory_format", "auto")
    chunk = T.embed_chunk if T.embed_chunk is not None else stored.get("embed_chunk")
    if fmt != "auto" and chunk is not None:
        shape = {"memory_format": fmt, "embed_chunk": int(chunk)}
    elif not measure or T.deterministic:
        shape = {"memory_format": "contiguous" if fmt == "auto" else fmt, "embed_chunk": chunk or 0}
    else:
        merged = OmegaConf.merge(cfg, {"trainer": {"memory_format": fmt, "embed_chunk": chunk}})
        shape = choose(merged, algo.model, dataset.modalities, algo.embed_batch(cfg, device), device,
                       algo.differentiates_twice)
    if T.compile:
        shape["embed_chunk"] = 0  # torch.compile traces whole batches
    return shape


def setup(cfg: DictConfig, run_dir: Path, overrides: List[str], ckpt: Optional[Dict], tuned: bool = True) -> Run:
    started = time.perf_counter()
    changes = []
    if ckpt is not None:
        cfg, changes = merge_resume(ckpt["config"], cfg, overrides)
    check_ranges(cfg)
    T, E = cfg.trainer, cfg.episode
    w = world()
    share, job = job_share(T.deterministic) if not w.distributed else (local_share(), w.local_rank)  # CPUs, GPU
    device = resolve_device(T.device, job)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = set_threads(T.threads if T.threads is not None else share, T.deterministic)
    if w.size > T.meta_batch:
        raise ConfigError(f"trainer.meta_batch={T.meta_batch}: {w.size} processes train together, each "
                          f"needs at least one task of the meta-batch; raise it to >= {w.size}")
    seed_everything(cfg.seed)
    make_deterministic(T.deterministic)
    stored = (ckpt or {}).get("data") or {}
    dataset = build_dataset(cfg.dataset, stored.get("state"))  # a resumed run keeps its preprocessing
    if cfg.dataset.get("modalities") is not None:  # positions ([1]) recorded as the names they stand for
        cfg.dataset.modalities = list(dataset.modalities)
    fingerprint = dataset.fingerprint()
    changed = describe_changes(stored.get("fingerprint"), fingerprint) if ckpt is not None else None
    if changed:
        log.warning(f"resume: {changed}")
    algo = build_algorithm(cfg, dataset).to(device)
    if cfg.encoder.get("init") == "RUN_OR_CKPT":  # a preset's placeholder
        raise ConfigError("encoder.init must be set: this preset starts from a pre-trained body "
                          "(encoder.init=RUN_FOLDER or a .pt, e.g. a +exp=benchmarks/pretrain_resnet12_mini run)")
    if ckpt is None and cfg.encoder.get("init"):  # a fresh run started from another run's body
        log.info(load_body(algo, cfg.encoder.init))
    shape = resolve_layout(cfg, algo, dataset, device, ckpt, tuned and not w.distributed)
    apply_layout(algo, shape["memory_format"], shape["embed_chunk"], algo.differentiates_twice)
    train_sampler = algo.train_sampler(cfg, dataset, device, T.meta_batch, cfg.seed)
    val_tasks = min(T.val_episodes, cfg.eval.tasks_per_batch)
    val_sampler = build_sampler(cfg, dataset, "val", device, val_tasks, cfg.seed + 1)
    if T.compile:
        compile_model(algo, T.compile_backend)
    optimizer = make_optimizer(algo.parameters(), T)
    scheduler = make_scheduler(optimizer, T)
    scaler = torch.amp.GradScaler(device.type, enabled=enum_name(T.amp) == "fp16")
    modules = {"model": algo, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    state = RunState(modules, train_sampler, device, {"state": dataset.state_dict(), "fingerprint": fingerprint})
    state.clock = started  # wall time counts the start-up (data loading) too
    run = Run(cfg, run_dir, device, algo, optimizer, scheduler, scaler, train_sampler, val_sampler,
              val_tasks, autocast_for(device, T.amp), state, dataset=dataset, world=w)
    state.layout = shape
    if ckpt is not None:
        restore(run, ckpt, changes)
        match_state_layout(optimizer)
    run.throughput = Throughput(run.state.step)  # episodes/s after this process's warm-up steps
    run.trial = reporter(cfg)
    if w.main:  # rank 0 writes the run folder; the others only train
        open_folder(run, overrides, changes, resumed=ckpt is not None)
    amp = warn_amp(device, T.amp)
    ranks = f", rank {w.rank} of {w.size}" if w.distributed else ""
    log.info(f"{dataset.describe()} | {E.way}-way {E.shot}-shot {E.query}-query | "
             f"{type(algo).__name__} + {type(algo.model.fusion).__name__} on {device} (amp {amp}, "
             f"{shape['memory_format']}{', pieces of ' + str(shape['embed_chunk']) if shape['embed_chunk'] else ''}, "
             f"{threads} CPU thread{'s' if threads > 1 else ''}{ranks}) | run dir {run_dir}")
    return run


def train_step(run: Run, stop: bool = False) -> bool:
    """One optimizer step. A non-finite loss or gradient skips the update on the device
    (fused Adam's found_inf, as a GradScaler does) and is counted, without a host sync.
    Distributed: this rank's share of the meta-batch, then one all-reduce (distributed.py); a stop
    requested on any rank (``stop``) is returned on every rank. Returns whether to stop."""
    T, S, w = run.cfg.trainer, run.state, run.world
    part = w.part(T.meta_batch) if w.distributed else None
    run.train_sampler.at_step(S.step)  # missing.warmup's ramp
    for m in run.algo.modules():  # layers scheduled by the step (DropBlock's ramp)
        if hasattr(m, "on_train_step"):
            m.on_train_step(S.step)
    episode = run.train_sampler.sample(part=part)
    before = snapshot(run.algo) if w.distributed else None
    run.optimizer.zero_grad(set_to_none=True)
    loss, acc = meta_backward(run.algo, episode, T.task_chunk or T.meta_batch, run.autocast, run.scaler,
                              total=T.meta_batch)
    if w.distributed:
        (loss, acc), stop = all_reduce_step(run.algo, torch.stack([loss, acc]), stop, before, part,
                                            T.meta_batch, w)
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
    return stop


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
    last = run.ckpt_dir / layout.LAST
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
            writer.add_scalar(TAGS.get(k, k), v, run.state.step)


def validate(run: Run) -> Dict[str, float]:
    S, T = run.state, run.cfg.trainer
    val = evaluate(run.algo, run.val_sampler, T.val_episodes, run.val_tasks, run.autocast, world=run.world)
    S.history.append(finite_json({"step": S.step, "val_acc": val["accuracy"], "val_acc_ci95": val["ci95"],
                                  "train_loss": (run.last or {}).get("train/loss"),
                                  "time_s": round(S.wall, 3)}))  # seconds since the run started
    writer = tensorboard(run)
    if writer:
        writer.add_scalar(VAL_ACC, val["accuracy"], S.step)
        writer.add_scalar(VAL_CI95, val["ci95"], S.step)
    last = run.last
    log.info(f"step {S.step}: val acc {val['accuracy']:.2f} +- {val['ci95']:.2f}"
             + (f" | train loss {last['train/loss']:.3f} acc {last['train/acc']:.1f}"
                f" | {per_second(last['episodes_per_s'])} episodes/s" if last else ""))
    if val["accuracy"] > S.best:
        S.best, S.best_step = val["accuracy"], S.step
        if run.world.main:
            save_checkpoint(run.ckpt_dir / layout.BEST, S.state_dict(run.stored_config()))
    run.val = {**val, "step": S.step}
    if run.trial is not None:  # a search's trial: its pruner may stop a clearly worse run here
        run.trial.report(val["accuracy"], S.step)
    return run.val


def checkpoint(run: Run) -> None:
    """last.pt, and with trainer.keep_last=N also step_XXXXXXXX.pt, of which the N newest stay
    (rank 0 writes; every rank holds the same state)."""
    if run.world.main:
        save_checkpoint(run.ckpt_dir / layout.LAST, run.state.state_dict(run.stored_config()))
        keep_last(run.ckpt_dir, run.state.step, run.cfg.trainer.keep_last)
    run.saved_step = run.state.step


def periodic(run: Run, stopping: bool, tick: float) -> None:
    """After a step: its time, then the divergence check, log, validate, checkpoint, each when due
    (a stop request makes a checkpoint due)."""
    T, step = run.cfg.trainer, run.state.step
    due = [step == T.max_steps or step % every == 0 for every in (T.log_every, T.val_every, T.ckpt_every)]
    due[2] = due[2] or stopping
    if any(due) and run.device.type == "cuda":
        torch.cuda.synchronize()  # only at event points: the time below is honest
    seconds = time.perf_counter() - tick
    run.timed(seconds)
    run.throughput.add(step, T.meta_batch, seconds)
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
    main = world().main  # distributed: rank 0 holds the run folder
    if main:
        claim(run_dir, f"trainer.resume={cfg.trainer.resume}" if cfg.trainer.resume else "train")
    run = None
    try:
        done, ckpt = begin(cfg, run_dir, overrides, ckpt, main)
        if done is not None:
            return done
        run = setup(cfg, run_dir, overrides, ckpt)
        T = run.cfg.trainer
        run.bar = tqdm(total=T.max_steps, initial=run.state.step, disable=not T.progress,
                       dynamic_ncols=True, desc="train", leave=False)
        with StopSignals() as stop, profiler(run) as prof:
            while run.state.step < T.max_steps:
                tick = time.perf_counter()
                try:
                    agreed = train_step(run, stop.signum is not None)
                    # distributed: the flag all ranks summed (a later signal counts at the next step)
                    stopping = agreed if run.world.distributed else stop.signum is not None
                except Exception as e:  # noqa: BLE001 - only memory errors are translated
                    if is_oom(e):
                        raise ConfigError(out_of_memory(run)) from e
                    raise
                run.bar.update()
                if prof is not None:
                    prof.step()
                periodic(run, stopping, tick)
                if stopping and run.state.step < T.max_steps:
                    run.bar.close()
                    stop_now(run, stop.signum or signal.SIGTERM)
                if patience_spent(run):
                    break
        run.bar.close()
        return finish(run)
    except Pruned as why:
        run.bar.close()
        checkpoint(run)
        log.info(f"search: {why}")
        return write_metrics(run, run.val, status="pruned", pruned=str(why))
    finally:
        if run is not None and run.writer:
            run.writer.close()
        if main:
            release(run_dir)


def begin(cfg: DictConfig, run_dir: Path, overrides: List[str], ckpt: Optional[Dict],
          main: bool = True):
    """Before setup: (metrics, None) of a run that finished before (nothing to train), else
    (None, the checkpoint to continue or None). A continued sweep's job finds its own state; a
    folder that holds a run is never overwritten."""
    if sweep_job() and cfg.trainer.resume:  # a continued sweep: this job's own state
        done, ckpt = continue_job(run_dir)
        if done is not None:
            log.info(f"{run_dir.name}: finished before, skipped")
            return done, None
        if ckpt is None:
            cfg.trainer.resume = None
    elif main and ckpt is None and cfg.trainer.resume in (None, False) and holds_a_run(run_dir):
        raise ConfigError(f"{run_dir} already holds a run: continue it with "
                          f"trainer.resume={hydra_quote(run_dir)} (or -m ... trainer.resume=SWEEP_FOLDER "
                          f"for a sweep), or choose another folder; nothing is overwritten")
    ckpt = ckpt or resume_state(cfg)
    done = finished(ckpt, cfg, overrides) if ckpt is not None else None
    return (done, None) if done is not None else (None, ckpt)


def patience_spent(run: Run) -> bool:
    """``trainer.patience=N``: N validations in a row without a new best stop the run early."""
    P, S = run.cfg.trainer.patience, run.state
    if not P or not S.history or S.history[-1]["step"] != S.step:
        return False
    since = sum(h["step"] > S.best_step for h in S.history)
    if since < P:
        return False
    log.info(f"early stop at step {S.step}: {since} validations without a new best "
             f"(best {S.best:.2f} at step {S.best_step}; trainer.patience={P})")
    run.early_stopped = S.step
    return True


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
    if not run.world.main:  # rank 0 reports; wait until it has
        barrier(run.world)
        return {"step": S.step, "val_acc": val["accuracy"], "best_val_acc": S.best}
    test = test_best(run) if run.cfg.trainer.test else None
    extra = {"test_acc": test["accuracy"], "test_acc_ci95": test["ci95"]} if test else {}
    if run.early_stopped:
        extra["early_stopped"] = run.early_stopped
    metrics = write_metrics(run, val, **extra)
    if tensorboard(run):  # one hparams table for a sweep: what differs, readable, beside acc/val and acc/test
        identity = run.identity or {}
        values = hparams(run.stored_config(), identity.get("choices", {}))
        write_hparams(run.writer, values, shown_hparams(values, identity.get("compared"), identity.get("choices", {})),
                      S.step)
    print(f"run directory: {run.run_dir}")
    print(f"final validation accuracy: {val['accuracy']:.2f} +- {val['ci95']:.2f} "
          f"(95% CI, {val['episodes']} episodes, step {S.step})")
    if test:
        print(f"test accuracy: {test['accuracy']:.2f} +- {test['ci95']:.2f} (95% CI, {test['episodes']} "
              f"episodes of best.pt, step {test['step']}; {test['setting']}; {run.run_dir / 'eval.json'})")
    barrier(run.world)
    return metrics


def test_best(run: Run) -> Dict[str, Any]:
    """``trainer.test=true``: ``best.pt`` on the test split with the run's ``eval.*`` settings
    (as ``metamm eval --ckpt RUN`` would), into the run's ``eval.json`` and TensorBoard."""
    from metamm_cli.runs.checkpoint import load_checkpoint
    from metamm_cli.evaluate import evaluate_checkpoint

    state = load_checkpoint(run.ckpt_dir / layout.BEST)
    if run.writer is not None:
        run.writer.flush()
    return evaluate_checkpoint(run.cfg, [], run.run_dir, state, quiet=True)


def stop_now(run: Run, signum: int) -> None:
    """After the checkpoint of a stop request: metrics, the resume command, exit 128 + signum
    (distributed: every rank stops after the same step; rank 0 has written)."""
    name = signal.Signals(signum).name
    if run.world is None or run.world.main:
        write_metrics(run, None, interrupted=name)
        log.warning(f"{name} at step {run.state.step}: checkpoint saved to {run.ckpt_dir / layout.LAST}; "
                    f"resume with: {resume_command(run.run_dir)}")
        if sweep_job():  # the whole sweep: its folder, the same command line, trainer.resume
            log.warning(f"continue the whole sweep: its command with "
                        f"'trainer.resume={hydra_quote(run.run_dir.parent.resolve())}' added")
    if run.world is not None:
        barrier(run.world)
    raise SystemExit(128 + signum)
