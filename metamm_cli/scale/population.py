"""Population training (``hydra/launcher=population``): the members of a sweep group, jobs that
differ only in population-safe keys (seed, learning rates, weight decay, temperature, missing
rates), trained as one program. Each member is set up as a run of its own (:func:`train.setup`:
its seed's weights, its samplers' generators, its optimizer, folder, TensorBoard, checkpoints);
then its weights, BatchNorm buffers and optimizer state become views into tensors stacked over a
leading member dim, so that its own module validates, checkpoints and resumes unchanged. A step
draws every member's episode from its own sampler, computes every member's loss in one
``torch.func.vmap`` of a ``functional_call`` of the algorithm (``randomness="different"``: each
member its own dropout masks), backpropagates once, and updates all members with the same
Adam/SGD maths over the stacked tensors (optim.py), each with its own learning rate and
schedule. A member that stops early, diverges or finishes is masked out; the others go on."""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.func import functional_call, vmap

from metamm_cli import ConfigError
from metamm_cli.algorithms import accuracy
from metamm_cli.algorithms.functional import population_transform
from metamm_cli.data.episodes import Episode
from metamm_cli.errors import is_oom, one_line
from metamm_cli.optim import adam_update, per_member, sgd_update
from metamm_cli.runs import layout
from metamm_cli.runs.claim import claim, release
from metamm_cli.runs.record import write_metrics
from metamm_cli.runs.resume import hydra_quote, resume_command
from metamm_cli.runs.signals import StopSignals

log = logging.getLogger("metamm")

SAFE_KEYS = ("seed", "trainer.lr", "trainer.weight_decay", "algorithm.inner_lr", "algorithm.temperature")
SAFE_PREFIXES = ("missing.",)
EPISODE_FIELDS = ("support", "support_present", "support_labels", "query", "query_present", "query_labels",
                  "classes")


def population_safe(key: str) -> bool:
    """Whether a config key may differ between the members of one population: it changes no
    shape, no algorithm and no code path, only values (initial weights, episodes, rates)."""
    key = key.lstrip("+~")
    return key in SAFE_KEYS or key.startswith(SAFE_PREFIXES)


TORCHRUN = ("hydra/launcher=population trains a sweep's members in one process as one vmapped program: "
            "it cannot run under torchrun (WORLD_SIZE > 1); drop torchrun, or use hydra/launcher=basic")


