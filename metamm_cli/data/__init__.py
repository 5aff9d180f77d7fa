from metamm_cli.data.base import MultimodalDataset
from metamm_cli.data.episodes import Episode, EpisodeSampler, ModalitySpec, SplitData

__all__ = ["MultimodalDataset", "Episode", "EpisodeSampler", "ModalitySpec", "SplitData"]
