"""Deterministic, resumable, shardable batches over fixed-shape example arrays.

Epoch e visits the rows in the order `seeded_rng(seed, 2, e).permutation(N)` and cuts it into
`N // batch_size` global batches (the tail that does not fill a batch is left out, so every batch has
the same shape and nothing recompiles). With `shard(p, P)`, process p yields rows
[p * B/P, (p+1) * B/P) of every global batch: P processes together see exactly the one-process batches.
The position is `{"epoch": e, "index": i}` (the next batch to yield), saved with checkpoints.

With `pad_last` (evaluation) nothing is left out: there are `ceil(N / batch_size)` batches, the last
one filled up with copies of the first row, and every batch carries `valid` (rows,) float32: 1 for a
real row, 0 for a copy. Losses weight rows by `valid`, so the copies contribute nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from jaxrl.data.split import seeded_rng
from jaxrl.errors import JaxrlError

_EPOCH_STREAM = 2  # generator stream of the epoch shuffles (split.py uses 0 and 1)


@dataclasses.dataclass(eq=False)
class BatchIterator:
    """Endless (or `num_epochs`-long) iterator of batch dicts `{key: array (local_batch_size, ...)}`.

    Attributes:
      arrays: example arrays with a shared leading dimension N (e.g. `Tokenized.arrays`).
      batch_size: the global batch size B (rows over all processes).
      seed: the shuffle seed; the order of epoch e depends only on (seed, e, N).
      shuffle: shuffle each epoch (off for evaluation: rows in order).
      num_epochs: stop after this many epochs; None runs forever.
      process_index, process_count: which contiguous slice of each global batch this process reads.
      pad_last: keep the tail that does not fill a batch, padded, with a `valid` row mask (evaluation);
        the dataset may then be smaller than one batch.
    """

    arrays: dict[str, np.ndarray]
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    process_index: int = 0
    process_count: int = 1
    pad_last: bool = False
    epoch: int = 0
    index: int = 0
    _order_cache: tuple[int, np.ndarray] | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        sizes = {k: len(v) for k, v in self.arrays.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"arrays need one shared leading dimension, got {sizes}")
        if self.batch_size < 1 or self.batch_size % self.process_count:
            raise JaxrlError(
                f"train.batch_size={self.batch_size} must be a positive multiple of the "
                f"{self.process_count} processes"
            )
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index={self.process_index} is not in [0, {self.process_count})")
        if self.size < (1 if self.pad_last else self.batch_size):
            raise JaxrlError(
                f"the dataset has {self.size} examples, fewer than train.batch_size={self.batch_size}"
            )

    @property
    def size(self) -> int:
        """N, the number of examples."""
        return len(next(iter(self.arrays.values())))

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch."""
        if self.pad_last:
            return -(-self.size // self.batch_size)
        return self.size // self.batch_size

    def shard(self, process_index: int, process_count: int) -> BatchIterator:
        """The same iterator, at the same position, reading only process `process_index`'s rows."""
        return dataclasses.replace(self, process_index=process_index, process_count=process_count)

    def state(self) -> dict[str, int]:
        """The position of the next batch, for checkpoints."""
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        """Continues from a `state()`: the next batch is the one that would have followed."""
        epoch, index = state.get("epoch"), state.get("index")
        valid = isinstance(epoch, int) and isinstance(index, int) and epoch >= 0
        if not (valid and 0 <= index < self.steps_per_epoch):
            raise JaxrlError(
                f"the checkpoint's data position {state} does not fit this dataset ({self.steps_per_epoch} "
                "batches per epoch); resume with the same data, split, seed and batch size"
            )
        self.epoch, self.index = epoch, index

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        local = self.batch_size // self.process_count
        start = self.index * self.batch_size + self.process_index * local
        positions = np.arange(start, start + local)  # in this epoch's order; >= N only with pad_last
        real = positions < self.size
        rows = self._order(self.epoch)[np.where(real, positions, 0)]
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        batch = {k: v[rows] for k, v in self.arrays.items()}
        if self.pad_last:
            batch["valid"] = real.astype(np.float32)
        return batch

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, seeded_rng(self.seed, _EPOCH_STREAM, epoch).permutation(self.size))
        return self._order_cache[1]
