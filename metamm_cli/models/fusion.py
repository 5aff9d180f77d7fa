"""Modality fusions ``(features: {m: [B, dim]}, present: [B, M] bool) -> [B, out_dim]``.

Every fusion honours the presence mask: a missing modality's features (computed from a
zero placeholder) never enter the result, so a sample with any subset of modalities gets a
valid embedding. A new fusion is a subclass here (or in any importable module) plus a YAML
file in ``configs/fusion/`` naming it in ``_target_``.
"""
from __future__ import annotations

from typing import Annotated, Dict, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.config import Range
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

    def __init__(self, modalities: Sequence[str], dim: int, rank: Annotated[int, Range(">= 1")] = 4):
        super().__init__(modalities, dim)
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

    def __init__(self, modalities: Sequence[str], dim: int, rounds: Annotated[int, Range(">= 1")] = 2):
        super().__init__(modalities, dim)
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


class Impute(Fusion):
    r"""Imputation (``fusion=impute``): a missing modality's embedding is predicted from the
    present ones through the shared space, then every modality slot is filled and combined.
    A learned cross-modal predictor per ordered pair of modalities, ``P_{n->m}`` (linear, or
    ``predictor=mlp``), reconstructs modality ``m``'s embedding from ``n``'s, as SMIL (Ma et
    al., AAAI 2021) reconstructs missing features and ShaSpec (Wang et al., CVPR 2023) fills a
    missing slot from shared features:

        hat h^m = (1 / |N|) sum_{n in N} P_{n->m}(h^n),   N = the modalities the sample has
        c^m     = h^m if the sample has m, else hat h^m
        output  = [c^1, ..., c^M] (``combine=concat``, M * dim wide) or (1/M) sum_m c^m (``mean``)

    The predictors learn from the samples that have both modalities of a pair, with the
    auxiliary loss (:meth:`aux_loss`, added to the algorithm's loss while training, times
    ``weight``) ``mean ||P_{n->m}(h^n) - sg(h^m)||^2 / dim`` over those (sample, pair) terms
    (``sg``: the target is not moved towards the prediction). A sample-level fusion: every
    algorithm can use it, the MAML family included."""

    def __init__(self, modalities: Sequence[str], dim: int, predictor: Literal["linear", "mlp"] = "linear",
                 combine: Literal["concat", "mean"] = "concat", weight: Annotated[float, Range(">= 0")] = 1.0,
                 hidden: Annotated[int, Range(">= 1")] = 128):
        super().__init__(modalities, dim)
        if len(self.modalities) < 2:
            raise ConfigError(f"fusion=impute predicts one modality from another and needs at least two; "
                              f"dataset.modalities={self.modalities} has one")

        def make() -> nn.Module:
            if predictor == "linear":
                return nn.Linear(dim, dim)
            return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

        self.pairs = [(i, j) for i in range(len(self.modalities)) for j in range(len(self.modalities)) if i != j]
        self.predict = nn.ModuleList(make() for _ in self.pairs)  # P_{n -> m} for (n, m) in pairs
        self.combine, self.weight = combine, float(weight)
        self.out_dim = dim * len(self.modalities) if combine == "concat" else dim

    def predictions(self, x: torch.Tensor) -> torch.Tensor:
        """``P_{n->m}(x^n)`` for every pair ``(n, m)``: ``x [..., M, D]`` -> ``[..., P, D]``."""
        return torch.stack([p(x[..., n, :]) for p, (n, _) in zip(self.predict, self.pairs)], -2)

    def forward(self, features, present):
        x = zero_absent(self.stack(features), present)  # [B, M, D]
        pred = self.predictions(x)  # [B, P, D]
        M = len(self.modalities)
        target = torch.tensor([m for _, m in self.pairs], device=x.device)
        source = torch.tensor([n for n, _ in self.pairs], device=x.device)
        into = F.one_hot(target, M).to(x.dtype).T  # [M, P]: pair k predicts modality target[k]
        w = present[..., source].to(x.dtype)  # [B, P]: its source is present
        total = w @ into.T  # [B, M]
        imputed = torch.einsum("mp,bp,bpd->bmd", into, w, pred) / total.clamp_min(1)[..., None]
        filled = torch.where(present[..., None], x, imputed)
        return filled.flatten(-2) if self.combine == "concat" else filled.mean(-2)

    def aux_loss(self, features: Dict[str, torch.Tensor], present: torch.Tensor) -> Optional[torch.Tensor]:
        """The predictors' reconstruction loss on ``features {m: [..., D]}`` with ``present [..., M]``
        (the samples of an episode), over the pairs both of whose modalities a sample has."""
        if self.weight == 0:
            return None
        x = zero_absent(self.stack(features), present)
        pred = self.predictions(x)  # [..., P, D]
        target = torch.stack([x[..., m, :] for _, m in self.pairs], -2).detach()
        valid = torch.stack([present[..., n] & present[..., m] for n, m in self.pairs], -1)  # [..., P]
        err = (upcast(pred) - upcast(target)).pow(2).mean(-1)
        return self.weight * (err * valid).sum() / valid.sum().clamp_min(1)


