"""From `data.path` to the records one training step reads: read, split, normalise, blend.

The split is taken over the raw rows of each file (as DeepSpeed-Chat does), so a step's portion does not
depend on which rows of other portions are malformed or on the tokenizer.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from jaxrl.data import formats, readers, split as split_lib
from jaxrl.errors import JaxrlError

log = logging.getLogger(__name__)


def load_records(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    need: formats.Need,
    fmt: str = "auto",
    split: str | None = None,
    step: int | None = None,
    seed: int = 0,
    tokenizer: Any = None,
    skip_bad_rows: bool = False,
) -> formats.Parsed:
    """Reads the records that one step trains on.

    Args:
      paths: one dataset file/directory or several, blended.
      need: "sft", "reward" or "prompt" (see `formats.parse_rows`).
      fmt: `data.format`; with `auto` each file's format is detected from its first row.
      split: `data.split` such as "2,4,4"; None reads every row.
      step: which portion of the split (1, 2 or 3); required with `split`.
      seed: the split and blend seed.
      tokenizer: needed by the `conversation` format.
      skip_bad_rows: skip (and count, and log) malformed rows instead of raising.
    Returns:
      The records (blended with a seeded shuffle when there are several files) and the skip count.
    Raises:
      JaxrlError: a read/format error, or no records left (naming the files and why).
    """
    paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise JaxrlError("data.path names no files")
    if split is not None and step is None:
        raise ValueError("a split needs the step whose portion to read")
    parts, total, taken, skipped, first_problem = [], 0, 0, 0, ""
    for path in paths:
        rows = readers.read_rows(path)
        total += len(rows)
        if fmt == "auto" and rows:
            file_fmt = formats.detect_format(rows[0])  # from the first row, before the split moves it
        else:
            file_fmt = fmt
        if split is not None:
            rows = split_lib.portion(rows, split, step, seed)
        taken += len(rows)
        parsed = formats.parse_rows(rows, file_fmt, need, tokenizer=tokenizer, skip_bad_rows=skip_bad_rows)
        parts.append(parsed.records)
        skipped += parsed.skipped
        first_problem = first_problem or parsed.first_problem
    if skipped:
        log.warning("skipped %d malformed rows of %s; first: %s", skipped, ", ".join(paths), first_problem)
    records = parts[0] if len(parts) == 1 else split_lib.blend(parts, seed)
    if not records:
        why = _why_empty(total, taken, skipped, first_problem, split, step)
        raise JaxrlError(f"no usable data in {', '.join(paths)}: {why}")
    return formats.Parsed(records, skipped, first_problem)


def _why_empty(
    total: int, taken: int, skipped: int, first_problem: str, split: str | None, step: int | None
) -> str:
    if total == 0:
        return "the files hold no rows"
    if taken == 0:
        return f"data.split={split!r} gives step {step} none of the {total} rows"
    return f"all {skipped} rows of this portion are malformed (first: {first_problem})"
