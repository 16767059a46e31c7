"""many_to_many over frames: a label for every frame of a clip (video: the action at each frame).

The activity model's shape (GateLSTM over steps, a head at every step) with a convolutional
frame encoder in front: each frame (with its difference from the previous one, see
`FrameEncoder`) becomes one step. With `bidirectional` a frame's label also sees later frames:
right for labelling a recorded clip, not a live feed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pipeline.models.base import RecurrentModule, core, head
from pipeline.models.encoders import FrameEncoder
from pipeline.models.many_to_many import ManyToMany, ManyToManyTopology


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


class VideoTopology(ManyToManyTopology):
    """many_to_many over frames (the video source's VARIANT): a clip in, an action per frame out."""

    model_class = FrameLabeller

    def settings(self, inputs: str) -> frozenset[str]:
        return frozenset({"model.bidirectional", "model.embedding_dim"})

    def evaluate(self, model, dm, split, plots, samples):
        from pipeline.models.vision import draw_strip

        metrics, baseline = super().evaluate(model, dm, split, plots, samples)
        draw_strip(model, dm, split, plots / "action_strip.png")
        return metrics, baseline

    def predict(self, pyfunc, model_input):
        from pipeline.models.vision import clip_inputs

        clips = clip_inputs(model_input, pyfunc.vocab["frame_shape"])
        labels = np.asarray(pyfunc.vocab["labels"], dtype=object)
        actions = [labels[pyfunc.model(torch.from_numpy(c)[None]).argmax(-1)[0].numpy()].tolist() for c in clips]
        return pd.DataFrame({"actions": pd.Series(actions, dtype=object),
                             "length": pd.Series([len(c) for c in clips], dtype=np.int64)})

    def cli_input(self, pyfunc, names, options):
        from pipeline.models import serving

        serving.no_options(pyfunc.info["task"], options)
        clips = []
        for _, x in serving.npy_files(names, pyfunc.info["task"]):  # a file: one clip (T, H, W) or (N, T, H, W)
            clips.extend(x if x.ndim == 4 else [x])
        return clips


VIDEO = VideoTopology()
