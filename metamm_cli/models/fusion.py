"""Modality fusions ``(features: {m: [B, dim]}, present: [B, M] bool) -> [B, out_dim]``.

Every fusion honours the presence mask: a missing modality's features (computed from a
zero placeholder) never enter the result, so a sample with any subset of modalities gets a
valid embedding. A new fusion is a subclass here (or in any importable module) plus a YAML
file in ``configs/fusion/`` naming it in ``_target_``.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.device import upcast


class Fusion(nn.Module):
    """Sample-level fusion: ``forward(features, present) -> [B, out_dim]``. ``level`` says where a
    fusion works: ``"sample"`` (here) or ``"prototype"`` (:class:`PrototypeFusion`)."""

    level = "sample"

    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__()
        self.modalities, self.dim, self.out_dim = list(modalities), dim, dim

    def stack(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([features[m] for m in self.modalities], dim=-2)  # [B, M, dim]


def masked_softmax(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to present entries (absent ones get weight 0)."""
    logits = upcast(logits)
    logits = logits.masked_fill(~present, torch.finfo(logits.dtype).min)
    return logits.softmax(dim=-1) * present


class Concat(Fusion):
    """Concatenation (early/feature-level fusion). An absent modality is replaced by a learned
    per-modality 'missing' embedding rather than zeros, so the model can tell absent from small."""

    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__(modalities, dim)
        self.out_dim = dim * len(self.modalities)
        self.missing = nn.Parameter(torch.zeros(len(self.modalities), dim))

    def forward(self, features, present):
        x = self.stack(features)
        x = torch.where(present[..., None], x, self.missing.to(x.dtype))
        return x.flatten(-2)


class Weighted(Fusion):
    """Learned scalar weight per modality, softmax-renormalised over the modalities present."""

    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__(modalities, dim)
        self.logits = nn.Parameter(torch.zeros(len(self.modalities)))

    def forward(self, features, present):
        w = masked_softmax(self.logits.expand(present.shape), present)
        return (w[..., None].to(features[self.modalities[0]].dtype) * self.stack(features)).sum(-2)


class Gated(Fusion):
    """Sample-dependent gates (in the spirit of gated multimodal units, Arevalo et al. 2017): a
    linear score per modality feature, softmax over the modalities present."""

    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__(modalities, dim)
        self.score = nn.Linear(dim, 1)

    def forward(self, features, present):
        x = self.stack(features)
        w = masked_softmax(self.score(x).squeeze(-1), present)
        return (w[..., None].to(x.dtype) * x).sum(-2)


