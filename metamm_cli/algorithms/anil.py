"""Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020): MAML where only the head adapts."""
from __future__ import annotations

import torch.nn.functional as F
from torch.func import functional_call

from metamm_cli.algorithms.functional import sgd_adapt, upcast
from metamm_cli.algorithms.maml import MAML


class ANIL(MAML):
    """The body (encoders + fusion) is shared by all tasks and meta-learned; the inner loop adapts
    only the linear head, on features computed once per task (the same meta-gradient as MAML
    restricted to the head, at a fraction of the cost). Everything else as :class:`MAML`."""

    population = False  # not tested under the population vmap (hydra/launcher=population)

    def fast_names(self):
        return ["head.weight", "head.bias"]

    def task_fn(self, steps: int, functional: bool = True):
        def task(fast, shared, lrs, sx, sp, sy, qx, qp, qy):
            body = {k[len("model."):]: v for k, v in shared.items() if k.startswith("model.")}
            if functional:  # per-task copies of the shared body, as MAML's adapted weights are: on
                # CUDA, vmap + autocast left a conv with unbatched weights with a float32 bias
                zero = sy.sum() * 0
                body = {k: v + zero.to(v.dtype) for k, v in body.items()}
            zs = functional_call(self.net.model, body, (sx, sp))
            zq = functional_call(self.net.model, body, (qx, qp))

            def support_loss(p):
                return F.cross_entropy(upcast(F.linear(zs, p["head.weight"], p["head.bias"])), sy)
            fast = sgd_adapt(support_loss, fast, lrs or self.inner_lr, steps, self.first_order, functional)
            logits = upcast(F.linear(zq, fast["head.weight"], fast["head.bias"]))
            return F.cross_entropy(logits, qy), logits
        return task