def under_torchrun() -> bool:
    """Whether this process is one of several training processes (read from the environment,
    before any process group is joined)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def refuse_argv(argv: Sequence[str]) -> None:
    """Before Hydra (and before a process group is joined): population with torchrun."""
    if any(a.lstrip("+") == "hydra/launcher=population" for a in argv) and under_torchrun():
        raise ConfigError(TORCHRUN)


def refuse(cfg) -> None:
    """One line why this group cannot train as a population: torchrun, or an algorithm that does
    not declare ``population = True`` (its step cannot run under vmap)."""
    from hydra.utils import get_class

    if under_torchrun():
        raise ConfigError(TORCHRUN)
    cls = get_class(cfg.algorithm._target_)
    if not getattr(cls, "population", False):
        raise ConfigError(f"hydra/launcher=population: {cls.__name__} ({cfg.algorithm._target_}) cannot be "
                          f"vmapped over a population ({getattr(cls, 'population_why', 'not declared population-safe')}); "
                          f"use hydra/launcher=basic or joblib")


@dataclass
class Member:
    """One job of the population: what Hydra composed for it, and its run once set up."""
    cfg: Any
    run_dir: Path
    overrides: List[str]
    hydra: Any  # its HydraConfig (HydraConfig.get() during its setup, checkpoints and finish)
    run: Any = None
    result: Optional[Dict] = None
    claimed: bool = False

    @property
    def active(self) -> bool:
        return self.run is not None and self.result is None


_CURRENT: List[Optional[Member]] = [None]  # the member whose work runs now (as_job), else None


@contextlib.contextmanager
def as_job(member: Member):
    """HydraConfig is this member's within the block (its sweep job number, launcher, folder),
    and what is logged goes to its own log file (:func:`member_logs`)."""
    from hydra.core.hydra_config import HydraConfig

    before = HydraConfig.instance().cfg
    if member.hydra is not None:
        HydraConfig.instance().set_config(member.hydra)
    _CURRENT[0] = member
    try:
        yield
    finally:
        _CURRENT[0] = None
        if before is not None:
            HydraConfig.instance().set_config(before)


@contextlib.contextmanager
def member_logs(members: Sequence[Member], name: str = "train"):
    """Each member's ``<folder>/train.log`` gets its own lines and the population's (Hydra's job
    logging gives one process one log file)."""
    root = logging.getLogger()
    handlers = []
    for m in members:
        h = logging.FileHandler(m.run_dir / f"{name}.log")
        h.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
        h.addFilter(lambda record, m=m: _CURRENT[0] is None or _CURRENT[0] is m)
        handlers.append(h)
    saved = list(root.handlers)
    for h in list(root.handlers):  # the last prepared job's file handler: replaced by the members' own
        if isinstance(h, logging.FileHandler):
            root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
        for h in saved:
            if h not in root.handlers:
                root.addHandler(h)


def fail(member: Member, exc: BaseException) -> None:
    """As a job of the basic launcher fails: one line, recorded in its folder; the others go on."""
    from metamm_cli import app
    from metamm_cli.scale.callbacks import record_failure

    if app.SHOW_TRACEBACK:  # HYDRA_FULL_ERROR=1
        raise exc
    message = one_line(exc)
    print(f"metamm train: job {member.run_dir.name}: error: {message}", flush=True)
    try:
        record_failure(member.run_dir, message)
    except OSError:
        pass
    member.result = {"status": "failed", "error": message}


# -- the stacked state ----------------------------------------------------------------------

class Stack:
    """Every member's parameters, buffers and optimizer state stacked over a leading dim ``[P, ...]``;
    each member's module and torch optimizer hold views (``p.data = stacked[i]``), so the member's
    own code (validation, checkpoints, resume) sees its own slice."""

    def __init__(self, runs: Sequence):
        algos = [r.algo for r in runs]
        self.names = [k for k, _ in algos[0].named_parameters()]
        self.trained = [k for k, p in algos[0].named_parameters() if p.requires_grad]
        self.params, self.buffers = {}, {}
        for k in self.names:
            own = [dict(a.named_parameters())[k] for a in algos]
            stacked = torch.stack([p.detach() for p in own])
            for i, p in enumerate(own):
                p.data = stacked[i]
            self.params[k] = stacked.requires_grad_(own[0].requires_grad)
        for k, _ in algos[0].named_buffers():
            own = [dict(a.named_buffers())[k] for a in algos]
            stacked = torch.stack([b.detach() for b in own])
            for i, b in enumerate(own):
                b.data = stacked[i]
            self.buffers[k] = stacked
        opt = runs[0].optimizer
        self.kind = "adam" if isinstance(opt, torch.optim.Adam) else "sgd"
        group = opt.param_groups[0]
        self.betas, self.eps = group.get("betas"), group.get("eps")
        self.momentum, self.nesterov = group.get("momentum", 0.0), bool(group.get("nesterov", False))
        device = self.params[self.names[0]].device
        self.step = torch.tensor([self._own(r, self.trained[0], "step", 0.0) for r in runs],
                                 dtype=torch.float32, device=device)
        slots = {"adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",) if self.momentum else ()}[self.kind]
        self.state = {k: {s: torch.stack([self._own(r, k, s) if self._own(r, k, s) is not None
                                          else torch.zeros_like(self.params[k][0]) for r in runs]).detach()
                          for s in slots} for k in self.trained}
        for i, r in enumerate(runs):  # each member's optimizer holds views: its checkpoint is a normal one
            own = dict(r.algo.named_parameters())
            for k in self.trained:
                st = {s: t[i] for s, t in self.state[k].items()}
                if self.kind == "adam":
                    st["step"] = self.step[i]
                if st:  # plain SGD keeps no state
                    r.optimizer.state[own[k]] = st

    @staticmethod
    def _own(run, name: str, slot: str, default=None):
        p = dict(run.algo.named_parameters())[name]
        value = run.optimizer.state.get(p, {}).get(slot)
        if value is None:
            return default
        return float(value) if slot == "step" else value.detach().to(p.device)

    def update(self, grads: Dict[str, torch.Tensor], lr: torch.Tensor, weight_decay: torch.Tensor,
               ok: torch.Tensor) -> None:
        """One optimizer step of every member that is ``ok``, in place (the views stay valid)."""
        with torch.no_grad():
            if self.kind == "adam":
                self.step.add_(ok.to(self.step.dtype))
            for k in self.trained:
                p, g, st = self.params[k], grads[k], self.state[k]
                if self.kind == "adam":
                    new, m, v = adam_update(p, g, st["exp_avg"], st["exp_avg_sq"], self.step, lr, weight_decay,
                                            ok, self.betas, self.eps)
                    st["exp_avg"].copy_(m)
                    st["exp_avg_sq"].copy_(v)
                else:
                    new, buf = sgd_update(p, g, st.get("momentum_buffer"), lr, weight_decay, ok,
                                          self.momentum, self.nesterov)
                    if self.momentum:
                        st["momentum_buffer"].copy_(buf)
                p.copy_(new)


def stack_episodes(episodes: Sequence[Episode]) -> Dict[str, Any]:
    """The members' episodes as one pytree of tensors with a leading member dim."""
    out = {}
    for name in EPISODE_FIELDS:
        values = [getattr(e, name) for e in episodes]
        out[name] = ({m: torch.stack([v[m] for v in values]) for m in values[0]} if isinstance(values[0], dict)
                     else torch.stack(values))
    return out


