"""The generation defaults and limits of the served models, in one place, light enough for the CLI's --help.

The caps keep one request well within MLflow's scoring timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT,
60 s by default), after which the server answers 504 while its worker keeps generating unseen. At the caps,
the default char LM (hidden 256) generated 4,000 characters in 7.9 s and the melody model 1,000 notes in
1.1 s, on this project's 2-core CPU while other jobs held it (load average 13).
"""

from __future__ import annotations

from typing import NamedTuple

MAX_CHARS = 4000  # charlm: `length` of a row, and of all rows of one request together
MAX_NOTES = 1000  # melody: the same in notes
MAX_SEED = 2**63 - 1


class Generation(NamedTuple):
    """One generation request: a row of a generator's input, or its defaults."""

    prime: str  # the text (charlm) or the seed note (melody) to start from
    length: int  # characters / notes to generate (melody stops early at its end token)
    temperature: float  # 0: greedy
    top_k: int | None  # sample among the top_k likeliest tokens; None: no cut
    seed: int | None  # random seed; None: unseeded


CHARLM = Generation(prime="ROMEO:", length=200, temperature=0.8, top_k=None, seed=None)
# Greedy melodies loop: from 158 of the 188 seed notes (84%) the default model's greedy line ended in a cycle of
# at most 8 notes repeated over its last 24; sampling at 0.8 among the 8 likeliest: 0 of 940 lines (5 seeds each).
MELODY = Generation(prime="", length=32, temperature=0.8, top_k=8, seed=None)
