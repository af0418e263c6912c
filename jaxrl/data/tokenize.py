"""Records -> fixed-shape numpy token arrays for SFT, reward pairs and PPO prompts.

Conventions (every step relies on them):
- A sequence is `prefix + prompt + response + [eos]`. `prefix` is what the tokenizer itself puts in front
  of a text (BOS for Llama/OPT, nothing for GPT-2), added once: not again when a chat template already
  rendered it. Texts are otherwise encoded without special tokens, so a tokenizer that appends EOS on
  its own cannot double it; EOS is appended by us exactly once, also when the text already ends in it.
- Prompt and response are encoded separately, so the prompt's tokens are exactly the tokens PPO
  generation continues from, and the loss mask boundary is exact.
- `loss_mask[b, t] = 1` marks token t as a training target (predicted from tokens < t); position 0 can
  never be one, so a loss shifts by one: logits[:, :-1] against input_ids[:, 1:] with loss_mask[:, 1:].
- Training arrays are right-padded to `max_len`; PPO prompts are left-padded to `max_prompt_len` so
  generation appends at the same column for every row. `attention_mask` is 1 on real tokens.
- `pad_id` is the tokenizer's pad token when it has one distinct from EOS, else EOS: padded positions
  are found through `attention_mask` (and have loss_mask 0), never by their id, so padding with EOS is
  safe; a distinct pad is still preferred so a stray EOS in padding cannot be mistaken for a stop.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jaxrl.data.formats import PreferenceRecord, PromptRecord, Record
from jaxrl.errors import JaxrlError

_PROBE = "hello world"  # any text: only the special tokens around its encoding matter


@dataclasses.dataclass(frozen=True)
class Encoder:
    """An HF tokenizer (anything with `encode` or `__call__` taking `add_special_tokens`) with jaxrl's ids.

    Attributes:
      tokenizer: the wrapped tokenizer.
      eos_id: the model's end-of-sequence id, appended to every response.
      pad_id: the padding id (see the module docstring for the choice).
      prefix: the special ids the tokenizer puts before a text (e.g. (bos_id,)), added once per sequence.
      eos_text: the EOS token's text, stripped from the end of a response before encoding.
    """

    tokenizer: Any
    eos_id: int
    pad_id: int
    prefix: tuple[int, ...]
    eos_text: str | None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> Encoder:
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            raise JaxrlError("the tokenizer has no eos_token; set one in its tokenizer_config.json")
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = eos_id if pad_id is None else pad_id
        bare, full = _encode(tokenizer, [_PROBE], False)[0], _encode(tokenizer, [_PROBE], True)[0]
        prefix = ()
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                prefix = tuple(full[:start])
                break
        return cls(tokenizer, int(eos_id), int(pad_id), prefix, getattr(tokenizer, "eos_token", None))

    def prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """Prompt ids: `prefix` + the text, the prefix not repeated when the text already renders it."""
        n = len(self.prefix)
        prefix = list(self.prefix)
        return [ids if n and ids[:n] == prefix else prefix + ids for ids in self._bare(texts)]

    def responses(self, texts: Sequence[str]) -> list[list[int]]:
        """Response ids ending in exactly one EOS."""
        if self.eos_text:
            texts = [t[: -len(self.eos_text)] if t.endswith(self.eos_text) else t for t in texts]
        return [ids if ids and ids[-1] == self.eos_id else [*ids, self.eos_id] for ids in self._bare(texts)]

    def _bare(self, texts: Sequence[str]) -> list[list[int]]:
        return _encode(self.tokenizer, texts, False) if texts else []


def _encode(tokenizer: Any, texts: Sequence[str], special: bool) -> list[list[int]]:
    if callable(tokenizer):  # HF tokenizers encode a batch at once, much faster than one by one
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=special)["input_ids"]]
    return [list(tokenizer.encode(t, add_special_tokens=special)) for t in texts]


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """Fixed-shape int32 arrays, one row per example, and how many examples were dropped as too long."""

    arrays: dict[str, np.ndarray]
    dropped: int = 0

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))


def pad_rows(rows: Sequence[Sequence[int]], length: int, value: int, side: str = "right") -> np.ndarray:
    """Pads each row to `length` with `value` on the given side -> int32 array (N, length)."""
    out = np.full((len(rows), length), value, dtype=np.int32)
    for i, row in enumerate(rows):
        if side == "right":
            out[i, : len(row)] = row
        else:
            out[i, length - len(row) :] = row
    return out


def _fit(prompt: list[int], response: list[int], max_len: int, head: int) -> tuple[list[int], list[int]]:
    """Drops tokens from the left of the prompt (after its `head` prefix ids), then from the left of
    the response, until both fit `max_len`: the response end and its EOS are always kept."""
    excess = len(prompt) + len(response) - max_len
    cut = min(max(excess, 0), len(prompt) - head)
    prompt = prompt[:head] + prompt[head + cut :]
    return prompt, response[max(excess - cut, 0) :]


def _check_lengths(enc: Encoder, max_len: int, max_prompt_len: int | None) -> None:
    if max_len < len(enc.prefix) + 2:
        need = len(enc.prefix) + 2
        raise JaxrlError(f"max_len={max_len} is too short: a sequence needs at least {need} tokens")
    if max_prompt_len is not None and max_prompt_len < 1:
        raise JaxrlError(f"max_prompt_len={max_prompt_len} must be positive")


def _require_some(records: Sequence[Record], keep: list[bool], max_prompt_len: int | None) -> None:
    if records and not any(keep):
        raise JaxrlError(
            f"all {len(records)} examples dropped: each prompt is longer than "
            f"max_prompt_len={max_prompt_len} tokens (first: {records[0].origin}); "
            "raise max_prompt_len or shorten the prompts"
        )


def tokenize_sft(
    records: Sequence[PromptRecord],
    enc: Encoder,
    *,
    max_len: int,
    max_prompt_len: int | None = None,
    loss_on_prompt: bool = False,
    pack: bool = False,
) -> Tokenized:
    """SFT examples -> `input_ids`, `attention_mask`, `loss_mask` (N, max_len).

    Args:
      records: prompt/response records (response not None).
      enc: the encoder.
      max_len: sequence length; longer examples lose prompt tokens from the left first, then response
        tokens from the left, keeping the response end and EOS.
      max_prompt_len: drop (and count) examples whose prompt alone is longer.
      loss_on_prompt: also train on prompt tokens.
      pack: pack several examples per row (see `pack_rows`; adds `segment_ids` and `positions`).
    """
    _check_lengths(enc, max_len, max_prompt_len)
    prompts = enc.prompts([r.prompt for r in records])
    responses = enc.responses([r.response for r in records])
    keep = [max_prompt_len is None or len(p) <= max_prompt_len for p in prompts]
    _require_some(records, keep, max_prompt_len)
    ids, masks = [], []
    for p, r, k in zip(prompts, responses, keep):
        if k:
            p, r = _fit(p, r, max_len, len(enc.prefix))
            ids.append(p + r)
            masks.append([int(loss_on_prompt)] * len(p) + [1] * len(r))
    if pack:
        return Tokenized(pack_rows(ids, masks, max_len, enc.pad_id), keep.count(False))
    arrays = {
        "input_ids": pad_rows(ids, max_len, enc.pad_id),
        "attention_mask": pad_rows([[1] * len(x) for x in ids], max_len, 0),
        "loss_mask": pad_rows(masks, max_len, 0),
    }
    return Tokenized(arrays, keep.count(False))


def pack_rows(
    ids: Sequence[list[int]], masks: Sequence[list[int]], max_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Packs examples, in order, into rows of `max_len`; a row is closed when the next one does not fit.

    Returns `input_ids`, `loss_mask`, `attention_mask`, `segment_ids` (1, 2, ... per example in a row,
    0 on padding) and `positions` (restarting at 0 per example). Attention must stay within a segment.
    """
    keys = ("input_ids", "loss_mask", "attention_mask", "segment_ids", "positions")
    rows: dict[str, list[list[int]]] = {k: [] for k in keys}
    for x, m in zip(ids, masks):
        if not rows["input_ids"] or len(rows["input_ids"][-1]) + len(x) > max_len:
            for k in keys:
                rows[k].append([])
        segment = rows["segment_ids"][-1][-1] + 1 if rows["segment_ids"][-1] else 1
        for k, values in zip(keys, (x, m, [1] * len(x), [segment] * len(x), range(len(x)))):
            rows[k][-1].extend(values)
    return {k: pad_rows(v, max_len, pad_id if k == "input_ids" else 0) for k, v in rows.items()}


