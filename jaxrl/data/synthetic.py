"""The synthetic verifiable task behind `jaxrl pipeline`'s default: two-number addition, `"37+45="` -> `"82"`.

Why this task suits the demo. A tiny transformer learns addition of numbers below 100 from a few thousand
examples on CPU, and every answer can be checked exactly (`check`), so "PPO raised accuracy" is a number
on held-out problems rather than a judgement. The SFT data is deliberately noisy: a fraction `sft_noise`
of its answers are *plausible* mistakes (off by ten, two digits swapped, a dropped carry), so
the SFT model learns the right answer as its most likely one but, when sampled, reproduces those mistakes
at about that rate. The preference pairs are clean (chosen = correct, rejected = those kinds of mistake
and the units-digit slips the model makes by itself), so the reward model learns exactly the
distinction the SFT model blurs, and PPO has a clear
signal: move the probability the policy puts on mistakes onto the correct answer. Sequences stay short
(prompt <= 6 tokens, answer <= 3 tokens + EOS) and the vocabulary has 18 tokens, so all three steps fit
in minutes on two cores.

Train and held-out problems never overlap: an unordered pair {a, b} is held out by a fixed hash of its
values (about 1 in 5), independent of the seed, so `a+b=` and `b+a=` always land on the same side.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from jaxrl.errors import JaxrlError
from jaxrl.io import atomic_write

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3, in this order
ALPHABET = "0123456789+= \n"  # every character the task writes, plus space/newline for typed chat input
KINDS = ("sft", "preference", "prompt")
HELD_OUT_PER_MILLE = 200  # share of unordered pairs {a, b} kept for evaluation only
DATASET_FILES = {  # write_dataset_files: size key -> file name
    "sft": "sft.jsonl",
    "preference": "preference.jsonl",
    "prompt": "prompts.jsonl",
    "eval": "eval_prompts.jsonl",
}
DEFAULT_SIZES = {"sft": 6000, "preference": 12000, "prompt": 2000, "eval": 500}

# User turns are rendered verbatim and assistant turns end in EOS, so a chat prompt is token for token
# what the model saw in training ("37+45="); a "User: ...\nAssistant:" wrapper would put the model off
# its training distribution and cost ~20 tokens per prompt at character level.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

_PROBLEM = re.compile(r"(\d+)\+(\d+)=")
# Mistake kinds and how often each is drawn. The SFT noise leaves out off-by-one (a units-digit slip):
# the SFT model makes such slips by itself when sampled, and the preference data must teach the reward
# model to catch them (a tiny reward model tells them from the right answer ~73% of the time after 2k
# steps, ~99% for the other kinds), or PPO moves the policy's probability onto exactly that blind spot.
_SFT_MISTAKES = {"off_by_ten": 0.4, "swap_digits": 0.3, "dropped_carry": 0.3}
_PREFERENCE_MISTAKES = {"off_by_one": 0.5, "off_by_ten": 0.2, "swap_digits": 0.15, "dropped_carry": 0.15}


def make_task_rows(
    n: int,
    *,
    seed: int,
    kind: str = "sft",
    held_out: bool = False,
    sft_noise: float = 0.3,
    max_operand: int = 100,
) -> list[dict]:
    """Rows of the addition task in jaxrl's normalised formats.

    Problems are drawn without replacement from their side of the train/held-out split (cycling through
    fresh permutations when `n` exceeds it), so every problem appears before any appears twice.

    Args:
      n: number of rows.
      seed: non-negative int; the same arguments always give the same rows.
      kind: "sft" -> {"prompt", "response"}; "preference" -> {"prompt", "chosen", "rejected"};
        "prompt" -> {"prompt"} (PPO prompts, or evaluation prompts with `held_out=True`).
      held_out: draw from the held-out problems (evaluation) instead of the training problems.
      sft_noise: for kind "sft", the probability that a response is a plausible mistake.
      max_operand: operands are drawn from [0, max_operand).

    Returns:
      A list of `n` dicts.
    """
    _validate(n=n, seed=seed, kind=kind, sft_noise=sft_noise, max_operand=max_operand)
    # The kind and split are part of the seed, so PPO prompts are not the SFT problems in the same order.
    rng = np.random.default_rng([seed, KINDS.index(kind), int(held_out), max_operand])
    a, b = _problems(max_operand, held_out)
    if n and a.size == 0:
        raise JaxrlError(f"max_operand={max_operand} leaves no {'held-out' if held_out else 'training'} "
                         "problems; use max_operand >= 10")
    order = np.concatenate([rng.permutation(a.size) for _ in range(-(-n // max(a.size, 1)))] or [[]])
    rows = []
    for i in order[:n].astype(int):
        x, y = int(a[i]), int(b[i])
        prompt, answer = f"{x}+{y}=", str(x + y)
        if kind == "sft":
            wrong = rng.random() < sft_noise
            rows.append({"prompt": prompt,
                         "response": _plausible_mistake(x, y, rng, _SFT_MISTAKES) if wrong else answer})
        elif kind == "preference":
            rows.append({"prompt": prompt, "chosen": answer,
                         "rejected": _plausible_mistake(x, y, rng, _PREFERENCE_MISTAKES)})
        else:
            rows.append({"prompt": prompt})
    return rows


def check(prompt: str, response: str) -> bool:
    """Whether `response` is exactly the sum asked for by the last `a+b=` in `prompt`.

    The response is cut at its first EOS text (so a trailing "<eos>" and any padding after it go) and
    stripped of surrounding whitespace; then it must equal the decimal sum with no leading zeros.
    """
    problems = _PROBLEM.findall(prompt)
    if not problems:
        raise JaxrlError(f"prompt {prompt!r} holds no addition problem; "
                         "synthetic-task prompts look like '37+45='")
    x, y = problems[-1]
    return response.split(EOS, 1)[0].strip() == str(int(x) + int(y))


def task_accuracy(prompts: Sequence[str], responses: Sequence[str]) -> float:
    """The fraction of `responses` that `check` accepts for the matching `prompts`."""
    if len(prompts) != len(responses):
        raise JaxrlError(f"task_accuracy got {len(prompts)} prompts but {len(responses)} responses; "
                         "pass one response per prompt")
    if not prompts:
        raise JaxrlError("task_accuracy got no prompts; pass at least one prompt and response")
    return sum(check(p, r) for p, r in zip(prompts, responses)) / len(prompts)


def write_dataset_files(
    out_dir: str | os.PathLike,
    *,
    seed: int,
    sizes: dict[str, int] | None = None,
    sft_noise: float = 0.3,
    max_operand: int = 100,
) -> dict[str, Path]:
    """Writes the task as JSONL files that the pipeline reads like a user's dataset.

    Args:
      out_dir: directory to write into (created if missing).
      seed: the seed passed to `make_task_rows` for every file.
      sizes: rows per file, keyed like `DATASET_FILES` ("sft", "preference", "prompt", "eval");
        missing keys take `DEFAULT_SIZES`. "eval" rows are held-out prompts.
      sft_noise, max_operand: as in `make_task_rows`.

    Returns:
      Size key -> path of the file written.
    """
    unknown = set(sizes or {}) - set(DATASET_FILES)
    if unknown:
        raise JaxrlError(f"unknown dataset size key(s) {sorted(unknown)}; use {sorted(DATASET_FILES)}")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, name in DATASET_FILES.items():
        held_out = key == "eval"
        rows = make_task_rows(sizes[key], seed=seed, kind="prompt" if held_out else key, held_out=held_out,
                              sft_noise=sft_noise, max_operand=max_operand)
        paths[key] = _write_jsonl(out / name, rows)
    return paths


def build_tokenizer(
    out_dir: str | os.PathLike | None = None, *, model_max_length: int = 32
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer for the task, built locally (no download).

    Every character of `ALPHABET` is one token and anything else is `<unk>`; `<pad>` (id 0), `<bos>`,
    `<eos>` and `<unk>` are special. No BOS/EOS is added on encode, so `decode(encode(x)) == x` for task
    text; the data layer decides where EOS goes. With `out_dir`, the tokenizer is also saved there in
    the form `AutoTokenizer.from_pretrained(out_dir)` loads offline.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *ALPHABET])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one char per token
    core.decoder = decoders.Fuse()  # join characters back with nothing in between
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _validate(*, n, seed, kind, sft_noise, max_operand):
    if kind not in KINDS:
        raise JaxrlError(f"kind={kind!r} is not a synthetic-task row kind; use one of {list(KINDS)}")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise JaxrlError(f"n={n!r} must be a non-negative int (the number of rows)")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise JaxrlError(f"seed={seed!r} must be a non-negative int")
    if not 0.0 <= sft_noise < 1.0:
        raise JaxrlError(f"sft_noise={sft_noise!r} must be in [0, 1): the share of wrong SFT answers")
    if not isinstance(max_operand, (int, np.integer)) or not 10 <= max_operand <= 1000:
        raise JaxrlError(f"max_operand={max_operand!r} must be an int in [10, 1000]")


def _held_out(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether each unordered pair {a, b} belongs to the held-out split: a splitmix64 hash of the pair."""
    z = np.minimum(a, b).astype(np.uint64) * np.uint64(1 << 20) + np.maximum(a, b).astype(np.uint64)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z % np.uint64(1000) < np.uint64(HELD_OUT_PER_MILLE)