class PrototypeFusion(Fusion):
    """A fusion that works at the prototype or score level instead of per sample: a metric
    algorithm hands it what it ``needs`` through :meth:`episode_logits` (``scores(zq, protos)``
    for :class:`AM3`, ``class_scores(zq, zs, mask, labels, way)`` for :class:`Presence` and
    :class:`Late`); it has no sample embedding, so algorithms that need one refuse it at
    construction."""

    level = "prototype"
    needs = "class_scores"  # the algorithm's method this fusion scores with

    def forward(self, features, present):
        raise ConfigError(f"fusion {type(self).__name__} works at the prototype level and gives "
                          f"no per-sample embedding")

    def logits(self, support: Dict[str, torch.Tensor], support_present: torch.Tensor,
               support_labels: torch.Tensor, query: Dict[str, torch.Tensor],
               query_present: torch.Tensor, way: int, score, shared=None) -> torch.Tensor:  # pragma: no cover
        """``support[m] [T, S, D]``, ``query[m] [T, Q, D]`` (each encoder's own embeddings) ->
        logits ``[T, Q, way]``; ``shared``: (support, query) mapped into the shared space (None:
        the same); ``score`` is the algorithm's method named by ``needs`` (higher = closer)."""
        raise NotImplementedError

    def episode_logits(self, algo, episode) -> torch.Tensor:
        """The logits of ``algo``'s episode: every modality embedded (the algorithm's
        ``episode_features``: per task, or in one call), then :meth:`logits`."""
        nk = episode.support_labels.shape[1]
        present = episode.present
        own = {m: upcast(f) for m, f in algo.episode_features(episode).items()}
        shared = {m: upcast(f) for m, f in algo.model.to_shared(own).items()}

        def halves(feats):
            return {m: f[:, :nk] for m, f in feats.items()}, {m: f[:, nk:] for m, f in feats.items()}

        (s, q), mapped = halves(own), halves(shared)
        return self.logits(s, present[:, :nk], episode.support_labels, q, present[:, nk:], episode.way,
                           getattr(algo, self.needs), shared=mapped)

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

    needs = "scores"  # mixes prototypes: a prototype scorer (ProtoNet's)

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

    def logits(self, support, support_present, support_labels, query, query_present, way, score, shared=None):
        support, query = shared or (support, query)  # mixes modalities: in the shared space
        protos, has = self.modality_prototypes(support, support_present, support_labels, way)
        return score(self.mix(self.stack(query), query_present), self.mix(protos, has))


def class_presence(support_present: torch.Tensor, labels: torch.Tensor, way: int) -> torch.Tensor:
    """Whether class ``c`` has a support sample with modality ``m``: ``[T, S, M]`` -> ``[T, N, M]``."""
    onehot = F.one_hot(labels, way).to(torch.float32)  # [T, S, N]
    return torch.einsum("tsn,tsm->tnm", onehot, support_present.to(torch.float32)) > 0


