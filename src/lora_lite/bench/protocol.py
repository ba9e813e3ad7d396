"""The fixed GSM8K protocol: prompt template and answer scoring (seed_spec §5.2, §5.4; PEFT's method_comparison).

    prompt   "Question: {q} Think step by step.\nAnswer:"   response " " + solution + eos, loss on the response
    answer   after the first "####" of a completion: the first number there (what follows is run-on text, often
             a made-up next question); with no "####": the last number of the text. Commas and a leading "$" are
             ignored; "1/2" is a fraction. None if there is no number.
    scoring  numeric: the prediction is right when it equals the reference as an exact rational number, so
             "18.0", "18" and "36/2" all match a reference of 18, and "0.50" matches "0.5".
"""

from __future__ import annotations

import re
from fractions import Fraction

PROMPT_TEMPLATE = "Question: {question} Think step by step.\nAnswer:"
_NUMBER = re.compile(r"(?<![\d.])[-+]?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


def format_example(row: dict) -> tuple[str, str]:
    """(prompt, response) of a question/answer row; the response starts with a space, as in the seed."""
    return format_prompt(row["question"]), " " + row["answer"]


def parse_number(literal: str) -> Fraction | None:
    """The exact value of a number literal as `extract_answer` finds it ("1,234", "$5", "-0.50", "3/4")."""
    text = literal.replace(",", "").replace("$", "")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> Fraction | None:
    """The number a completion (or a reference solution) gives as its final answer; None if it gives none."""
    head, marker, tail = text.partition("####")
    numbers = _NUMBER.findall(tail) if marker else _NUMBER.findall(head)
    values = [v for v in map(parse_number, numbers) if v is not None]
    if not values:
        return None
    return values[0] if marker else values[-1]


def reference_answer(answer_field: str) -> Fraction:
    """The gold answer of a GSM8K-style `answer` field; a row without a number is a data error."""
    gold = extract_answer(answer_field)
    if gold is None:
        raise ValueError(f"reference answer has no number after '####': {answer_field[-80:]!r}")
    return gold


def show_number(value: Fraction | None) -> str | None:
    """A value as result.json shows it: '18', '-0.5', or '1/3' when it has no finite decimal form."""
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    as_float = float(value)
    return repr(as_float) if Fraction(as_float) == value else str(value)
