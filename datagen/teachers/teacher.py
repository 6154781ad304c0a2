"""The Teacher: a backend plus `n` samples per prompt, the request cache and run statistics.

Generators call `Teacher.complete(conversations, params)`; it answers from the cache what
it can, sends the rest to the backend in one batch, stores each reply the moment it
arrives, and counts requests, hits, retries, tokens, cost and failures.
`Teacher.complete_many([(conversations, params), ...])` does the same for several jobs
with different sampling in one backend call (a method answering batches ahead).

    from datagen.teachers import TeacherConfig, make_teacher
    with make_teacher(TeacherConfig(backend="local")) as teacher:
        [[reply]] = teacher.complete([[{"role": "user", "content": "Hi"}]])
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from datagen.config import DEFAULT_MODEL, SamplingParams, Strict
from datagen.errors import TeacherError
from datagen.teachers.base import Backend, Completion, Message, Request
from datagen.teachers.batch_api import BATCH_BACKEND, BATCH_DISCOUNT, BatchAPIBackend
from datagen.teachers.cache import RequestCache, cache_folder, request_key
from datagen.teachers.local import LocalBackend
from datagen.teachers.openai_api import DEFAULT_KEY_ENV, OpenAIBackend
from datagen.teachers.spending import SpendingLedger, worst_cost
from datagen.teachers.vllm_engine import VLLMBackend

# The backends by name: `teacher.backend` and `--backend` accept exactly these. A backend
# module imports nothing heavy at module level (torch, vllm, openai load in __init__).
BACKENDS: dict[str, Callable[[TeacherConfig], Backend]] = {
    "local": LocalBackend,
    "openai": OpenAIBackend,
    BATCH_BACKEND: BatchAPIBackend,
    "vllm": VLLMBackend,
}

BackendName = Literal[tuple(BACKENDS)]  # type: ignore[valid-type]

# one `complete` call's arguments: the conversations, their sampling (None: the teacher's) and
# optionally a JSON schema the replies must follow (see `complete`)
Job = tuple[Sequence[Sequence[Message]], SamplingParams | None] | \
    tuple[Sequence[Sequence[Message]], SamplingParams | None, dict[str, Any] | str | None]


class PriceTable(Strict):
    """Prices in currency units per million tokens; turns usage into cost."""

    input_per_million: float = Field(ge=0.0)
    output_per_million: float = Field(ge=0.0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million
        ) / 1_000_000

    def scaled(self, factor: float) -> PriceTable:
        return PriceTable(input_per_million=self.input_per_million * factor,
                          output_per_million=self.output_per_million * factor)


class TeacherConfig(Strict):
    """Which teacher answers, how it is called, and where its replies are cached."""

    backend: BackendName = "local"
    model: str = DEFAULT_MODEL
    sampling: SamplingParams = SamplingParams()

    # local (transformers)
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(16, ge=1)

    # openai (any OpenAI-compatible server)
    # one server, or several serving the same model (a list, or comma-separated on the command
    # line): requests go to the least busy, and a failed one is retried on another
    base_url: str | list[str] | None = None
    api_key_env: str = DEFAULT_KEY_ENV
    max_concurrency: int = Field(32, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    # the SDK's own default: a long generation (thousands of tokens from a slow model) must not
    # time out, since a timed-out request is retried and the provider may bill both
    timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    prices: PriceTable | None = None
    # stop before a request that could take the run's spend (all its teachers) past this
    # (needs `prices`; see datagen.teachers.spending)
    max_cost: float | None = Field(None, gt=0)

    # openai-batch (the Batch API; base_url, api_key_env, timeout_s and max_retries as above,
    # for its file and batch calls; see datagen.teachers.batch_api)
    # what the Batch API charges; unset: `prices` x 0.5, OpenAI's batch discount
    batch_prices: PriceTable | None = None
    batch_poll_s: float = Field(30.0, gt=0)  # seconds between two looks at a batch
    batch_retries: int = Field(2, ge=0)  # new batches for lines that expired or failed for a passing reason
    batch_max_lines: int = Field(50_000, ge=1)  # requests per batch (OpenAI's limit; and 200 MB a file)
    # stop waiting for a batch this long after it was created (the 24 h window, and an hour to
    # finalize); it stays recorded, so a rerun polls it again
    batch_give_up_s: float = Field(25 * 3600.0, gt=0)

    # vllm (offline engine); e.g. {"tensor_parallel_size": 2, "max_model_len": 4096}
    engine_args: dict[str, Any] = Field(default_factory=dict)

    # send the reply schemas callers ask for (ratings, verdicts, the judge's score); off: every
    # request is plain text, for a server that refuses `response_format`
    structured_outputs: bool = True

    # request cache: "use" reads and writes, "off" bypasses, "only" replays offline
    cache: Literal["use", "off", "only"] = "use"
    cache_dir: str | None = None

    @field_validator("base_url", mode="before")
    @classmethod
    def _url_list(cls, value: Any) -> Any:
        if isinstance(value, str) and "," in value:
            value = [url.strip() for url in value.split(",") if url.strip()]
        if isinstance(value, list) and not value:
            raise ValueError("list at least one URL")
        return value[0] if isinstance(value, list) and len(value) == 1 else value

    def share(self, workers: int) -> TeacherConfig:
        """One of `workers` equal shares of this teacher's limits (requests and tokens a minute,
        concurrency, the spending cap), for workers that cannot share one budget (several
        machines): together they stay within the configured limits."""
        if workers <= 1:
            return self
        per = {name: value / workers for name in ("requests_per_minute", "tokens_per_minute", "max_cost")
               if (value := getattr(self, name)) is not None}
        return self.model_copy(update={**per, "max_concurrency": max(1, self.max_concurrency // workers)})

    @property
    def billed_prices(self) -> PriceTable | None:
        """The prices this teacher pays: `prices`, or on the Batch API `batch_prices` (unset:
        `prices` at the batch discount). Costs, the spending cap and `--estimate` use these."""
        if self.backend != BATCH_BACKEND:
            return self.prices
        return self.batch_prices or (self.prices.scaled(BATCH_DISCOUNT) if self.prices else None)



@dataclass
class RunStats:
    """Counts for the run summary. Tokens and cost are for requests sent in this run."""

    requests_sent: int = 0
    cache_hits: int = 0
    retries: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None
    failures: int = 0
    failure_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Teacher:
    """Cache-aware, batch-first access to one backend."""

    def __init__(self, backend: Backend, config: TeacherConfig):
        self.backend = backend
        self.config = config
        self.stats = RunStats(cost=0.0 if config.billed_prices else None)
        self.cache: RequestCache | None = None
        if config.cache != "off":
            self.cache = RequestCache(cache_folder(config.cache_dir) / "requests.sqlite")
        self._answering_ahead = False
        self._sent_ahead: set[str] = set()  # keys this run answered ahead, not yet taken by the loop
        self.ledger: SpendingLedger | None = None  # the run's spending cap (`run_generate` sets it)

    @property
    def name(self) -> str:
        return f"{self.backend.name}:{self.backend.model}"

    def complete(
        self,
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams | None = None,
        progress: Callable[[int], None] | None = None,
        schema: dict[str, Any] | str | None = None,
    ) -> list[list[Completion]]:
        """`params.n` completions for each conversation, in order.

        Failed requests come back with finish_reason "error" and are counted, not raised.
        A conversation given as a `str` is a raw prefix for the model to continue (no chat
        template; Magpie's pre-query prefix), for backends that can (`Request.prefix`).
        `progress(k)` is called as k more requests finish (cache hits included).
        `schema`: a JSON schema the replies must follow; backends that can constrain decoding
        do (local with xgrammar, vllm, openai's `response_format`), the others ignore it, so
        the caller still parses the text. It is part of each request's cache key.
        """
        [replies] = self.complete_many([(conversations, params, schema)], progress)
        return replies

    @contextmanager
    def answering_ahead(self) -> Iterator[None]:
        """Calls inside fill the cache for the loop's later calls (a look-ahead window): what
        they send counts as sent, what they find cached is not counted (the loop's call that
        takes it is), and the loop taking a reply they sent is no cache hit (this run paid)."""
        self._answering_ahead = True
        try:
            yield
        finally:
            self._answering_ahead = False

    @property
    def in_look_ahead(self) -> bool:
        """Inside `answering_ahead`: the replies are for later calls, not the loop's own."""
        return self._answering_ahead

    def complete_many(
        self,
        jobs: Sequence[Job],
        progress: Callable[[int], None] | None = None,
    ) -> list[list[list[Completion]]]:
        """`complete` for several (conversations, params) jobs in ONE backend call.

        Jobs with different sampling (e.g. one seed per batch) go out together: one vLLM
        `engine.chat` batch, one concurrent HTTP burst, one Ray pipeline, since every
        request carries its own params. Returns each job's `complete` result, in order; the
        cache keys and counting are those of `complete` (each request is answered from the
        cache or sent, cached the moment it arrives). With the cache on, a request asked twice
        in one call (the same key: messages, sampling, seed, sample) is sent once; the copy
        counts as a cache hit, as it would in a later call.
        """
        structured = self.config.structured_outputs
        jobs = [(job[0], job[1] or self.config.sampling,
                 schema_text(job[2] if len(job) > 2 and structured else None)) for job in jobs]
        requests = [request for conversations, params, schema in jobs for messages in conversations
                    for request in sample_requests(messages, params, schema)]
        results: list[Completion | None] = [None] * len(requests)
        keys = [request_key(self.backend.name, self.backend.model, r) for r in requests]
        missing = []
        for index, key in enumerate(keys):
            hit = self.cache.get(key) if self.cache else None
            if hit is not None:
                results[index] = hit
                if self._answering_ahead:
                    pass  # counted when the loop takes it
                elif key in self._sent_ahead:
                    self._sent_ahead.discard(key)
                else:
                    self.stats.cache_hits += 1
            else:
                missing.append(index)
        # with the cache off each request stands alone (unseeded sampling must stay independent)
        first_of: dict[str, int] = {}
        copies = [index for index in missing if first_of.setdefault(keys[index], index) != index] \
            if self.cache is not None else []
        if copies:
            missing = [index for index in missing if first_of[keys[index]] == index]
            if not self._answering_ahead:  # ahead, they are counted when the loop takes them
                self.stats.cache_hits += len(copies)
        if progress and len(missing) < len(requests):
            progress(len(requests) - len(missing))
        if missing and self.config.cache == "only":
            raise TeacherError(
                f"{len(missing)} of {len(requests)} requests are not in the cache "
                "(cache: only replays offline; run with the cache on to fill it)"
            )
        prepaid = self._submitted_before(requests, missing)
        reserved, over = self._reserve(requests, [index for index in missing if index not in prepaid])
        if over is not None:
            missing = [index for index in missing if index in reserved or index in prepaid]

        def on_result(position: int, completion: Completion) -> None:
            index = missing[position]
            results[index] = completion
            cost = self._count(completion)
            if index in reserved:
                self.ledger.settle(reserved[index], cost)  # type: ignore[union-attr]
            if self.cache is not None:
                self.cache.put(keys[index], completion)
                if self._answering_ahead and completion.ok:
                    self._sent_ahead.add(keys[index])
            if progress:
                progress(1)

        if missing:
            retries_before = self.backend.counters.retries
            self.backend.generate([requests[i] for i in missing], on_result)
            self.stats.retries += self.backend.counters.retries - retries_before
            self.stats.retry_reasons = dict(self.backend.counters.retry_reasons)
        for index in missing:
            if results[index] is None:  # a backend bug, not a user error
                raise RuntimeError(f"backend {self.backend.name} returned no result for request {index}")
        if over is not None:  # what fitted is answered and cached; the run stops here
            raise self.ledger.stop(over)  # type: ignore[union-attr]
        for index in copies:
            results[index] = results[first_of[keys[index]]]
        answered: list[list[list[Completion]]] = []
        start = 0
        for conversations, params, _schema in jobs:
            answered.append([
                [results[start + i * params.n + s] for s in range(params.n)]  # type: ignore[misc]
                for i in range(len(conversations))
            ])
            start += len(conversations) * params.n
        return answered

    def _submitted_before(self, requests: Sequence[Request], missing: list[int]) -> set[int]:
        """Under a spending cap, the requests a killed run already submitted (an open Batch API
        batch, which this call polls): their reservations became spend when this run started,
        so they are not reserved again, and not stopped by the cap."""
        submitted = getattr(self.backend, "submitted", None)
        if self.ledger is None or submitted is None or not missing:
            return set()
        return {missing[position] for position in submitted([requests[index] for index in missing])}

    def _reserve(self, requests: Sequence[Request], missing: list[int]) -> tuple[dict[int, float], float | None]:
        """Under a spending cap, reserve each request's worst cost, in order, until one does not
        fit: (index -> reserved, that one's worst cost or None when all fit)."""
        prices = self.config.billed_prices
        if self.ledger is None or prices is None:
            return {}, None
        reserved: dict[int, float] = {}
        for index in missing:
            cost = worst_cost(requests[index], prices)
            if not self.ledger.reserve(cost):
                return reserved, cost
            reserved[index] = cost
        return reserved, None

    def _count(self, completion: Completion) -> float:
        """Count a reply that was sent; its cost (0 unpriced or failed)."""
        self.stats.requests_sent += 1
        if not completion.ok:
            self.stats.failures += 1
            if len(self.stats.failure_examples) < 5 and completion.error:
                self.stats.failure_examples.append(completion.error)
            return 0.0
        self.stats.prompt_tokens += completion.prompt_tokens
        self.stats.completion_tokens += completion.completion_tokens
        prices = self.config.billed_prices
        if not prices:
            return 0.0
        cost = prices.cost(completion.prompt_tokens, completion.completion_tokens)
        self.stats.cost = (self.stats.cost or 0.0) + cost
        return cost

    def close(self) -> None:
        self.backend.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _single_sample(params: SamplingParams, sample: int) -> SamplingParams:
    seed = None if params.seed is None else params.seed + sample
    return params.model_copy(update={"n": 1, "seed": seed})


def sample_requests(messages: Sequence[Message] | str, params: SamplingParams, schema: str | None = None
                    ) -> list[Request]:
    """The requests one conversation becomes: one per sample (`params.n`), each n=1 with the
    seed + its sample index, so every sample is a request (and a cache key) of its own. A `str`
    in place of the messages is a raw prefix to continue (`Request.prefix`, Magpie)."""
    if isinstance(messages, str):
        return [Request((), _single_sample(params, sample), sample, prefix=messages, schema=schema)
                for sample in range(params.n)]
    return [Request.build(messages, _single_sample(params, sample), sample, schema=schema)
            for sample in range(params.n)]


def schema_text(schema: dict[str, Any] | str | None) -> str | None:
    """A JSON schema as `Request.schema` holds it: compact JSON text, so the same schema always
    makes the same cache key. Keys keep their order: constrained decoding writes properties in
    the order the schema lists them (the verdict before the rationale)."""
    if schema is None:
        return None
    value = json.loads(schema) if isinstance(schema, str) else schema
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def make_backend(config: TeacherConfig) -> Backend:
    """The backend named by `config.backend`; its heavy imports happen here, not before."""
    return BACKENDS[config.backend](config)


def make_teacher(config: TeacherConfig) -> Teacher:
    return Teacher(make_backend(config), config)


def run_summary(teacher: Teacher, wall_seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "teacher": {"backend": teacher.backend.name, "model": teacher.backend.model},
        **teacher.stats.as_dict(),
        "wall_seconds": round(wall_seconds, 3),
        **extra,
    }
