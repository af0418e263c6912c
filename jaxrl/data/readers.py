"""Read local dataset files into rows that remember where they came from.

Supported inputs: JSONL (`.jsonl`, one JSON object per line), JSON (`.json`, a list of objects or
`{"data": [...]}`), parquet (`.parquet`, needs `pyarrow`) and directories written by
`datasets.Dataset.save_to_disk` (need `datasets`). The optional libraries are imported only when such a
file is read, because the GPU image has neither.

Line numbers are 1-based (as editors show them); row numbers of JSON lists, parquet files and HF
datasets are 0-based indices (as `dataset[i]` takes them).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Sequence

from jaxrl.errors import JaxrlError


@dataclasses.dataclass(frozen=True)
class Row:
    """One record of a dataset file.

    Attributes:
      data: the record's fields as read (a JSON object).
      file: the path of the file it came from, as given.
      where: its place in that file: "line 7" or "row 3".
    """

    data: dict[str, Any]
    file: str
    where: str

    @property
    def origin(self) -> str:
        """`"data.jsonl line 7"`: what error messages name."""
        return f"{self.file} {self.where}"


def read_rows(path: str | os.PathLike) -> list[Row]:
    """Reads every record of one local dataset file or saved HF dataset directory.

    Args:
      path: a `.jsonl`, `.json` or `.parquet` file, or a `save_to_disk` directory.
    Returns:
      The rows in file order.
    Raises:
      JaxrlError: the path is missing, of an unknown kind, or holds something that is not a list of
        JSON objects (the message names the file and line/row).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise JaxrlError(f"data file not found: {path} (check data.path)")
    if os.path.isdir(path):
        return _read_hf_directory(path)
    suffix = os.path.splitext(path)[1].lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    if suffix not in readers:
        raise JaxrlError(
            f"{path}: unknown data file type {suffix or '(none)'!r}; "
            "use .jsonl, .json, .parquet or a directory saved by datasets.save_to_disk"
        )
    return readers[suffix](path)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise JaxrlError(f"{path}: not UTF-8 text ({e})") from e
    except OSError as e:
        raise JaxrlError(f"{path}: cannot read ({e.strerror})") from e


def _checked(data: Any, path: str, where: str) -> Row:
    if not isinstance(data, dict):
        raise JaxrlError(f"{path} {where}: expected a JSON object, got {type(data).__name__}")
    return Row(data, path, where)


def _read_jsonl(path: str) -> list[Row]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise JaxrlError(f"{path} line {number}: invalid JSON ({e.msg} at column {e.colno})") from e
        rows.append(_checked(data, path, f"line {number}"))
    return rows


def _read_json(path: str) -> list[Row]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise JaxrlError(f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise JaxrlError(f'{path}: expected a JSON list of records or {{"data": [...]}}')
    return [_checked(item, path, f"row {i}") for i, item in enumerate(data)]


def _import(module: str, path: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise JaxrlError(f"{path}: reading this needs `{package}`: pip install {package}") from e


def _rows_from_records(records: Sequence[Any], path: str) -> list[Row]:
    return [_checked(item, path, f"row {i}") for i, item in enumerate(records)]


def _read_parquet(path: str) -> list[Row]:
    parquet = _import("pyarrow.parquet", path, "pyarrow")
    try:
        table = parquet.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise JaxrlError(f"{path}: cannot read parquet ({e})") from e
    return _rows_from_records(table.to_pylist(), path)


def _read_hf_directory(path: str) -> list[Row]:
    markers = ("dataset_dict.json", "state.json")
    if not any(os.path.exists(os.path.join(path, m)) for m in markers):
        raise JaxrlError(
            f"{path}: a directory must be saved by datasets.save_to_disk (no dataset_dict.json or "
            "state.json found); point data.path at a .jsonl/.json/.parquet file instead"
        )
    datasets = _import("datasets", path, "datasets")
    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset.keys())
        if "train" in dataset:
            dataset = dataset["train"]
        elif len(splits) == 1:
            dataset = dataset[splits[0]]
        else:
            raise JaxrlError(f"{path}: holds splits {splits} and none is 'train'; save the one to use")
    return _rows_from_records(dataset.to_list(), path)
