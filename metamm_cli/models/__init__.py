from metamm_cli.models.net import MultimodalNet, build_model

__all__ = ["MultimodalNet", "build_model"]
