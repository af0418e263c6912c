"""Dataset formats: raw rows -> normalised prompt/response or preference records.

`data.format` values and the columns each reads:
- `prompt_chosen_rejected`: `prompt`, `chosen`, `rejected` (DeepSpeed-Chat's local jsonfile) -> preference.
- `rm_static`: `prompt`, `response`, `chosen`, `rejected` (Dahoas/rm-static; `response` repeats
  `chosen` and is not read) -> preference.
- `hh_rlhf`: `chosen`, `rejected`, whole `\\n\\nHuman:`/`\\n\\nAssistant:` transcripts
  (Anthropic/hh-rlhf) -> preference, split at the last assistant turn they share.
- `conversation`: `messages` and/or `chosen`/`rejected` as message lists, rendered by the tokenizer's
  chat template -> prompt/response, prompt-only or preference.
- `prompt_response`: `prompt` and, for SFT, `response` -> prompt/response or prompt-only.

`auto` picks one from the columns of the first row of each file (`detect_format`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import numpy as np

from jaxrl.data.readers import Row
from jaxrl.errors import JaxrlError

Need = Literal["sft", "reward", "prompt"]
NEEDS = ("sft", "reward", "prompt")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A prompt and, for SFT, its response (None for prompt-only PPO rows).

    `fields` holds a prompt-only row's other scalar columns (e.g. GSM8K's `answer`), untokenized: what
    the GRPO family's reward functions receive as keyword arguments (`row_fields`)."""

    prompt: str
    response: str | None
    origin: str
    fields: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) response."""

    prompt: str
    chosen: str
    rejected: str
    origin: str


Record = PromptRecord | PreferenceRecord


class BadRow(ValueError):
    """A row that does not fit its format; `parse_rows` turns it into an error naming the row, or skips it."""


def _text(data: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    if key not in data:
        raise BadRow(f"missing column {key!r} (has {sorted(data)})")
    value = data[key]
    if not isinstance(value, str):
        raise BadRow(f"column {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow(f"column {key!r} is empty")
    return value


def _prompt_chosen_rejected(data: dict[str, Any], tokenizer: Any) -> Record:
    del tokenizer
    return PreferenceRecord(_text(data, "prompt"), _text(data, "chosen"), _text(data, "rejected"), "")


def _hh_rlhf(data: dict[str, Any], tokenizer: Any) -> Record:
    """Splits two transcripts at the last `\\n\\nAssistant:` inside their longest common prefix."""
    del tokenizer
    chosen, rejected = _text(data, "chosen"), _text(data, "rejected")
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(ASSISTANT, 0, common)
    if cut < 0:
        raise BadRow(f"chosen and rejected share no prefix ending in {ASSISTANT!r}")
    cut += len(ASSISTANT)
    prompt, good, bad = chosen[:cut], chosen[cut:], rejected[cut:]
    if HUMAN not in prompt:
        raise BadRow(f"the shared prompt has no {HUMAN!r} turn")
    if not good.strip() or not bad.strip():
        raise BadRow("chosen or rejected has an empty last assistant turn")
    return PreferenceRecord(prompt, good, bad, "")


def _prompt_response(data: dict[str, Any], tokenizer: Any) -> Record:
    del tokenizer
    response = _text(data, "response") if "response" in data else None
    return PromptRecord(_text(data, "prompt"), response, "")


def _messages(data: dict[str, Any], key: str) -> list[dict[str, str]]:
    value = data[key]
    if not isinstance(value, list) or not value:
        raise BadRow(f"column {key!r} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRow(f"{key}[{i}] must be an object with string 'role' and 'content'")
    return value


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat template applied to `messages`, ending with the generation prompt."""
    if not messages:
        raise BadRow("no messages before the last assistant message")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises TemplateError and friends for bad messages
        raise BadRow(f"chat template failed: {e}") from e


def _split_last_turn(messages: list[dict[str, str]], key: str) -> tuple[list[dict[str, str]], str]:
    if messages[-1]["role"] != "assistant":
        raise BadRow(f"{key} must end with an assistant message")
    response = messages[-1]["content"]
    if not response.strip():
        raise BadRow(f"the last assistant message of {key} is empty")
    return messages[:-1], response


