"""Magpie: the pre-query prefix from the embedded model's real chat template, raw completion
through the backends (vLLM's /v1/completions, a chat-only server's one-line refusal), the
generator's multi-turn records, resume after a kill, its filter pass and tags, and a run of the
installed `datagen generate --method magpie` exported as multi-turn messages."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from datagen.chat import instance_messages
from datagen.config_file import load_config
from datagen.errors import TeacherError
from datagen.filters.base import PassContext
from datagen.filters.magpie import MagpieFilterConfig, conversation_reason, magpie_pass, tag_reason
from datagen.generate import run_generate
from datagen.generators.magpie import (
    FOLLOWUP_SYSTEM,
    MagpieConfig,
    end_of_turn,
    followup_prefix,
    parse_tags,
    pre_query_prefix,
)
from datagen.io import read_tasks, rejects_path
from datagen.records import Instance, Task, Turn
from datagen.teachers.base import BackendCounters, Completion, Request, ResultCallback
from datagen.teachers.teacher import Teacher, TeacherConfig, make_teacher
from tests.helpers import run_cli
from tests.local_server import LocalServer

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer(embedded_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path)


def test_the_prefix_is_cut_from_the_teachers_own_template(tokenizer):
    # SmolLM2's template adds its default system message when none is given: the prefix keeps it
    assert pre_query_prefix(tokenizer) == SMOL_SYSTEM + "<|im_start|>user\n"
    assert pre_query_prefix(tokenizer, "Ask about cooking.") == (
        "<|im_start|>system\nAsk about cooking.<|im_end|>\n<|im_start|>user\n")
    assert end_of_turn(tokenizer) == "<|im_end|>"
    later = followup_prefix(tokenizer, [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
                            FOLLOWUP_SYSTEM)
    assert later == (f"<|im_start|>system\n{FOLLOWUP_SYSTEM}<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
                     "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n")


def test_tags_parse_from_json_or_lines_and_only_known_values():
    assert parse_tags('{"task_category": "Math", "difficulty": "easy", "quality": "good"} extra') == {
        "task_category": "math", "difficulty": "easy", "quality": "good"}
    assert parse_tags("task_category: coding_&_debugging\ndifficulty: very hard\nquality: poor") == {
        "task_category": "coding & debugging", "difficulty": "very hard", "quality": "poor"}
    assert parse_tags('{"task_category": "cooking", "difficulty": "easy", "quality": "good"}') is None
    assert parse_tags("This is a math question.") is None


def conversation(*turns: str, tags: dict | None = None) -> Task:
    user, assistant, *rest = turns
    followups = [Turn(user=rest[i], assistant=rest[i + 1]) for i in range(0, len(rest), 2)]
    return Task(id=f"t{abs(hash(turns))}", instruction=user,
                instances=[Instance(output=assistant, followups=followups or None)], **({"tags": tags} if tags else {}))


def test_the_filter_pass_reads_every_turn_and_keeps_by_tags():
    settings = MagpieFilterConfig()
    good = conversation("How do I keep basil alive on a windowsill?", "Water it when the soil is dry.",
                        "And how much light does it need each day?", "About six hours of sun.")
    assert conversation_reason(good, settings) is None
    short = conversation("How do I keep basil alive?", "Water it.", "Why?", "Roots.")
    assert conversation_reason(short, settings) == "user message too short: user turn 2 has 1 words"
    loop = conversation("Tell me about the sea and its tides today.",
                        "The sea is big. The sea is big. The sea is big. The sea is big. The sea is big.")
    assert conversation_reason(loop, settings).startswith("repetitive text:")
    french = conversation("How do I keep basil alive on a windowsill?", "Water it when the soil is dry.",
                          "Et combien de lumière lui faut-il chaque jour, à peu près ?", "Six heures.")
    assert conversation_reason(french, settings) == "language fr: user turn 2"
    assert conversation_reason(french, MagpieFilterConfig(languages=())) is None

    by_quality = MagpieFilterConfig(min_quality="good", task_categories=("advice seeking",))
    tags = {"task_category": "advice seeking", "difficulty": "easy", "quality": "excellent"}
    tagged = conversation(good.instruction, "Water it when dry.", tags=tags)
    poor = Task(**{**tagged.model_dump(), "id": "poor", "tags": {**tags, "quality": "average"}})
    untagged = Task(**{**good.model_dump(), "id": "untagged"})
    kept, rejected = magpie_pass([tagged, poor, untagged], PassContext(settings=by_quality, teacher=lambda: None))
    assert [t.id for t in kept] == [tagged.id]
    assert [(r.task.id, r.reason) for r in rejected] == [("poor", "quality average below good"),
                                                        ("untagged", "no tags")]
    assert tag_reason(untagged, by_quality.model_copy(update={"untagged": "keep"})) is None


# -- the generator on a scripted backend: exact prompts, multi-turn records, resume ------------------


class PrefixScript:
    """A backend answering raw prefixes with a numbered question and chats with an answer; it
    keeps every request and can stop the run (a kill) after `die_after` requests."""

    name, model = "scripted", "script"

    def __init__(self, die_after: int | None = None):
        self.counters = BackendCounters()
        self.requests: list[Request] = []
        self.die_after = die_after

    def generate(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        for index, request in enumerate(requests):
            if self.die_after is not None and len(self.requests) >= self.die_after:
                raise KeyboardInterrupt
            self.requests.append(request)
            if request.prefix is not None:
                text = f"Question {request.params.seed % 1000} about {request.prefix.count('<|im_start|>')} turns?"
            elif request.schema is not None:
                text = '{"task_category": "reasoning", "difficulty": "medium", "quality": "good"}'
            else:
                text = f"Answer to: {request.messages[-1][1]}"
            on_result(index, Completion(text, "stop", 10, 5))

    def close(self) -> None:
        pass


def magpie_config(tmp_path: Path, embedded_model_path: str, num: int = 3, **magpie) -> object:
    path = tmp_path / "magpie.yaml"
    path.write_text(json.dumps({
        "generate": {"method": "magpie", "num": num, "out": str(tmp_path / "raw.jsonl"),
                     "magpie": {"tokenizer": embedded_model_path, "turns": 2, "items_per_batch": 2, **magpie}},
        "teacher": {"cache_dir": str(tmp_path / "cache")}}))
    return load_config(path)


def test_conversations_are_multi_turn_records_and_a_killed_run_resumes_from_the_cache(tmp_path, embedded_model_path):
    config = magpie_config(tmp_path, embedded_model_path)
    # 10 requests a batch of 2 (2 x (user, reply) x 2 turns, 2 tags); the 2nd is killed after its first turn
    dying = PrefixScript(die_after=14)
    with pytest.raises(KeyboardInterrupt):
        run_generate(config, "test", teacher_factory=lambda: Teacher(dying, config.teacher))
    assert len(read_tasks(tmp_path / "raw.jsonl")) == 2  # the first batch was flushed
    again = PrefixScript()
    summary = run_generate(config, "test", teacher_factory=lambda: Teacher(again, config.teacher))
    tasks = read_tasks(tmp_path / "raw.jsonl")
    assert len(tasks) == 3 and len({t.id for t in tasks}) == 3
    # the killed batch's answered requests came from the cache: the rerun sent only the rest
    assert summary["cache_hits"] == 4 and summary["requests_sent"] == len(again.requests) == 5
    first = dying.requests[0]
    assert first.messages == () and first.prefix == SMOL_SYSTEM + "<|im_start|>user\n"
    assert "<|im_end|>" in first.params.stop and "\n" in first.params.stop
    task = tasks[0]
    assert task.tags == {"task_category": "reasoning", "difficulty": "medium", "quality": "good"}
    assert task.lineage.generator == "magpie" and task.lineage.pre_query_prefix == first.prefix
    messages = instance_messages(task, task.instances[0])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    # the second user turn was written from the conversation so far under the follow-up system message
    second = next(r for r in dying.requests if r.prefix and FOLLOWUP_SYSTEM in r.prefix)
    assert second.prefix.endswith(f"<|im_start|>assistant\n{messages[1]['content']}<|im_end|>\n<|im_start|>user\n")
    assert messages[3]["content"] == f"Answer to: {messages[2]['content']}"
    assert not rejects_path(tmp_path / "raw.jsonl").exists() or not rejects_path(tmp_path / "raw.jsonl").read_text()


def test_empty_instructions_are_rejected_with_the_reason(tmp_path, embedded_model_path):
    config = magpie_config(tmp_path, embedded_model_path, num=1, turns=1, tags=False, max_attempts=2.0)

    class Silent(PrefixScript):
        def generate(self, requests, on_result):
            for index, request in enumerate(requests):
                on_result(index, Completion("  " if request.prefix else "Hi.", "stop", 1, 1))

    summary = run_generate(config, "test", teacher_factory=lambda: Teacher(Silent(), config.teacher))
    assert summary["tasks_total"] == 0 and summary["rejects_by_reason"] == {"empty instruction": 2}


# -- raw completion against servers -------------------------------------------------------------


class ChatOnly(LocalServer):
    """An OpenAI-like server without raw completion: /v1/completions answers 404 (as OpenAI does for
    a chat model)."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "chat-model", "object": "model"}]})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._send(404, {"error": {"message": "This is a chat model and not supported in the "
                                                      "v1/completions endpoint.", "type": "invalid_request_error"}})

        super().__init__(Handler)


