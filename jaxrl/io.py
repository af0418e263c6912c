"""Reading the small JSON and YAML files a user hands over (configs, indexes, tokenizer files), with
errors that name the file, say what is wrong with it, and say how to fix it.

A file cut short (an interrupted download, copy or write) is the usual cause of a parse error in a file
that some program wrote, so when the parser stops at the very end of the text the message says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import yaml

from jaxrl.errors import JaxrlError


def read_json(path: str | os.PathLike, *, what: str, fix: str, expect: type | None = dict) -> Any:
    """The JSON value in `path`.

    Args:
      path: the file.
      what: what the file is, for the message (e.g. "model config").
      fix: how the user repairs it (e.g. "download the model again").
      expect: the type the top-level value must have (`None`: any).
    Raises:
      JaxrlError: the file is missing or unreadable, is not valid JSON (corrupt or incomplete), or holds
        another type than `expect`.
    """
    text = _read_text(path, what, fix)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{e.msg} at line {e.lineno} column {e.colno}"
        raise JaxrlError(_broken(path, what, fix, where, at_end=e.pos >= len(text.rstrip()))) from None
    _check_type(data, path, what, fix, expect)
    return data


def read_yaml(path: str | os.PathLike, *, what: str, fix: str, expect: type | None = dict) -> Any:
    """The YAML value in `path` (an empty file reads as `None`); errors as in `read_json`."""
    text = _read_text(path, what, fix)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        where = problem if mark is None else f"{problem} at line {mark.line + 1} column {mark.column + 1}"
        at_end = mark is not None and mark.index >= len(text.rstrip())
        raise JaxrlError(_broken(path, what, fix, where, at_end=at_end, kind="YAML")) from None
    if data is not None:
        _check_type(data, path, what, fix, expect)
    return data


def check_json_files(directory: str | os.PathLike, names: Iterable[str], *, what: str, fix: str) -> None:
    """Raises the `read_json` error of the first file among `names` in `directory` that does not parse.

    Used after a library (transformers, tokenizers) failed on a directory, to name the broken file
    instead of passing on the library's bare `JSONDecodeError`.
    """
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            read_json(path, what=what, fix=fix, expect=None)


def _read_text(path, what, fix) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise JaxrlError(f"{what} {path} does not exist; {fix}") from None
    except UnicodeDecodeError as e:
        raise JaxrlError(f"{path}: the {what} is corrupt (not UTF-8 text: {e.reason} at byte {e.start}); "
                         f"{fix}") from None
    except OSError as e:
        raise JaxrlError(f"cannot read {what} {path}: {e.strerror}") from None


def _broken(path, what, fix, where, *, at_end: bool, kind: str = "JSON") -> str:
    if at_end:
        cause = "the text stops before the value is complete, so the file was cut short (truncated)"
    else:
        cause = "it was damaged or edited by hand"
    return f"{path}: the {what} is corrupt or incomplete (not valid {kind}: {where}; {cause}); {fix}"


def _check_type(data, path, what, fix, expect) -> None:
    if expect is not None and not isinstance(data, expect):
        name = {dict: "an object (mapping)", list: "a list"}.get(expect, expect.__name__)
        raise JaxrlError(f"{path}: the {what} must hold {name}, got {type(data).__name__}; {fix}")
