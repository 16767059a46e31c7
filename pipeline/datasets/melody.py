"""melody: soprano lines of the Bach chorales in music21's bundled corpus.

One token per note or rest, pitch and duration together: "C5|1.0", "E-4|0.5", "rest|1.0"
(tied notes merged, grace notes dropped, the top note of a rare soprano chord). Each melody
is cut to `max_notes` tokens and ends with <eos>:

    tokens (N, T) int64: the melody, <eos> (1), then <pad> (0) to the split's longest
    lengths (N,) int64: tokens before the padding, <eos> included

Pieces come in Riemenschneider order (music21's `chorales.Iterator`, the 371 chorales are
350 distinct files), the first `max_pieces` are parsed, melodies identical after the cut are
kept once (so no melody is in two splits), and the split is by piece, seeded.

The vocabulary is built from every kept piece, not the training split only: it is a closed
set of pitch/duration symbols, and a symbol first seen in val/test has no sensible <unk>.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import ClassVar

import numpy as np
from pydantic import Field

from pipeline.batch import SEQUENCE_SPECIALS
from pipeline.config import SplitData
from pipeline.datasets.common import pad, require_module, source, split_indices
from pipeline.datasets.prepared import Prepared

TOPOLOGY = "one_to_many"  # the topology these data feed (pipeline/topologies.py)


class MelodyData(SplitData):
    inputs: ClassVar[str] = "tokens"
    source: str = "melody"
    max_pieces: int = Field(371, gt=0)  # Riemenschneider's 371 Bach chorales: 350 distinct files in music21
    max_notes: int = Field(64, ge=2)  # seed note + up to max_notes - 1 generated
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)


Data = MelodyData  # the `data` section's schema (pipeline.sources)

PAD, EOS = SEQUENCE_SPECIALS  # ids 0, 1: pipeline.batch.PAD, SEQUENCE_EOS
PROGRESS_EVERY = 25


def piece_names() -> list[str]:
    """The distinct chorale files in Riemenschneider order (e.g. 'bach/bwv269')."""
    corpus = require_module("music21.corpus", "pip install music21")
    names = corpus.chorales.Iterator(numberingSystem="riemenschneider", returnType="filename")
    return list(dict.fromkeys(names))


def _duration(quarter_length) -> str:
    return str(round(float(quarter_length), 4))


def soprano_tokens(name: str) -> list[str]:
    """The soprano line of one chorale as "pitch|duration" tokens."""
    music21 = require_module("music21", "pip install music21")
    score = music21.corpus.parse(name, forceSource=True)  # forceSource: no pickle cache written
    parts = list(score.parts)
    soprano = next((p for p in parts if str(p.id).lower().startswith("soprano")), parts[0])
    tokens = []
    for el in soprano.stripTies().flatten().notesAndRests:
        if el.duration.quarterLength <= 0:  # grace notes
            continue
        if el.isRest:
            pitch = "rest"
        elif el.isChord:
            pitch = max(el.pitches, key=lambda p: p.ps).nameWithOctave
        else:
            pitch = el.pitch.nameWithOctave
        tokens.append(f"{pitch}|{_duration(el.duration.quarterLength)}")
    return tokens


def parse_all(names: list[str]):
    """soprano_tokens of each chorale, in order: parsed on every core (music21 parses about 20 a second on one),
    in worker processes (parsing is pure Python: threads would share one core)."""
    workers = min(len(os.sched_getaffinity(0)), len(names))
    if workers < 2:
        yield from map(soprano_tokens, names)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(soprano_tokens, names, chunksize=4)


def build(cfg: MelodyData, seed: int) -> Prepared:
    names = piece_names()[: cfg.max_pieces]
    melodies: dict[tuple[str, ...], str] = {}  # melody (cut) -> first piece that has it
    for i, (name, tokens) in enumerate(zip(names, parse_all(names), strict=True), 1):
        melody = tuple(tokens[: cfg.max_notes])
        if melody:
            melodies.setdefault(melody, name)
        if i % PROGRESS_EVERY == 0 or i == len(names):
            print(f"melody: parsed {i}/{len(names)} chorales", file=sys.stderr, flush=True)
    kept = list(melodies)
    vocab = [PAD, EOS, *sorted({tok for melody in kept for tok in melody})]
    index = {tok: i for i, tok in enumerate(vocab)}

    rng = np.random.default_rng(seed)
    parts = split_indices(len(kept), cfg.val_fraction, cfg.test_fraction, rng)
    splits = {}
    for split, idx in parts.items():
        tokens, lengths = pad([[index[t] for t in kept[i]] + [index[EOS]] for i in idx])
        splits[split] = {"tokens": tokens, "lengths": lengths}
    return Prepared(
        splits=splits,
        vocab={"tokens": vocab},
        source=source(
            "music21",
            "BSD-3-Clause (music21 corpus); Bach's chorales are public domain",
            "Soprano lines of the Bach chorales (Riemenschneider) in music21's bundled corpus.",
        ),
        stats={
            "unit": "melodies",
            "pieces": {"parsed": len(names), "distinct_melodies": len(kept)},
            "split_pieces": {split: [melodies[kept[i]] for i in idx] for split, idx in parts.items()},
        },
    )
