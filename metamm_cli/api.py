"""metamm as a Python library, beside the CLI (docs/api.md): compose a config, train and evaluate
in-process, load a checkpoint, sample episodes, and use any algorithm on plain tensors with your
own backbone. Each function calls what the CLI calls; Hydra's global state is saved and restored
around each call (:func:`metamm_cli.config.initialized`), so calls repeat in one process."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.algorithms import MetaAlgorithm
from metamm_cli.data.base import MultimodalDataset
from metamm_cli.data.episodes import Episode, EpisodeSampler
from metamm_cli.models.net import MultimodalNet

__all__ = ["compose", "train", "evaluate", "load", "episodes", "Result", "Loaded",
           "FewShot", "ProtoNet", "MAML", "Adapted", "episode_of"]

SPLITS = ("train", "val", "test")


# -- configs, runs and checkpoints ----------------------------------------------------------------

@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Hydra's and OmegaConf's errors (a bad override, an unknown key or option) as the one-line
    :class:`ConfigError` the CLI prints; metamm's own errors pass as they are."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from metamm_cli.errors import one_line

    try:
        yield
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(one_line(e)) from e


def check_overrides(overrides: Sequence[Any]) -> List[str]:
    """The overrides as strings ``key=value``; a flag (``-m``, ``--cfg``) or another object is a
    one-line error."""
    for o in overrides:
        if not isinstance(o, str) or o.startswith("-"):
            raise ConfigError(f"overrides: {o!r} is not a key=value override (strings such as "
                              f"'+exp=smoke' or 'episode.shot=5'; the CLI's flags have no meaning here)")
    return list(overrides)


def compose(*overrides: str, name: str = "train") -> DictConfig:
    """The config that ``metamm train OVERRIDES`` runs (``name="eval"``: ``metamm eval``'s),
    composed without running anything."""
    from metamm_cli.config import compose as compose_config

    with one_line_errors():
        return compose_config(check_overrides(overrides), name)


@contextlib.contextmanager
def kept_logging() -> Iterator[None]:
    """Hydra sets up the root logger for a job (the console and the run's log file, as the CLI
    does); afterwards the caller's handlers and level are put back and the job's are closed."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def run_job(config_name: str, task: Callable[[DictConfig], Any], overrides: List[str]) -> Any:
    """``task(cfg)`` as the CLI's Hydra app runs it (the same folder, ``.hydra/`` records and log
    file), in this process: returns its value or raises its error; a start that fails leaves no
    folder behind, as in the CLI."""
    from hydra.core.hydra_config import HydraConfig

    from metamm_cli.app import remove_failed_start
    from metamm_cli.config import initialized

    failed: List[Exception] = []

    def guarded(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except BaseException as e:
            remove_failed_start(Path(HydraConfig.get().runtime.output_dir))
            if not isinstance(e, Exception):
                raise
            failed.append(e)  # raised below, without Hydra's "Error executing job" line

    with one_line_errors(), kept_logging(), initialized() as hydra:
        value = hydra.run(config_name, guarded, overrides).return_value
        if failed:
            raise failed[0]
    return value


def root_override(output_root: Optional[Union[str, Path]]) -> List[str]:
    from metamm_cli.runs.resume import hydra_quote

    return [] if output_root is None else [f"output_root={hydra_quote(output_root)}"]


@dataclass
class Result:
    """What :func:`train` returns: the run folder and its final metrics (``metrics.json``)."""
    run_dir: Path
    metrics: Dict[str, Any]


STORED = "metamm_api_train"  # the name under which train(cfg) hands a config object to Hydra


def stored(cfg: DictConfig) -> str:
    """``cfg`` as a primary config that Hydra can run with metamm's run folders and logging
    (its name in Hydra's ConfigStore); it has no group choices (no overrides made it)."""
    from hydra.core.config_store import ConfigStore

    node = OmegaConf.to_container(cfg, enum_to_str=True)
    node.pop("hydra", None)
    ConfigStore.instance().store(name=STORED, node={"defaults": ["train_schema", {"hydra": "default"}, "_self_"], **node})
    return STORED


def train(*overrides: Union[str, DictConfig], output_root: Optional[Union[str, Path]] = None) -> Result:
    """``metamm train OVERRIDES`` in this process (one run; ``trainer.resume=...`` continues
    one): the same run folder under ``output_root`` (default: the config's, ``outputs``).
    The first argument may be a config (:func:`compose`, then edited): it is trained as it is,
    the overrides after it applied on top. Returns the folder and the metrics; errors are
    raised (bad input as :class:`ConfigError`)."""
    from hydra.core.hydra_config import HydraConfig

    from metamm_cli.runs.resume import resume_overrides
    from metamm_cli.train import train as train_run

    given = list(overrides)
    name = stored(given.pop(0)) if given and isinstance(given[0], DictConfig) else "train"
    args = check_overrides(given) + root_override(output_root)
    with one_line_errors():
        extra, ckpt = resume_overrides(args)
    folder: List[Path] = []

    def task(cfg: DictConfig) -> Dict[str, Any]:
        folder.append(Path(HydraConfig.get().runtime.output_dir))
        return train_run(cfg, ckpt=ckpt)

    metrics = run_job(name, task, args + extra)
    return Result(folder[0], metrics)


def evaluate(ckpt: Union[str, Path], *overrides: str,
             output_root: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """``metamm eval --ckpt CKPT OVERRIDES`` in this process: the report (accuracy, ci95,
    episodes, setting, config, ...), also written to ``<output_root>/evals/<time>_<run>/eval.json``."""
    from metamm_cli.evaluate import app_overrides, eval_task
    from metamm_cli.runs import layout
    from metamm_cli.runs.checkpoint import load_checkpoint

    args = check_overrides(overrides) + root_override(output_root)
    state = load_checkpoint(str(ckpt), key="ckpt", prefer=layout.BEST)
    return run_job("eval", lambda cfg: eval_task(cfg, state), args + app_overrides(str(ckpt), state))


def make_sampler(cfg: DictConfig, dataset: MultimodalDataset, split: str, device: torch.device,
                 tasks: int, seed: int) -> EpisodeSampler:
    from metamm_cli.data.episodes import build_sampler

    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ConfigError(f"tasks={tasks!r}: episodes per sample(), must be an integer >= 1")
    return build_sampler(cfg, dataset, split, device, tasks, seed)


@dataclass
class Loaded:
    """A checkpoint as ``metamm eval`` rebuilds it: the algorithm with its weights, in eval mode
    (``.model``: its multimodal network), the run's config with your overrides, the dataset with
    the preprocessing it learned, the device and the checkpoint itself."""
    algorithm: MetaAlgorithm
    config: DictConfig
    dataset: MultimodalDataset
    device: torch.device
    checkpoint: Dict[str, Any]

    @property
    def model(self) -> MultimodalNet:
        return self.algorithm.model

    def sampler(self, split: Optional[str] = None, tasks: Optional[int] = None,
                seed: Optional[int] = None) -> EpisodeSampler:
        """Episodes as ``metamm eval`` draws them: ``eval.split``, ``eval.tasks_per_batch`` tasks
        per draw and ``eval.seed`` unless given."""
        from metamm_cli.device import enum_name

        V = self.config.eval
        return make_sampler(self.config, self.dataset, split or enum_name(V.split), self.device,
                            tasks or V.tasks_per_batch, V.seed if seed is None else seed)


def load(ckpt: Union[str, Path], *overrides: str) -> Loaded:
    """A checkpoint (a ``.pt``, or a run folder: its ``best.pt``) as a ready algorithm and its
    data, built as ``metamm eval --ckpt CKPT OVERRIDES`` builds them."""
    from metamm_cli.evaluate import rebuild
    from metamm_cli.runs import layout
    from metamm_cli.runs.checkpoint import load_checkpoint

    state = load_checkpoint(str(ckpt), key="ckpt", prefer=layout.BEST)
    cfg = compose(*overrides, name="eval")
    run_cfg, dataset, algo, device = rebuild(cfg, list(overrides), state)
    return Loaded(algo.eval(), run_cfg, dataset, device, state)


def episodes(*overrides: str, split: str = "train", tasks: int = 1, seed: int = 0) -> EpisodeSampler:
    """The sampler of ``split``'s episodes of the dataset that ``metamm train OVERRIDES`` would
    use (``episode.*``; validation and test: ``eval.way``/``shot``/``query`` where set):
    ``sampler.sample()`` draws an :class:`Episode` of ``tasks`` tasks, ``sampler.reset()``
    starts the same sequence again."""
    from metamm_cli.config import check_ranges
    from metamm_cli.data.base import build_dataset
    from metamm_cli.device import resolve_device

    cfg = compose(*overrides)
    check_ranges(cfg)
    return make_sampler(cfg, build_dataset(cfg.dataset), split, resolve_device(cfg.trainer.device), tasks, seed)


# -- any algorithm on plain tensors ---------------------------------------------------------------

INPUT = "input"  # the one modality of an episode made of plain tensors


class OneInputNet(MultimodalNet):
    """Your ``backbone`` (``[B, ...] -> [B, dim]``) as metamm's multimodal network of one
    modality (``input``, fused by ``mean``: the identity). ``dim`` is needed only by algorithms
    that build layers on the embedding (a head, a relation module)."""

    def __init__(self, backbone: nn.Module, dim: Optional[int] = None):
        from metamm_cli.models.fusion import Mean

        super().__init__({INPUT: backbone}, Mean([INPUT], dim))

    @property
    def out_dim(self) -> int:
        if self._out_dim is None:
            raise ConfigError("dim: this algorithm builds layers on the backbone's output: pass dim=D, "
                              "the width of backbone [B, ...] -> [B, D]")
        return self._out_dim

    @out_dim.setter
    def out_dim(self, value: Optional[int]) -> None:
        self._out_dim = value


def class_count(labels: torch.Tensor, key: str) -> int:
    """N for labels ``[T, n]`` holding every class id ``0..N-1`` in each task."""
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or labels.dim() != 2 or labels.numel() == 0:
        raise ConfigError(f"{key}: class ids 0..N-1 as an integer tensor [n] (one task) or [T, n] (T tasks)")
    way = int(labels.max()) + 1
    if int(labels.min()) < 0 or bool((F.one_hot(labels.long(), way).sum(1) == 0).any()):
        raise ConfigError(f"{key}: class ids must be 0..N-1 with every id in every task; got "
                          f"{sorted(set(labels.flatten().tolist()))}")
    return way


def episode_of(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
               query_labels: Optional[torch.Tensor] = None) -> Episode:
    """Plain tensors as metamm's :class:`Episode` (one modality, ``input``, always present): one
    task (``support [S, ...]``, ``support_labels [S]`` in ``0..N-1``, ``query [Q, ...]``) or T
    tasks (``[T, S, ...]``, ``[T, S]``, ``[T, Q, ...]``). Without ``query_labels`` the query's are
    zeros (for the logits only)."""
    one = isinstance(support_labels, torch.Tensor) and support_labels.dim() == 1
    lead = (lambda x: x if x is None else x[None]) if one else (lambda x: x)
    s, sy, q, qy = lead(support), lead(support_labels), lead(query), lead(query_labels)
    way = class_count(sy, "support_labels")
    T = sy.shape[0]
    if not isinstance(s, torch.Tensor) or tuple(s.shape[:2]) != tuple(sy.shape):
        raise ConfigError(f"support: one sample per support label ({tuple(support_labels.shape)}), "
                          f"got {tuple(getattr(support, 'shape', ()))}")
    if not isinstance(q, torch.Tensor) or q.dim() < 2 or q.shape[0] != T:
        raise ConfigError(f"query: {'[Q, ...] for one task' if one else f'[{T}, Q, ...] for {T} tasks'}, "
                          f"got {tuple(getattr(query, 'shape', ()))}")
    if qy is None:
        qy = torch.zeros(q.shape[:2], dtype=torch.long, device=sy.device)
    elif tuple(qy.shape) != tuple(q.shape[:2]) or int(qy.min()) < 0 or int(qy.max()) >= way:
        raise ConfigError(f"query_labels: one class id in 0..{way - 1} per query sample")

    def present(n: int) -> torch.Tensor:
        return torch.ones(T, n, 1, dtype=torch.bool, device=sy.device)

    return Episode(support={INPUT: s}, support_present=present(s.shape[1]), support_labels=sy.long(),
                   query={INPUT: q}, query_present=present(q.shape[1]), query_labels=qy.long(),
                   classes=torch.arange(way, device=sy.device).expand(T, way))


def build(name: str, net: MultimodalNet, way: Optional[int], settings: Dict[str, Any]) -> MetaAlgorithm:
    """The algorithm ``configs/algorithm/NAME.yaml`` around ``net``, its settings replaced by
    ``settings`` (checked as the config's are)."""
    from metamm_cli.algorithms import registered
    from metamm_cli.config import config_dir, instantiate_checked

    known = registered()
    if name not in known:
        raise ConfigError(f"algorithm {name!r}: not a metamm algorithm; choose one of {', '.join(known)}")
    node = OmegaConf.merge(OmegaConf.load(Path(config_dir(), "algorithm", f"{name}.yaml")), settings)
    try:
        return instantiate_checked(node, "algorithm", model=net, way=way, num_classes=None)
    except Exception as e:  # noqa: BLE001 - a layer per class built from way=None
        if way is None and not isinstance(e, ConfigError):
            raise ConfigError(f"way: algorithm {name} builds a layer per class: pass way=N, the "
                              f"classes of a task") from e
        raise


class FewShot(nn.Module):
    """Any metamm algorithm (``configs/algorithm/NAME.yaml``: protonet, matching, relation, maml,
    ...) on plain tensors with your own ``backbone`` (an ``nn.Module`` ``[B, ...] -> [B, D]``):
    ``model(support, support_labels, query) -> logits [Q, N]`` (T tasks at once: ``[T, Q, N]``).
    ``settings`` replace the YAML's (``distance="cosine"``); ``dim=D`` is needed by algorithms
    with layers on the embedding, ``way=N`` by those with a layer per class. The algorithm's
    maths is the one training runs; the backbone's BatchNorm layers are swapped, in place, for
    the algorithm's own (per task, same parameters)."""

    def __init__(self, name: str, backbone: nn.Module, way: Optional[int] = None,
                 dim: Optional[int] = None, **settings: Any):
        super().__init__()
        self.algorithm = build(name, OneInputNet(backbone, dim), way, settings)
        self.own_logits = False  # MAML(model): the model's outputs are the logits, any way

    def run(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
            query_labels: Optional[torch.Tensor] = None) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """(the algorithm's own loss, the mean over tasks: None without ``query_labels``; the logits)."""
        episode = episode_of(support, support_labels, query, query_labels)
        if self.own_logits:
            self.algorithm.way = episode.way
        loss, logits = self.algorithm(episode)
        return (loss if query_labels is not None else None), (logits[0] if support_labels.dim() == 1 else logits)

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return self.run(support, support_labels, query)[1]

    def adapt(self, support: torch.Tensor, support_labels: torch.Tensor) -> "Adapted":
        """The MAML family's inner loop on one task's support set (``support [S, ...]``, labels
        ``[S]``): the adapted network, to call on queries. Its weights stay differentiable w.r.t.
        the original ones (second order unless ``first_order``), so a query loss back-propagates
        the meta-gradient, as ``learn2learn``'s ``maml.clone().adapt(loss)``."""
        from metamm_cli.algorithms.maml import MAML as MAMLAlgorithm

        algo = self.algorithm
        if not isinstance(algo, MAMLAlgorithm):
            raise ConfigError(f"adapt: {type(algo).__name__} has no inner loop; adapt is for the MAML "
                              f"family (maml, fomaml, anil, metasgd, reptile)")
        if not isinstance(support_labels, torch.Tensor) or support_labels.dim() != 1:
            raise ConfigError("support_labels: adapt takes one task, support [S, ...] and support_labels [S]")
        episode = episode_of(support, support_labels, support)
        if self.own_logits:
            algo.way = episode.way
        fast, shared = algo.initial_params(episode.way, loop=True)
        fast = algo.adapt(fast, shared, algo.learned_lrs(), {INPUT: support}, episode.support_present[0],
                          episode.support_labels[0], algo.steps, functional=False)
        return Adapted(algo.net, {**shared, **fast})


@dataclass
class Adapted:
    """One task's adapted network (:meth:`FewShot.adapt`): ``adapted(query [Q, ...]) -> logits
    [Q, N]``; ``params`` holds its weights."""
    net: nn.Module
    params: Dict[str, torch.Tensor]

    def __call__(self, query: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        from metamm_cli.device import upcast

        present = torch.ones(query.shape[0], 1, dtype=torch.bool, device=query.device)
        return upcast(functional_call(self.net, self.params, ({INPUT: query}, present)))


class ProtoNet(FewShot):
    """Prototypical Networks on your backbone, as ``easyfsl.methods.PrototypicalNetworks``:
    ``ProtoNet(backbone)(support, support_labels, query) -> logits [Q, N]`` (negative squared
    Euclidean distances to the class means; ``distance="cosine"`` etc. as ``algorithm=protonet``)."""

    def __init__(self, backbone: nn.Module, **settings: Any):
        super().__init__("protonet", backbone, **settings)


class MAML(FewShot):
    """MAML on your model, as ``learn2learn.algorithms.MAML(model, lr)``: ``model`` maps inputs
    to a task's logits ``[B, N]``; ``maml.adapt(support, support_labels)`` takes ``steps`` SGD
    steps of size ``lr`` (second order unless ``first_order``) and returns the adapted network;
    ``maml(support, support_labels, query)`` is both at once. With ``dim=D, way=N``, ``model``
    is a backbone ``[B, ...] -> [B, D]`` and MAML adds its learned linear head, as
    ``algorithm=maml``. Norm layers use the statistics of the batch at hand (as in the paper)."""

    def __init__(self, model: nn.Module, lr: float = 0.4, steps: int = 1, first_order: bool = False,
                 way: Optional[int] = None, dim: Optional[int] = None, **settings: Any):
        settings = {"inner_lr": lr, "inner_steps": steps, "inner_steps_eval": steps,
                    "first_order": first_order, **settings}
        if dim is not None:
            super().__init__("maml", model, way, dim, **settings)
            return
        if settings.get("head", "learned") != "learned":
            raise ConfigError(f"head={settings['head']}: a head of MAML's own needs dim=D and way=N; without "
                              f"dim, the model's outputs are the logits")
        super().__init__("maml", model, 1, 1, **settings)  # a placeholder head, replaced:
        self.algorithm.net.head = nn.Identity()  # the model's outputs are the logits
        self.own_logits = True