def weighted_over(scores: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor):
    """``sum_k w_k s_k / sum_k w_k`` over the entries ``k`` (last dim) that are ``valid``: the
    weights renormalised over what is there. ``scores, valid [..., K]``, ``weights [K]`` (> 0)
    -> (combined ``[...]``, whether any entry was valid ``[...]``); where none is, 0."""
    w = weights.to(scores.dtype) * valid
    total = w.sum(-1)
    out = (w * torch.where(valid, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))).sum(-1)
    return out / total.clamp_min(1e-12), total > 0


def row_floor(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``scores [T, Q, N]`` where ``valid``, elsewhere the lowest valid score of the query's row
    (detached; 0 for a row with none): a pair that cannot be compared ranks last, at chance."""
    floor = scores.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor)).detach()
    return torch.where(valid, scores, floor)


class Presence(PrototypeFusion):
    r"""Presence-aware comparison (``fusion=presence``): a query is compared with a class on
    the modalities both have, and across modalities, through the shared space, only where
    they have none in common. Decoupled per-modality prototypes scored on the modalities
    present (Lu et al. 2025), with ModDrop-style training (``+recipe=robust``).

    The algorithm's class scorer ``s(z_q, {z_i : i in I}, c)`` (``class_scores``: ProtoNet's
    negative distance to the mean of the class's support samples in ``I``, Matching Nets' log
    attention, Relation Nets' relation score) is applied per pair of modalities: with
    ``E^m_q`` the query's embedding of modality ``m`` (its encoder's own for ``m = n``, mapped
    into the shared space for ``m != n``) and ``I^n`` the support samples that have ``n``,

        s^{mn}_{qc} = s(E^m_q, {E^n_i : i in I^n}, c),   h^n_c = [class c has a sample in I^n].

    With ``A_{qc} = {m : q has m and h^m_c}`` (the modalities both have), ``w = softmax(a)``
    (learned logits ``a``, one per modality) and, over the pairs that share nothing,
    ``B_{qc} = {(m, n) : m != n, q has m, h^n_c}`` with ``v = softmax(b)`` (learned logits, one
    per ordered pair; with two modalities ``B`` holds one pair and ``v = 1``), a scale ``alpha = exp(log_alpha)`` and an offset ``beta``:

        same_{qc}  = sum_{m in A} w_m s^{mm}_{qc} / sum_{m in A} w_m
        cross_{qc} = alpha * sum_{(m,n) in B} v_{mn} s^{mn}_{qc} / sum_{(m,n) in B} v_{mn} + beta
        logit_{qc} = same_{qc}      if A_{qc} is not empty
                     cross_{qc}     else, if B_{qc} is not empty and the model has a ``mapping``
                     the lowest logit of the row q (detached) otherwise.

    ``alpha`` and ``beta`` calibrate cross-modal scores against same-modality ones in the
    same row (their distances differ by the modality gap); they learn from training episodes
    whose pairs share nothing (modality dropout, cross-modal episodes). ``cross=false`` is
    :class:`Late`. Without a shared space (``mapping=none``) a pair that shares nothing cannot
    be compared: a setting that can produce one is refused at start-up (:meth:`check`)."""

    def __init__(self, modalities: Sequence[str], dim: int, cross: bool = True):
        super().__init__(modalities, dim)
        M = len(self.modalities)
        self.weight_logits = nn.Parameter(torch.zeros(M))
        self.cross = bool(cross) and M > 1
        if self.cross:
            if M > 2:  # with two modalities a disjoint pair has exactly one cross pair: v = 1
                self.cross_logits = nn.Parameter(torch.zeros(M, M))
            self.cross_log_scale = nn.Parameter(torch.zeros(()))
            self.cross_bias = nn.Parameter(torch.zeros(()))
        self.shared = False  # set by check(): whether the model maps modalities into one space

    def check(self, cfg, modalities: Sequence[str], shared: bool) -> None:
        """At start-up: refuse a single-modality dataset (nothing to fuse), and, without a shared
        space, a setting whose query and class can share no modality (two or more modalities
        that can be missing, or disjoint cross-modal episodes)."""
        from omegaconf import OmegaConf

        name = type(self).__name__.lower()
        if len(modalities) < 2:
            raise ConfigError(f"fusion={name} compares modalities and needs at least two; "
                              f"dataset.modalities={list(modalities)} has one (use any fusion, or none of this)")
        self.shared = shared
        if not self.cross or shared:
            return
        E = cfg.episode
        support, query = E.get("support_modalities"), E.get("query_modalities")
        if support and query and not set(support) & set(query):
            raise ConfigError(f"fusion={name}: episode.support_modalities={list(support)} and "
                              f"episode.query_modalities={list(query)} share no modality, and without a "
                              f"shared space they cannot be compared; set mapping=linear (or mlp)")
        for phase in ("train", "test"):
            rates = OmegaConf.select(cfg, f"missing.{phase}") or {}
            every = float(rates.get("all", 0) or 0)
            droppable = [m for m in modalities if float(rates.get(m, every) or 0) > 0]
            if len(droppable) >= 2:
                raise ConfigError(
                    f"fusion={name}: missing.{phase} can leave a query and a class with no modality in "
                    f"common ({', '.join(droppable)} can each be missing), and without a shared space they "
                    f"cannot be compared; set mapping=linear (or mlp), or fusion=late to score such pairs "
                    f"at chance")

    def logits(self, support, support_present, support_labels, query, query_present, way, compare, shared=None):
        M = len(self.modalities)
        has = class_presence(support_present, support_labels, way)  # [T, N, M]
        pair = query_present[:, :, None, :, None] & has[:, None, :, None, :]  # [T, Q, N, M(q), M(c)]
        use_cross = self.cross and self.shared
        def present_only(feats, present):  # absent entries exactly zero (no garbage reaches a score)
            return {m: torch.where(present[..., i, None], feats[m], 0.0) for i, m in enumerate(self.modalities)}

        query, support = present_only(query, query_present), present_only(support, support_present)
        xq, xs = (present_only(shared[1], query_present), present_only(shared[0], support_present)) if shared \
            else (query, support)
        scores = {}
        for i, m in enumerate(self.modalities):
            for j, n in enumerate(self.modalities):
                if i == j:  # the same modality: in its encoder's own space
                    scores[i, j] = compare(query[m], support[n], support_present[..., j], support_labels, way)
                elif use_cross:  # across modalities: in the shared space
                    scores[i, j] = compare(xq[m], xs[n], support_present[..., j], support_labels, way)
        diag = range(M)
        same = torch.stack([scores[i, i] for i in diag], -1)  # [T, Q, N, M]
        both = pair[..., diag, diag]
        out, valid = weighted_over(same, both, self.weight_logits.softmax(0))
        if use_cross:
            off = [(i, j) for i in range(M) for j in range(M) if i != j]
            cross = torch.stack([scores[k] for k in off], -1)  # [T, Q, N, P]
            ok = torch.stack([pair[..., i, j] for i, j in off], -1)
            v = (torch.stack([self.cross_logits[i, j] for i, j in off]).softmax(0) if M > 2
                 else torch.ones(len(off), dtype=cross.dtype, device=cross.device))
            x, xvalid = weighted_over(cross, ok, v)
            x = self.cross_log_scale.exp() * x + self.cross_bias
            out = torch.where(valid, out, x)
            valid = valid | xvalid
        return row_floor(out, valid)


class Late(Presence):
    """Decision-level (late) fusion: one classifier per modality, ``s^m_qc`` the algorithm's
    class score of query ``q``'s modality ``m`` against class ``c``'s support samples that have
    ``m``, combined as ``sum_m w_m s^m_qc / sum_m w_m`` over the modalities that both query
    ``q`` and class ``c`` have, with ``w = softmax`` of learned per-modality logits. A (query,
    class) pair sharing no modality gets the lowest score of the query's row (chance). This is
    :class:`Presence` without its cross-modal term."""

    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__(modalities, dim, cross=False)

    def check(self, cfg, modalities, shared) -> None:
        return None  # late scores pairs that share nothing at the row's floor, by definition
