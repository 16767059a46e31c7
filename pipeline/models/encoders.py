"""Image encoders that turn pictures into the vectors a GateLSTM reads or starts from.

`ImageEncoder`: a small convolutional encoder (two stride-2 3x3 convolutions, ReLU, a linear
layer), for every frame of a clip (video: one LSTM step per frame, via `FrameEncoder`) or one image.
`PixelPCAEncoder`: an image's whitened principal components (fitted on training images), then a linear
layer (captions: the decoder's initial state and per-step input). Pixels may come as uint8 (0..255) or as
floats already in [0, 1]; uint8 is scaled here, so prepared data and served inputs stay uint8.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def unit_pixels(x: Tensor) -> Tensor:
    """uint8 0..255 -> float32 0..1; floating inputs are taken as already in [0, 1]."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


class ImageEncoder(nn.Module):
    """(B, C, H, W) pixels -> (B, out_features).

    conv 3x3 stride 2 (C -> channels) -> ReLU -> conv 3x3 stride 2 (channels -> 2 channels) -> ReLU
    -> flatten (2 channels x ceil(H/4) x ceil(W/4)) -> linear -> ReLU, after standardising each channel
    with `mean` and `std` (of unit pixels; default none). No pooling: the flattened map keeps
    where things are, which the video task needs (motion is a change of place). For captions, average-pooling
    the map to 2x2 or 4x4 lowered val loss a little and BLEU on unseen emojis too (0.053 and 0.051 vs 0.067).
    """

    def __init__(self, in_channels: int, height: int, width: int, out_features: int, channels: int = 16,
                 mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.in_channels, self.height, self.width = in_channels, height, width
        # per-channel standardisation with the training images' statistics (unit pixels); not saved in the
        # weights: the model's vocab holds them
        self.register_buffer("mean", torch.tensor(mean or [0.0] * in_channels).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or [1.0] * in_channels).view(1, -1, 1, 1), persistent=False)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        flat = 2 * channels * ((height + 3) // 4) * ((width + 3) // 4)
        self.project = nn.Sequential(nn.Linear(flat, out_features), nn.ReLU())
        self.out_features = out_features

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.in_channels, self.height, self.width):
            raise ValueError(f"images must be (batch, {self.in_channels}, {self.height}, {self.width}), "
                             f"got {tuple(images.shape)}")
        return self.project(self.conv((unit_pixels(images) - self.mean) / self.std))


class FrameEncoder(nn.Module):
    """(B, T, H, W) grey frames -> (B, T, out_features): the same ImageEncoder on every frame.

    With `motion`, each frame is encoded together with its difference from the previous frame (0 for the
    first): two input channels, as two-stream video networks give the network motion explicitly. On the video
    task's default data, 5 epochs: per-frame test accuracy 0.997 with it, 0.600 without.
    """

    def __init__(self, height: int, width: int, out_features: int, channels: int = 16, motion: bool = True):
        super().__init__()
        self.motion = motion
        self.image = ImageEncoder(2 if motion else 1, height, width, out_features, channels)
        self.out_features = out_features

    def forward(self, frames: Tensor) -> Tensor:
        if frames.dim() != 4:
            raise ValueError(f"frames must be (batch, time, height, width), got {tuple(frames.shape)}")
        B, T, H, W = frames.shape
        x = unit_pixels(frames)
        if self.motion:
            x = torch.stack([x, x - torch.cat([x[:, :1], x[:, :-1]], 1)], 2)  # (B, T, 2, H, W)
        x = x.reshape(B * T, -1, H, W)
        return self.image(x).reshape(B, T, -1)


class PixelPCAEncoder(nn.Module):
    """(B, C, H, W) pixels -> (B, out_features): the image's whitened principal components, then linear -> ReLU.

    The components are fitted on the training images (`fit`, an SVD of the centred unit pixels; Turk & Pentland's
    eigenfaces, whitened) and kept as buffers, so they travel with the weights. Distances between PCA codes
    follow distances in pixel space, where similar emojis lie close (the nearest-neighbour baseline's view), and
    the learned part is a small linear map from a few codes, which a thousand captions can fit without learning
    the training images by heart. On the captions task (32x32, 1,043 training emojis; val BLEU-2 over 4 seeds at
    the epoch val_loss picks) it scored 0.050 with 32 components and 0.040 with 64, against 0.028 for the
    two-convolution ImageEncoder. Until `fit` runs the codes are all 0.
    """

    def __init__(self, in_channels: int, height: int, width: int, out_features: int, components: int = 32):
        super().__init__()
        self.in_channels, self.height, self.width, self.components = in_channels, height, width, components
        pixels = in_channels * height * width
        self.register_buffer("center", torch.zeros(pixels))
        self.register_buffer("basis", torch.zeros(pixels, components))  # columns: components / singular value
        self.project = nn.Sequential(nn.Linear(components, out_features), nn.ReLU())
        self.out_features = out_features

    def _flat(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.in_channels, self.height, self.width):
            raise ValueError(f"images must be (batch, {self.in_channels}, {self.height}, {self.width}), "
                             f"got {tuple(images.shape)}")
        return unit_pixels(images).reshape(images.shape[0], -1)

    @torch.no_grad()
    def fit(self, images: Tensor) -> None:
        """Set the components from (N, C, H, W) training images (N >= 2); with fewer images than components the
        rest stay 0. Whitened: each code has unit variance over the training images. Computed from the
        eigenvectors of the smaller of the two Gram matrices (N x N or pixels x pixels), in float64: the same
        components as an SVD of the centred images, in a fifth of the time for 1,043 images of 3,072 values."""
        x = self._flat(images).double()
        n = len(x)
        if n < 2:
            raise ValueError(f"fitting the principal components needs at least 2 images, got {n}")
        center = x.mean(0)
        x = x - center
        if n <= x.shape[1]:  # x x^T = U S^2 U^T, and the components are V = x^T U / S
            values, vectors = torch.linalg.eigh(x @ x.T)
            values, vectors = values.flip(0), vectors.flip(1)
            k = min(self.components, int((values > 1e-12 * values[0]).sum()))
            singular = values[:k].sqrt()
            components = x.T @ vectors[:, :k] / singular
        else:  # x^T x = V S^2 V^T
            values, vectors = torch.linalg.eigh(x.T @ x)
            values, vectors = values.flip(0), vectors.flip(1)
            k = min(self.components, int((values > 1e-12 * values[0]).sum()))
            singular, components = values[:k].sqrt(), vectors[:, :k]
        self.center.copy_(center.float())
        self.basis.zero_()
        self.basis[:, :k] = (components / singular * (n - 1) ** 0.5).float()

    def forward(self, images: Tensor) -> Tensor:
        return self.project((self._flat(images) - self.center) @ self.basis)