def _conversation(data: dict[str, Any], tokenizer: Any) -> Record:
    """`messages` alone: SFT (ends with assistant) or prompt-only; with `chosen`/`rejected`: preference.

    `chosen`/`rejected` continue `messages` when it is given, else they are whole conversations whose
    messages before the last assistant turn must agree.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise JaxrlError("data.format=conversation needs a tokenizer with a chat_template")
    context = _messages(data, "messages") if "messages" in data else []
    if "chosen" in data or "rejected" in data:
        (head, good), (other, bad) = (
            _split_last_turn(context + _messages(data, key), key) for key in ("chosen", "rejected")
        )
        if head != other:
            raise BadRow("chosen and rejected differ before their last assistant message")
        return PreferenceRecord(_render(tokenizer, head), good, bad, "")
    if "messages" not in data:
        raise BadRow(f"missing column 'messages' (has {sorted(data)})")
    if context[-1]["role"] == "assistant":
        head, response = _split_last_turn(context, "messages")
        return PromptRecord(_render(tokenizer, head), response, "")
    return PromptRecord(_render(tokenizer, context), None, "")


PARSERS: dict[str, Callable[[dict[str, Any], Any], Record]] = {
    "prompt_chosen_rejected": _prompt_chosen_rejected,
    "rm_static": _prompt_chosen_rejected,
    "hh_rlhf": _hh_rlhf,
    "conversation": _conversation,
    "prompt_response": _prompt_response,
}
FORMATS = ("auto", *PARSERS)


def detect_format(row: Row) -> str:
    """The format that fits the columns of `row` (the first row of a file)."""
    columns = set(row.data)
    if "messages" in columns or isinstance(row.data.get("chosen"), list):
        return "conversation"
    if {"prompt", "chosen", "rejected"} <= columns:
        return "rm_static" if "response" in columns else "prompt_chosen_rejected"
    if {"chosen", "rejected"} <= columns:
        return "hh_rlhf"
    if "prompt" in columns:
        return "prompt_response"
    raise JaxrlError(
        f"{row.origin}: data.format=auto cannot tell the format from columns {sorted(columns)}; "
        f"set data.format to one of {list(PARSERS)}"
    )


def _for_need(record: Record, need: Need) -> Record:
    """Adapts a record to what a step reads: SFT trains on prompt+chosen (as DeepSpeed-Chat does)."""
    if need == "reward":
        if not isinstance(record, PreferenceRecord):
            raise BadRow("no chosen/rejected pair, which the reward step needs")
        return record
    if need == "sft":
        if isinstance(record, PreferenceRecord):
            return PromptRecord(record.prompt, record.chosen, record.origin)
        if record.response is None:
            raise BadRow("no response, which SFT needs")
        return record
    return PromptRecord(record.prompt, None, record.origin)


# Columns a format reads as the prompt or a response; every other scalar column is a row field.
_TEXT_COLUMNS = frozenset({"prompt", "response", "chosen", "rejected", "messages"})


def row_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The row's scalar columns (strings, numbers, booleans, nulls) other than the prompt and responses,
    numpy scalars (parquet's) as Python ones; lists and objects are left out (reward functions get
    per-row scalars)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, np.generic):  # a numpy scalar (a dataset saved with numpy types)
            value = value.item()
        if key not in _TEXT_COLUMNS and (value is None or isinstance(value, (str, int, float, bool))):
            out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class Parsed:
    """Records of one or more files, with the malformed rows that were skipped.

    Attributes:
      records: the normalised records, in row order.
      skipped: how many malformed rows were skipped (only with `skip_bad_rows`).
      first_problem: the first skipped row and its problem, for messages; "" when none.
    """

    records: list[Record]
    skipped: int = 0
    first_problem: str = ""


def parse_rows(
    rows: list[Row], fmt: str, need: Need, *, tokenizer: Any = None, skip_bad_rows: bool = False
) -> Parsed:
    """Normalises the rows of one file.

    Args:
      rows: rows of one file (from `read_rows`).
      fmt: one of `FORMATS`; `auto` detects it from the first row.
      need: what the caller reads: "sft" (prompt+response), "reward" (preferences) or "prompt".
      tokenizer: an HF tokenizer; only the `conversation` format uses it (its chat template).
      skip_bad_rows: skip and count malformed rows instead of raising.
    Returns:
      The records, the number of skipped rows and the first problem seen.
    Raises:
      JaxrlError: an unknown format/need, or a malformed row (naming file, line/row and the problem).
    """
    if fmt not in FORMATS:
        raise JaxrlError(f"data.format={fmt!r} is unknown; use one of {list(FORMATS)}")
    if need not in NEEDS:
        raise ValueError(f"need must be one of {NEEDS}, got {need!r}")
    if not rows:
        return Parsed([])
    if fmt == "auto":
        fmt = detect_format(rows[0])
    parser = PARSERS[fmt]
    records, skipped, first_problem = [], 0, ""
    for row in rows:
        try:
            record = _for_need(parser(row.data, tokenizer), need)
            if need == "prompt":
                record = dataclasses.replace(record, fields=row_fields(row.data))
        except BadRow as e:
            problem = f"{row.origin}: {e} (data.format={fmt})"
            if not skip_bad_rows:
                raise JaxrlError(f"{problem}; fix the row or set data.skip_bad_rows=true") from None
            skipped += 1
            first_problem = first_problem or problem
            continue
        records.append(dataclasses.replace(record, origin=row.origin))
    return Parsed(records, skipped, first_problem)
