"""Structured outputs: reply schemas in requests, cache keys and request bodies, the JSON and
text parsers of ratings, verdicts and judge scores, and constrained decoding on the local
backend (xgrammar) and a real vLLM server."""

from __future__ import annotations

import json

import pytest

from datagen.config import SamplingParams
from datagen.filters.judge import parse_judgement
from datagen.finetune.evaluate import parse_verdict as eval_verdict
from datagen.generators.preferences import Rating, Verdict, parse_rating, parse_verdict
from datagen.structured import RATING_SCHEMA, SCORE_SCHEMA, VERDICT_SCHEMA, json_field
from datagen.teachers.base import BackendCounters, Completion, Request
from datagen.teachers.cache import request_key
from datagen.teachers.openai_api import chat_body
from datagen.teachers.teacher import Teacher, TeacherConfig, schema_text

MESSAGES = [{"role": "user", "content": "Which is better, A or B?"}]
# only an enum: a complete reply is a few tokens, so the end of the JSON must let EOS through
SHORT = {"type": "object", "properties": {"verdict": {"type": "string", "enum": ["A", "B", "tie"]}},
         "required": ["verdict"], "additionalProperties": False}


def test_a_schema_is_part_of_the_cache_key_and_so_is_its_property_order():
    params = SamplingParams(temperature=0.0, max_tokens=8)
    plain = Request.build(MESSAGES, params)
    with_schema = Request.build(MESSAGES, params, schema=schema_text(VERDICT_SCHEMA))
    # the order of properties is the order they are written in: the verdict before the rationale
    flipped = {**VERDICT_SCHEMA, "properties": dict(reversed(list(VERDICT_SCHEMA["properties"].items())))}
    reordered = Request.build(MESSAGES, params, schema=schema_text(flipped))
    assert list(json.loads(with_schema.schema)["properties"]) == ["verdict", "rationale"]
    assert request_key("local", "m", plain) != request_key("local", "m", with_schema)
    assert request_key("local", "m", with_schema) != request_key("local", "m", reordered)


def test_openai_bodies_and_batch_lines_carry_the_schema_as_response_format():
    params = SamplingParams(temperature=0.0, max_tokens=8)
    assert "response_format" not in chat_body("m", Request.build(MESSAGES, params))
    body = chat_body("m", Request.build(MESSAGES, params, schema=schema_text(RATING_SCHEMA)))
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "reply", "schema": RATING_SCHEMA, "strict": True}}


class _Seen:
    """A backend that records the requests it is sent and answers each with "{}"."""

    name, model = "local", "m"

    def __init__(self):
        self.counters = BackendCounters()
        self.requests: list[Request] = []

    def generate(self, requests, on_result):
        self.requests += requests
        for index, _ in enumerate(requests):
            on_result(index, Completion("{}", "stop"))

    def close(self):
        pass


@pytest.mark.parametrize("structured", [True, False])
def test_the_teacher_sends_the_schema_with_every_sample_unless_switched_off(structured):
    backend = _Seen()
    config = TeacherConfig(cache="off", structured_outputs=structured)
    with Teacher(backend, config) as teacher:
        teacher.complete([MESSAGES], SamplingParams(n=2, seed=1), schema=VERDICT_SCHEMA)
        teacher.complete_many([([MESSAGES], SamplingParams(seed=1), SCORE_SCHEMA), ([MESSAGES], None)])
    expected = [schema_text(VERDICT_SCHEMA)] * 2 + [schema_text(SCORE_SCHEMA), None]
    assert [r.schema for r in backend.requests] == (expected if structured else [None] * 4)
    assert [r.sample_index for r in backend.requests[:2]] == [0, 1]


def test_json_replies_parse_and_text_replies_still_do():
    assert parse_rating('{"rating": 8, "rationale": "Correct."}') == Rating(8.0, "Correct.")
    # cut off at max_tokens inside the rationale: the rating came first
    assert parse_rating('{"rating": 3, "rationale": "It repeats the the the') == Rating(3.0, "")
    assert parse_rating('{"rating": 11, "rationale": ""}') == 'no "rating" from 1 to 10 in the JSON reply'
    assert parse_rating("Rationale: Correct.\nRating: 8") == Rating(8.0, "Correct.")
    assert parse_verdict('{"verdict": "tie", "rationale": "Same."}') == Verdict("tie", "Same.")
    assert parse_verdict("Rationale: B is right.\nVerdict: B") == Verdict("B", "B is right.")
    assert parse_verdict('{"rationale": "no verdict"}') == 'no "verdict" of A, B, tie in the JSON reply'
    assert eval_verdict('```json\n{"verdict": "B", "rationale": "x"}\n```') == "B"
    assert eval_verdict("Verdict: A\nReason: shorter") == "A"
    assert parse_judgement('{"score": 4.5, "rationale": "Fine."}') == (4.5, "Fine.")
    assert parse_judgement('{"score": 2, "rationale": "Wro') == (2.0, "")
    assert parse_judgement("Score: 4\nRationale: Fine.") == (4.0, "Fine.")
    assert json_field("Score: 4", "score") is None


def _valid_short(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"verdict"} and value["verdict"] in ("A", "B", "tie")


@pytest.mark.slow
def test_the_local_backend_writes_json_that_follows_the_schema(tmp_path):
    """The embedded model, decoded under xgrammar: valid JSON, ended by EOS (not max_tokens)
    once the object is complete; the same request without a schema is free text."""
    from datagen.teachers import make_teacher

    with make_teacher(TeacherConfig(cache_dir=str(tmp_path), batch_size=2)) as teacher:
        [[[plain]], [[shaped], [other]]] = teacher.complete_many([
            ([MESSAGES], SamplingParams(temperature=0.0, max_tokens=12)),
            ([MESSAGES, [{"role": "user", "content": "Pick A or B."}]], SamplingParams(temperature=0.0, max_tokens=12),
             SHORT)])
    assert not plain.text.lstrip().startswith("{")
    for reply in (shaped, other):
        assert _valid_short(reply.text) and reply.finish_reason == "stop", reply


@pytest.mark.slow
def test_a_schema_request_through_the_vllm_server_returns_json_that_follows_it(vllm_server, tmp_path):
    from datagen.teachers import make_teacher

    config = TeacherConfig(backend="openai", model="smollm2-135m", base_url=vllm_server, cache_dir=str(tmp_path))
    with make_teacher(config) as teacher:
        [[reply]] = teacher.complete([MESSAGES], SamplingParams(temperature=0.0, max_tokens=16), schema=SHORT)
    assert reply.ok and _valid_short(reply.text), reply