def tokenize_pairs(
    records: Sequence[PreferenceRecord], enc: Encoder, *, max_len: int, max_prompt_len: int | None = None,
    loss_mask: bool = False,
) -> Tokenized:
    """Preference records -> `chosen_input_ids`, `chosen_attention_mask`, `rejected_input_ids`,
    `rejected_attention_mask` (N, max_len), each sequence ending in EOS (truncated like `tokenize_sft`).
    With `loss_mask` also `chosen_loss_mask`, `rejected_loss_mask`: 1 on the response tokens (and EOS),
    what DPO's log-probs sum over."""
    _check_lengths(enc, max_len, max_prompt_len)
    prompts = enc.prompts([r.prompt for r in records])
    keep = [max_prompt_len is None or len(p) <= max_prompt_len for p in prompts]
    _require_some(records, keep, max_prompt_len)
    arrays = {}
    for side in ("chosen", "rejected"):
        responses = enc.responses([getattr(r, side) for r in records])
        fitted = [_fit(p, r, max_len, len(enc.prefix)) for p, r, k in zip(prompts, responses, keep) if k]
        seqs = [p + r for p, r in fitted]
        arrays[f"{side}_input_ids"] = pad_rows(seqs, max_len, enc.pad_id)
        arrays[f"{side}_attention_mask"] = pad_rows([[1] * len(s) for s in seqs], max_len, 0)
        if loss_mask:
            arrays[f"{side}_loss_mask"] = pad_rows([[0] * len(p) + [1] * len(r) for p, r in fitted], max_len, 0)
    return Tokenized(arrays, keep.count(False))


