"""Reading safetensors lazily, a slice at a time (so each device reads only its shard), bf16 included.

The `safetensors` package's numpy reader cannot return bf16 slices, so tensors are memory-mapped here
from the documented layout: an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the raw bytes. Writing uses `safetensors.numpy.save_file`.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from jaxrl.errors import JaxrlError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class TensorStore:
    """Every tensor of an HF directory's `model.safetensors` or sharded `model.safetensors.index.json`."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            pickled = [n for n in ("pytorch_model.bin", "model.bin") if os.path.exists(os.path.join(directory, n))]
            hint = (f" It holds {pickled[0]}, a pickle, which jaxrl never loads: convert it to safetensors "
                    "with transformers (`model.save_pretrained(dir, safe_serialization=True)`).") if pickled else ""
            raise JaxrlError(f"{directory} has no model.safetensors or model.safetensors.index.json.{hint}")
        self._entries = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                raise JaxrlError(f"{index} names {name}, which is missing from {directory}")
            self._entries.update(_read_header(path))

    def keys(self):
        return self._entries.keys()

    def shape(self, name) -> tuple[int, ...]:
        return self._entries[name][2]

    def get(self, name) -> np.ndarray:
        """A read-only memory map of the tensor: slicing it reads only the bytes of that slice."""
        path, dtype, shape, start = self._entries[name]
        return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape) if shape else \
            np.fromfile(path, dtype=dtype, count=1, offset=start).reshape(())


def _read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise JaxrlError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        out[name] = (path, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + info["data_offsets"][0])
    return out
