"""Structured judge replies: the JSON schemas ratings, verdicts and scores are asked for, and
reading a reply that follows one.

A caller passes one of these schemas to `Teacher.complete(..., schema=...)`; backends that can
constrain decoding (local through xgrammar, vllm, OpenAI-compatible servers through
`response_format`) then return JSON that follows it, the others answer in text as the prompt
asks, and the caller's text parser reads that. The verdict or score comes before the rationale
so that a reply cut off at max_tokens inside its rationale still carries it (`json_field`).
The schemas keep to what OpenAI's strict mode accepts (every property required, no others).

    reply = teacher.complete([messages], params, schema=RATING_SCHEMA)[0][0]
    value = json_field(reply.text, "rating")   # 7, or None when the reply is no such JSON
"""

from __future__ import annotations

import json
import re
from typing import Any


def _object(**properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


_RATIONALE = {"type": "string"}

RATING_SCHEMA = _object(rating={"type": "integer", "minimum": 1, "maximum": 10}, rationale=_RATIONALE)
"""A preference rating: a whole number from 1 to 10 (templates/preference_rating.jinja)."""

VERDICT_SCHEMA = _object(verdict={"type": "string", "enum": ["A", "B", "tie"]}, rationale=_RATIONALE)
"""A pairwise verdict (templates/preference_pairwise.jinja, judge_pairwise.jinja)."""

SCORE_SCHEMA = _object(score={"type": "number", "minimum": 0, "maximum": 5}, rationale=_RATIONALE)
"""The quality judge's score from 0 to 5 (templates/judge_quality.jinja)."""

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", flags=re.DOTALL)


def json_reply(text: str) -> dict[str, Any] | None:
    """The reply as a JSON object (a ```json fence allowed), or None when it is not one."""
    fenced = _FENCE.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def json_field(text: str, name: str) -> Any:
    """Field `name` of a JSON reply; for a reply cut off before its end, the field when it is
    the object's first (the schemas above put the verdict first). None when neither reads."""
    whole = json_reply(text)
    if whole is not None:
        return whole.get(name)
    start = re.match(r'\s*\{\s*"' + re.escape(name) + r'"\s*:\s*', text)
    if start is None:
        return None
    try:
        value, _end = json.JSONDecoder().raw_decode(text, start.end())
    except ValueError:
        return None
    return value


def json_rationale(text: str) -> str:
    """The `rationale` of a JSON reply, or "" (absent, or cut off)."""
    whole = json_reply(text)
    value = whole.get("rationale") if whole else None
    return value.strip() if isinstance(value, str) else ""


def looks_like_json(text: str) -> bool:
    """The reply opens a JSON object (or a code fence): read as JSON first."""
    return text.lstrip().startswith(("{", "```"))
