"""Structured-config schemas (types at composition) and range checks (at start-up).

Hydra merges the YAML files in ``configs/`` onto these dataclasses, so a wrong type
(``episode.way=abc``) or an unknown key (``episode.wya=5``) fails while composing; the
ranges that OmegaConf cannot express are checked by :func:`check_ranges`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from metamm_cli import ConfigError


class Amp(enum.Enum):
    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


class EvalTask(enum.Enum):
    fewshot = "fewshot"
    retrieval = "retrieval"


class OnNan(enum.Enum):
    stop = "stop"
    skip = "skip"


class Scheduler(enum.Enum):
    none = "none"
    cosine = "cosine"
    step = "step"
    linear = "linear"
    multistep = "multistep"


class Optimizer(enum.Enum):
    adam = "adam"
    sgd = "sgd"


class Split(enum.Enum):
    train = "train"
    val = "val"
    test = "test"


@dataclass
class EpisodeConfig:
    way: int = 5
    shot: int = 1
    query: int = 15
    support_modalities: Optional[List[str]] = None  # cross-modal episodes: modalities kept in the support
    query_modalities: Optional[List[str]] = None  # ... and in the query (null = all)


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N (checked by device.resolve_device)
    amp: Amp = Amp.none
    max_steps: int = 1000
    meta_batch: int = 4
    task_chunk: Optional[int] = None  # tasks per forward/backward; None = whole meta-batch
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None
    log_every: int = 50
    val_every: int = 250
    val_episodes: int = 200
    ckpt_every: int = 250
    keep_last: int = 0  # step_XXXXXXXX.pt checkpoints kept besides last.pt/best.pt
    on_nan: OnNan = OnNan.stop  # non-finite loss/gradient: stop, or skip the update
    scheduler: Scheduler = Scheduler.none
    step_size: int = 2000  # scheduler=step: steps between learning-rate drops ...
    gamma: float = 0.5  # ... each multiplying it by gamma
    lr_final: float = 0.0  # scheduler=linear: the learning rate reached at max_steps
    milestones: List[int] = field(default_factory=list)  # scheduler=multistep: from these steps on ...
    factors: List[float] = field(default_factory=list)  # ... lr x these factors (MetaOptNet's schedule)
    optimizer: Optimizer = Optimizer.adam
    momentum: float = 0.0  # optimizer=sgd
    nesterov: bool = False  # optimizer=sgd: Nesterov momentum (MetaOptNet)
    patience: Optional[int] = None  # stop after this many validations without a new best (null: never)
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact resume
    resume: Any = None  # null | true (latest run of this task) | path to a .pt or run folder
    progress: bool = True
    tensorboard: bool = True
    threads: Optional[int] = None  # torch CPU threads; null: auto (device.auto_threads)
    test: bool = False  # at the end, best.pt on the test split -> RUN/eval.json (as metamm eval)
    compile: bool = False  # torch.compile the embedding network (algorithms differentiated once)
    profile: bool = False  # a torch.profiler trace of steps 3-5 into the run's TensorBoard folder
    compile_backend: str = "inductor"  # torch.compile's backend (inductor; aot_eager for a quick check)


@dataclass
class EvalConfig:
    split: Split = Split.test
    episodes: int = 600
    tasks_per_batch: int = 50
    seed: int = 0
    missing_sweep: Optional[List[float]] = None  # rates: accuracy per modality missing at each rate
    episodes_file: Optional[str] = None  # JSON of fixed episodes (metamm_cli/fixed_episodes.py)
    task: EvalTask = EvalTask.fewshot  # fewshot episodes | cross-modal retrieval
    query_modality: Optional[str] = None  # retrieval: the query side ...
    gallery_modality: Optional[str] = None  # ... and the ranked side
    way: Optional[int] = None  # validation and test episodes: null = episode.way ...
    shot: Optional[int] = None  # ... episode.shot ...
    query: Optional[int] = None  # ... episode.query


@dataclass
class MissingConfig:
    """Per-modality probability that a sample of an episode lacks the modality (drawn per
    episode): ``train`` while training, ``test`` for validation and evaluation."""
    train: Dict[str, float] = field(default_factory=dict)
    test: Dict[str, float] = field(default_factory=dict)


@dataclass
class AlignConfig:
    weight: float = 0.0  # > 0 adds the symmetric InfoNCE alignment of modalities to the loss
    temperature: float = 0.07  # initial temperature (learned)


@dataclass
class SearchConfig:
    """Set by the Optuna sweeper on each job of a search: the Optuna trial id it reports to."""
    trial: Optional[int] = None


@dataclass
class PresetConfig:
    """Set by a dataset-specific ``+exp`` preset: its name and the datasets it fits."""
    name: str = ""
    datasets: Optional[List[str]] = None
    paper: Optional[Dict[str, Any]] = None  # the reported result: {accuracy: 98.8, source: "..."}


@dataclass
class TrainConfig:
    task_name: str = "default"
    seed: int = 0
    output_root: str = "outputs"
    dataset: Any = None
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    encoder: Any = None
    fusion: Any = None
    mapping: Any = None
    align: AlignConfig = field(default_factory=AlignConfig)
    algorithm: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    missing: MissingConfig = field(default_factory=MissingConfig)
    preset: PresetConfig = field(default_factory=PresetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


def register_schemas() -> None:
    cs = ConfigStore.instance()
    node = OmegaConf.structured(TrainConfig)
    for phase in ("train", "test"):  # missing.train.audio=0.3 adds a key without a '+'
        OmegaConf.set_struct(node.missing[phase], False)
    cs.store(name="train_schema", node=node)
    if not OmegaConf.has_resolver("metamm_dirname"):
        OmegaConf.register_new_resolver("metamm_dirname", job_dirname)
        OmegaConf.register_new_resolver("metamm_jobnum", lambda num: f"{int(num):04d}")


_HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_", "_args_")


def instantiate_checked(node: DictConfig, key: str, convert: str = "none", **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` after checking the node's keys against the
    target's signature, so that a key the target does not take, or a required one left unset,
    is a one-line error naming ``key.NAME`` and the settings the target has, never the
    constructor's ``TypeError``. ``key`` is the node's place in the config (``dataset``);
    ``convert`` is Hydra's ``_convert_`` (``all``: plain dicts and lists for the config's values)."""
    import inspect

    from hydra.utils import get_method, instantiate
    from omegaconf.errors import MissingMandatoryValue

    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        raise ConfigError(f"{key}: needs a config with a _target_ (pick one with {key.split('.')[0]}=NAME)")
    try:
        obj = get_method(str(target))
    except Exception as e:  # noqa: BLE001 - hydra raises ImportError or its own error types
        raise ConfigError(f"{key}._target_={target}: cannot be imported ({type(e).__name__})") from e
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = None
    name = getattr(obj, "__name__", str(target))
    if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        allowed = {p.name for p in params}
        given = [k for k in node.keys() if k not in _HYDRA_KEYS]
        unknown = [k for k in given if k not in allowed]
        if unknown:
            settings = sorted(allowed - set(kwargs))
            raise ConfigError(f"{key}.{unknown[0]}: not a setting of {key} {name}; its settings: "
                              f"{', '.join(settings) or '(none)'}")
        for p in params:
            if p.default is p.empty and p.name not in kwargs and p.name not in given:
                raise ConfigError(f"{key}.{p.name} is required by {key} {name}: set {key}.{p.name}=VALUE")
    for k in node.keys():
        if k not in _HYDRA_KEYS and OmegaConf.is_missing(node, k):
            raise ConfigError(f"{key}.{k} must be set ({key}.{k}=VALUE): it has no default")
    try:
        return instantiate(node, _convert_=convert, **kwargs)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{key}: a required value is not set ({' '.join(str(e).split())})") from e


