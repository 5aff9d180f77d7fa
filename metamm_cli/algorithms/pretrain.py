"""Pre-training: ordinary minibatch classification over every class of the training split (the
first stage of most published ResNet-12 numbers: FEAT, Meta-Baseline, LibFewShot's "pretrain"),
validated by few-shot episodes; then ``encoder.init=RUN_OR_CKPT`` starts any algorithm from the
body (:mod:`metamm_cli.runs.pretrained`).

Training steps draw plain minibatches of ``batch_size`` samples from the whole split
(:class:`metamm_cli.data.batches.BatchSampler`, this algorithm's :meth:`train_sampler`), through the
dataset's image pipeline, and minimise the cross-entropy of a linear head (``head=linear``) or
Baseline++'s cosine head (``head=cosine``, :class:`DistLinear`) over all training classes;
BatchNorm uses the statistics of the whole minibatch. Validation and test episodes are classified
by the body alone, as ProtoNet does: class means of the support embeddings, queries scored by
``metric`` (``cosine``, Meta-Baseline's evaluation; ``sq_euclidean``, ProtoNet's); the head is
not used there, so any way works.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from torch import nn

from metamm_cli import ConfigError
from metamm_cli.config import Range
from metamm_cli.algorithms.base import MetaAlgorithm
from metamm_cli.algorithms.finetune import HEADS, DistLinear, classify_all, minibatches
from metamm_cli.algorithms.protonet import cosine_similarity, prototypes, squared_euclidean

METRICS = ("cosine", "sq_euclidean")


class Pretrain(MetaAlgorithm):
    """Minibatch classification over all training classes (see the module docstring)."""

    family = "transfer"
    task_batchnorm = False  # BatchNorm over the whole minibatch
    episodic = False  # trains on minibatches, not episodes (its own train_sampler)

    def __init__(self, model, way, num_classes: Optional[int] = None, head: Literal[HEADS] = "linear",
                 scale: Annotated[Optional[float], Range("null or > 0")] = None,
                 batch_size: Annotated[int, Range(">= 1")] = 128, metric: Literal[METRICS] = "cosine",
                 temperature: Annotated[float, Range("> 0")] = 10.0):
        super().__init__(model, way, num_classes, bn_stats="batch", execution="batch")
        if not num_classes:
            raise ConfigError("algorithm=pretrain needs the number of training classes "
                              "(build it with metamm_cli.algorithms.build_algorithm)")
        self.head, self.batch_size, self.metric, self.temperature = head, batch_size, metric, temperature
        self.classifier = DistLinear(model.out_dim, num_classes, scale) if head == "cosine" \
            else nn.Linear(model.out_dim, num_classes)

    def embed_batch(self, cfg, device):
        return self.batch_size * cfg.trainer.meta_batch  # the minibatches of a step, in one call

    def train_sampler(self, cfg, dataset, device, tasks: int, seed: int):
        return minibatches(cfg, dataset, device, self.batch_size, tasks, seed, "algorithm.batch_size")

    def forward(self, episode):
        if self.training:  # minibatches (or episodes): classification over all training classes
            return classify_all(self, episode)
        zs, zq = self.embed_episode(episode)
        protos = prototypes(zs, episode.support_labels, episode.way)
        logits = (self.temperature * cosine_similarity(zq, protos) if self.metric == "cosine"
                  else -squared_euclidean(zq, protos))
        return self.loss(logits, episode.query_labels), logits
