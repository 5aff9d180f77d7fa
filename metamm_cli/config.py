"""Structured-config schemas (types at composition) and range checks (at start-up).

Hydra merges the YAML files in ``configs/`` onto these dataclasses, so a wrong type
(``episode.way=abc``) or an unknown key (``episode.wya=5``) fails while composing; the
ranges that OmegaConf cannot express are checked by :func:`check_ranges`.
"""
from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from metamm_cli import ConfigError


class Range:
    """A declared range of a numeric setting, checked by one mechanism (:func:`check_value`):
    ``Range("> 0")``, ``Range(">= 1")``, ``Range("in [0, 1]")``, ``Range("in (0, 1]")``; ``null
    or ...`` also admits None; ``float32=True`` also bounds it by float32's largest number.
    Settings declare it where they are defined: a config dataclass field
    (``field(default=..., metadata={"range": Range(...)})``) or a constructor argument
    (``temperature: Annotated[float, Range("> 0")] = 10.0``, read by :func:`instantiate_checked`)."""

    def __init__(self, spec: str, float32: bool = False):
        self.spec, self.float32 = spec, float32
        rule = spec[len("null or "):] if spec.startswith("null or ") else spec
        self.nullable = rule != spec
        if rule.startswith("in "):
            lo_open, hi_open = rule[3] == "(", rule[-1] == ")"
            lo, hi = (float(x) for x in rule[4:-1].split(","))
            self.test = lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
        else:
            op, bound = rule.split()
            bound = float(bound)
            self.test = {">": lambda v: v > bound, ">=": lambda v: v >= bound, "<": lambda v: v < bound,
                         "<=": lambda v: v <= bound}[op]

    def __repr__(self) -> str:
        return f"Range({self.spec!r})"

    def allowed(self) -> str:
        return self.spec + (" (a float32 number, < 3e38)" if self.float32 else "")

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return bool(self.test(value)) and (not self.float32 or abs(value) < 3e38)


def check_value(key: str, value: Any, declared: Any) -> None:
    """``key=value`` against what is declared for it: a :class:`Range`, or the choices of a
    ``Literal[...]``; a value outside is one line naming the key and what is allowed."""
    import typing

    if isinstance(declared, Range):
        if not declared.ok(value):
            raise ConfigError(f"{key}={value} is out of range: must be {declared.allowed()}")
    elif typing.get_origin(declared) is typing.Literal:
        choices = typing.get_args(declared)
        if value not in choices:
            raise ConfigError(f"{key}={value}: must be one of {', '.join(map(str, choices))}")


