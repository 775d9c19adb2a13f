"""Final-answer extraction for voting: a completion's answer as a canonical string, so that
samples that agree in value agree in text ("1,000" = "1000", "3.50" = "3.5", "-0" = "0",
"1/2" = "0.5", "\\boxed{\\frac{1}{2}}" = "0.5", "$12" = "12").

Three ways to find the answer: ``boxed`` (the last ``\\boxed{...}``, nested braces allowed),
``number`` (the last number in the text) and ``auto`` (boxed if there is one, else the number
after the last "answer is"/"answer:", else the last number); or a user regex whose last match
(its first group when it has one) is the answer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from heron.errors import InvalidRequestError

ANSWER_KINDS = ("auto", "boxed", "number")

# A number: not glued to a letter, digit or decimal point on its left (so "5-3" has no "-3"
# and "x2" no "2"); thousands separators only in groups of three; an optional fraction part.
_NUMBER = (
    r"(?<![\w.])[-+\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?"
    r"|(?<![\w.])[-+\u2212]?\.\d+"
)
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*[:$]?\s*\**\s*(" + _NUMBER + ")", re.I)
# A whole answer that is one number, maybe with a currency sign, percent or a unit word.
_NUMERIC_ANSWER_RE = re.compile(r"[$€£]?\s*(" + _NUMBER + r")\s*(?:%|[a-z][a-z ]*)?", re.I)
_LATEX_SUBS = (
    (re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}"), r"(\1)/(\2)"),
    (re.compile(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\[,!;: ]"), ""),
    (re.compile(r"\\([$%])"), r"\1"),
    (re.compile(r"\\(?:left|right)"), ""),
)


@dataclass(frozen=True)
class AnswerExtractor:
    """``kind`` is one of ANSWER_KINDS; ``regex``, when given, replaces it."""

    kind: str = "auto"
    regex: str | None = None
    _compiled: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ANSWER_KINDS:
            raise InvalidRequestError(
                f"strategy_options.answer: must be one of {ANSWER_KINDS}, got {self.kind!r} "
                "(or give answer_regex)",
                param="strategy_options",
            )
        if self.regex is not None:
            try:
                compiled = re.compile(self.regex)
            except (re.error, TypeError) as e:
                raise InvalidRequestError(
                    f"strategy_options.answer_regex: not a valid regular expression: {e}",
                    param="strategy_options",
                ) from None
            object.__setattr__(self, "_compiled", compiled)

    def __call__(self, text: str) -> str | None:
        """The canonical answer of ``text``, or None when it has none."""
        if self._compiled is not None:
            matches = list(self._compiled.finditer(text))
            if not matches:
                return None
            last = matches[-1]
            found = last.group(1) if last.re.groups else last.group(0)
            return normalize_answer(found) if found is not None else None
        if self.kind in ("auto", "boxed"):
            boxed = last_boxed(text)
            if boxed is not None or self.kind == "boxed":
                return normalize_answer(boxed) if boxed is not None else None
            stated = _ANSWER_IS_RE.findall(text)
            if stated:
                return normalize_number(stated[-1])
        return last_number(text)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None  # unclosed: the sample was cut off


def last_number(text: str) -> str | None:
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def normalize_number(token: str) -> str:
    """Canonical text of one number token: no sign noise, separators or trailing zeros."""
    t = token.replace(",", "").replace("\u2212", "-").lstrip("+")
    num, _, den = t.partition("/")
    try:
        value = Fraction(Decimal(num))
        if den:
            value /= Fraction(Decimal(den))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return token
    return _fraction_text(value)


def normalize_answer(text: str) -> str:
    """Canonical text of a whole answer: a number's value when the answer is one number
    (LaTeX, currency, percent and unit words aside), else trimmed, lower-cased text."""
    t = text
    for pattern, repl in _LATEX_SUBS:
        t = pattern.sub(repl, t)
    t = t.strip().strip("$").strip().rstrip(".").strip()
    t = re.sub(r"^[a-z]\s*=\s*", "", t, flags=re.I)  # "x = 5"
    frac = re.fullmatch(r"\((" + _NUMBER + r")\)/\((" + _NUMBER + r")\)", t)
    if frac:
        return normalize_number(f"{frac.group(1)}/{frac.group(2)}")
    m = _NUMERIC_ANSWER_RE.fullmatch(t)
    if m:
        return normalize_number(m.group(1))
    return " ".join(t.casefold().split())


def _fraction_text(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:  # not a terminating decimal: keep it exact
        return f"{value.numerator}/{value.denominator}"
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
