"""Training on several processes with torch.distributed: ``torchrun --nproc_per_node=N -m
metamm_cli train ...`` on one or several machines, or Slurm tasks started by submitit
(``hydra/launcher=submitit_slurm hydra.launcher.tasks_per_node=N``). metamm schedules nothing:
torchrun or Slurm starts the processes, torch.distributed connects them.

- Every rank draws the same meta-batch (same seed, same sampler generator) and takes its share
  of the tasks (:meth:`World.part`), so N ranks train on exactly the tasks one process would.
- After the backward pass ONE all-reduce sums a flat buffer holding the gradients (each rank's
  scaled by its share of the tasks, so the sum is the mean over the whole meta-batch), the loss
  and accuracy sums, a stop flag (a signal on any rank stops all of them after the same step)
  and the BatchNorm running statistics (combined in closed form: with ``bn_stats=task`` they end
  exactly as one process, embedding the tasks in order, leaves them).
- Validation episodes are split across ranks and gathered, so every rank sees the same accuracy.
- Only rank 0 writes: run folder, logs, TensorBoard, checkpoints, console; the other ranks log
  to ``train_rank<r>.log`` in the same folder. One run is one folder.
- A checkpoint does not depend on the number of ranks: a run resumes on more or fewer.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from metamm_cli import ConfigError


class World:
    """This process's place among the training processes (a single process: rank 0 of 1)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0):
        self.rank, self.size, self.local_rank = rank, size, local_rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def part(self, tasks: int) -> Tuple[int, int]:
        """This rank's tasks ``[start, stop)`` of a meta-batch of ``tasks`` (contiguous, sizes
        differing by at most one; a rank may get none)."""
        base, extra = divmod(tasks, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)


SINGLE = World()


def _env_world() -> Optional[Tuple[int, int, int]]:
    """(rank, size, local rank) from torchrun's variables, or from a submitit Slurm job with
    several tasks; None in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return env.rank, env.world_size, env.local_rank
    return None


def world() -> World:
    """The process group of this run, joined on first use (CPU tensors through gloo, CUDA tensors
    through NCCL); :data:`SINGLE` when one process trains alone."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    found = _env_world()
    if found is None:
        return SINGLE
    rank, size, local_rank = found
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=size)
    return World(rank, size, local_rank)


def local_share() -> int:
    """CPU threads of one of the ``LOCAL_WORLD_SIZE`` processes torchrun started on this machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def broadcast(value, w: World):
    """Rank 0's ``value`` on every rank (small picklable values: a folder, a list of overrides)."""
    if not w.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def barrier(w: World) -> None:
    if w.distributed:
        dist.barrier()


# -- the one all-reduce of a training step

def _norms(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]


