"""many_to_many over frames: a label for every frame of a clip (video: the action at each frame).

The activity model's shape (GateLSTM over steps, a head at every step) with a convolutional
frame encoder in front: each frame (with its difference from the previous one, see
`FrameEncoder`) becomes one step. With `bidirectional` a frame's label also sees later frames:
right for labelling a recorded clip, not a live feed.
"""

from __future__ import annotations

from torch import Tensor

from pipeline.models.base import RecurrentModule, core, head
from pipeline.models.encoders import FrameEncoder
from pipeline.models.many_to_many import ManyToMany


class FrameLabeller(ManyToMany):
    """x (B, T, H, W) uint8 or [0, 1] float frames -> logits (B, T, classes). vocab: labels, frame_shape."""

    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        RecurrentModule.__init__(self, vocab, dims, model, train)
        cfg = self.model_cfg
        height, width = vocab["frame_shape"]
        self.encoder = FrameEncoder(height, width, cfg.embedding_dim)
        self.lstm = core(cfg.embedding_dim, cfg, bidirectional=cfg.bidirectional)
        self.head = head(cfg, len(vocab["labels"]), (2 if cfg.bidirectional else 1) * cfg.hidden_size)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        out, _ = self.lstm(self.encoder(x), lengths=lengths)
        return self.head(out)

    def trace(self, batch):
        return self.lstm(self.encoder(batch["x"]), lengths=batch.get("lengths"), return_gates=True)[2]
