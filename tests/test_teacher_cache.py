"""The Teacher wrapper: request keys, the on-disk cache, n samples, resume after a crash."""

from __future__ import annotations

import pytest

from datagen.config import SamplingParams
from datagen.errors import TeacherError
from datagen.teachers import TeacherConfig
from datagen.teachers.base import Request
from datagen.teachers.cache import RequestCache, request_key
from datagen.teachers.teacher import Teacher, make_backend

HELLO = [{"role": "user", "content": "Say hello."}]


def test_request_key_depends_on_everything_that_changes_the_answer():
    base = Request.build(HELLO, SamplingParams(temperature=0.5, seed=1))
    key = request_key("openai", "m", base)
    assert key == request_key("openai", "m", Request.build(HELLO, SamplingParams(temperature=0.5, seed=1)))
    variants = [
        request_key("vllm", "m", base),
        request_key("openai", "other", base),
        request_key("openai", "m", Request.build([{"role": "user", "content": "Say hi."}], base.params)),
        request_key("openai", "m", Request.build(HELLO, SamplingParams(temperature=0.6, seed=1))),
        request_key("openai", "m", Request.build(HELLO, SamplingParams(temperature=0.5, seed=2))),
        request_key("openai", "m", Request.build(HELLO, base.params, sample_index=1)),
    ]
    assert len({key, *variants}) == 7


def test_cache_file_holds_no_credentials(tmp_path, monkeypatch):
    secret = "sk-test-very-secret-value"
    monkeypatch.setenv("DATAGEN_TEST_KEY", secret)
    cache = RequestCache(tmp_path / "requests.sqlite")
    from datagen.teachers.base import Completion

    cache.put(request_key("openai", "m", Request.build(HELLO, SamplingParams())), Completion("hi", "stop", 3, 1))
    cache.close()
    for path in tmp_path.iterdir():
        assert secret.encode() not in path.read_bytes()


class CrashAfter:
    """Fault injection: wraps a real backend and dies (like a kill) after `limit` results."""

    def __init__(self, backend, limit):
        self.backend, self.limit = backend, limit
        self.name, self.model, self.counters = backend.name, backend.model, backend.counters
        self.sent = 0

    def generate(self, requests, on_result):
        def counted(index, completion):
            if self.sent == self.limit:
                raise KeyboardInterrupt
            self.sent += 1
            on_result(index, completion)

        self.backend.generate(requests, counted)

    def close(self):
        pass


@pytest.mark.slow
def test_crash_mid_batch_then_resume_sends_only_what_was_missing(tmp_path):
    config = TeacherConfig(backend="local", cache_dir=str(tmp_path), batch_size=2,
                           sampling=SamplingParams(temperature=0.0, max_tokens=8))
    prompts = [[{"role": "user", "content": f"Name a color. ({i})"}] for i in range(6)]
    real = make_backend(config)
    crashing = Teacher(CrashAfter(real, limit=4), config)
    with pytest.raises(KeyboardInterrupt):
        crashing.complete(prompts)
    crashing.cache.close()

    resumed = Teacher(real, config)
    replies = resumed.complete(prompts)
    assert resumed.stats.cache_hits == 4
    assert resumed.stats.requests_sent == 2
    assert all(reply.ok and reply.text for [reply] in replies)

    replay = Teacher(real, config.model_copy(update={"cache": "only"}))
    assert [r.text for [r] in replay.complete(prompts)] == [r.text for [r] in replies]
    assert replay.stats.requests_sent == 0
    with pytest.raises(TeacherError, match="not in the cache"):
        replay.complete([[{"role": "user", "content": "never asked"}]])
    resumed.close()