def population_loss(template, hyper: Sequence[str]):
    """``(params, buffers, episode fields, hyper values) -> (loss, summed accuracy)`` for one
    member, by ``functional_call`` of the template algorithm (member 0's module) on that
    member's tensors; ``hyper``: the algorithm's plain-number attributes that differ between
    members (``inner_lr``), set to the member's (batched) value during the call."""
    def member(params, buffers, fields, values):
        old = {k: getattr(template, k) for k in hyper}
        for k in hyper:
            object.__setattr__(template, k, values[k])
        try:
            # tie_weights=False: a module reached by two names (MAML's model and net.model) is swapped
            # once, and restored once (tied names swap it twice and restore the batched value)
            loss, logits = functional_call(template, {**params, **buffers}, (Episode(**fields),),
                                           tie_weights=False, strict=False)
        finally:
            for k, v in old.items():
                object.__setattr__(template, k, v)
        return loss, accuracy(logits, fields["query_labels"]).sum()
    return member


def chunk(tree, start: int, stop: int):
    if isinstance(tree, dict):
        return {k: chunk(v, start, stop) for k, v in tree.items()}
    return tree[start:stop]


class Population:
    """The live population: members (set up), their stacked state and the vmapped step."""

    def __init__(self, members: List[Member]):
        self.members = members
        runs = [m.run for m in members]
        self.stack = Stack(runs)
        template = runs[0].algo
        self.cfg = runs[0].cfg
        self.hyper = self.differing_attributes(template)
        self.values = {k: torch.tensor([float(getattr(r.algo, k)) for r in runs], device=runs[0].device)
                       for k in self.hyper}
        self.fn = vmap(population_loss(template, self.hyper), randomness="different")
        self.chunk_size = self.cfg.trainer.get("population_chunk") or len(members)

    def differing_attributes(self, template) -> List[str]:
        keys = {k for m in self.members for k in m.cfg.algorithm}
        out = []
        for k in sorted(keys):
            values = {str(m.cfg.algorithm.get(k)) for m in self.members}
            if len(values) > 1 and isinstance(getattr(template, k, None), (int, float)) \
                    and not isinstance(getattr(template, k), bool):
                out.append(k)
        return out

    def step(self, stopping: bool) -> None:
        """One optimizer step of every active member (the others' tensors stay as they are)."""
        members, S = self.members, self.stack
        ok = torch.tensor([m.active for m in members], device=S.step.device)
        episodes = []
        for m in members:
            run = m.run
            run.train_sampler.at_step(run.state.step)
            for mod in run.algo.modules():  # layers scheduled by the step (DropBlock's ramp)
                if hasattr(mod, "on_train_step"):
                    mod.on_train_step(run.state.step)
            episodes.append(run.train_sampler.sample() if m.active else None)
        active_ep = next(e for e in episodes if e is not None)
        episodes = [e if e is not None else active_ep for e in episodes]  # a stopped member: any input, masked
        fields = stack_episodes(episodes)
        losses, accs = [], []
        for g in S.params.values():
            g.grad = None
        for start in range(0, len(members), self.chunk_size):
            stop = start + self.chunk_size
            with population_transform():
                loss, acc = self.fn(chunk(S.params, start, stop), chunk(S.buffers, start, stop),
                                    chunk(fields, start, stop), chunk(self.values, start, stop))
            loss.sum().backward()
            losses.append(loss.detach())
            accs.append(acc.detach())
        loss, acc = torch.cat(losses), torch.cat(accs)
        grads = {k: S.params[k].grad if S.params[k].grad is not None else torch.zeros_like(S.params[k])
                 for k in S.trained}
        T = self.cfg.trainer
        P = len(members)
        sq = sum(g.detach().float().pow(2).flatten(1).sum(1) for g in grads.values())
        norm = sq.sqrt()
        if T.grad_clip:  # per member, as clip_grad_norm_
            coef = (T.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            grads = {k: g * per_member(coef, g) for k, g in grads.items()}
        bad = ~torch.isfinite(loss + norm)
        lr = torch.tensor([m.run.optimizer.param_groups[0]["lr"] for m in members], dtype=torch.float64,
                          device=S.step.device)
        wd = torch.tensor([m.run.optimizer.param_groups[0]["weight_decay"] for m in members],
                          dtype=torch.float64, device=S.step.device)
        S.update(grads, lr, wd, ok & ~bad)
        for i, m in enumerate(members):
            if m.active:
                m.run.optimizer._opt_called = True  # the update above was its optimizer's step
                m.run.scheduler.step()
                tasks = T.meta_batch
                m.run.state.record(loss[i] * tasks, acc[i], bad[i], tasks, episodes[i].index)
        assert P == len(members)


def out_of_memory(pop: Population, device) -> str:
    size = pop.chunk_size
    return (f"out of memory on {device}: {size} population members per vmapped step do not fit; set "
            f"trainer.population_chunk={max(1, size // 2)} (same results, less memory)")


def train_population(members: List[Member]) -> List[Dict]:
    """Train ``members`` (one group) as one population; every member's metrics (or failure), in order."""
    with member_logs(members):
        return _train_population(members)


def _train_population(members: List[Member]) -> List[Dict]:
    from metamm_cli.train import begin, finish, patience_spent, periodic, setup

    for m in members:
        with as_job(m):
            try:
                claim(m.run_dir, f"trainer.resume={m.cfg.trainer.resume}" if m.cfg.trainer.resume else "train")
                m.claimed = True
                done, ckpt = begin(m.cfg, m.run_dir, m.overrides, None)
                if done is not None:
                    m.result = done
                    continue
                m.run = setup(m.cfg, m.run_dir, m.overrides, ckpt, tuned=False)  # one layout for all members
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - one member's failure, the others go on
                fail(m, e)
    live = [m for m in members if m.active]
    try:
        if live:
            run_population(live, periodic, patience_spent, finish)
    finally:
        for m in members:
            if m.run is not None and m.run.writer:
                m.run.writer.close()
            if m.claimed:
                release(m.run_dir)
    return [m.result if m.result is not None else {"status": "failed", "error": "not trained"} for m in members]


def run_population(live: List[Member], periodic, patience_spent, finish) -> None:
    pop = Population(live)
    device = live[0].run.device
    log.info(f"population: {len(live)} members trained as one vmapped program"
             + (f" (population_chunk={pop.chunk_size})" if pop.chunk_size < len(live) else "")
             + (f"; per-member {', '.join(pop.hyper)}" if pop.hyper else ""))
    with StopSignals() as stop:
        while any(m.active and m.run.state.step < m.run.cfg.trainer.max_steps for m in live):
            tick = time.perf_counter()
            stopping = stop.signum is not None
            try:
                pop.step(stopping)
            except Exception as e:  # noqa: BLE001 - only memory errors are translated
                if is_oom(e):
                    raise ConfigError(out_of_memory(pop, device)) from e
                raise
            for m in live:
                if not m.active:
                    continue
                with as_job(m):
                    try:
                        periodic(m.run, stopping, tick)
                        T = m.run.cfg.trainer
                        if m.run.state.step >= T.max_steps or patience_spent(m.run):
                            m.result = {"status": "finished", **finish(m.run)}
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:  # noqa: BLE001 - a member that diverged: masked out
                        fail(m, e)
            if stopping and any(m.active for m in live):
                stop_all(live, stop.signum or signal.SIGTERM)
    for m in live:  # resumed at max_steps already (nothing to train) but not finished
        if m.active:
            with as_job(m):
                m.result = {"status": "finished", **finish(m.run)}


def stop_all(live: List[Member], signum: int) -> None:
    """A stop request: every active member has saved last.pt (periodic); its metrics say so, then
    exit 128 + signum, as a run alone does."""
    name = signal.Signals(signum).name
    for m in live:
        if m.active:
            with as_job(m):
                write_metrics(m.run, None, interrupted=name)
            log.warning(f"{name} at step {m.run.state.step}: checkpoint saved to {m.run.ckpt_dir / layout.LAST}; "
                        f"resume with: {resume_command(m.run.run_dir)}")
    log.warning(f"continue the whole sweep: its command with "
                f"'trainer.resume={hydra_quote(live[0].run.run_dir.parent.resolve())}' added")
    raise SystemExit(128 + signum)
