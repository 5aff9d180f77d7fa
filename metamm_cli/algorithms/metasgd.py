"""Meta-SGD (Li, Zhou, Chen & Li, 2017): MAML with a learned per-parameter inner learning rate."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.algorithms.maml import MAML


class MetaSGD(MAML):
    """The inner step is ``theta - alpha * grad`` with ``alpha`` a tensor of the shape of each
    parameter (a learning rate and direction per coordinate), meta-learned together with the
    initialisation ``theta``. ``alpha`` starts uniform in ``inner_lr_range`` (the paper's
    [0.005, 0.1]). One inner step as in the paper; the head is learned (fixed way)."""

    population = False  # not tested under the population vmap (hydra/launcher=population)

    def __init__(self, model, way, num_classes: Optional[int] = None,
                 inner_lr_range: Sequence[float] = (0.005, 0.1), inner_steps: int = 1,
                 inner_steps_eval: int = 1, first_order: bool = False, execution: str = "auto"):
        low, high = (float(v) for v in inner_lr_range)
        if not 0 < low <= high:
            raise ConfigError(f"algorithm.inner_lr_range={[low, high]}: needs 0 < low <= high")
        super().__init__(model, way, num_classes, inner_lr=high, inner_steps=inner_steps,
                         inner_steps_eval=inner_steps_eval, first_order=first_order,
                         head="learned", execution=execution)
        self.alpha = nn.ParameterDict({
            k.replace(".", "__"): nn.Parameter(torch.empty_like(p).uniform_(low, high))
            for k, p in self.net.named_parameters()})

    def fixed_way(self):
        return f"MetaSGD learns a {self.way}-way head"

    def learned_lrs(self):
        return {k: self.alpha[k.replace(".", "__")] for k in self.fast_names()}
