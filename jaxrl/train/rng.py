"""Named random streams: every consumer of randomness derives its key (or numpy seed) from the run's
seed and a name, never from an offset such as `seed + 7`, so two streams cannot meet by arithmetic."""

from __future__ import annotations

import zlib

import jax


def _name_id(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def rng_stream(seed: int, name: str, *ids: int):
    """A named RNG stream: key(seed) folded with the name's CRC-32, then with each id in turn (nested
    `fold_in`, so (step, batch, round) never collide as a flat `step * 1000 + batch` would)."""
    key = jax.random.fold_in(jax.random.key(seed), _name_id(name))
    for i in ids:
        key = jax.random.fold_in(key, i)
    return key


def numpy_seed(seed: int, name: str) -> int:
    """A named integer seed for the numpy shufflers (`jaxrl.data.split.seeded_rng` reads its low and high
    32-bit words): the run's seed below, the name's CRC-32 above, so it differs from the bare seed."""
    return seed % 2**32 + _name_id(name) * 2**32
