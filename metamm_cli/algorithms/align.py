"""``algorithm=align``: contrastive alignment of the modalities alone, scored like ProtoNet."""
from __future__ import annotations

from metamm_cli.algorithms.protonet import ProtoNet
from metamm_cli.crossmodal import Alignment


class AlignProtoNet(ProtoNet):
    """Trains with the symmetric InfoNCE alignment of a sample's modalities alone (CLIP,
    Radford et al. 2021; no episode labels are used, :class:`metamm_cli.crossmodal.Alignment`);
    the query logits are ProtoNet's, so validation and ``metamm eval`` measure few-shot accuracy
    in the aligned space. Use with ``mapping=linear|mlp`` and a sample-level fusion (``mean``)."""

    family = "cross-modal"

    def __init__(self, model, way, temperature: float = 0.07, **kwargs):
        super().__init__(model, way, **kwargs)
        self.align = Alignment(temperature)

    def forward(self, episode):
        _, logits = super().forward(episode)
        inputs, present = episode.samples()
        return self.align(self.encode_modalities(inputs, present), present), logits.detach()
