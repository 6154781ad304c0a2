"""The openai backend against a real vLLM OpenAI-compatible server on 127.0.0.1.

Faults come from `FaultProxy` in front of the real server: 429 with Retry-After,
500s, stalls past the timeout, truncated and garbage bodies. Every request must
still complete exactly once, and a rerun must be answered from the cache.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from datagen.config import SamplingParams
from datagen.errors import TeacherError
from datagen.teachers import PriceTable, TeacherConfig, make_teacher
from datagen.teachers.openai_api import backoff_seconds, retry_after_seconds
from datagen.teachers.rate_budget import SharedBucket, bucket_path
from tests.fault_proxy import FaultProxy

PLAN = {
    "[r0]": ["429", "429"],
    "[r1]": ["500"],
    "[r2]": ["stall"],
    "[r3]": ["truncate"],
    "[r4]": ["garbage", "500"],
    "[r5]": [],
    "[r6]": ["429", "stall", "truncate"],
    "[r7]": [],
}


# Far past what 12 tokens take on a loaded 2-core machine (a slow real reply must never be
# retried and delivered twice), yet short enough that the two injected stalls cost little.
TIMEOUT_S = 15.0


def api_config(base_url, tmp_path, **changes):
    settings = dict(
        backend="openai", model="smollm2-135m", base_url=base_url, cache_dir=str(tmp_path),
        timeout_s=TIMEOUT_S, max_retries=5, backoff_base_s=0.05, backoff_max_s=2.0, max_concurrency=4,
        sampling=SamplingParams(temperature=0.0, max_tokens=12),
        prices=PriceTable(input_per_million=1.0, output_per_million=2.0),
    )
    settings.update(changes)
    return TeacherConfig(**settings)


@pytest.mark.slow
def test_every_request_completes_exactly_once_through_faults(vllm_server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    prompts = [[{"role": "user", "content": f"{marker} Name a fruit."}] for marker in PLAN]
    with FaultProxy(vllm_server, PLAN, stall_seconds=TIMEOUT_S + 1) as proxy:
        with make_teacher(api_config(proxy.base_url, tmp_path)) as teacher:
            replies = teacher.complete(prompts)
            stats = teacher.stats
        assert all(reply.ok and reply.text.strip() for [reply] in replies)
        assert dict(proxy.delivered) == {marker: 1 for marker in PLAN}
        assert stats.requests_sent == len(PLAN) and stats.failures == 0
        assert stats.retries == sum(len(faults) for faults in PLAN.values())
        assert stats.retry_reasons["429"] == 3
        assert stats.retry_reasons["timeout"] == 2
        assert stats.prompt_tokens > 0 and stats.completion_tokens > 0
        assert stats.cost == pytest.approx((stats.prompt_tokens + 2 * stats.completion_tokens) / 1e6)

        # A rerun (or a resume after a kill) sends nothing: every reply is on disk.
        with make_teacher(api_config(proxy.base_url, tmp_path)) as again:
            replay = again.complete(prompts)
            assert again.stats.requests_sent == 0 and again.stats.cache_hits == len(PLAN)
        assert [r.text for [r] in replay] == [r.text for [r] in replies]
        assert dict(proxy.delivered) == {marker: 1 for marker in PLAN}


@pytest.mark.slow
def test_a_spent_quota_stops_the_run_with_one_line_instead_of_being_retried(vllm_server, tmp_path):
    # both are 429s; a rate limit is waited out, a spent quota never refills
    plan = {"[spent]": ["quota"] * 10}
    with FaultProxy(vllm_server, plan) as proxy, make_teacher(api_config(proxy.base_url, tmp_path)) as teacher:
        with pytest.raises(TeacherError, match=r"out of quota \(429 insufficient_quota\); check its plan"):
            teacher.complete([[{"role": "user", "content": "[spent] Name a fruit."}]])
        assert proxy.attempts["[spent]"] == 1 and teacher.stats.retries == 0


@pytest.mark.slow
def test_request_that_keeps_failing_is_reported_not_raised(vllm_server, tmp_path):
    plan = {"[always]": ["500"] * 10}
    with FaultProxy(vllm_server, plan) as proxy:
        with make_teacher(api_config(proxy.base_url, tmp_path, max_retries=2)) as teacher:
            [[bad], [good]] = teacher.complete(
                [[{"role": "user", "content": "[always] hi"}], [{"role": "user", "content": "Say hi."}]]
            )
    assert bad.finish_reason == "error" and "500" in bad.error
    assert good.ok
    assert teacher.stats.failures == 1 and teacher.stats.retries == 2


@pytest.mark.slow
def test_openai_backend_matches_server_sampling(vllm_server, tmp_path):
    """n samples with a seed, stop strings and max_tokens reach the real server."""
    config = api_config(vllm_server, tmp_path, sampling=SamplingParams(temperature=0.9, max_tokens=20, seed=11, n=3))
    with make_teacher(config) as teacher:
        [samples] = teacher.complete([[{"role": "user", "content": "Invent a word."}]])
        [[short]] = teacher.complete([[{"role": "user", "content": "Tell me a story."}]],
                                     SamplingParams(temperature=0, max_tokens=4))
    assert len(samples) == 3 and all(s.ok for s in samples)
    assert short.finish_reason == "length" and short.completion_tokens == 4


def test_retry_after_parsing_and_backoff_bounds():
    import random

    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after_seconds({}) is None
    rng = random.Random(0)
    delays = [backoff_seconds(attempt, 1.0, 8.0, rng) for attempt in range(6)]
    for attempt, delay in enumerate(delays):
        ceiling = min(8.0, 2**attempt)
        assert ceiling / 2 <= delay <= ceiling


def take_in_process(path, per_minute, count):
    asyncio.run(_take(SharedBucket(path, per_minute), count))


async def _take(bucket, count):
    for _ in range(count):
        await bucket.acquire(1)


def test_rate_budget_holds_back_past_the_budget_and_lets_big_takes_through_in_debt(tmp_path):
    bucket = SharedBucket(tmp_path / "b.json", per_minute=600)  # 10 a second, a second's worth in the bucket
    started = time.monotonic()
    asyncio.run(_take(bucket, 15))
    assert time.monotonic() - started >= 0.45  # lower bounds only: slowness cannot break them
    started = time.monotonic()
    asyncio.run(bucket.acquire(25))  # bigger than the bucket: waits for a full one, then owes 15
    asyncio.run(bucket.acquire(1))  # waits for the debt to be repaid
    assert time.monotonic() - started >= 1.5


def test_processes_share_one_rate_budget(tmp_path):
    """Four processes (as datatrove's shards) taking 15 each at 1200 a minute: together they
    wait as one budget does, (60 - 20 in the bucket) / 20 a second = 2 s; each with its own
    budget they would not wait at all."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=take_in_process, args=(tmp_path / "b.json", 1200, 15)) for _ in range(4)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0] * 4
    assert time.monotonic() - started >= 1.9


def test_one_account_one_bucket(tmp_path):
    one = bucket_path(tmp_path, ["http://a/v1", "http://b/v1"], "KEY", "requests")
    assert one == bucket_path(tmp_path, ["http://b/v1", "http://a/v1"], "KEY", "requests")
    assert one != bucket_path(tmp_path, ["http://a/v1", "http://b/v1"], "OTHER_KEY", "requests")
    assert one != bucket_path(tmp_path, ["http://a/v1", "http://b/v1"], "KEY", "tokens")
