"""The fixed GSM8K protocol: prompt template and answer extraction (seed_spec §5.2, §5.4).

    prompt   "Question: {q} Think step by step.\nAnswer:"   response " " + solution + eos, loss on the response
    answer   the last number in the text after the last "####" (the whole text if there is none),
             commas removed, trailing dots stripped; None if there is no number. Scored by exact string match.
"""

from __future__ import annotations

import re

PROMPT_TEMPLATE = "Question: {question} Think step by step.\nAnswer:"
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


def format_example(row: dict) -> tuple[str, str]:
    """(prompt, response) of a question/answer row; the response starts with a space, as in the seed."""
    return format_prompt(row["question"]), " " + row["answer"]


def extract_answer(text: str) -> str | None:
    tail = text.rsplit("####", 1)[-1]
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    return numbers[-1].replace(",", "").strip().rstrip(".")


def reference_answer(answer_field: str) -> str:
    """The gold answer of a GSM8K-style `answer` field; a row without a number is a data error."""
    gold = extract_answer(answer_field)
    if gold is None:
        raise ValueError(f"reference answer has no number after '####': {answer_field[-80:]!r}")
    return gold
