"""The data contract: a split of per-modality tensors, and batched episodes sampled on its device."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from metamm_cli import ConfigError

log = logging.getLogger("metamm")
_WARNED: set = set()

@dataclass(frozen=True)
class ModalitySpec:
    """What one modality looks like per sample: ``kind`` picks a sensible encoder."""

    shape: Tuple[int, ...]
    dtype: torch.dtype = torch.float32
    kind: str = "vector"  # image | audio | tokens | strokes | vector
    vocab: Optional[int] = None  # tokens only
    level: str = "sample"  # sample | class: side information equal for every sample of a class,
    # shown with the support set only (never in a query: it would give the label away)


@dataclass
class SplitData:
    """One split of a dataset, held on the training device.

    ``data[m]``: ``[S, *shape_m]``; ``present``: ``[S, M]`` bool, modalities in ``order``;
    ``labels``: ``[S]`` class ids ``0..num_classes-1`` within the split.

    ``groups`` (optional, ``[num_classes]``): the group of each class. Classes of one group are
    never drawn into the same task: the sampler draws N distinct groups, then one member class of
    each, uniformly among the group's members (e.g. the four rotations of an Omniglot character:
    each class of a task gets a random rotation, as augmentation rather than as new classes).
    ``same_member``: one draw per task picks the same member (by rank in its group, classes in
    id order) for every class of the task (one rotation for the whole task); the groups must then
    have equally many members.

    ``transform`` (optional): what turns gathered inputs into what the encoders see,
    ``transform(inputs {m: [*lead, ...]}, lead, generator, full)`` (the dataset's, e.g. the image
    pipeline of :mod:`metamm_cli.data.augment`: random augmentation from the sampler's generator
    on the train split, a fixed resize and crop elsewhere, normalisation); :meth:`prepare`
    applies it. ``data`` may stay on another device than ``labels`` (a memory-mapped split too
    large for the GPU): the gather then reads it there and moves the rows.
    """

    data: Dict[str, torch.Tensor]
    present: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    groups: Optional[torch.Tensor] = None
    same_member: bool = False
    transform: Optional[Callable] = None

    def to(self, device) -> "SplitData":
        return replace(self, data={m: x.to(device) for m, x in self.data.items()},
                       present=self.present.to(device), labels=self.labels.to(device),
                       groups=None if self.groups is None else self.groups.to(device))

    def prepare(self, inputs: Dict[str, torch.Tensor], lead: int, generator: Optional[torch.Generator] = None,
                full: Optional[Tuple[int, int]] = None) -> Dict[str, torch.Tensor]:
        """Gathered inputs ``{m: [*lead, ...]}`` through :attr:`transform` (unchanged without one)."""
        return inputs if self.transform is None else self.transform(inputs, lead, generator, full)

    def prepare_episode(self, support: Dict[str, torch.Tensor], query: Dict[str, torch.Tensor],
                        generator: Optional[torch.Generator], full: Tuple[int, int]):
        """An episode's support and query ``[T, n, ...]`` through :meth:`prepare` in one call."""
        if self.transform is None:
            return support, query
        n = next(iter(support.values())).shape[1]
        both = self.prepare({m: torch.cat([support[m], query[m]], 1) for m in support}, 2, generator, full)
        return {m: x[:, :n] for m, x in both.items()}, {m: x[:, n:] for m, x in both.items()}

    @property
    def num_groups(self) -> int:
        """Distinct groups of classes (each class its own group when ``groups`` is None)."""
        return self.num_classes if self.groups is None else int(torch.unique(self.groups).numel())

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)