def _problems(max_operand: int, held_out: bool) -> tuple[np.ndarray, np.ndarray]:
    """All ordered pairs (a, b) with operands in [0, max_operand) on one side of the split."""
    a, b = np.divmod(np.arange(max_operand * max_operand), max_operand)
    keep = _held_out(a, b) == held_out
    return a[keep], b[keep]


def _plausible_mistake(a: int, b: int, rng: np.random.Generator, mistakes: dict[str, float]) -> str:
    """A wrong answer of the kind a learner makes; never the sum, never negative."""
    s = a + b
    digits = str(s)
    carry_free = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:04d}", f"{b:04d}")))
    candidates = {
        "off_by_one": [s - 1, s + 1],
        "off_by_ten": [s - 10, s + 10],
        "swap_digits": [int(digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:])
                        for i in range(len(digits) - 1)],
        "dropped_carry": [carry_free],
    }
    candidates = {k: [v for v in vs if v >= 0 and v != s] for k, vs in candidates.items()}
    kinds = [k for k in mistakes if candidates[k]]
    weights = np.array([mistakes[k] for k in kinds])
    chosen = candidates[kinds[rng.choice(len(kinds), p=weights / weights.sum())]]
    return str(chosen[rng.integers(len(chosen))])


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Writes rows one JSON object a line, through a temporary file so nothing is left half-written."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
