"""LLM-judge pass (AlpaGasus, Chen et al. 2023): the teacher grades each example 0-5.

Each instance is shown to the teacher with its instruction and input; the reply's
`Score:` is parsed (or its JSON `score`: the teacher is asked for SCORE_SCHEMA, which backends
that constrain decoding keep to), a task's score is the mean over its instances, and tasks below the
threshold (default 4.5, the paper's cut) are rejected. Score and rationale go into the
task's lineage (`judge_score`, `judge_rationale`), so the dedup keep-rule can use them.
A reply with no readable score rejects the task as "judge reply unparseable" (raw kept
in the detail): a silent keep or drop would hide a broken judge.

    kept, rejected = judge_pass(tasks, teacher, JudgeConfig(threshold=4.5))
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from datagen.config import SamplingParams
from datagen.filters.base import PassContext, PassResult, Rejection
from datagen.prompts import load_template
from datagen.records import Lineage, Task
from datagen.structured import SCORE_SCHEMA, json_field, json_rationale, looks_like_json

TEMPLATE = "judge_quality.jinja"


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(4.5, ge=0.0, le=5.0)
    sampling: SamplingParams = SamplingParams(temperature=0.0, max_tokens=128)


def judge_messages(instruction: str, instance_input: str, output: str) -> list[dict[str, str]]:
    text = load_template(TEMPLATE).render(instruction=instruction, input=instance_input, output=output)
    return [{"role": "user", "content": text}]


def parse_judgement(text: str) -> tuple[float, str] | None:
    """(score, rationale) from 'Score: 4.5 / Rationale: ...', or from a JSON reply
    `{"score": 4.5, "rationale": "..."}` (asked for with SCORE_SCHEMA); None when no score in
    0-5 is found."""
    if looks_like_json(text):
        value = json_field(text, "score")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 5.0:
            return float(value), json_rationale(text)
    match = re.search(r"score\s*[:=]?\s*(\d+(?:\.\d+)?)", text, flags=re.IGNORECASE)
    if match is None:
        match = re.match(r"\s*(\d+(?:\.\d+)?)\b", text)
    if match is None:
        return None
    score = float(match.group(1))
    if not 0.0 <= score <= 5.0:
        return None
    rationale = re.search(r"rationale\s*:\s*(.+)", text, flags=re.IGNORECASE | re.DOTALL)
    return score, (rationale.group(1).strip() if rationale else "")


def judge_pass(tasks: Sequence[Task], teacher, config: JudgeConfig) -> PassResult:
    conversations, owners = [], []
    for position, task in enumerate(tasks):
        for instance in task.instances:
            conversations.append(judge_messages(task.instruction, instance.input, instance.output))
            owners.append(position)
    replies = teacher.complete(conversations, config.sampling, schema=SCORE_SCHEMA) if conversations else []
    verdicts: dict[int, list[tuple[float, str] | str]] = {}
    for position, [reply] in zip(owners, replies):
        parsed = parse_judgement(reply.text) if reply.ok else None
        verdicts.setdefault(position, []).append(parsed if parsed else (reply.text or reply.error or ""))
    kept, rejected = [], []
    for position, task in enumerate(tasks):
        found = verdicts.get(position, [])
        unreadable = [v for v in found if isinstance(v, str)]
        if not found:
            rejected.append(Rejection(task, "no instances to judge"))
            continue
        if unreadable:
            rejected.append(Rejection(task, "judge reply unparseable", detail=unreadable[0][:500]))
            continue
        score = sum(v[0] for v in found) / len(found)
        lineage = (task.lineage or Lineage()).model_copy(
            update={"judge_score": score, "judge_rationale": found[0][1]})
        judged = task.model_copy(update={"lineage": lineage})
        if score >= config.threshold:
            kept.append(judged)
        else:
            rejected.append(Rejection(judged, "judge score below threshold",
                                      detail=f"{score:.2f} < {config.threshold}"))
    return kept, rejected


def run_judge_pass(tasks: Sequence[Task], context: PassContext) -> PassResult:
    """The `judge` pass, with the run's teacher."""
    return judge_pass(tasks, context.teacher(), context.settings)