def declared_in(annotation: Any) -> List[Any]:
    """The :class:`Range` / ``Literal`` declarations of a type annotation
    (``Annotated[float, Range("> 0")]``, ``Optional[Annotated[...]]``, ``Literal["a", "b"]``)."""
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return [m for m in annotation.__metadata__ if isinstance(m, Range)] + declared_in(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return [annotation]
    if origin is typing.Union:
        return [d for a in typing.get_args(annotation) if a is not type(None) for d in declared_in(a)]
    return []


def check_arguments(target: Any, values: Dict[str, Any], key: str) -> None:
    """Every constructor argument of ``target`` that declares a range or choices, with its value
    in ``values`` (else its default), checked; messages name ``key.ARG``."""
    import inspect
    import typing

    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    hints: Dict[str, Any] = {}  # a subclass that passes an argument on inherits its base's declaration
    for owner in (target.__mro__ if inspect.isclass(target) else [target]):
        try:
            found = typing.get_type_hints(owner.__init__ if inspect.isclass(owner) else owner, include_extras=True)
        except (TypeError, NameError, AttributeError):
            continue
        for name, hint in found.items():
            if name not in hints or not declared_in(hints[name]):
                hints[name] = hint
    for name, p in params.items():
        for declared in declared_in(hints.get(name)):
            value = values[name] if name in values else p.default
            if value is not inspect.Parameter.empty:
                check_value(f"{key}.{name}", value, declared)


def _range(spec: str, float32: bool = False) -> Dict[str, Range]:
    return {"range": Range(spec, float32)}


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


class MemoryFormat(enum.Enum):
    auto = "auto"
    channels_last = "channels_last"
    contiguous = "contiguous"


class Optimizer(enum.Enum):
    adam = "adam"
    sgd = "sgd"


class Split(enum.Enum):
    train = "train"
    val = "val"
    test = "test"


@dataclass
class EpisodeConfig:
    way: int = field(default=5, metadata=_range(">= 2"))
    shot: int = field(default=1, metadata=_range(">= 1"))
    query: int = field(default=15, metadata=_range(">= 1"))
    support_modalities: Optional[List[str]] = None  # cross-modal episodes: modalities kept in the support
    query_modalities: Optional[List[str]] = None  # ... and in the query (null = all)


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N (checked by device.resolve_device)
    amp: Amp = Amp.none
    max_steps: int = field(default=1000, metadata=_range(">= 0"))
    meta_batch: int = field(default=4, metadata=_range(">= 1"))
    task_chunk: Optional[int] = field(default=None, metadata=_range("null or >= 1"))  # tasks per forward/backward; None = whole meta-batch
    population_chunk: Optional[int] = field(default=None, metadata=_range("null or >= 1"))  # hydra/launcher=population: members per vmapped forward/backward; None = all
    lr: float = field(default=1e-3, metadata=_range("> 0", True))
    weight_decay: float = field(default=0.0, metadata=_range(">= 0", True))
    grad_clip: Optional[float] = field(default=None, metadata=_range("null or > 0", True))
    log_every: int = field(default=50, metadata=_range(">= 1"))
    val_every: int = field(default=250, metadata=_range(">= 1"))
    val_episodes: int = field(default=200, metadata=_range(">= 1"))
    ckpt_every: int = field(default=250, metadata=_range(">= 1"))
    keep_last: int = field(default=0, metadata=_range(">= 0"))  # step_XXXXXXXX.pt checkpoints kept besides last.pt/best.pt
    on_nan: OnNan = OnNan.stop  # non-finite loss/gradient: stop, or skip the update
    scheduler: Scheduler = Scheduler.none
    step_size: int = field(default=2000, metadata=_range(">= 1"))  # scheduler=step: steps between learning-rate drops ...
    gamma: float = field(default=0.5, metadata=_range("in (0, 1]"))  # ... each multiplying it by gamma
    lr_final: float = field(default=0.0, metadata=_range(">= 0", True))  # scheduler=linear: the learning rate reached at max_steps
    milestones: List[int] = field(default_factory=list)  # scheduler=multistep: from these steps on ...
    factors: List[float] = field(default_factory=list)  # ... lr x these factors (MetaOptNet's schedule)
    optimizer: Optimizer = Optimizer.adam
    momentum: float = field(default=0.0, metadata=_range("in [0, 1)"))  # optimizer=sgd
    nesterov: bool = False  # optimizer=sgd: Nesterov momentum (MetaOptNet)
    patience: Optional[int] = field(default=None, metadata=_range("null or >= 1"))  # stop after this many validations without a new best (null: never)
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact resume
    resume: Any = None  # null | true (latest run of this task) | path to a .pt or run folder
    progress: bool = True
    tensorboard: bool = True
    threads: Optional[int] = field(default=None, metadata=_range("null or >= 1"))  # torch CPU threads; null: auto (device.auto_threads)
    memory_format: MemoryFormat = MemoryFormat.auto  # of 4-d weights and images; auto: measured (models/memory_format.py)
    embed_chunk: Optional[int] = field(default=None, metadata=_range("null or >= 0"))  # samples per piece of an embedding call (BatchNorm over the whole batch); 0: whole; null: auto
    test: bool = False  # at the end, best.pt on the test split -> RUN/eval.json (as metamm eval)
    compile: bool = False  # torch.compile the embedding network (algorithms differentiated once)
    profile: bool = False  # a torch.profiler trace of steps 3-5 into the run's TensorBoard folder
    compile_backend: str = "inductor"  # torch.compile's backend (inductor; aot_eager for a quick check)


@dataclass
class EvalConfig:
    split: Split = Split.test
    episodes: int = field(default=600, metadata=_range(">= 1"))
    tasks_per_batch: int = field(default=50, metadata=_range(">= 1"))
    seed: int = 0
    missing_sweep: Optional[List[float]] = None  # rates: accuracy with every modality (all), and each, missing at each rate
    missing_each: bool = True  # missing_sweep: also each modality alone (false: the all curve only)
    episodes_file: Optional[str] = None  # JSON of fixed episodes (metamm_cli/fixed_episodes.py)
    task: EvalTask = EvalTask.fewshot  # fewshot episodes | cross-modal retrieval
    query_modality: Optional[str] = None  # retrieval: the query side ...
    gallery_modality: Optional[str] = None  # ... and the ranked side
    way: Optional[int] = field(default=None, metadata=_range("null or >= 2"))  # validation and test episodes: null = episode.way ...
    shot: Optional[int] = field(default=None, metadata=_range("null or >= 1"))  # ... episode.shot ...
    query: Optional[int] = field(default=None, metadata=_range("null or >= 1"))  # ... episode.query


@dataclass
class MissingConfig:
    """Per-modality probability that a sample of an episode lacks the modality (drawn per
    episode): ``train`` while training, ``test`` for validation and evaluation."""
    train: Dict[str, float] = field(default_factory=dict)
    test: Dict[str, float] = field(default_factory=dict)
    schedule: str = field(default="fixed", metadata={"choices": ("fixed", "uniform")})  # training: fixed rates | uniform: each task's rates drawn in [0, rate]
    warmup: int = field(default=0, metadata=_range(">= 0"))  # training: steps over which the train rates (and crossmodal) ramp from 0
    crossmodal: float = field(default=0.0, metadata=_range("in [0, 1]"))  # training: probability that a task is cross-modal (support one modality, query another)


@dataclass
class AlignConfig:
    weight: float = field(default=0.0, metadata=_range(">= 0"))  # > 0 adds the symmetric InfoNCE alignment of modalities to the loss
    temperature: float = field(default=0.07, metadata=_range("> 0"))  # initial temperature (learned)


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
    toy: Optional[Dict[str, Any]] = None  # +scale=toy's budget: {steps, meta_batch, val_episodes, test_episodes}


@dataclass
class RecipeConfig:
    """Set by a ``+recipe=`` training recipe: its name, and whether it needs the shared space."""
    name: str = ""
    shared_space: bool = False  # refused with mapping=none


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
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
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
    check_arguments(obj, {k: node[k] for k in node.keys() if k not in _HYDRA_KEYS}, key)
    try:
        return instantiate(node, _convert_=convert, **kwargs)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{key}: a required value is not set ({' '.join(str(e).split())})") from e
    except Exception as e:  # noqa: BLE001 - Hydra wraps the target's own one-line ConfigError
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise


def job_dirname(overrides: str, limit: int = 120) -> str:
    """A sweep job's folder name from its overrides, cut to ``limit`` characters with a short
    hash of the whole, so that long sweeps stay within the file system's 255-byte names (the
    full overrides are in the job's .hydra/overrides.yaml). A group's ``/`` (``encoder/image=mlp``)
    becomes ``_``: one folder per job, not a folder inside another."""
    name = str(overrides).replace("/", "_")
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


@contextlib.contextmanager
def initialized() -> Iterator[Any]:
    """Hydra set up on metamm's configs for the block, which gets Hydra's ``Hydra`` object (to
    compose, or to run a job in-process). Hydra's global state is saved before and restored
    after, so the block works any number of times in one process and inside a running Hydra
    app (hydra #440)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    register_schemas()
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            yield GlobalHydra.instance().hydra
    finally:
        restore_gh_from_backup(backup)


def compose(overrides: Sequence[str] = (), name: str = "train") -> DictConfig:
    """The config ``name`` (``train``, ``eval``) composed with ``overrides`` as the CLI composes
    it, in-process and without a run folder (:func:`initialized`: any number of times)."""
    from hydra import compose as hydra_compose

    with initialized():
        return hydra_compose(name, overrides=list(overrides))


INFO_FLAGS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "--info", "--resolve")  # print, run nothing


def option(argv: List[str], *names: str) -> Optional[str]:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in ``argv``."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def check_yaml(config_dir: Optional[str]) -> None:
    """A YAML syntax error in a --config-dir file, named with its file and line (Hydra's own
    message names neither)."""
    import yaml

    if not config_dir or not Path(config_dir).is_dir():
        return
    for path in sorted(Path(config_dir).rglob("*.yaml")):
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ConfigError(f"--config-dir: YAML syntax error in {where}: "
                              f"{getattr(e, 'context', None) or ''} {getattr(e, 'problem', None) or e}".replace("  ", " "))


def declared_fields(schema: type = None, prefix: str = "") -> Dict[str, Any]:
    """``{dotted key: Range or choices}`` declared on the config dataclasses' fields."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(schema or TrainConfig):
        if "range" in f.metadata or "choices" in f.metadata:
            out[prefix + f.name] = f.metadata.get("range") or typing_literal(f.metadata["choices"])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(declared_fields(type(default), prefix + f.name + "."))
    return out


def typing_literal(choices) -> Any:
    import typing

    return typing.Literal[tuple(choices)]


def check_ranges(cfg: DictConfig) -> None:
    """The declared ranges and choices of the top-level settings (the config dataclasses'
    fields), then what they cannot declare: the missing rates, the presets and recipes."""
    for key, declared in declared_fields().items():
        check_value(key, OmegaConf.select(cfg, key), declared)
    for phase in ("train", "test"):
        for m, p in (OmegaConf.select(cfg, f"missing.{phase}") or {}).items():
            if not isinstance(p, (int, float)) or isinstance(p, bool):
                raise ConfigError(f"missing.{phase}.{m}={p}: a probability, must be a number in [0, 1]")
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
    recipe = OmegaConf.select(cfg, "recipe")
    mapping = OmegaConf.select(cfg, "mapping.kind", default="none")
    if recipe is not None and recipe.shared_space and mapping == "none":
        raise ConfigError(f"+recipe={recipe.name} trains a shared space across modalities, and mapping=none "
                          f"has none: set mapping=linear (or mlp), or drop the recipe")


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
