"""one_to_many from an image: a picture in, a sentence out (captions: an emoji -> its CLDR name).

The melody model's decoder (embedding -> GateLSTM -> head over the words), conditioned on an
image instead of a seed token: a `PixelPCAEncoder` (the image's whitened principal components, fitted on the
training images when fitting starts, then linear -> ReLU) maps the image to features that set
the decoder's initial state (h_0, c_0) of every layer and are read again beside every word
("par-inject"; Show and Tell feeds them once, as the first input). With the initial state alone the
decoder learned the caption language and ignored the image: every held-out emoji got the same caption.
The decoder's first input is <eos>, standing for "start of caption" (one symbol for both ends, as
in NeuralTalk). Training uses teacher forcing: step t reads true word t-1 and predicts word t,
the last prediction being <eos>; <unk> targets (words too rare to learn) add no loss, so the loss
measures the words the decoder has. Decoding (`caption`) is beam search (pipeline.models.beam) with
BEAM_SIZE and LENGTH_PENALTY, <pad> and <unk> never chosen; evaluation and serving both decode through it.
BEAM_SIZE 1 (greedy) was chosen on the validation emojis (BLEU-2, mean of 4 training seeds at the epoch val_loss
picks): greedy 0.049; beam 3 with length_penalty 0, 0.5, 1: 0.022, 0.042, 0.047; beam 5 with 0 and 1: 0.013,
0.042 (with the earlier convolutional encoder, 5 seeds: greedy 0.028, beam 3 0.025, beam 5 0.020). The model's
doubt is over which words, not how many: a wider beam finds likelier captions, not better ones.

    batch: image (B, H, W, 3) uint8, tokens (B, L) int64 (words, <eos>, <pad>...), lengths (B,) (words + 1)
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor, nn

from pipeline.models.base import core, masked_cross_entropy
from pipeline.models.beam import beam_search
from pipeline.models.encoders import PixelPCAEncoder
from pipeline.models.one_to_many import EOS, OneToMany, OneToManyTopology, one_thread

PAD, UNK = 0, 2  # prepared caption vocabularies: 0 <pad>, 1 <eos>, 2 <unk>
MAX_WORDS = 12  # a caption's length limit (the longest CLDR name has 8 words)
BEAM_SIZE = 1  # hypotheses kept while decoding: 1 is greedy (chosen on val BLEU-2; see the module docstring)
PCA_COMPONENTS = 32  # the image encoder's principal components (chosen on val BLEU-2: 16, 24, 32, 64, 128 tried)
LENGTH_PENALTY = 0.0  # beam ranking: log-probability / length ** LENGTH_PENALTY (no effect at BEAM_SIZE 1)


class ImageCaptioner(OneToMany):
    """vocab: tokens (the decoder's words), image_shape [H, W, C]; model.hidden_size, num_layers, embedding_dim."""

    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        super().__init__(vocab, dims, model, train)  # embed, head over vocab["tokens"]
        height, width, channels = vocab["image_shape"]
        cfg = self.model_cfg
        self.encoder = PixelPCAEncoder(channels, height, width, cfg.embedding_dim, components=PCA_COMPONENTS)
        self.lstm = core(2 * cfg.embedding_dim, cfg)  # each step reads [word embedding, image features]
        self.bridge = nn.Linear(cfg.embedding_dim, 2 * cfg.num_layers * cfg.hidden_size)  # -> (h_0, c_0) per layer

    def on_fit_start(self) -> None:
        # Training runs on one intra-op thread, as generation does (one_to_many.one_thread): batches of 32
        # captions of a few words are too small for a second thread to pay. On the shared 2-core machine
        # train@captions took 95.8 s of CPU on 2 threads and 13.9 s on 1; and the run no longer depends on the
        # machine's thread count (2 threads picked epoch 8 and scored test BLEU-2 0.035, 1 thread epoch 9, 0.040).
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        dm = self.trainer.datamodule
        if dm is not None and not bool(self.encoder.basis.any()):  # a resumed run has its components already
            self.fit_encoder(torch.as_tensor(dm.split("train")["image"]))

    def fit_encoder(self, images: Tensor) -> None:
        """Fit the image encoder's principal components on (N, H, W, C) training images (before training)."""
        self.encoder.fit(images.permute(0, 3, 1, 2))

    def on_fit_end(self) -> None:
        torch.set_num_threads(getattr(self, "_threads", torch.get_num_threads()))

    def encode(self, images: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(B, H, W, C) pixels -> (image features (B, embedding_dim), (h_0, c_0) each (num_layers, B, hidden))."""
        cfg = self.model_cfg
        feats = self.encoder(images.permute(0, 3, 1, 2))
        h, c = self.bridge(feats).reshape(images.shape[0], 2, cfg.num_layers, cfg.hidden_size).permute(1, 2, 0, 3)
        return feats, (torch.tanh(h).contiguous(), c.contiguous())

    def steps(self, tokens: Tensor, feats: Tensor) -> Tensor:
        """The decoder's inputs: each token's embedding beside the image features, (B, T, 2 * embedding_dim)."""
        return torch.cat([self.embed(tokens), feats[:, None].expand(-1, tokens.shape[1], -1)], -1)

    def forward(self, tokens: Tensor, state=None, lengths: Tensor | None = None, feats: Tensor | None = None):
        out, state = self.lstm(self.steps(tokens, feats), state, lengths=lengths)
        return self.head(out), state

    def teacher_forcing(self, batch) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs, targets, mask): <eos> then words 0..L-2 in; words 0..L-1 (ending in <eos>) out."""
        tokens, lengths = batch["tokens"], batch["lengths"]
        start = torch.full_like(tokens[:, :1], EOS)
        inputs = torch.cat([start, tokens[:, :-1]], 1)
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        return inputs, tokens, mask

    def loss_terms(self, batch):
        inputs, targets, mask = self.teacher_forcing(batch)
        feats, state = self.encode(batch["image"])
        logits, _ = self(inputs, state, lengths=batch["lengths"], feats=feats)
        return masked_cross_entropy(logits, targets, mask & (targets != UNK))

    def trace(self, batch):
        inputs, _, _ = self.teacher_forcing(batch)
        feats, state = self.encode(batch["image"])
        return self.lstm(self.steps(inputs, feats), state, lengths=batch["lengths"], return_gates=True)[2]

    def step_predictions(self, batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """As OneToMany.step_predictions, conditioned on the batch's images (every word is a step)."""
        inputs, targets, _ = self.teacher_forcing(batch)
        feats, state = self.encode(batch["image"])
        logits, _ = self(inputs, state, lengths=batch["lengths"], feats=feats)
        return inputs, batch["lengths"], targets, logits

    @torch.no_grad()
    def caption(self, images: Tensor, max_words: int = MAX_WORDS, beam_size: int = BEAM_SIZE,
                length_penalty: float = LENGTH_PENALTY) -> list[list[int]]:
        """Captions of (B, H, W, C) images by beam search (pipeline.models.beam; beam_size 1 is greedy): each a
        list of token ids, without <eos>, at most max_words; <pad> and <unk> are never chosen."""
        with one_thread():
            feats, state = self.encode(images)

            def step(tokens: Tensor, carried):
                feats, state = carried
                logits, state = self(tokens[:, None], state, feats=feats)
                return torch.log_softmax(logits[:, -1].float(), -1), (feats, state)

            def reorder(carried, index: Tensor):
                feats, (h, c) = carried
                return feats[index], (h[:, index], c[:, index])

            return beam_search(step, reorder, (feats, state), images.shape[0], EOS, EOS, beam_size, max_words,
                               length_penalty, banned=(PAD, UNK))


class CaptionsTopology(OneToManyTopology):
    """one_to_many from an image (the captions source's VARIANT): an image file in, a caption out; BLEU on
    held-out images against a nearest-neighbour and a most-frequent-caption baseline (pipeline.models.vision)."""

    model_class = ImageCaptioner
    key_metric, higher_is_better = "bleu", True
    explorer = "pipeline.explore:CaptionsExplorer"  # the caption's words beside its picture
    verbs = frozenset()
    max_generated = None

    def settings(self, inputs: str) -> frozenset[str]:
        return frozenset({"model.embedding_dim"})

    def evaluate(self, model, dm, split, plots, samples):
        from pipeline.models.vision import evaluate_captions

        return evaluate_captions(model, dm, split, plots, samples)

    def input_example(self, info, source_example):
        return source_example  # two emoji PNGs as base64 text (pipeline.datasets.captions.example)

    def predict(self, pyfunc, model_input):
        from pipeline.models.vision import caption_inputs, generate_captions

        images = caption_inputs(model_input, pyfunc.vocab["image_shape"])
        return pd.DataFrame({"caption": pd.Series(generate_captions(pyfunc.model, images) if len(images) else [],
                                                  dtype=object)})

    def cli_input(self, pyfunc, names, options):
        from pathlib import Path

        from pipeline.config import PipelineError
        from pipeline.models import serving

        serving.no_options(pyfunc.info["task"], options)
        for name in names:
            if not Path(name).is_file():
                raise PipelineError(f"{name}: no such file")
        return pd.DataFrame({"image": [Path(name).read_bytes() for name in names]})


CAPTIONS = CaptionsTopology()
