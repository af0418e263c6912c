"""Built-in reward functions: `math_answer`, `exact_match` and the synthetic task's checker.

Each has the reward-function signature `fn(prompts, completions, **row_fields) -> list[float]`: one float
per completion, the row fields (e.g. `answer`) as lists aligned with the completions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from jaxrl.data.synthetic import check as _synthetic_check

# A number as people write answers: optional sign, thousands commas (1,234), decimals, or a fraction (3/4).
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+")
_HASHES = re.compile(r"####\s*(.+)")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_LATEX_SPACE = re.compile(r"\\[,;:! ]|\\(?:text|mathrm)\{[^{}]*\}")


def _boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), matching nested braces; None if none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: no answer


def extract_answer(text: str) -> str | None:
    """The final answer written in `text`, by precedence:

    1. the content of the last `\\boxed{...}` (nested braces allowed, e.g. `\\boxed{\\frac{3}{4}}`);
    2. what follows the last `#### ` on its line (GSM8K's convention);
    3. the last number in the text (`_NUMBER`: sign, thousands commas, decimals, a/b).
    Returns None when there is none.
    """
    text = text.replace("\u2212", "-")  # the Unicode minus sign
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def parse_number(text: str) -> float | None:
    """`text` as a number, or None: ignores `$`, `\\$`, thousands commas, LaTeX spacing/`\\text{}` units,
    surrounding spaces and a trailing period; reads `a/b` and `\\frac{a}{b}` as fractions.

        "$1,234.50." -> 1234.5      "-3/4" -> -0.75      "\\frac{3}{4}" -> 0.75      "12 apples" -> None
    """
    s = _LATEX_SPACE.sub("", text.replace("\u2212", "-")).replace("\\$", "").replace("$", "")
    s = s.strip().rstrip(".").strip()
    frac = _FRAC.match(s)
    if frac:
        s = f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}"
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s).replace(" ", "")
    parts = s.split("/")
    try:
        if len(parts) == 2:
            value = float(parts[0]) / float(parts[1])
        elif len(parts) == 1:
            value = float(s)
        else:
            return None
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def _same_answer(completion: str, answer) -> bool:
    """Numeric equality (relative tolerance 1e-6) of the extracted answers; string equality when the
    reference is not a number."""
    got = extract_answer(completion)
    if got is None:
        return False
    ref_text = str(answer)
    ref_text = extract_answer(ref_text) if ("####" in ref_text or "\\boxed" in ref_text) else ref_text
    ref_text = (ref_text or "").strip()
    ref, value = parse_number(ref_text), parse_number(got)
    if ref is None:
        return got.strip().rstrip(".") == ref_text.rstrip(".")
    return value is not None and abs(value - ref) <= 1e-6 * max(1.0, abs(ref))


def math_answer(prompts: Sequence[str], completions: Sequence[str], answer: Sequence, **_) -> list[float]:
    """1.0 where the completion's final answer (`extract_answer`) equals the row's `answer`, else 0.0.

    The comparison is numeric (`parse_number`, relative tolerance 1e-6), so "1,000", "$1000" and
    "1000." all match 1000; a GSM8K-style reference ("... #### 72") is reduced to its final answer
    first. A reference that is not a number is compared as a string.
    """
    return [float(_same_answer(c, a)) for c, a in zip(completions, answer)]


def exact_match(prompts: Sequence[str], completions: Sequence[str], answer: Sequence, **_) -> list[float]:
    """1.0 where the completion equals the row's `answer` after stripping surrounding whitespace."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def synthetic_task(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
    """The synthetic addition task's checker (`jaxrl.data.synthetic.check`) as a reward: 1.0 if right."""
    return [float(_synthetic_check(p, c)) for p, c in zip(prompts, completions)]