@dataclass
class Episode:
    """A whole meta-batch of N-way K-shot tasks; tasks are the leading dimension ``T``.

    support[m]: ``[T, N*K, *shape_m]``, support_present: ``[T, N*K, M]``, support_labels:
    ``[T, N*K]`` in ``0..N-1``; the same for query with ``N*Q`` samples; classes: ``[T, N]``
    split class ids; index: ``[T, N*K + N*Q]`` the split rows of the support then the query
    samples (None where the episode was not drawn from a split).
    """

    support: Dict[str, torch.Tensor]
    support_present: torch.Tensor
    support_labels: torch.Tensor
    query: Dict[str, torch.Tensor]
    query_present: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor
    index: Optional[torch.Tensor] = None

    @property
    def num_tasks(self) -> int:
        return self.classes.shape[0]

    @property
    def way(self) -> int:
        return self.classes.shape[1]

    @property
    def present(self) -> torch.Tensor:
        """The presence of the support then the query samples, ``[T, N*K + N*Q, M]``."""
        return torch.cat([self.support_present, self.query_present], 1)

    def samples(self) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Support then query samples of every task: ``{m: [T, N*K + N*Q, ...]}`` and their
        presence ``[T, N*K + N*Q, M]``."""
        return {m: torch.cat([self.support[m], self.query[m]], 1) for m in self.support}, self.present

    def tasks(self, start: int, stop: int) -> "Episode":
        """The tasks ``start:stop`` of the meta-batch (for chunked forward/backward)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = ({m: x[start:stop] for m, x in value.items()} if isinstance(value, dict)
                           else None if value is None else value[start:stop])
        return replace(self, **out)


class Sampler:
    """What every sampler of the trainer shares: a generator on the split's device (its state
    goes into checkpoints), the missing-modality rates (``missing.train|test``, the key ``all``
    for every modality not named) and their warm-up ramp (:meth:`at_step`)."""

    def __init__(self, split: SplitData, seed: int, split_name: str,
                 missing: Optional[Mapping[str, float]] = None, warmup: int = 0):
        device = split.labels.device
        self.split, self.seed, self.split_name = split, seed, split_name
        self.generator = torch.Generator(device=device)
        names = list(split.data)
        phase = "train" if split_name == "train" else "test"
        missing = dict(missing or {})
        unknown = [m for m in missing if m not in names and m != "all"]
        if unknown:
            raise ConfigError(f"missing.{phase}.{unknown[0]}: not a modality of the dataset; choose among "
                              f"{names} (or all: every modality)")
        for m, p in missing.items():
            if not 0 <= float(p) <= 1:
                raise ConfigError(f"missing.{phase}.{m}={p}: a probability, must be in [0, 1]")
        every = float(missing.get("all", 0.0))
        self.missing = {m: float(missing.get(m, every)) for m in names}
        self.rates = torch.tensor([self.missing[m] for m in names], device=device)
        self.dropping = any(p > 0 for p in self.missing.values())
        self.warmup, self.scale = int(warmup), 1.0
        self.reset()

    def reset(self, seed: Optional[int] = None) -> None:
        self.generator.manual_seed(self.seed if seed is None else seed)

    def at_step(self, step: int) -> None:
        """Ramp the missing rates (and the cross-modal probability) from 0 at step 0 to theirs at
        ``warmup`` (the trainer calls it before each step's draw)."""
        self.scale = min(1.0, step / self.warmup) if self.warmup > 0 else 1.0


