"""What a user sees when something goes wrong: :class:`ConfigError` (bad input, named) and
:func:`one_line`, which turns any error into the one line the CLI prints."""
from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input: printed by the CLI as one line, naming the key or file and what is allowed."""


def one_line(exc: BaseException) -> str:
    """A one-line message for any error: ours as is, Hydra's and OmegaConf's condensed."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException


    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, ConfigError):
            return str(e)
    if any(is_oom(e) for e in chain):
        return ("out of memory: lower trainer.meta_batch or set trainer.task_chunk (training), "
                "eval.tasks_per_batch (evaluation), or use a smaller dataset.* size")
    for e in chain:
        if isinstance(e, MissingConfigException) and e.options:
            first = str(e).strip().splitlines()[0]
            return f"{first}; available: {', '.join(sorted(e.options))}"
    from hydra.errors import InstantiationException

    def lines(e):  # every line of the message but OmegaConf's key-location trailer
        return [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()
                and not ln.strip().startswith(("full_key:", "reference_type=", "object_type="))]

    message = " ".join(lines(exc)) or type(exc).__name__
    if isinstance(exc, InstantiationException) and message.endswith(":") and chain[1:]:
        message += f" {type(chain[1]).__name__}: {' '.join(lines(chain[1]))}"
    for e in chain[1:]:  # OmegaConf's reason behind a Hydra error
        if isinstance(e, OmegaConfBaseException) and "$" not in str(e) and lines(e):
            if " ".join(lines(e)) not in message:
                message += ": " + " ".join(lines(e))
            break
        if isinstance(e, (OSError, TypeError, ValueError)) and str(e).strip() and str(e) not in message:
            message += f" ({' '.join(str(e).split())})"
            break
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and str(exc.filename) not in message:
        message += f" ({exc.filename})"
    return message


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of any device (CUDA's ``torch.OutOfMemoryError``, or the CPU
    allocator's RuntimeError), told without importing torch."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