def test_a_chat_only_server_refuses_a_raw_prefix_in_one_line(tmp_path):
    with ChatOnly() as server, make_teacher(TeacherConfig(backend="openai", base_url=server.base_url,
                                                          model="chat-model", cache_dir=str(tmp_path))) as teacher:
        with pytest.raises(TeacherError, match=r"has no raw completion .*404.*Magpie needs"):
            teacher.complete(["<|im_start|>user\n"])


@pytest.mark.slow
def test_raw_completion_through_vllms_server(vllm_server, tmp_path, tokenizer):
    prefix = pre_query_prefix(tokenizer)
    config = TeacherConfig(backend="openai", base_url=vllm_server, model="smollm2-135m", cache_dir=str(tmp_path))
    params = MagpieConfig().instruction_sampling.model_copy(update={"max_tokens": 24, "seed": 3,
                                                                    "stop": ("<|im_end|>", "\n")})
    with make_teacher(config) as teacher:
        [[raw]], [[chat]] = teacher.complete([prefix], params), teacher.complete([[{"role": "user", "content": "Hi"}]],
                                                                                 params)
        [[again]] = teacher.complete([prefix], params)
    assert raw.ok and raw.text.strip() and raw.completion_tokens > 0
    assert raw.prompt_tokens == len(tokenizer(prefix, add_special_tokens=False).input_ids)
    assert again.cached and again.text == raw.text  # the prefix is the cache key, not an empty chat
    assert chat.ok


