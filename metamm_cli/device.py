"""Where and how a run computes: the device, mixed precision, seeding."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import re
from typing import Any, Optional

import numpy as np
import torch

from metamm_cli.errors import ConfigError, is_oom  # noqa: F401 - is_oom: callers import it from here too


def enum_name(value: Any) -> str:
    """An enum config value (Device.cpu) or a plain string, as its string."""
    return value.value if hasattr(value, "value") else str(value)


def busy_cpus(seconds: float = 0.2) -> float:
    """How many CPUs other work keeps busy right now: the non-idle share of ``/proc/stat`` over
    ``seconds`` times the CPU count (Linux), else the 1-minute load average."""
    import time

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # total, idle + iowait

    try:
        (t0, i0), _ = sample(), time.sleep(seconds)
        t1, i1 = sample()
        return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0


def auto_threads() -> int:
    """CPU threads for torch when ``trainer.threads`` is null: ``OMP_NUM_THREADS`` or Slurm's
    ``SLURM_CPUS_PER_TASK`` when set, else the CPUs this process may use less the ones other
    work keeps busy (:func:`busy_cpus`), at least 1. On a shared 2-core machine under load this
    is 1: torch's default (every core) trains several times slower there (README, Speed)."""

    for var in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, cpus - int(busy_cpus() + 0.5)))


def set_threads(threads: Any, deterministic: bool = False) -> int:
    """``trainer.threads``: torch's intra-op CPU threads (null: :func:`auto_threads`; with
    ``trainer.deterministic`` every CPU this process may use, a count that does not change with
    the machine's load: another thread count sums in another order)."""
    if threads is None and deterministic:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = auto_threads() if threads is None else int(threads)  # trainer.threads: its range is declared in config.py
    torch.set_num_threads(n)
    return n


def resolve_device(device: Any, job: Optional[int] = None) -> torch.device:
    """``trainer.device``: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
    ``job``: the number of a job running beside others (a parallel sweep); with several GPUs
    auto/cuda then take GPU ``job % count``, one job per GPU."""
    name = str(enum_name(device))
    if name not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise ConfigError(f"trainer.device={name}: must be one of auto, cpu, cuda, cuda:N")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name}: no CUDA device is available here; use auto or cpu")
    count = torch.cuda.device_count()
    if ":" in name:
        index = int(name.split(":")[1])
        if index >= count:
            raise ConfigError(f"trainer.device={name}: this machine has {count} CUDA device"
                              f"{'s' if count > 1 else ''} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
        return torch.device("cuda", index)
    return torch.device("cuda", (job or 0) % count)


def autocast_for(device: torch.device, amp: Any):
    """A factory of autocast contexts: bf16 or fp16 mixed precision, or none."""
    name = enum_name(amp)
    if name == "none":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type,
                             dtype=torch.bfloat16 if name == "bf16" else torch.float16)


def compile_model(algo, backend: str = "inductor") -> None:
    """``trainer.compile``: ``torch.compile`` the algorithm's embedding network (encoders,
    mapping, fusion), in place (same module, same state-dict keys). torch.compile cannot
    differentiate twice (pytorch #91469): an algorithm that does (second-order MAML, Meta-SGD,
    ANIL) is refused; the MAML family's per-task programs (functional_call with adapted weights)
    are not compiled either: metric, transfer and ProtoNet-like algorithms are."""
    if algo.inner_loop:
        raise ConfigError(f"trainer.compile=true: {type(algo).__name__} adapts weights per task "
                          f"(functional_call{', second order' if algo.differentiates_twice else ''}), "
                          f"which torch.compile cannot compile; use a metric or transfer algorithm, "
                          f"or trainer.compile=false")
    model = algo.model
    model.forward = torch.compile(model.forward, backend=backend, dynamic=False)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (losses and statistics under AMP); float32/64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_deterministic(on: bool) -> None:
    """``trainer.deterministic``: deterministic kernels (an error where none exists), no cuDNN
    autotuning; with it, an interrupted and resumed run ends bit-identical to an uninterrupted one.
    (torch's switch imports its compiler stack, a second of start-up: only called to change it.)"""
    if torch.are_deterministic_algorithms_enabled() != bool(on):
        torch.use_deterministic_algorithms(bool(on), warn_only=False)
    torch.backends.cudnn.benchmark = not on
    torch.backends.cudnn.deterministic = bool(on)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def warn_amp(device: torch.device, amp: Any) -> str:
    """The AMP mode's name; a warning where it only costs time (AMP on the CPU)."""
    name = enum_name(amp)
    if device.type == "cpu" and name != "none":
        logging.getLogger("metamm").warning(
            f"trainer.amp={name} on the CPU is emulated and often several times slower than fp32; "
            f"use trainer.amp=none unless you are testing AMP")
    return name
