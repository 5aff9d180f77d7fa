"""The transfer baselines of Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot
Classification" (ICLR 2019): Baseline (linear head) and Baseline++ (cosine head).

Reference code: github.com/wyharveychen/CloserLookFewShot (``methods/baselinetrain.py``,
``methods/baselinefinetune.py``, ``backbone.py`` ``distLinear``)."""
from __future__ import annotations

from typing import Annotated, Dict, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.config import Range
from metamm_cli.algorithms.base import MetaAlgorithm
from metamm_cli.algorithms.functional import upcast

HEADS = ("linear", "cosine")
Head = Dict[str, torch.Tensor]


def paper_scale(classes: int) -> float:
    """distLinear's ``scale_factor``, from the head's own number of classes: 2 up to 200, else 10."""
    return 2.0 if classes <= 200 else 10.0


def head_logits(z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], head: str,
                scale: float, norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[..., D]`` features, ``[..., C, D]`` weights -> ``[..., C]``: ``z W^T + b`` (linear) or
    Baseline++'s distLinear, ``scale * <z / (||z|| + 1e-5), g_c v_c / ||v_c||>`` with ``weight``
    the direction ``v`` and ``norm [..., C]`` the learned per-class norm ``g`` of
    ``WeightNorm(dim=0)`` (None: 1, the plain cosine)."""
    if head == "cosine":
        zn = z / (z.norm(dim=-1, keepdim=True) + 1e-5)
        w = F.normalize(weight, dim=-1) if norm is None else weight * (norm / weight.norm(dim=-1))[..., None]
        return scale * zn @ w.transpose(-1, -2)
    return z @ weight.transpose(-1, -2) + bias[..., None, :]


class DistLinear(nn.Module):
    """Baseline++'s head, the paper's ``distLinear``: ``nn.Linear(dim, classes, bias=False)`` under
    ``WeightNorm(dim=0)``, i.e. ``weight_v [C, D]`` (nn.Linear's default initialisation) and
    ``weight_g [C, 1]`` (initialised to each row's norm), applied to ``x / (||x|| + 1e-5)``, times
    ``scale`` (null: :func:`paper_scale` of ``classes``)."""

    def __init__(self, dim: int, classes: int, scale: Optional[float] = None):
        super().__init__()
        v = nn.Linear(dim, classes, bias=False).weight.detach()
        self.weight_v = nn.Parameter(v.clone())
        self.weight_g = nn.Parameter(v.norm(dim=1, keepdim=True))
        self.scale = paper_scale(classes) if scale is None else scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return head_logits(z, upcast(self.weight_v), None, "cosine", self.scale,
                           upcast(self.weight_g).squeeze(-1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight" in state_dict and prefix + "weight_v" not in state_dict:
            # a checkpoint from before the learned norm: a plain cosine head, i.e. g = 1
            w = state_dict.pop(prefix + "weight")
            state_dict[prefix + "weight_v"], state_dict[prefix + "weight_g"] = w, w.new_ones(w.shape[0], 1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def init_head(tasks: int, way: int, dim: int, head: str, generator: torch.Generator,
              dtype: torch.dtype, device) -> Head:
    """A fresh test head per task, as a default-initialised ``nn.Linear(dim, way)``: weight and
    bias uniform in ``±1/sqrt(dim)``; ``head=cosine``: distLinear, ``v`` that weight and
    ``g = ||v_c||``, no bias. ``{name: [tasks, ...]}``."""
    bound = dim ** -0.5

    def uniform(*shape):
        return (torch.rand(tasks, *shape, generator=generator, device=device, dtype=dtype) * 2 - 1) * bound
    weight = uniform(way, dim)
    if head == "cosine":
        return {"weight_v": weight, "weight_g": weight.norm(dim=-1)}
    return {"weight": weight, "bias": uniform(way)}


def head_params_logits(params: Head, z: torch.Tensor, head: str, scale: float) -> torch.Tensor:
    """Logits of the per-task heads of :func:`init_head`: ``z [T, n, D]`` -> ``[T, n, C]``."""
    if head == "cosine":
        return head_logits(z, params["weight_v"], None, "cosine", scale, params["weight_g"])
    return head_logits(z, params["weight"], params["bias"], "linear", scale)


def epoch_permutations(epochs: int, tasks: int, size: int, generator: torch.Generator, device) -> torch.Tensor:
    """A new random order of each task's support set per epoch: ``[epochs, tasks, size]``."""
    return torch.rand(epochs, tasks, size, generator=generator, device=device).argsort(-1)


def fit_head(params: Head, zs: torch.Tensor, ys: torch.Tensor, perms: torch.Tensor, head: str,
             scale: float, batch_size: int = 4, lr: float = 0.01, momentum: float = 0.9,
             dampening: float = 0.9, weight_decay: float = 0.001) -> Head:
    """The paper's fit of a test head on a task's support set ``zs [S, D]``, ``ys [S]``, for all
    ``T`` tasks at once (``[T, ...]`` everywhere): for each epoch's order ``perms[e] [T, S]``,
    minibatches ``order[:, i:i+batch_size]``, each task's mean cross-entropy over its minibatch,
    one ``torch.optim.SGD(lr, momentum, dampening, weight_decay)`` step. SGD is elementwise, so
    one optimizer over the stacked heads of the summed per-task losses is each task's own SGD."""
    params = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    opt = torch.optim.SGD(params.values(), lr=lr, momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay)
    S, D = zs.shape[1], zs.shape[2]
    zs = zs.detach()
    with torch.enable_grad():
        for order in perms:
            for i in range(0, S, batch_size):
                idx = order[:, i:i + batch_size]  # [T, b]
                zb = torch.gather(zs, 1, idx[..., None].expand(-1, -1, D))
                logits = head_params_logits(params, zb, head, scale)
                # sum over tasks of each task's minibatch mean: every task gets its own gradient
                loss = F.cross_entropy(logits.flatten(0, 1), torch.gather(ys, 1, idx).flatten(),
                                       reduction="sum") / idx.shape[1]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return {k: p.detach() for k, p in params.items()}


def classify_all(algo: MetaAlgorithm, episode):
    """Training by classification over every class of the training split: each support and query
    sample of the batch, labelled with its split class id (``episode.classes``), through
    ``algo.classifier``; the loss over all classes, and the logits of the episode's classes for its
    query (a minibatch episode of :class:`metamm_cli.data.batches.BatchSampler`: every class)."""
    zs, zq = algo.embed_episode(episode)
    z = torch.cat([zs, zq], 1)
    labels = torch.cat([episode.support_labels, episode.query_labels], 1)
    glob = torch.gather(episode.classes, 1, labels)  # global class ids
    logits = upcast(algo.classifier(z))
    index = episode.classes[:, None].expand(-1, zq.shape[1], -1)
    return algo.loss(logits, glob), torch.gather(logits[:, zs.shape[1]:], 2, index)


def minibatches(cfg, dataset, device, batch: int, tasks: int, seed: int, key: str):
    """Plain minibatches of ``batch`` training samples (:class:`metamm_cli.data.batches.BatchSampler`)."""
    from omegaconf import OmegaConf

    from metamm_cli.data.batches import BatchSampler
    from metamm_cli.data.episodes import missing_rates

    return BatchSampler(dataset.split("train", device), batch, tasks, seed, missing=missing_rates(cfg, "train"),
                        key=key, warmup=OmegaConf.select(cfg, "missing.warmup", default=0))


class Finetune(MetaAlgorithm):
    """Training is ordinary classification over all ``num_classes`` classes of the training
    split (every support and query sample of the meta-batch, labelled with its global class id
    from ``episode.classes``), with the paper's heads: ``head=linear`` (Baseline) an
    ``nn.Linear`` with a zero-initialised bias, ``head=cosine`` (Baseline++) :class:`DistLinear`;
    the training logits reported are the base classifier's restricted to the episode's classes.

    At validation/test time the body is frozen and a fresh head per task (a default-initialised
    ``nn.Linear(D, way)`` or a ``DistLinear(D, way)`` with its own scale, 2 for <= 200 classes)
    is fitted on the task's support embeddings exactly as the paper's code does
    (:func:`fit_head`: ``finetune_epochs`` epochs of a new random order, minibatches of
    ``batch_size``, SGD with ``finetune_lr``, ``momentum``, ``dampening``, ``weight_decay``), all
    tasks of the meta-batch at once; the head's initialisation and the orders come from a
    generator seeded afresh on every call (reproducible evaluation). Any way at test time.

    ``train_batch``: the base classes are seen through plain minibatches of that many samples
    (the paper: 16, with the dataset's augmentation), drawn from the whole training split; null
    (default): through the meta-batch's episodes (class-balanced support and query sets).

    Departures from the paper: the features are the fused multimodal embedding of the whole
    network in eval mode (the paper: the backbone's pooled features, saved once in eval mode);
    episodes instead of minibatches unless ``train_batch`` is set; the trainer's
    optimizer (Adam) trains the body and the base head; BatchNorm normalises each task's samples
    while training (a batch of N*(K+Q) images: nearer the paper's minibatches of 16 than the
    pooled meta-batch), and on the CPU the tasks are embedded one at a time (``execution``)."""

    family = "transfer"
    task_batchnorm = False  # normalises each task on its own, always (no bn_stats setting)

    def __init__(self, model, way, num_classes: Optional[int] = None, head: Literal[HEADS] = "linear",
                 scale: Annotated[Optional[float], Range("null or > 0")] = None,
                 finetune_epochs: Annotated[int, Range(">= 1")] = 100, batch_size: Annotated[int, Range(">= 1")] = 4,
                 finetune_lr: Annotated[float, Range("> 0")] = 0.01, momentum: Annotated[float, Range("in [0, 1)")] = 0.9,
                 dampening: Annotated[float, Range("in [0, 1]")] = 0.9,
                 weight_decay: Annotated[float, Range(">= 0")] = 0.001, execution: str = "auto",
                 train_batch: Annotated[Optional[int], Range("null or >= 1")] = None):
        super().__init__(model, way, num_classes, bn_stats="task", execution=execution)
        self.train_batch = train_batch
        if not num_classes:
            raise ConfigError("algorithm=finetune needs the number of training classes "
                              "(build it with metamm_cli.algorithms.build_algorithm)")
        self.head, self.scale, self.epochs, self.batch_size = head, scale, finetune_epochs, batch_size
        self.sgd = dict(lr=finetune_lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
        if head == "cosine":
            self.classifier = DistLinear(model.out_dim, num_classes, scale)
        else:
            self.classifier = nn.Linear(model.out_dim, num_classes)
            nn.init.zeros_(self.classifier.bias)  # baselinetrain.py: bias.data.fill_(0)

    def test_scale(self, way: int) -> float:
        return paper_scale(way) if self.scale is None else self.scale

    def embed_batch(self, cfg, device):
        return super().embed_batch(cfg, device) if self.train_batch is None else self.train_batch

    def train_sampler(self, cfg, dataset, device, tasks: int, seed: int):
        if self.train_batch is None:
            return super().train_sampler(cfg, dataset, device, tasks, seed)
        return minibatches(cfg, dataset, device, self.train_batch, tasks, seed, "algorithm.train_batch")

    def forward(self, episode):
        if self.training:
            return classify_all(self, episode)
        zs, zq = self.embed_episode(episode)
        params = self.finetune(zs, episode.support_labels, episode.way)
        with torch.autocast(zq.device.type, enabled=False):
            logits = head_params_logits(params, upcast(zq), self.head, self.test_scale(episode.way))
        return self.loss(logits, episode.query_labels), logits

    def finetune(self, zs: torch.Tensor, ys: torch.Tensor, way: int) -> Head:
        """A fresh head per task fitted on the support embeddings ``[T, S, D]``, all tasks at once."""
        T, S, D = zs.shape
        zs = upcast(zs.detach())
        g = torch.Generator(device=zs.device).manual_seed(0)
        params = init_head(T, way, D, self.head, g, zs.dtype, zs.device)
        perms = epoch_permutations(self.epochs, T, S, g, zs.device)
        with torch.autocast(zs.device.type, enabled=False):
            return fit_head(params, zs, ys, perms, self.head, self.test_scale(way), self.batch_size, **self.sgd)