def job_dirname(overrides: str, limit: int = 120) -> str:
    """A sweep job's folder name from its overrides, cut to ``limit`` characters with a short
    hash of the whole, so that long sweeps stay within the file system's 255-byte names (the
    full overrides are in the job's .hydra/overrides.yaml)."""
    name = str(overrides)
    if len(name) <= limit:
        return name
    import hashlib
    return f"{name[:limit - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def config_dir() -> str:
    """configs/ inside an installed wheel, else the repository's top-level configs/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise ConfigError(f"metamm's configs/ not found next to {here}; reinstall metamm")


_RANGES = [
    ("episode.way", lambda v: v >= 2, ">= 2"),
    ("episode.shot", lambda v: v >= 1, ">= 1"),
    ("episode.query", lambda v: v >= 1, ">= 1"),
    ("trainer.max_steps", lambda v: v >= 0, ">= 0"),
    ("trainer.meta_batch", lambda v: v >= 1, ">= 1"),
    ("trainer.task_chunk", lambda v: v is None or v >= 1, "null or >= 1"),
    ("trainer.lr", lambda v: v > 0, "> 0"),
    ("trainer.weight_decay", lambda v: v >= 0, ">= 0"),
    ("trainer.grad_clip", lambda v: v is None or v > 0, "null or > 0"),
    ("trainer.log_every", lambda v: v >= 1, ">= 1"),
    ("trainer.val_every", lambda v: v >= 1, ">= 1"),
    ("trainer.val_episodes", lambda v: v >= 1, ">= 1"),
    ("trainer.ckpt_every", lambda v: v >= 1, ">= 1"),
    ("trainer.keep_last", lambda v: v >= 0, ">= 0"),
    ("trainer.lr", lambda v: v < 3e38, "a float32 number (< 3e38)"),
    ("trainer.weight_decay", lambda v: v < 3e38, "a float32 number (< 3e38)"),
    ("trainer.grad_clip", lambda v: v is None or v < 3e38, "null or a float32 number (< 3e38)"),
    ("trainer.threads", lambda v: v is None or v >= 1, "null (auto) or >= 1"),
    ("trainer.step_size", lambda v: v >= 1, ">= 1"),
    ("trainer.gamma", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("trainer.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("trainer.patience", lambda v: v is None or v >= 1, "null or >= 1"),
    ("trainer.lr_final", lambda v: 0 <= v < 3e38, ">= 0 (a float32 number)"),
    ("eval.way", lambda v: v is None or v >= 2, "null (episode.way) or >= 2"),
    ("eval.shot", lambda v: v is None or v >= 1, "null (episode.shot) or >= 1"),
    ("eval.query", lambda v: v is None or v >= 1, "null (episode.query) or >= 1"),
    ("eval.episodes", lambda v: v >= 1, ">= 1"),
    ("eval.tasks_per_batch", lambda v: v >= 1, ">= 1"),
    ("align.weight", lambda v: v >= 0, ">= 0"),
    ("align.temperature", lambda v: v > 0, "> 0"),
]


def check_ranges(cfg: DictConfig) -> None:
    for key, ok, allowed in _RANGES:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value} is out of range: must be {allowed}")
    for phase in ("train", "test"):
        for m, p in (OmegaConf.select(cfg, f"missing.{phase}") or {}).items():
            if not 0 <= p <= 1:
                raise ConfigError(f"missing.{phase}.{m}={p} is out of range: must be in [0, 1]")
    T = cfg.trainer
    milestones, factors = list(T.get("milestones") or []), list(T.get("factors") or [])
    if len(milestones) != len(factors) or milestones != sorted(set(milestones)) or any(f <= 0 for f in factors):
        raise ConfigError(f"trainer.milestones={milestones}, trainer.factors={factors}: increasing steps, one "
                          f"positive learning-rate factor each (scheduler=multistep)")
    if T.get("nesterov") and (enum_value(T.optimizer) != "sgd" or not T.momentum > 0):
        raise ConfigError("trainer.nesterov=true needs trainer.optimizer=sgd and trainer.momentum > 0")
    for p in OmegaConf.select(cfg, "eval.missing_sweep") or []:
        if not 0 <= p <= 1:
            raise ConfigError(f"eval.missing_sweep: {p} is out of range: rates must be in [0, 1]")


    modalities = OmegaConf.select(cfg, "dataset.modalities", default=None)
    if modalities is not None and len(modalities) == 0:
        raise ConfigError("dataset.modalities=[] is empty: name at least one modality, or null for all")
    for group in ("dataset", "fusion", "algorithm"):
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{group}: needs a config with a _target_ (pick one with {group}=NAME)")
    check_preset(cfg)


def enum_value(v) -> str:
    return v.value if isinstance(v, enum.Enum) else str(v)


def dataset_name(cfg: DictConfig) -> str:
    """The ``name`` of the configured dataset class (``omniglot``, ``folder``, ...)."""
    from hydra.utils import get_class

    try:
        return getattr(get_class(str(cfg.dataset._target_)), "name", str(cfg.dataset._target_))
    except Exception:  # noqa: BLE001 - reported by instantiate_checked with the key
        return str(cfg.dataset._target_)


def check_preset(cfg: DictConfig) -> None:
    """A dataset-specific preset (``preset.datasets``) refuses other datasets in one line."""
    preset = OmegaConf.select(cfg, "preset")
    fits = list(preset.datasets or []) if preset is not None else []
    if fits and dataset_name(cfg) not in fits:
        raise ConfigError(f"+exp={preset.name} is a preset for dataset={'/'.join(fits)}, not "
                          f"dataset={dataset_name(cfg)}; drop the preset (+exp=smoke works with any "
                          f"dataset) or use dataset={fits[0]}")