@pytest.mark.slow
def test_installed_script_makes_two_turn_conversations_and_exports_them_as_messages(tmp_path, vllm_server):
    # The embedded model behind the shared vLLM server (raw prefixes through /v1/completions): the same
    # run on the local backend costs about a minute of this suite
    config = tmp_path / "magpie.yaml"
    config.write_text(json.dumps({
        "generate": {"method": "magpie", "num": 2, "magpie": {
            "turns": 2, "items_per_batch": 2, "reject_cut_replies": False, "tags": False,
            "instruction_sampling": {"temperature": 1.0, "max_tokens": 64},
            "response_sampling": {"temperature": 0.0, "max_tokens": 16}}},
        "teacher": {"backend": "openai", "base_url": vllm_server, "model": "smollm2-135m",
                    "cache_dir": str(tmp_path / "cache")}}))
    script = Path(sys.executable).with_name("datagen")
    raw, exported = tmp_path / "raw.jsonl", tmp_path / "dataset"
    result = subprocess.run([str(script), "generate", "-c", str(config), "--out", str(raw)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    tasks = read_tasks(raw)
    assert len(tasks) == 2 and all(len(t.instances[0].followups) == 1 for t in tasks)
    result = run_cli("export", str(raw), "--format", "messages", "--out", str(exported))  # in this process
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for path in sorted(exported.glob("*.jsonl")) for line in path.read_text().splitlines()]
    assert len(rows) == 2
    assert all([m["role"] for m in row["messages"]] == ["user", "assistant"] * 2 for row in rows)
    assert {row["messages"][0]["content"] for row in rows} == {t.instruction for t in tasks}


def test_view_facets_and_filter_pass_read_the_tags_column(tmp_path):
    from datagen.io import write_jsonl_atomic
    from datagen.view.index import TaskIndex, discover

    math = conversation("What is the sum of the first ten odd numbers?", "It is 100.",
                        tags={"task_category": "math", "difficulty": "easy", "quality": "good"})
    plain = conversation("Write a short poem about the rain on the roof.", "Drops fall softly.")
    write_jsonl_atomic(tmp_path / "raw.jsonl", [math, plain])
    page = TaskIndex.build(discover(tmp_path)).query(filters={"task_category": ["math"]})
    assert [row["id"] for row in page["rows"]] == [math.id] and page["rows"][0]["quality"] == "good"
    assert dict(map(tuple, page["facets"]["difficulty"])) == {"easy": 1}
    (tmp_path / "filter.yaml").write_text(json.dumps({"filter": {"passes": ["magpie"],
                                                               "magpie": {"task_categories": ["math"]}}}))
    result = run_cli("filter", str(tmp_path / "raw.jsonl"), "--out", str(tmp_path / "kept.jsonl"),
                     "-c", str(tmp_path / "filter.yaml"))
    assert result.returncode == 0, result.stderr
    assert [task.id for task in read_tasks(tmp_path / "kept.jsonl")] == [math.id]
