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


def test_several_jobs_with_their_own_sampling_go_out_in_one_backend_call(tmp_path):
    from tests.helpers import ScriptedBackend

    backend = ScriptedBackend(lambda prompt: f"re: {prompt}")
    calls: list[list[Request]] = []
    generate = backend.generate
    backend.generate = lambda requests, on_result: (calls.append(list(requests)), generate(requests, on_result))
    teacher = Teacher(backend, TeacherConfig(cache_dir=str(tmp_path)))
    a = [[{"role": "user", "content": f"a{i}"}] for i in range(2)]
    b = [[{"role": "user", "content": "b0"}]]
    jobs = [(a, SamplingParams(seed=1)), (b, SamplingParams(seed=2, n=2))]
    [for_a, for_b] = teacher.complete_many(jobs)

    assert len(calls) == 1 and [(r.messages[-1][1], r.params.seed) for r in calls[0]] == [
        ("a0", 1), ("a1", 1), ("b0", 2), ("b0", 3)]  # each request with its own params
    def texts(replies):
        return [[c.text for c in samples] for samples in replies]

    assert texts(for_a) == [["re: a0"], ["re: a1"]] and texts(for_b) == [["re: b0", "re: b0"]]
    assert teacher.stats.requests_sent == 4
    # the same keys as `complete`: each job comes back from the cache, nothing sent again
    again = [teacher.complete(b, SamplingParams(seed=2, n=2)), teacher.complete(*jobs[0])]
    assert [texts(r) for r in again] == [texts(for_b), texts(for_a)]
    assert all(c.cached for replies in again for samples in replies for c in samples)
    assert len(calls) == 1 and teacher.stats.cache_hits == 4
    teacher.close()


def test_replies_answered_ahead_count_once_as_sent_and_never_as_cache_hits(tmp_path):
    """A look-ahead window's replies are paid for once (sent); the loop taking them back is
    no cache hit. What an earlier run cached stays a hit, counted when the loop takes it."""
    from tests.helpers import ScriptedBackend

    def ask(text):
        return [[{"role": "user", "content": text}]]

    config = TeacherConfig(cache_dir=str(tmp_path))
    with Teacher(ScriptedBackend(lambda prompt: f"re: {prompt}"), config) as earlier:
        earlier.complete(ask("old"))
    teacher = Teacher(ScriptedBackend(lambda prompt: f"re: {prompt}"), config)
    with teacher.answering_ahead():
        assert teacher.in_look_ahead
        teacher.complete_many([(ask("new"), None), (ask("old"), None)])
    assert not teacher.in_look_ahead
    assert (teacher.stats.requests_sent, teacher.stats.cache_hits) == (1, 0)
    teacher.complete(ask("new"))
    teacher.complete(ask("old"))
    assert (teacher.stats.requests_sent, teacher.stats.cache_hits) == (1, 1)
    teacher.complete(ask("new"))  # asked again by the loop itself: now a real hit
    assert teacher.stats.cache_hits == 2
    teacher.close()


def test_a_request_asked_twice_in_one_call_is_sent_once(tmp_path):
    from tests.helpers import ScriptedBackend

    backend = ScriptedBackend(lambda prompt: f"reply to {prompt}")
    teacher = Teacher(backend, TeacherConfig(cache_dir=str(tmp_path)))
    other = [{"role": "user", "content": "Say bye."}]
    replies = teacher.complete([HELLO, other, HELLO], SamplingParams(temperature=0.0, seed=3))
    assert backend.seen == ["Say hello.", "Say bye."]
    assert [r.text for [r] in replies] == ["reply to Say hello.", "reply to Say bye.", "reply to Say hello."]
    assert (teacher.stats.requests_sent, teacher.stats.cache_hits) == (2, 1)
    # with the cache off every request stands alone (an unseeded sample must stay independent)
    uncached = Teacher(backend, TeacherConfig(cache="off"))
    uncached.complete([HELLO, HELLO], SamplingParams(temperature=0.9))
    assert backend.seen[2:] == ["Say hello.", "Say hello."] and uncached.stats.requests_sent == 2
    # two samples of one conversation are two requests (sample index, seed + i), not copies
    teacher.complete([other], SamplingParams(temperature=0.7, seed=3, n=2))
    assert backend.seen[4:] == ["Say bye.", "Say bye."]


def test_a_repeat_answered_ahead_counts_once_when_the_loop_takes_it(tmp_path):
    from tests.helpers import ScriptedBackend

    backend = ScriptedBackend(lambda prompt: "ok")
    teacher = Teacher(backend, TeacherConfig(cache_dir=str(tmp_path)))
    with teacher.answering_ahead():
        teacher.complete([HELLO, HELLO])
    teacher.complete([HELLO, HELLO])  # the loop's call, answered from the cache
    assert (teacher.stats.requests_sent, teacher.stats.cache_hits) == (1, 1)  # as without the look-ahead