class EpisodeSampler(Sampler):
    """Draws ``tasks`` N-way K-shot episodes at once with index arithmetic on the split's device.

    Classes with fewer than ``shot + query`` samples are never drawn (one warning counts them);
    an impossible request fails at construction with the key to change (``keys`` names the
    config keys of way, shot and query in those messages: ``episode.*`` or ``eval.*``).

    With ``split.groups``, a task's N classes come from N distinct groups: N groups uniformly
    without replacement among those with a drawable member, then one drawable member of each
    uniformly (``split.same_member``: one member rank for the whole task).

    ``missing`` maps a modality to the probability that a sample of an episode lacks it (the
    key ``all``: every modality not named): a fresh presence mask is drawn per episode with
    the sampler's generator (modality dropout), never removing a sample's last present
    modality; a dropped modality's data is zeroed. ``schedule=uniform`` draws each task's rates
    uniformly in ``[0, rate]`` (clean and heavily masked tasks in one meta-batch, as Ma et al.,
    CVPR 2022, train on full and masked inputs together); :meth:`at_step` ramps the rates from 0
    over ``warmup`` steps. ``crossmodal`` is the probability that a task is cross-modal: its
    support keeps one modality ``a`` and its query another ``b``, drawn uniformly (a sample
    lacking that modality keeps what it has). uint8 modalities (images held as bytes) become
    float32 in [0, 1] here, so encoders see floats.
    """

    def __init__(self, split: SplitData, way: int, shot: int, query: int, tasks: int,
                 seed: int = 0, split_name: str = "train",
                 missing: Optional[Mapping[str, float]] = None,
                 keys: Optional[Mapping[str, str]] = None, schedule: str = "fixed",
                 crossmodal: float = 0.0, warmup: int = 0):
        K = {k: f"episode.{k}" for k in ("way", "shot", "query")}
        K.update(keys or {})
        counts = split.class_counts()
        need = shot + query
        self.eligible = torch.nonzero(counts >= need).flatten()
        short = split.num_classes - len(self.eligible)
        if short and len(self.eligible) >= way and (split_name, need, short) not in _WARNED:
            _WARNED.add((split_name, need, short))  # once per process, not per sampler
            log.warning(f"{short} of {split.num_classes} classes of the {split_name} split have "
                        f"fewer than {K['shot']}+{K['query']}={need} samples: skipped")
        if way > split.num_classes:
            raise ConfigError(f"{K['way']}={way} is impossible: the {split_name} split has "
                              f"{split.num_classes} classes")
        if len(self.eligible) < way:
            raise ConfigError(
                f"{K['shot']}+{K['query']}={need} is impossible: {len(self.eligible)} classes of "
                f"the {split_name} split have that many samples (largest: {int(counts.max())}), "
                f"{K['way']}={way} needs {way}")
        self.split, self.way, self.shot, self.query, self.tasks = split, way, shot, query, tasks
        self.split_name = split_name
        device = split.labels.device
        self.grouped = split.groups is not None
        if self.grouped:
            self._group_tables(split, counts >= need, way, K["way"])
        order = torch.argsort(split.labels, stable=True)
        max_n = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        col = torch.arange(max_n, device=device)
        # table[c, j] = index of the j-th sample of class c (padding repeats a valid index)
        self.table = order[(starts[:, None] + torch.minimum(col[None], counts[:, None] - 1))]
        self.pad = col[None] >= counts[:, None]  # [C, max_n]
        super().__init__(split, seed, split_name, missing, warmup)
        names = list(split.data)
        if schedule not in SCHEDULES:
            raise ConfigError(f"missing.schedule={schedule}: must be one of {', '.join(SCHEDULES)}")
        if crossmodal and len(names) < 2:
            raise ConfigError(f"missing.crossmodal={crossmodal}: cross-modal tasks need two or more "
                              f"modalities; the dataset has {names}")
        self.schedule, self.crossmodal = schedule, float(crossmodal)
        self.dropping = self.dropping or self.crossmodal > 0

    def _group_tables(self, split: SplitData, drawable: torch.Tensor, way: int, way_key: str) -> None:
        """``members[g, j]``: the j-th drawable class of group ``g`` (class id order; padding
        repeats a valid one), ``sizes[g]`` how many, ``eligible_groups`` those with at least one."""
        _, groups = torch.unique(split.groups, return_inverse=True)  # ids 0..G-1
        G = int(groups.max()) + 1
        classes = torch.nonzero(drawable).flatten()
        g = groups[classes]
        order = torch.argsort(g, stable=True)  # stable: members stay in class id order
        classes, g = classes[order], g[order]
        sizes = torch.bincount(g, minlength=G)
        starts = torch.cumsum(sizes, 0) - sizes
        width = max(int(sizes.max()), 1)
        col = torch.arange(width, device=sizes.device)
        self.members = classes[(starts[:, None] + torch.minimum(col[None], (sizes[:, None] - 1).clamp(min=0)))
                               .clamp(max=max(len(classes) - 1, 0))]
        self.sizes = sizes
        self.eligible_groups = torch.nonzero(sizes > 0).flatten()
        if len(self.eligible_groups) < way:
            raise ConfigError(f"{way_key}={way} is impossible: the {self.split_name} split has "
                              f"{len(self.eligible_groups)} groups of classes with enough samples "
                              f"(classes of one group, e.g. rotations of one character, never share a task)")
        if split.same_member:
            kept = sizes[self.eligible_groups]
            if bool((kept != kept[0]).any()):
                raise ConfigError(f"the {self.split_name} split's groups have {int(kept.min())} to "
                                  f"{int(kept.max())} drawable members: one member for the whole task "
                                  f"needs equally many in every group")

    def draw_classes(self, T: int) -> torch.Tensor:
        """``[T, N]`` distinct split classes per task (with groups: of distinct groups)."""
        g, N = self.generator, self.way
        device = self.table.device
        if not self.grouped:
            scores = torch.rand(T, len(self.eligible), generator=g, device=device)
            return self.eligible[scores.topk(N, dim=1).indices]
        scores = torch.rand(T, len(self.eligible_groups), generator=g, device=device)
        chosen = self.eligible_groups[scores.topk(N, dim=1).indices]  # [T, N] distinct groups
        u = torch.rand(T, 1 if self.split.same_member else N, generator=g, device=device)
        size = self.sizes[chosen]
        rank = torch.minimum((u * size).long(), size - 1)  # uniform over the group's members
        return self.members[chosen, rank]

    def sample(self, tasks: Optional[int] = None, part: Optional[Tuple[int, int]] = None) -> Episode:
        """``tasks`` episodes (default: the sampler's ``tasks``); ``part=(start, stop)``: draw all of
        them (the generator moves as for the whole meta-batch) but gather only tasks
        ``start:stop`` (a rank's share in distributed training)."""
        T, N, K, Q = tasks or self.tasks, self.way, self.shot, self.query
        g, device = self.generator, self.table.device
        full = (T, part[0] if part is not None else 0)  # the whole meta-batch's augmentation draws
        classes = self.draw_classes(T)  # [T, N] distinct classes
        keys = torch.rand(T, N, self.table.shape[1], generator=g, device=device)
        keys = keys.masked_fill(self.pad[classes], 2.0)  # padding sorts last
        pick = keys.argsort(dim=-1)[..., : K + Q]  # [T, N, K+Q]
        idx = torch.gather(self.table[classes], 2, pick)
        labels = torch.arange(N, device=device)
        d = self.split
        present = d.present[idx]  # [T, N, K+Q, M]
        # drawn even at rate 0, so the episodes, and the masks across rates (nested), do not
        # depend on the rates: runs at different rates compare on the same episodes
        noise = torch.rand(T, N, K + Q, 2 * len(self.rates), generator=g, device=device)
        if self.dropping:
            rates = self.rates * self.scale
            if self.schedule == "uniform":  # each task its own rates in [0, rate]
                rates = rates * torch.rand(T, 1, 1, 1, generator=g, device=device)
            dropped = drop_modalities(present, rates, noise)
            if self.crossmodal > 0:
                dropped = self.cross_modal_tasks(present, dropped, K)
            present = dropped
        if part is not None:
            idx, present, classes = idx[part[0]:part[1]], present[part[0]:part[1]], classes[part[0]:part[1]]
            T = idx.shape[0]
        s_idx, q_idx = idx[..., :K].reshape(T, N * K), idx[..., K:].reshape(T, N * Q)
        s_pre, q_pre = present[:, :, :K].reshape(T, N * K, -1), present[:, :, K:].reshape(T, N * Q, -1)
        support, query = d.prepare_episode(gather_modalities(d.data, s_idx, s_pre if self.dropping else None),
                                           gather_modalities(d.data, q_idx, q_pre if self.dropping else None), g, full)
        return Episode(
            support=support,
            support_present=s_pre,
            support_labels=labels.repeat_interleave(K).expand(T, -1),
            query=query,
            query_present=q_pre,
            query_labels=labels.repeat_interleave(Q).expand(T, -1),
            classes=classes,
            index=torch.cat([s_idx, q_idx], 1),
        )


    def cross_modal_tasks(self, present: torch.Tensor, dropped: torch.Tensor, K: int) -> torch.Tensor:
        """``dropped`` with each task made cross-modal with probability ``crossmodal`` (ramped):
        from the samples' own presence ``present [T, N, K+Q, M]``, the support keeps modality
        ``a`` and the query ``b != a`` (uniform), where a sample has it."""
        T, M = present.shape[0], present.shape[-1]
        u = torch.rand(T, 3, generator=self.generator, device=present.device)
        cross = u[:, 0] < self.crossmodal * self.scale
        a = (u[:, 1] * M).long().clamp(max=M - 1)
        b = (a + 1 + (u[:, 2] * (M - 1)).long().clamp(max=M - 2)) % M
        keep = torch.zeros(T, 1, K + (present.shape[2] - K), M, dtype=torch.bool, device=present.device)
        keep[:, :, :K] = F.one_hot(a, M).bool()[:, None, None, :]
        keep[:, :, K:] = F.one_hot(b, M).bool()[:, None, None, :]
        kept = present & keep
        kept = torch.where(kept.any(-1, keepdim=True), kept, present)  # lacking it: keeps what it has
        return torch.where(cross[:, None, None, None], kept, dropped)


