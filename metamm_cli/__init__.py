"""metamm: an experiment runner for multimodal few-shot meta-learning."""

__version__ = "0.1.0"


class ConfigError(ValueError):
    """Bad user input: printed by the CLI as one line, naming the key or file and what is allowed."""
