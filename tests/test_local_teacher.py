"""The local backend generates real text from the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest

from datagen.config import SamplingParams
from datagen.teachers import TeacherConfig, make_teacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    config = TeacherConfig(backend="local", cache="off", batch_size=4)
    with make_teacher(config) as loaded:
        yield loaded


def ask(text):
    return [{"role": "user", "content": text}]


def test_batch_of_real_replies_with_usage(teacher):
    prompts = [ask("What is the capital of France?"), ask("Write a haiku about rain."), ask("Say yes.")]
    replies = teacher.complete(prompts, SamplingParams(temperature=0.0, max_tokens=32))
    assert len(replies) == 3
    for [reply] in replies:
        assert reply.ok and reply.text.strip()
        assert reply.prompt_tokens > 5
        assert 0 < reply.completion_tokens <= 32
        assert reply.finish_reason in {"stop", "length"}
    assert "paris" in replies[0][0].text.lower()


def test_length_limit_is_reported(teacher):
    [[reply]] = teacher.complete([ask("Tell me a long story about a dragon.")],
                                 SamplingParams(temperature=0.0, max_tokens=5))
    assert reply.finish_reason == "length"
    assert reply.completion_tokens == 5


def test_stop_string_cuts_the_reply(teacher):
    params = SamplingParams(temperature=0.0, max_tokens=40)
    prompt = [ask("List five fruits, one per line.")]
    [[full]] = teacher.complete(prompt, params)
    words = full.text.split()
    assert len(words) > 4
    stop = words[3]
    [[cut]] = teacher.complete(prompt, params.model_copy(update={"stop": (stop,)}))
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert full.text.startswith(cut.text)


def test_seeded_sampling_repeats_with_n_samples(teacher):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=7, n=2)
    first = teacher.complete([ask("Invent a name for a cat.")], params)[0]
    second = teacher.complete([ask("Invent a name for a cat.")], params)[0]
    assert len(first) == 2
    assert [r.text for r in first] == [r.text for r in second]


def test_system_message_is_used(teacher):
    [[reply]] = teacher.complete(
        [[{"role": "system", "content": "Answer with one word only."}, *ask("What color is the sky?")]],
        SamplingParams(temperature=0.0, max_tokens=16),
    )
    assert reply.ok and len(reply.text.split()) <= 8
