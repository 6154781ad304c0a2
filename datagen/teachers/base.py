"""The teacher protocol: batch-first chat completion with usage accounting.

A *backend* (local transformers, an OpenAI-compatible API, the offline vLLM engine)
turns a list of `Request`s (one sample each) into `Completion`s and reports each one
through a callback the moment it is done, so the request cache can keep it even if
the run is killed before the batch ends.

Everything else sees the `Teacher` in `datagen.teachers.teacher`, which adds `n`
samples per prompt, the cache and the run statistics on top of a backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from datagen.config import SamplingParams

Message = dict[str, str]
"""A chat message: {"role": "system" | "user" | "assistant", "content": "..."}."""


@dataclass(frozen=True)
class Request:
    """One sample of one prompt. `params.n` is always 1 here; `sample_index` tells samples apart.

    `prefix`: raw text for the model to continue instead of a chat (Magpie's pre-query
    prefix, the chat template opened up to the user's message); `messages` then stays
    empty, and a backend without raw completion answers it with a TeacherError.
    `schema`: a JSON schema (canonical JSON text) the reply must follow, for backends that
    constrain decoding; the others answer as usual and the caller parses the text.
    Both are part of the request cache key when set.
    """

    messages: tuple[tuple[str, str], ...]
    params: SamplingParams
    sample_index: int = 0
    prefix: str | None = None
    schema: str | None = None

    @classmethod
    def build(cls, messages: Sequence[Message], params: SamplingParams, sample_index: int = 0,
              schema: str | None = None) -> Request:
        return cls(
            messages=tuple((m["role"], m["content"]) for m in messages),
            params=params,
            sample_index=sample_index,
            schema=schema,
        )

    def chat(self) -> list[Message]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass
class Completion:
    """A teacher's reply. `finish_reason` is "stop", "length" or "error" (then `error` says why)."""

    text: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.finish_reason != "error"


ResultCallback = Callable[[int, Completion], None]


@dataclass
class BackendCounters:
    """What a backend did beyond answering: retries after faults, for the run summary."""

    retries: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)

    def count_retry(self, reason: str) -> None:
        self.retries += 1
        self.retry_reasons[reason] = self.retry_reasons.get(reason, 0) + 1


class Backend(Protocol):
    """What every teacher backend provides."""

    name: str
    model: str
    counters: BackendCounters

    def generate(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        """Answer every request, calling `on_result(index, completion)` once per request.

        A request that fails for good (after retries) gets a completion with
        finish_reason "error"; a teacher that cannot be used at all raises TeacherError.
        """
        ...

    def close(self) -> None: ...

    # Optional: `submitted(requests) -> set[int]`, the positions of requests an earlier run
    # already submitted and paid for (an open Batch API batch), which the spending cap does
    # not reserve again. Backends that send each request as it is asked need none.
