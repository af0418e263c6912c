"""Reading safetensors lazily, a slice at a time (so each device reads only its shard), bf16 included.

The `safetensors` package's numpy reader cannot return bf16 slices, so tensors are memory-mapped here
from the documented layout: an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the raw bytes. Writing uses `safetensors.numpy.save_file`.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from jaxrl.errors import JaxrlError
from jaxrl.io import read_json

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
            files = _index_files(index)
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
                raise JaxrlError(f"{index} names {name}, which is missing from {directory}: the model is "
                                 f"incomplete; {REFETCH}")
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


REFETCH = "copy or download the model directory again (or export it again with save_pretrained)"


def _index_files(index: str) -> list[str]:
    """The shard files a `model.safetensors.index.json` names (its `weight_map` values)."""
    data = read_json(index, what="safetensors index", fix=REFETCH)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise JaxrlError(f"{index}: the safetensors index is malformed (no 'weight_map' object of tensor "
                         f"name -> shard file); {REFETCH}")
    return sorted(set(weight_map.values()))


def _read_header(path: str) -> dict:
    """{name: (path, dtype, shape, byte offset)} of one file, every tensor's bytes checked to be there.

    The layout is an 8-byte length n, n bytes of JSON, then the data; each tensor's `data_offsets`
    [begin, end) count from the end of the header and must hold prod(shape) * itemsize bytes. A file
    cut short fails here, naming the file, rather than as a memory map past its end later.
    """
    size = os.path.getsize(path)
    broken = f"{path} is corrupt or incomplete"
    if size < 8:
        raise JaxrlError(f"{broken}: {size} bytes, too short for a safetensors file (truncated); {REFETCH}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise JaxrlError(f"{broken}: its header says {n} bytes of metadata follow but the file has only "
                             f"{size - 8} (truncated, or not a safetensors file); {REFETCH}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JaxrlError(f"{broken}: its header is not valid JSON ({e}); {REFETCH}") from None
    if not isinstance(header, dict):
        raise JaxrlError(f"{broken}: its header is not a JSON object; {REFETCH}")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise JaxrlError(f"{broken}: tensor {name}'s header entry {info!r} lacks dtype, shape or "
                             f"data_offsets; {REFETCH}") from None
        if dtype not in _DTYPES:
            raise JaxrlError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != nbytes:
            raise JaxrlError(f"{broken}: tensor {name} of shape {shape} and dtype {dtype} needs {nbytes} bytes "
                             f"but its offsets [{begin}, {end}) span {end - begin}; {REFETCH}")
        if 8 + n + end > size:
            raise JaxrlError(f"{broken}: tensor {name} ends at byte {8 + n + end} but the file has only {size} "
                             f"bytes (truncated); {REFETCH}")
        out[name] = (path, _DTYPES[dtype], shape, 8 + n + begin)
    return out
