"""metamm: an experiment runner for multimodal few-shot meta-learning."""

from metamm_cli.errors import ConfigError  # noqa: F401 - the package's one error type, importable from here

__version__ = "0.1.0"