def snapshot(model: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The BatchNorm running statistics before a step (to combine the ranks' updates)."""
    return [(m.running_mean.clone(), m.running_var.clone()) for m in _norms(model)]


def _contribution(m: nn.Module, before, mine: int, after: int, first: bool) -> torch.Tensor:
    """This rank's share of the combined running statistics ``[mean, var]``. With momentum ``p``,
    one process updating with every task in order ends at ``(1-p)^T r0 + sum_t p (1-p)^(T-1-t)
    s_t``; a rank that went from ``r0`` to ``R`` with its ``mine`` tasks, ``after`` more tasks
    following on later ranks, contributes ``(1-p)^after (R - (1-p)^mine r0)``, and rank 0 adds
    ``(1-p)^T r0``. With momentum None (a cumulative average over ``n0`` earlier updates) the
    running sums add up: ``R (n0 + mine) - n0 r0``, rank 0 adding ``n0 r0``."""
    out = []
    total = mine + after if first else None
    for now, r0 in ((m.running_mean, before[0]), (m.running_var, before[1])):
        if m.momentum is None:
            n0 = float(m.num_batches_tracked) - mine
            out.append(now * (n0 + mine) - n0 * r0 + (n0 * r0 if first else 0))
        else:
            keep = 1 - m.momentum
            out.append(keep ** after * (now - keep ** mine * r0) + (keep ** total * r0 if first else 0))
    return torch.cat(out)


def all_reduce_step(algo: nn.Module, sums: torch.Tensor, stop: bool, before, tasks: Tuple[int, int],
                    total: int, w: World) -> Tuple[torch.Tensor, bool]:
    """After this rank's backward: sum gradients, ``sums`` (loss, accuracy), the stop flag and the
    BatchNorm statistics over all ranks in one all-reduce; writes the results back. ``tasks``:
    this rank's ``[start, stop)`` of the ``total`` tasks. Returns (summed ``sums``, stop anywhere).
    Per-task BatchNorm (``bn_stats=task``) updates once per task: the combined statistics are
    exactly one process's; pooled BatchNorm (``bn_stats=batch``) counts each rank's call as one
    update, in rank order (an approximation: one process pools all tasks in one update)."""
    from metamm_cli.algorithms.functional import is_task_norm

    params = [p for p in algo.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    norms = _norms(algo)
    updates = [(tasks[1] - tasks[0], total - tasks[1]) if is_task_norm(m) else (1, w.size - 1 - w.rank)
               for m in norms]
    tracked = [int(m.num_batches_tracked) - mine for m, (mine, _) in zip(norms, updates)]
    stats = [_contribution(m, b, mine, after, w.main) for m, b, (mine, after) in zip(norms, before, updates)]
    device = sums.device
    flat = torch.cat([g.reshape(-1).to(device, torch.float32) for g in grads]
                     + [sums.float().reshape(-1), torch.tensor([float(stop)], device=device)]
                     + [s.to(device, torch.float32) for s in stats])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype)
        offset += g.numel()
    summed = flat[offset:offset + sums.numel()].view_as(sums)
    stopping = bool(flat[offset + sums.numel()] > 0)
    offset += sums.numel() + 1
    for m, n0, (mine, after) in zip(norms, tracked, updates):
        c, n = m.running_mean.numel(), (total if is_task_norm(m) else w.size)
        mean, var = flat[offset:offset + c], flat[offset + c:offset + 2 * c]
        if m.momentum is None:
            mean, var = mean / (n0 + n), var / (n0 + n)
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.fill_(n0 + n)
        offset += 2 * c
    return summed, stopping


def gather_tasks(values: torch.Tensor, total: int, w: World) -> torch.Tensor:
    """Every rank's per-task ``values`` (its ``part`` of ``total`` tasks) in task order, on every rank."""
    if not w.distributed:
        return values
    sizes = [World(r, w.size).part(total) for r in range(w.size)]
    width = max(b - a for a, b in sizes)
    padded = torch.zeros(width, dtype=values.dtype, device=values.device)
    padded[:values.numel()] = values
    out = [torch.empty_like(padded) for _ in range(w.size)]
    dist.all_gather(out, padded)
    return torch.cat([o[:b - a] for o, (a, b) in zip(out, sizes)])


def rank_overrides(argv: List[str]):
    """Under torchrun: rank 0 picks the run folder (a new one, or the resumed run's) and every
    rank uses it; ranks > 0 log to ``train_rank<r>.log`` there and print only warnings."""
    import time

    from metamm_cli.errors import one_line
    from metamm_cli.runs.checkpoint import load_checkpoint
    from metamm_cli.runs.resume import RESUMABLE, resume_overrides

    w = world()
    if any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError("torchrun trains one run over several processes: drop -m (a sweep of "
                          "distributed jobs: hydra/launcher=submitit_slurm hydra.launcher.tasks_per_node=N)")
    picked = None
    if w.main:
        try:
            extra, ckpt = resume_overrides(argv)
            if not extra and ckpt is None and not any(a.startswith("hydra.run.dir=") for a in argv):
                stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + f"_{int(time.time() * 1e6) % 1000000:06d}"
                extra = [f"hydra.run.dir=${{output_root}}/${{task_name}}/runs/{stamp}"]
            picked = {"extra": extra, "ckpt": ckpt["path"] if ckpt else None}
        except Exception as e:  # noqa: BLE001 - every rank must hear it, or they wait forever
            picked = {"error": one_line(e)}
            broadcast(picked, w)
            raise
    picked = broadcast(picked, w)
    if "error" in picked:
        raise ConfigError(f"rank 0: {picked['error']}")
    ckpt = load_checkpoint(picked["ckpt"], key="trainer.resume", versions=RESUMABLE) if picked["ckpt"] else None
    extra = list(picked["extra"])
    if not w.main:
        extra += ["hydra.output_subdir=null", f"hydra.job.name=train_rank{w.rank}",
                  "hydra.job_logging.root.level=WARNING"]
    return extra, ckpt