FIELD = "field/"  # prefix of the row-field arrays among the prompt arrays: "field/answer" (N,) object


def tokenize_prompts(records: Sequence[Record], enc: Encoder, *, max_prompt_len: int) -> Tokenized:
    """Prompts for generation -> left-padded `input_ids`, `attention_mask` (N, max_prompt_len), no EOS;
    longer prompts are dropped and counted.

    Each field of the records' `fields` (e.g. `answer`) comes along untokenized as a (N,) object array
    `FIELD + name`, None where a row lacks it, so batch iterators keep it aligned with its prompt."""
    if max_prompt_len <= len(enc.prefix):
        raise JaxrlError(f"max_prompt_len={max_prompt_len} leaves no room for a prompt")
    prompts = enc.prompts([r.prompt for r in records])
    keep = [len(p) <= max_prompt_len for p in prompts]
    _require_some(records, keep, max_prompt_len)
    kept = [p for p, k in zip(prompts, keep) if k]
    arrays = {
        "input_ids": pad_rows(kept, max_prompt_len, enc.pad_id, side="left"),
        "attention_mask": pad_rows([[1] * len(p) for p in kept], max_prompt_len, 0, side="left"),
    }
    rows = [r.fields if isinstance(r, PromptRecord) else {} for r, k in zip(records, keep) if k]
    for name in dict.fromkeys(key for row in rows for key in row):
        column = np.empty(len(rows), dtype=object)
        column[:] = [row.get(name) for row in rows]
        arrays[FIELD + name] = column
    return Tokenized(arrays, keep.count(False))


def batch_rows(batch: dict[str, np.ndarray]) -> list[dict]:
    """A prompt batch's row fields as one dict per row: `{"answer": ...}`, [] when it has none."""
    names = [k for k in batch if k.startswith(FIELD)]
    n = len(batch[names[0]]) if names else 0
    return [{k[len(FIELD):]: batch[k][i] for k in names} for i in range(n)]
