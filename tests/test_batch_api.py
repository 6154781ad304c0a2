"""The openai-batch backend (the Batch API) against a local stand-in of the files and batches
endpoints (tests/batch_stand_in.py) whose every line is answered by the real vLLM server on
127.0.0.1: replies reach the cache, a rerun pays for nothing, a run killed mid-poll and started
again polls the same batch, expired lines go into a new batch and then become rejects with the
provider's reason, costs and the spending cap use batch prices, and a method runs end to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from datagen.config import SamplingParams
from datagen.errors import ConfigError
from datagen.rejects import TEACHER_ERROR
from datagen.teachers import PriceTable, Request, TeacherConfig, make_teacher
from datagen.teachers.batch_api import line_result, missing_line
from datagen.teachers.spending import SpendingCapReached, SpendingLedger, check_priced, worst_cost
from tests.batch_stand_in import BatchStandIn
from tests.helpers import run_cli, single_error_line

PRICES = PriceTable(input_per_million=1e6, output_per_million=2e6)  # a prompt token costs 1, a reply token 2
SAMPLING = SamplingParams(temperature=0.0, max_tokens=16)


def batch_config(base_url: str, tmp_path: Path, **changes) -> TeacherConfig:
    settings = dict(backend="openai-batch", model="smollm2-135m", base_url=base_url,
                    cache_dir=str(tmp_path / "cache"), batch_poll_s=0.1, sampling=SAMPLING, prices=PRICES,
                    backoff_base_s=0.05)
    settings.update(changes)
    return TeacherConfig(**settings)


def ask(*texts: str) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": text}] for text in texts]


# -- without a server ---------------------------------------------------------------------------


def test_batch_prices_default_to_half_and_can_be_set():
    config = TeacherConfig(backend="openai-batch", prices=PRICES)
    assert config.billed_prices == PriceTable(input_per_million=5e5, output_per_million=1e6)
    own = PriceTable(input_per_million=3.0, output_per_million=4.0)
    assert TeacherConfig(backend="openai-batch", prices=PRICES, batch_prices=own).billed_prices == own
    assert TeacherConfig(backend="openai", prices=PRICES, batch_prices=own).billed_prices == PRICES
    with pytest.raises(ConfigError, match="has no prices"):
        check_priced(TeacherConfig(backend="openai-batch"), "openai-batch", "the teacher")
    check_priced(TeacherConfig(backend="openai-batch", batch_prices=own), "openai-batch", "the teacher")


def test_lines_are_read_with_the_providers_reason_and_sorted_into_retry_or_not():
    body = {"choices": [{"message": {"content": "Paris"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 1}}
    ok = line_result({"custom_id": "a", "response": {"status_code": 200, "body": body}, "error": None})
    assert (ok.completion.text, ok.completion.prompt_tokens, ok.completion.completion_tokens) == ("Paris", 7, 1)
    expired = line_result({"custom_id": "b", "response": None,
                           "error": {"code": "batch_expired", "message": "not done in the window"}})
    assert (expired.reason, expired.retry_as) == ("batch_expired: not done in the window", "batch_expired")
    busy = line_result({"custom_id": "c", "response": {"status_code": 500, "body": {"error": {
        "message": "overloaded", "type": "server_error"}}}})
    assert (busy.reason, busy.retry_as) == ("server_error: overloaded (HTTP 500)", "server_error")
    bad = line_result({"custom_id": "d", "response": {"status_code": 400, "body": {"error": {
        "message": "max_tokens is too large", "code": "invalid_value"}}}})
    assert (bad.reason, bad.retry_as) == ("invalid_value: max_tokens is too large (HTTP 400)", None)
    # a line missing from both files: retried unless the batch failed or was cancelled
    ended = SimpleNamespace(id="batch_9", status="expired", errors=None)
    assert missing_line(ended).retry_as == "batch_expired"
    failed = SimpleNamespace(id="batch_9", status="failed", errors=SimpleNamespace(data=[SimpleNamespace(
        code="invalid_json_line", message="line 3 is not JSON", line=3)]))
    assert (missing_line(failed).reason, missing_line(failed).retry_as) == (
        "batch batch_9 failed: invalid_json_line: line 3 is not JSON (line 3)", None)


def test_estimate_prices_the_batch_api_at_its_prices_and_counts_batches(tmp_path):
    from datagen.config_file import load_config
    from datagen.estimate import format_estimate, run_estimate
    from datagen.io import write_jsonl_atomic
    from datagen.teachers.teacher import Teacher
    from tests.test_preferences import SEEDS, SETTINGS, SampledScript

    seeds = tmp_path / "seeds.jsonl"
    write_jsonl_atomic(seeds, SEEDS)
    estimates = {}
    for backend in ("openai", "openai-batch"):
        config = load_config()
        config.teacher = TeacherConfig(backend=backend, cache_dir=str(tmp_path / backend), prices=PRICES)
        config.generate = config.generate.model_copy(update={
            "method": "preferences", "seeds": str(seeds), "out": str(tmp_path / "pairs.jsonl"), "num": 10,
            "seed": 7, "preferences": SETTINGS})
        estimates[backend] = run_estimate(config, pilot=1,
                                          teacher_factory=lambda c=config: Teacher(SampledScript(), c.teacher))
    full, batched = estimates["openai"], estimates["openai-batch"]
    assert batched["prompt_tokens"] == full["prompt_tokens"] > 0
    assert batched["cost"] == pytest.approx(full["cost"] / 2)
    # the pilot's 3 teacher calls were one batch each; 10 pairs make 10 times as many, one after another
    assert full["batches"] is None and batched["batches"] == 30
    text = format_estimate(batched)
    assert "at batch prices" in text and "the Batch API's pace: 30 batches one after another" in text


def test_bad_batch_config_is_one_line(tmp_path):
    result = run_cli("teacher", "Hi", "--backend", "openai-batch", "--base-url",
                     "http://127.0.0.1:9/v1,http://127.0.0.1:10/v1")
    assert result.returncode == 2
    assert single_error_line(result) == ("error: teacher.base_url: the openai-batch backend takes one URL (a batch "
                                         "goes to one provider, which spreads the work itself)")
    from datagen.engines.config import EngineConfig
    from datagen.engines.ray_teacher import ray_teacher

    with pytest.raises(ConfigError, match="the openai-batch backend sends each teacher call as one batch"):
        ray_teacher(TeacherConfig(backend="openai-batch"), EngineConfig(kind="ray"))
    result = run_cli("teacher", "Hi", "--backend", "openai-batch", "--base-url", "https://api.example.com/v1",
                     "--api-key-env", "DATAGEN_TEST_NO_SUCH_KEY")
    assert single_error_line(result) == ("error: --api-key-env: environment variable DATAGEN_TEST_NO_SUCH_KEY is "
                                         "not set (needed for https://api.example.com/v1)")


# -- through the stand-in, answered by the real server --------------------------------------------


@pytest.mark.slow
def test_replies_reach_the_cache_at_batch_prices_and_a_rerun_sends_no_batch(vllm_server, tmp_path):
    prompts = ask("Name a fruit.", "Name a colour.", "Name a city.")
    with BatchStandIn(vllm_server) as stand_in:
        with make_teacher(batch_config(stand_in.base_url, tmp_path)) as teacher:
            replies = teacher.complete(prompts)
            stats = teacher.stats
        assert all(reply.ok and reply.text.strip() for [reply] in replies)
        assert len(stand_in.created) == 1 and set(stand_in.answered.values()) == {1} and len(stand_in.answered) == 3
        assert stats.requests_sent == 3 and stats.failures == 0 and stats.prompt_tokens > 0
        # batch prices: half of 1 per prompt token and 2 per reply token
        assert stats.cost == pytest.approx(0.5 * stats.prompt_tokens + stats.completion_tokens)

        with make_teacher(batch_config(stand_in.base_url, tmp_path)) as again:
            replay = again.complete(prompts)
            assert again.stats.requests_sent == 0 and again.stats.cache_hits == 3
        assert [r.text for [r] in replay] == [r.text for [r] in replies]
        assert len(stand_in.created) == 1 and stand_in.uploads == 1


# a run in a process of its own, under a spending cap (argv: config JSON, ledger path, prompts JSON)
KILLED_CLIENT = """
import json, sys
from pathlib import Path
from datagen.teachers import TeacherConfig, make_teacher
from datagen.teachers.spending import SpendingLedger
config = TeacherConfig.model_validate_json(sys.argv[1])
with make_teacher(config) as teacher:
    teacher.ledger = SpendingLedger(Path(sys.argv[2]), config.max_cost, fresh=True)
    teacher.complete(json.loads(sys.argv[3]))