class Attention(Fusion):
    """Modality tokens (feature + learned modality embedding) attend to each other with absent
    tokens masked out as keys (Vaswani et al. 2017); a residual, layer norm, then the mean of
    the present tokens."""

    def __init__(self, modalities: Sequence[str], dim: int, heads: int = 4):
        super().__init__(modalities, dim)
        if dim % heads:
            raise ConfigError(f"fusion.heads={heads} must divide encoder.dim={dim}")
        self.heads = heads
        self.type_embed = nn.Parameter(torch.zeros(len(self.modalities), dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, features, present):
        x = self.stack(features) + self.type_embed.to(features[self.modalities[0]].dtype)
        *lead, M, D = x.shape
        q, k, v = self.qkv(x).view(*lead, M, 3, self.heads, D // self.heads).unbind(-3)
        scores = torch.einsum("...qhd,...khd->...hqk", q, k) / (D // self.heads) ** 0.5
        attn = masked_softmax(scores, present[..., None, None, :]).to(v.dtype)
        y = torch.einsum("...hqk,...khd->...qhd", attn, v).reshape(*lead, M, D)
        y = self.norm(x + self.proj(y))
        w = present[..., None].to(y.dtype)
        return (y * w).sum(-2) / w.sum(-2).clamp_min(1)


def masked_mean(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean over the modality axis of ``x [..., M, D]`` restricted to ``present [..., M]``."""
    w = present[..., None].to(x.dtype)
    return (x * w).sum(-2) / w.sum(-2).clamp_min(1)


def zero_absent(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``x [..., M, D]`` with absent modalities' rows set to exact zeros (``where``, so even
    non-finite garbage in an absent slot cannot leak through a product with 0)."""
    return torch.where(present[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


class Mean(Fusion):
    """The average of the present modalities' embeddings (no parameters). With a ``mapping``
    into a shared space, a sample with one modality lands where that modality's embedding is,
    which is what cross-modal episodes need."""

    def forward(self, features, present):
        return masked_mean(self.stack(features), present)


class DeepMLP(Fusion):
    """Deep fusion: the concatenation (a learned 'missing' embedding in place of an absent
    modality, as in :class:`Concat`) through a two-layer MLP back to ``dim``."""

    def __init__(self, modalities: Sequence[str], dim: int, hidden: int = 128):
        super().__init__(modalities, dim)
        M = len(self.modalities)
        self.missing = nn.Parameter(torch.zeros(M, dim))
        self.mlp = nn.Sequential(nn.Linear(M * dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, features, present):
        x = self.stack(features)
        x = torch.where(present[..., None], x, self.missing.to(x.dtype))
        return self.mlp(x.flatten(-2))


class FiLM(Fusion):
    """Feature-wise linear modulation (Perez et al., AAAI 2018): the conditioning modality
    ``condition`` predicts a scale and shift for every other modality,
    ``h_m <- (1 + gamma_m(h_c)) * h_m + beta_m(h_c)``; where the conditioner is absent the others
    pass unchanged (the identity). The output is the mean over the present modalities of the
    modulated embeddings and the conditioner's own. ``condition=null`` picks the dataset's first
    modality. The generator starts at zero, i.e. as :class:`Mean`."""

    def __init__(self, modalities: Sequence[str], dim: int, condition: str | None = None):
        super().__init__(modalities, dim)
        condition = condition or self.modalities[0]
        if condition not in self.modalities:
            raise ConfigError(f"fusion.condition={condition}: not a modality of this dataset; "
                              f"choose one of {self.modalities}")
        if len(self.modalities) < 2:
            raise ConfigError(f"fusion=film needs at least two modalities (dataset has {self.modalities})")
        self.condition, self.c = condition, self.modalities.index(condition)
        self.film = nn.Linear(dim, 2 * dim * len(self.modalities))
        nn.init.zeros_(self.film.weight), nn.init.zeros_(self.film.bias)

    def forward(self, features, present):
        x = self.stack(features)  # [B, M, D]
        cond = zero_absent(x, present)[..., self.c, :]
        gamma, beta = self.film(cond).view(*x.shape[:-2], len(self.modalities), 2, self.dim).unbind(-2)
        others = torch.arange(len(self.modalities), device=x.device) != self.c
        on = (present[..., self.c, None] & others)[..., None]  # [B, M, 1]: modulate these
        x = torch.where(on, (1 + gamma) * x + beta, x)
        return masked_mean(zero_absent(x, present), present)


class LowRank(Fusion):
    """Low-rank multimodal fusion (Liu et al., ACL 2018, LMF): each modality's embedding gets a
    1 appended, ``z_m = [h_m, 1]``; rank-``rank`` factors ``W_m [rank, dim+1, dim]`` give
    ``y = sum_r lambda_r prod_m (z_m W_m^r) + b``, the low-rank form of the tensor-product fusion
    of Zadeh et al. 2017. An absent modality enters as ``z_m = [0, ..., 0, 1]``, so its term is
    the learned last row of its factor (a learned missing embedding, the "1"-appended convention)."""

    def __init__(self, modalities: Sequence[str], dim: int, rank: int = 4):
        super().__init__(modalities, dim)
        if rank < 1:
            raise ConfigError(f"fusion.rank={rank} is out of range: must be >= 1")
        M = len(self.modalities)
        self.rank = rank
        self.factors = nn.Parameter(torch.empty(M, rank, dim + 1, dim))
        for m in range(M):
            for r in range(rank):
                nn.init.xavier_normal_(self.factors.data[m, r])
        self.rank_weights = nn.Parameter(torch.empty(rank))
        nn.init.normal_(self.rank_weights, std=rank ** -0.5)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, features, present):
        x = zero_absent(self.stack(features), present)  # [B, M, D]
        z = torch.cat([x, torch.ones_like(x[..., :1])], -1)  # [B, M, D+1]
        per = torch.einsum("bmi,mrio->bmro", z, self.factors.to(z.dtype))  # [B, M, R, D]
        fused = per.prod(dim=1)  # [B, R, D]
        return torch.einsum("r,bro->bo", self.rank_weights.to(z.dtype), fused) + self.bias.to(z.dtype)


class Graph(Fusion):
    """Modalities as the nodes of a fully connected graph with learned edge weights: node
    states start as embedding + learned node-type embedding; each of ``rounds`` rounds passes
    messages ``h_i <- h_i + relu(W_t sum_j a_ij h_j)`` with ``a_ij`` the softmax of the learned
    edge logits over the present nodes ``j``; the readout is the mean of the present nodes."""

    def __init__(self, modalities: Sequence[str], dim: int, rounds: int = 2):
        super().__init__(modalities, dim)
        if rounds < 1:
            raise ConfigError(f"fusion.rounds={rounds} is out of range: must be >= 1")
        M = len(self.modalities)
        self.edges = nn.Parameter(torch.zeros(M, M))
        self.node_type = nn.Parameter(torch.zeros(M, dim))
        self.message = nn.ModuleList(nn.Linear(dim, dim) for _ in range(rounds))

    def forward(self, features, present):
        x = self.stack(features)
        h = zero_absent(x + self.node_type.to(x.dtype), present)
        adj = masked_softmax(self.edges.expand(*present.shape[:-1], *self.edges.shape),
                             present[..., None, :]).to(h.dtype)  # [B, M(i), M(j)]
        for lin in self.message:
            h = zero_absent(h + torch.relu(lin(adj @ h)), present)
        return masked_mean(h, present)


class PrototypeFusion(Fusion):
    """A fusion that works at the prototype or score level instead of per sample: a metric
    algorithm (one with ``prototype_fusion = True``, e.g. ProtoNet) calls
    :meth:`episode_logits` with its scoring function; it has no sample embedding, so
    algorithms that need one refuse it at construction."""

    level = "prototype"

    def forward(self, features, present):
        raise ConfigError(f"fusion {type(self).__name__} works at the prototype level and gives "
                          f"no per-sample embedding")

    def logits(self, support: Dict[str, torch.Tensor], support_present: torch.Tensor,
               support_labels: torch.Tensor, query: Dict[str, torch.Tensor],
               query_present: torch.Tensor, way: int, score) -> torch.Tensor:  # pragma: no cover
        """``support[m] [T, S, D]``, ``query[m] [T, Q, D]`` -> logits ``[T, Q, way]``;
        ``score(zq [T, Q, D], protos [T, N, D]) -> [T, Q, N]`` (higher = closer)."""
        raise NotImplementedError

    def episode_logits(self, model, episode, score) -> torch.Tensor:
        nk = episode.support_labels.shape[1]
        inputs = {m: torch.cat([episode.support[m], episode.query[m]], 1) for m in episode.support}
        present = torch.cat([episode.support_present, episode.query_present], 1)
        feats = {m: upcast(f) for m, f in model.encode(inputs, present).items()}
        return self.logits({m: f[:, :nk] for m, f in feats.items()}, present[:, :nk],
                           episode.support_labels, {m: f[:, nk:] for m, f in feats.items()},
                           present[:, nk:], episode.way, score)

    def modality_prototypes(self, support, support_present, labels, way):
        """Per-modality class means over the support samples that have the modality:
        ``[T, N, M, D]`` and whether class ``c`` has any such sample, ``[T, N, M]``."""
        x = zero_absent(self.stack(support), support_present)  # [T, S, M, D]
        onehot = F.one_hot(labels, way).to(x.dtype)  # [T, S, N]
        w = onehot[..., None] * support_present[:, :, None, :].to(x.dtype)  # [T, S, N, M]
        counts = w.sum(1)  # [T, N, M]
        protos = torch.einsum("tsnm,tsmd->tnmd", w, x) / counts.clamp_min(1)[..., None]
        return protos, counts > 0


class AM3(PrototypeFusion):
    """Adaptive modality mixing (Xing et al., NeurIPS 2019, AM3), generalised to any set of
    modalities: per-modality prototypes ``p_c^m`` (means over the class's support samples that
    have ``m``) are mixed as ``p_c = sum_m a_c^m p_c^m`` with ``a_c = softmax_m(h_m(p_c^m))``
    over the modalities class ``c`` has (for two modalities, the paper's
    ``lambda = sigmoid(.)``); ``h_m`` is a small MLP. A query is mixed the same way from its
    own present modalities. Logits are the algorithm's score between query and prototype."""

    def __init__(self, modalities: Sequence[str], dim: int, hidden: int = 64):
        super().__init__(modalities, dim)
        self.mixer = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
                                   for _ in self.modalities)

    def mix(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``x [..., M, D]`` mixed over the present modalities -> ``[..., D]``."""
        x = zero_absent(x, present)
        s = torch.cat([h(x[..., i, :]) for i, h in enumerate(self.mixer)], -1)  # [..., M]
        a = masked_softmax(s, present).to(x.dtype)
        return (a[..., None] * x).sum(-2)

    def logits(self, support, support_present, support_labels, query, query_present, way, score):
        protos, has = self.modality_prototypes(support, support_present, support_labels, way)
        return score(self.mix(self.stack(query), query_present), self.mix(protos, has))


class Late(PrototypeFusion):
    """Decision-level (late) fusion: one prototypical classifier per modality, ``s^m_qc =
    score(q^m, p_c^m)``, combined as ``sum_m w_m s^m_qc / sum_m w_m`` over the modalities that
    both query ``q`` and class ``c`` have, with ``w = softmax`` of learned per-modality logits.
    A (query, class) pair sharing no modality gets the lowest score of the query's row."""

    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__(modalities, dim)
        self.weight_logits = nn.Parameter(torch.zeros(len(self.modalities)))

    def logits(self, support, support_present, support_labels, query, query_present, way, score):
        protos, has = self.modality_prototypes(support, support_present, support_labels, way)
        q = zero_absent(self.stack(query), query_present)  # [T, Q, M, D]
        per = torch.stack([score(q[..., i, :], protos[..., i, :]) for i in range(len(self.modalities))], -1)
        both = query_present[:, :, None, :] & has[:, None, :, :]  # [T, Q, N, M]
        w = self.weight_logits.softmax(0) * both  # [T, Q, N, M]
        total = w.sum(-1)
        out = (w * torch.where(both, per, torch.zeros((), dtype=per.dtype, device=per.device))).sum(-1)
        valid = total > 0
        out = out / total.clamp_min(1e-12)
        floor = out.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
        floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))
        return torch.where(valid, out, floor.detach())
