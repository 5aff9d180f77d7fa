"""The one interface every meta-algorithm implements: ``Episode -> (loss, query logits)``."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.algorithms.functional import BN_STATS, task_groups, task_norms, under_transform, upcast

EXECUTIONS = ("auto", "batch", "loop")
from metamm_cli.data.episodes import Episode
from metamm_cli.models.net import MultimodalNet


class MetaAlgorithm(nn.Module):
    """Subclasses implement :meth:`forward` for a whole meta-batch at once.

    ``forward(episode)`` returns the mean query loss over tasks and the query logits
    ``[T, N*Q, N]``. ``model`` is the multimodal embedding network; ``way`` is the training
    way, for algorithms with a way-sized head; ``num_classes`` the number of classes of the
    training split, for algorithms that classify over all of them (the transfer baseline).

    ``bn_stats`` (the metric algorithms, which embed every task of a meta-batch in one call):
    ``task`` (default) normalises each task's samples with that task's own BatchNorm batch
    statistics while training and updates the running statistics as if the tasks had been
    embedded one after another, as the papers train (one episode per forward); ``batch`` uses
    the statistics of the whole meta-batch (every task at once). Eval mode: running statistics
    either way. The MAML family normalises per task regardless (functional norms).

    ``execution`` (how a meta-batch is embedded): ``batch``, every task in one call; ``loop``,
    one call per task (the same values with ``bn_stats=task``: each task is normalised on its
    own either way); ``auto``, the loop on the CPU, where a 600-image batch falls out of cache
    and runs slower than the same work task by task (scripts/bench_algorithms.py), one call on
    GPUs. ``bn_stats=batch`` always embeds in one call.
    """

    # What the algorithm is and can do, declared here (tests, benchmarks and sweeps read these
    # instead of keeping lists): its family (the README's grouping), whether it embeds a
    # meta-batch with per-task BatchNorm statistics (``bn_stats``), whether it adapts weights per
    # task with an inner loop, and whether its meta-loss is the adapted model's query loss (the
    # MAML family but Reptile). :meth:`fixed_way` and :attr:`differentiates_twice` depend on the
    # instance's settings.
    family = "metric"  # metric | optimization | model-based | transfer | cross-modal
    episodic = True  # trains on episodes (False: on plain minibatches, its own train_sampler)
    task_batchnorm = True
    inner_loop = False
    query_meta_loss = False
    # Whether hydra/launcher=population may train members of a sweep as one torch.func.vmap over
    # this algorithm's step (scale/population.py): no data-dependent Python control flow, no
    # in-place state outside parameters and buffers. Declared where it is tested
    # (tests/test_population.py); ``population_why`` says why not, for the refusal.
    population = False
    population_why = "not tested under vmap over members"

    @property
    def differentiates_twice(self) -> bool:
        """Whether a training step differentiates through a gradient (second-order MAML, Meta-SGD,
        ANIL): ``torch.compile`` cannot (pytorch #91469)."""
        return False

    def __init__(self, model: MultimodalNet, way: int, num_classes: Optional[int] = None,
                 bn_stats: str = "task", execution: str = "auto"):
        super().__init__()
        if bn_stats not in BN_STATS:
            raise ConfigError(f"algorithm.bn_stats={bn_stats}: must be one of {', '.join(BN_STATS)}")
        if execution not in EXECUTIONS:
            raise ConfigError(f"algorithm.execution={execution}: must be one of {', '.join(EXECUTIONS)}")
        self.model, self.way, self.num_classes, self.bn_stats = model, way, num_classes, bn_stats
        self.execution = execution
        if bn_stats == "task":
            task_norms(model)

    def forward(self, episode: Episode) -> Tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def train_sampler(self, cfg, dataset, device, tasks: int, seed: int):
        """What draws this algorithm's training batches: N-way K-shot episodes of the train split
        (``episode.*``); classification algorithms return minibatches instead (``pretrain``)."""
        from metamm_cli.data.episodes import build_sampler

        return build_sampler(cfg, dataset, "train", device, tasks, seed)

    def embed_batch(self, cfg, device: torch.device) -> int:
        """The samples of one call of the embedding network in a training step (what
        ``trainer.memory_format=auto`` measures): one task's support and query, or the whole
        meta-batch's where it is embedded in one call."""
        E = cfg.episode
        return E.way * (E.shot + E.query) * (1 if self.looped(device) else cfg.trainer.meta_batch)

    def fixed_way(self) -> Optional[str]:
        """Why this algorithm classifies only at its training way (a way-sized head), or None."""
        return None

    def task_groups(self, tasks: int) -> ContextManager:
        """Within the block the model's BatchNorm layers see batches of ``tasks`` task groups
        (``bn_stats=task``; a no-op for ``batch``)."""
        return task_groups(self.model, tasks) if self.bn_stats == "task" else contextlib.nullcontext()

    def looped(self, device: torch.device) -> bool:
        """Whether a meta-batch is embedded one task at a time (``execution``)."""
        if self.bn_stats != "task" or self.execution == "batch":
            return False
        return self.execution == "loop" or device.type == "cpu" or under_transform()

    def embed(self, inputs: Dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """Embed ``[*lead, ...]`` inputs of any leading shape -> ``[*lead, D]``; with two or more
        leading dims the first is tasks (BatchNorm statistics per task, ``bn_stats``), embedded
        in one call or one task at a time (``execution``)."""
        lead = present.shape[:-1]
        if len(lead) > 1 and self.looped(present.device):
            return torch.stack([self.embed({m: x[t] for m, x in inputs.items()}, present[t])
                                for t in range(lead[0])])
        flat = {m: x.reshape(-1, *x.shape[len(lead):]) for m, x in inputs.items()}
        with self.task_groups(lead[0] if len(lead) > 1 else 1):
            z = self.model(flat, present.reshape(-1, present.shape[-1]))
        return z.reshape(*lead, -1)

    def encode_modalities(self, inputs: Dict[str, torch.Tensor], present: torch.Tensor,
                          shared: bool = True) -> Dict[str, torch.Tensor]:
        """Per-modality embeddings (before the fusion) of ``[T, n, ...]`` inputs -> ``{m: [T, n, D]}``,
        per task or in one call as :meth:`embed` (BatchNorm statistics per task, ``bn_stats``); in
        the shared space (the ``mapping``), or with ``shared=False`` each encoder's own."""
        T = present.shape[0]
        if self.looped(present.device):
            parts = [self.model.encode({m: x[t:t + 1] for m, x in inputs.items()}, present[t:t + 1], shared)
                     for t in range(T)]
            return {m: torch.cat([p[m] for p in parts]) for m in parts[0]}
        with self.task_groups(T):
            return self.model.encode(inputs, present, shared)

    def episode_features(self, episode: Episode) -> Dict[str, torch.Tensor]:
        """:meth:`encode_modalities` of the episode's support then query samples, each encoder's own
        embeddings (``model.to_shared`` maps them into the shared space). While training,
        the result is kept for the rest of the forward pass (an episode restricted to some
        modalities holds the same inputs), so the terms added to the loss (alignment, an
        imputation loss) reuse the embeddings of a score-level fusion instead of embedding the
        episode again; :meth:`forget` drops it."""
        keep = self.training and self.reuse_features
        kept = self.__dict__.get("_features")
        if keep and kept is not None and kept[0] is episode.support and kept[1] is episode.query:
            return kept[2]
        feats = self.encode_modalities(*episode.samples(), shared=False)
        if keep:
            self.__dict__["_features"] = (episode.support, episode.query, feats)
        return feats

    reuse_features = False  # set where a forward hook uses episode_features and calls forget()

    def forget(self) -> None:
        self.__dict__.pop("_features", None)

    def class_scores(self, zq: torch.Tensor, zs: torch.Tensor, mask: Optional[torch.Tensor],
                     labels: torch.Tensor, way: int) -> torch.Tensor:  # pragma: no cover - interface
        """The metric algorithms' comparison of queries with classes: ``zq [T, Q, D]`` against the
        support samples ``zs [T, S, D]`` (labels ``[T, S]``) for which ``mask [T, S]`` holds (None:
        all) -> ``[T, Q, way]``, higher = more likely. Score-level fusions (``fusion=presence``,
        ``late``) call it once per pair of modalities."""
        raise NotImplementedError

    def episode_scores(self, episode: Episode) -> torch.Tensor:
        """The query-class scores ``[T, N*Q, N]`` of a metric algorithm: the fused embeddings
        through :meth:`class_scores`, or, with a score-level fusion, the fusion's combination of
        per-modality ``class_scores``."""
        fusion = self.model.fusion
        if getattr(fusion, "level", "sample") == "prototype":
            return fusion.episode_logits(self, episode)
        zs, zq = self.embed_episode(episode)
        return self.class_scores(zq, zs, None, episode.support_labels, episode.way)

    def embed_episode(self, episode: Episode) -> Tuple[torch.Tensor, torch.Tensor]:
        """Support and query of every task embedded in one call -> ``[T, N*K, D]``, ``[T, N*Q, D]`` (float)."""
        nk = episode.support_labels.shape[1]
        inputs, present = episode.samples()
        z = upcast(self.embed(inputs, present))
        return z[:, :nk], z[:, nk:]

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(upcast(logits.flatten(0, -2)), labels.flatten())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy in percent, ``[T]``; stays on the device."""
    return (logits.argmax(-1) == labels).float().mean(-1) * 100