SCHEDULES = ("fixed", "uniform")


def drop_modalities(present: torch.Tensor, rates: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``present`` [..., M] with modality ``m`` removed with probability ``rates[..., m]``, never a
    sample's last present one (a sample that would lose all keeps one of its own at random).
    ``noise`` [..., 2M] uniform: the first M decide the drops, the last M pick the survivor."""
    M = rates.shape[-1]
    kept = present & (noise[..., :M] >= rates)
    empty = present.any(-1) & ~kept.any(-1)
    survivor = noise[..., M:].masked_fill(~present, -1.0).argmax(-1, keepdim=True)
    rescue = torch.zeros_like(kept).scatter_(-1, survivor, True) & empty[..., None]
    return kept | rescue


def gather_modalities(data: Dict[str, torch.Tensor], idx: torch.Tensor,
                      present: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """``data[m][idx]`` per modality; uint8 becomes float32 / 255; absent entries are zeroed."""
    out = {}
    flat = idx.reshape(-1)
    for i, (m, x) in enumerate(data.items()):
        y = x.index_select(0, flat.to(x.device)).to(flat.device)  # faster than x[idx] on CPU
        y = y.view(idx.shape + x.shape[1:])
        if y.dtype == torch.uint8:
            y = y.float().div_(255)
        if present is not None:
            mask = present[..., i].reshape(present.shape[:-1] + (1,) * (y.dim() - present.dim() + 1))
            y = y * mask if y.is_floating_point() else y.masked_fill(~mask, 0)
        out[m] = y
    return out


def missing_rates(cfg, split: str) -> Dict[str, float]:
    """``missing.train`` for the train split, ``missing.test`` for validation and test."""
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, f"missing.{'train' if split == 'train' else 'test'}", default=None)
    return dict(OmegaConf.to_container(node)) if node is not None else {}


def episode_shape(cfg, split: str) -> Tuple[Dict[str, int], Dict[str, str]]:
    """The way, shot and query of ``split``'s episodes and the config key each comes from: the
    train split uses ``episode.*``; validation and test use ``eval.way``/``eval.shot``/
    ``eval.query`` where set (not null), else ``episode.*``."""
    from omegaconf import OmegaConf

    values, keys = {}, {}
    for k in ("way", "shot", "query"):
        v = None if split == "train" else OmegaConf.select(cfg, f"eval.{k}", default=None)
        values[k], keys[k] = (int(v), f"eval.{k}") if v is not None else (int(cfg.episode[k]), f"episode.{k}")
    return values, keys


def build_sampler(cfg, dataset, split: str, device, tasks: int, seed: int,
                  missing: Optional[Mapping[str, float]] = None) -> EpisodeSampler:
    """The sampler of ``split``: ``episode.*`` for the train split, ``eval.way``/``eval.shot``/
    ``eval.query`` (null: ``episode.*``) for validation and test (:func:`episode_shape`), with
    the missing-modality rates of the config (:func:`missing_rates`) unless ``missing`` is given;
    the train split also takes ``missing.schedule``, ``missing.warmup`` and ``missing.crossmodal``."""
    from omegaconf import OmegaConf

    shape, keys = episode_shape(cfg, split)
    training = {}
    if split == "train":
        training = {k: OmegaConf.select(cfg, f"missing.{k}", default=d)
                    for k, d in (("schedule", "fixed"), ("crossmodal", 0.0), ("warmup", 0))}
    data = dataset.split(split, device)
    check_classes_fit(dataset, data, split, shape["shot"] + shape["query"], keys)
    return EpisodeSampler(data, shape["way"], shape["shot"], shape["query"],
                          tasks, seed=seed, split_name=split,
                          missing=missing_rates(cfg, split) if missing is None else missing, keys=keys,
                          **training)


def check_classes_fit(dataset, data: SplitData, split: str, need: int, keys: Mapping[str, str]) -> None:
    """A dataset that names its classes (the benchmarks: every class belongs to the protocol)
    refuses a class with fewer samples than an episode needs, naming it, instead of the sampler's
    skipping it."""
    names = dataset.class_names(split)
    if names is None:
        return
    counts = data.class_counts().cpu()
    short = torch.nonzero(counts < need).flatten()
    if len(short):
        c = int(short[0])
        more = f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
        raise ConfigError(f"{keys['shot']}+{keys['query']}={need} is impossible: class {names[c]} of the "
                          f"{split} split has {int(counts[c])} images{more}; lower them or complete the files")