"""


@pytest.mark.slow
def test_a_run_killed_mid_poll_polls_the_same_batch_when_started_again(vllm_server, tmp_path):
    prompts = ask("Name a tree.", "Name a river.", "Name a bird.")
    requests = [Request.build(p, SAMPLING) for p in prompts]
    worst = sum(worst_cost(r, TeacherConfig(backend="openai-batch", prices=PRICES).billed_prices) for r in requests)
    spend = tmp_path / "run.spend.json"
    with BatchStandIn(vllm_server, hold=True) as stand_in:
        # room for the batch once, not twice: the killed run's reservations become spend on the restart
        config = batch_config(stand_in.base_url, tmp_path, max_cost=1.5 * worst)
        client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, config.model_dump_json(), str(spend),
                                   json.dumps(prompts)], cwd=Path(__file__).parent.parent, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not (stand_in.created and stand_in.polls[stand_in.created[0]] >= 2):
                assert client.poll() is None, "the client ended before it was killed"
                assert time.monotonic() < deadline, "the client never polled its batch"
                time.sleep(0.05)
        finally:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait()
        stand_in.release()

        with make_teacher(config) as resumed:
            resumed.ledger = SpendingLedger(spend, config.max_cost, fresh=True)
            assert resumed.ledger.spent == pytest.approx(worst)  # what the killed run had reserved
            replies = resumed.complete(prompts)  # the cap would refuse a second batch of these
        assert all(reply.ok and reply.text.strip() for [reply] in replies)
        assert len(stand_in.created) == 1 and stand_in.uploads == 1  # polled, not submitted again
        assert sorted(stand_in.answered.values()) == [1, 1, 1]  # no line paid twice
        assert resumed.stats.requests_sent == 3


@pytest.mark.slow
def test_a_run_killed_between_upload_and_create_finds_its_batch_instead_of_creating_another(vllm_server, tmp_path):
    import openai

    from datagen.teachers.batch_api import ENDPOINT, SUBMISSION_KEY, BatchRecords
    from datagen.teachers.cache import request_key
    from datagen.teachers.openai_api import chat_body

    prompts = ask("Name a sport.", "Name a song.")
    requests = [Request.build(p, SAMPLING) for p in prompts]
    with BatchStandIn(vllm_server) as stand_in:
        config = batch_config(stand_in.base_url, tmp_path)
        # what a run killed right after `batches.create` went through leaves: a record still "creating"
        records = BatchRecords(tmp_path / "cache" / "batches.sqlite")
        ids = [request_key("openai-batch", config.model, r) for r in requests]
        submission = records.begin(stand_in.base_url, ids)
        lines = "".join(json.dumps({"custom_id": cid, "method": "POST", "url": ENDPOINT,
                                    "body": chat_body(config.model, r)}) + "\n" for cid, r in zip(ids, requests))
        provider = openai.OpenAI(base_url=stand_in.base_url, api_key="EMPTY")
        uploaded = provider.files.create(file=("killed.jsonl", lines.encode()), purpose="batch")
        records.update(submission, "creating", file_id=uploaded.id)
        provider.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h",
                                metadata={SUBMISSION_KEY: submission.tag})
        records.close()

        with make_teacher(config) as resumed:
            replies = resumed.complete(prompts)
        assert all(reply.ok for [reply] in replies)
        assert len(stand_in.created) == 1 and stand_in.uploads == 1 and sorted(stand_in.answered.values()) == [1, 1]


@pytest.mark.slow
def test_expired_lines_go_into_a_new_batch_then_become_rejects_with_the_providers_reason(vllm_server, tmp_path):
    plan = {"expire": {"[late once]": 1, "[late always]": 99},
            "fail": {"[bad]": (400, "invalid_value", "this request is refused")}}
    prompts = ask("Name a fish.", "[late once] Name a dog.", "[late always] Name a cat.", "[bad] Name a cow.")
    with BatchStandIn(vllm_server, **plan) as stand_in:
        with make_teacher(batch_config(stand_in.base_url, tmp_path, batch_retries=1)) as teacher:
            [[fish], [dog], [cat], [cow]] = teacher.complete(prompts)
            stats = teacher.stats
        assert fish.ok and dog.ok  # the dog's line expired once, then came back in the second batch
        assert cat.finish_reason == "error" and cat.error == (
            "batch_expired: This request could not be executed before the completion window expired. "
            "(in 2 batches)")
        assert cow.finish_reason == "error" and cow.error == "invalid_value: this request is refused (HTTP 400)"
        assert len(stand_in.created) == 2  # the second one carried the two expired lines only
        assert len(stand_in.answered) == 2 and set(stand_in.answered.values()) == {1}
        assert stats.retry_reasons == {"batch_expired": 2} and stats.failures == 2

        # the generators make failed replies rejects with this reason; a line missing from both
        # files reads the same way
    with BatchStandIn(vllm_server, expire={"[late]": 99}, expired_in_error_file=False) as stand_in:
        with make_teacher(batch_config(stand_in.base_url, tmp_path / "again", batch_retries=0)) as teacher:
            [[late]] = teacher.complete(ask("[late] Name a horse."))
        assert late.error == f"batch_expired: batch {stand_in.created[0]} ended expired without this request"


@pytest.mark.slow
def test_the_spending_cap_submits_no_batch_that_could_pass_it(vllm_server, tmp_path):
    prompts = ask("Name a month.", "Name a planet.", "Name a metal.")
    batch_prices = TeacherConfig(backend="openai-batch", prices=PRICES).billed_prices
    worst = [worst_cost(Request.build(p, SAMPLING), batch_prices) for p in prompts]
    cap = worst[0] + worst[1] + worst[2] / 2  # two fit at batch prices (at full prices only one would)
    assert worst[0] * 2 + worst[1] * 2 > cap
    with BatchStandIn(vllm_server) as stand_in:
        config = batch_config(stand_in.base_url, tmp_path, max_cost=cap)
        with make_teacher(config) as teacher:
            teacher.ledger = SpendingLedger(tmp_path / "run.spend.json", cap, fresh=True)
            with pytest.raises(SpendingCapReached, match="the next request could cost up to"):
                teacher.complete(prompts)
            spent = teacher.ledger.spent
        lines = stand_in.files[stand_in.batches[stand_in.created[0]]["input_file_id"]].decode().splitlines()
        assert len(stand_in.created) == 1 and len(lines) == 2  # the third was never submitted
        assert spent == pytest.approx(teacher.stats.cost) and spent <= cap


@pytest.mark.slow
def test_orca_runs_end_to_end_on_the_batch_api(vllm_server, tmp_path):
    from datagen.io import write_jsonl_atomic
    from datagen.records import Instance, Task

    seeds = tmp_path / "seeds.jsonl"
    write_jsonl_atomic(seeds, [
        Task(id="capital", instruction="Name the capital of the country.", instances=[Instance(
            input="France", output="Paris")]),
        Task(id="opposite", instruction="Give the opposite of the word.", instances=[Instance(
            input="hot", output="cold")]),
    ])
    with BatchStandIn(vllm_server) as stand_in:
        config = tmp_path / "run.yaml"
        config.write_text(json.dumps({
            "teacher": {"model": "smollm2-135m", "cache_dir": str(tmp_path / "cache"), "batch_poll_s": 0.1,
                        "prices": {"input_per_million": 2.0, "output_per_million": 4.0}},
            "generate": {"orca": {"answer_sampling": {"temperature": 0.0, "max_tokens": 24},
                                  "max_instances_per_task": 1}},
        }))
        out = tmp_path / "orca.jsonl"
        result = run_cli("generate", "--config", str(config), "--method", "orca", "--seeds", str(seeds),
                         "--num", "2", "--out", str(out), "--backend", "openai-batch",
                         "--base-url", stand_in.base_url)
        assert result.returncode == 0, result.stderr
        assert len(stand_in.created) == 1 and len(stand_in.answered) == 2
    summary = json.loads((tmp_path / "orca.summary.json").read_text())
    assert summary["teacher"]["backend"] == "openai-batch" and summary["requests_sent"] == 2
    assert summary["cost"] == pytest.approx((summary["prompt_tokens"] * 1.0 + summary["completion_tokens"] * 2.0)
                                            / 1e6)
    produced = [json.loads(line) for line in out.read_text().splitlines()]
    rejects = [json.loads(line) for line in (tmp_path / "orca.rejects.jsonl").read_text().splitlines()]
    # each real reply became a task or a reject with Orca's reason and the reply's text (the tiny
    # model rarely writes Orca's "Final answer:" line within 24 tokens)
    with_reply = [r for r in rejects if r.get("raw")]
    assert len(produced) + len(with_reply) == 2 and TEACHER_ERROR not in {r["reason"] for r in rejects}
    assert all(task["lineage"]["teacher_backend"] == "openai-batch" for task in produced)
