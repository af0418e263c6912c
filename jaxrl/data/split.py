"""DeepSpeed-Chat style data splits (`data.split: "2,4,4"`) and blending of several datasets.

Each dataset's rows are permuted by a seeded generator and cut into contiguous portions proportional to
the split weights, one per training step (1: SFT, 2: reward, 3: PPO). The portions are disjoint, cover
every row, and depend only on (number of rows, split, seed): `np.random.RandomState` is numpy's frozen
legacy generator, so the same seed gives the same permutation in every process and numpy version.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

from jaxrl.errors import JaxrlError

T = TypeVar("T")
_SPLIT_STREAM, _BLEND_STREAM = 0, 1  # separate generator streams for the two shuffles


def seeded_rng(seed: int, *stream: int) -> np.random.RandomState:
    """A reproducible generator for (seed, stream...): the same numbers in every process and version."""
    words = [seed % 2**32, seed // 2**32 % 2**32, *stream]
    return np.random.RandomState(np.asarray(words, dtype=np.uint32))


def parse_split(split: str) -> tuple[float, ...]:
    """`"2,4,4"` -> (2.0, 4.0, 4.0); non-negative weights with a positive sum."""
    try:
        weights = tuple(float(part) for part in str(split).split(","))
    except ValueError:
        raise JaxrlError(f'data.split={split!r} must be comma-separated numbers such as "2,4,4"') from None
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise JaxrlError(f"data.split={split!r} needs non-negative weights with a positive sum")
    return weights


def split_bounds(size: int, split: str) -> list[int]:
    """Cut points [0, ..., size] of the portions: round(size * cumulative weight share)."""
    weights = np.asarray(parse_split(split))
    bounds = np.rint(np.cumsum(weights) / weights.sum() * size).astype(int)
    bounds[-1] = size  # the float sum may fall a hair short of 1
    return [0, *bounds.tolist()]


def portion(rows: Sequence[T], split: str, step: int, seed: int) -> list[T]:
    """The rows that training step `step` (1-based) gets under `split`.

    Args:
      rows: all rows of one dataset.
      split: weights such as "2,4,4"; step k gets share weight[k-1] / sum.
      step: 1, 2, ... up to the number of weights.
      seed: the permutation seed (the run's `seed`).
    Returns:
      The portion, in permuted order.
    """
    bounds = split_bounds(len(rows), split)
    if not 1 <= step < len(bounds):
        raise JaxrlError(f"data.split={split!r} has {len(bounds) - 1} parts; step {step} has none")
    order = seeded_rng(seed, _SPLIT_STREAM).permutation(len(rows))
    return [rows[i] for i in order[bounds[step - 1] : bounds[step]]]


def blend(portions: Sequence[Sequence[T]], seed: int) -> list[T]:
    """Concatenates the portions of several datasets and shuffles them with `seed`."""
    rows = [row for part in portions for row in part]
    order = seeded_rng(seed, _BLEND_STREAM).permutation(len(rows))
    return [rows[i] for i in order]
