"""`engine: ray`: a run's teacher requests answered by a Ray Data pipeline (`RayTeacher`).

Every stage that asks a teacher gets one through `datagen.engines.open_teacher` (generation,
export's teacher negatives and categories, ...); this module is what `engine.kind: ray` means.

The generation method's own loop still runs in the driver, unchanged: it builds the
requests, parses the replies, stamps lineage and writes OUT batch by batch, exactly as
with `engine: local`. What changes is the backend under its `Teacher`: `RayBackend`
answers each request from a Ray Data stream instead of calling a model in-process, so
the cache keys (backend name + model + request) and lineage stay those of the configured
teacher, and a deterministic teacher gives the same records bit for bit.

Two ways requests reach the cluster:

- *planned* (Orca): before the loop starts, the method lists every request it will send
  (`GenerationMethod.plan`, the same plan its loop walks). The ones not in the request
  cache go into one streaming pipeline, `engine.batch_size` rows a shard, served by
  `engine.replicas` replicas; the loop consumes the replies in order as they stream back and
  flushes each of its batches to OUT. A thread reads the stream as it comes and writes each
  reply to the request cache the moment it reaches the driver, before the loop asks for it,
  so a killed run pays again only for replies still inside the pipeline, and repeats no
  flushed batch (its tasks are skipped by id).
- *per call* (Evol-Instruct, which answers a window of its batches ahead into the cache):
  each `Teacher.complete` call (the rewrites, the verdicts, the answers of a window) becomes
  one pipeline.

The pipeline's route follows `teacher.backend` (`datagen.engines.config.ray_route`):
`vllm` -> `ray.data.llm.build_processor(vLLMEngineProcessorConfig(concurrency=replicas,
engine_kwargs={"tensor_parallel_size": ...}))`; `openai` with one base URL ->
`HttpRequestProcessorConfig` (POST /chat/completions); anything else -> `map_batches` over an
actor pool whose actors each build one teacher backend (`local` loads its model once per
actor). Ray is imported only here, and only when a run uses it.

On every route a request that fails (the engine refuses a prompt past max_model_len, the
server answers 400/403/404/500) comes back as that request's error completion, as with
`engine: local`: its task is rejected with the reason, nothing is cached for it, and the run
goes on. What Ray still raises (429/408/502/503/504 past max_retries, a body that is not JSON, a dead
replica) stops the run with one line.

    with ray_teacher(config.teacher, config.engine) as teacher: ...
"""

from __future__ import annotations

import json
import math
import queue
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from datagen.config import SamplingParams
from datagen.engines.config import ROUTE_ACTORS, ROUTE_HTTP, ROUTE_VLLM, EngineConfig, ray_route
from datagen.engines.ray_cluster import alive_nodes, import_ray, join_ray
from datagen.errors import ConfigError, TeacherError
from datagen.teachers.base import Backend, BackendCounters, Completion, Message, Request, ResultCallback
from datagen.teachers.batch_api import BATCH_BACKEND
from datagen.teachers.cache import RequestCache, request_key
from datagen.teachers.teacher import Teacher, TeacherConfig, make_backend, sample_requests

BackendFactory = Callable[[TeacherConfig], Backend]


# -- rows: what travels through the pipeline ---------------------------------------------------

# Ray's LLM stages merge what they write into the row (dict.update): in Ray 2.60 the vLLM
# stage writes `params` (vLLM's SamplingParams repr), `prompt`, `request_id`, `generated_text`,
# `num_input_tokens`, `__inference_error__` ..., the chat template, tokenize and detokenize
# stages `prompt`, `tokenized_prompt`, `generated_text`, the HTTP stage `http_response`. Every
# column a request row carries through them is therefore prefixed, so no stage overwrites it.
SEQ, KEY, MESSAGES, PARAMS, SAMPLE = "datagen_seq", "datagen_key", "datagen_messages", "datagen_params", \
    "datagen_sample_index"
# set by Ray's vLLM stage (with should_continue_on_error) on a row whose request failed; such a
# row skips the postprocess and comes out as the whole row
INFERENCE_ERROR = "__inference_error__"
ERROR_CHARS = 500  # an error reason is cut to this, as the openai backend does


def request_row(seq: int, key: str, request: Request) -> dict[str, Any]:
    """A request as a pipeline row (plain columns, so every route can read it)."""
    return {
        SEQ: seq,
        KEY: key,
        MESSAGES: json.dumps(request.chat(), ensure_ascii=False),
        PARAMS: request.params.model_dump_json(),
        SAMPLE: request.sample_index,
    }


def row_request(row: dict[str, Any]) -> Request:
    params = SamplingParams.model_validate_json(row[PARAMS])
    return Request.build(json.loads(row[MESSAGES]), params, int(row[SAMPLE]))


RESULT_COLUMNS = ("seq", "key", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error")


def result_row(row: dict[str, Any], completion: Completion) -> dict[str, Any]:
    """The reply to request row `row` as a result row (RESULT_COLUMNS, what streams back)."""
    return dict(zip(RESULT_COLUMNS, (
        int(row[SEQ]), str(row[KEY]), completion.text, completion.finish_reason, int(completion.prompt_tokens),
        int(completion.completion_tokens), completion.error or "")))


def error_row(row: dict[str, Any], reason: str) -> dict[str, Any]:
    """A failed request as a result row: the driver's Teacher counts it, does not cache it, and
    the method rejects its task with `reason`, as a failed request of `engine: local`."""
    return result_row(row, Completion("", "error", error=reason[:ERROR_CHARS]))


def row_completion(row: dict[str, Any]) -> Completion:
    return Completion(
        text=str(row["text"]),
        finish_reason=str(row["finish_reason"]),
        prompt_tokens=int(row["prompt_tokens"]),
        completion_tokens=int(row["completion_tokens"]),
        error=str(row["error"]) or None,
    )


# -- the three routes --------------------------------------------------------------------------


class TeacherReplica:
    """A Ray Data actor holding one teacher backend (built once, reused for every batch)."""

    def __init__(self, teacher_config_json: str, backend_factory: BackendFactory):
        self.backend = backend_factory(TeacherConfig.model_validate_json(teacher_config_json))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        replies: list[Completion | None] = [None] * len(rows)

        def keep(index: int, completion: Completion) -> None:
            replies[index] = completion

        self.backend.generate([row_request(row) for row in rows], keep)
        results = [result_row(row, reply or Completion("", "error", error="no reply")) for row, reply in
                   zip(rows, replies)]
        return {column: [result[column] for result in results] for column in results[0]} if results else {}


def replica_teacher(teacher: TeacherConfig, nodes: int) -> TeacherConfig:
    """What each actor's backend runs with. The replicas of one node share the configured rate
    budget (a file locked on that node); nodes cannot, so on N nodes each node's replicas
    share an exact 1/N of every limit, said once on stderr."""
    if nodes <= 1:
        return teacher
    share = teacher.share(nodes)
    limits = {name: value for name in ("requests_per_minute", "tokens_per_minute")
              if (value := getattr(share, name)) is not None}
    if limits:
        said = ", ".join(f"{name} {value:g}" for name, value in limits.items())
        print(f"engine: ray: {nodes} nodes cannot share one rate budget; each node's replicas get 1/{nodes} "
              f"of it ({said})", file=sys.stderr)
    return share


def _actor_pool(dataset, teacher: TeacherConfig, engine: EngineConfig, backend_factory: BackendFactory):
    resources = dict(engine.resources or {"CPU": 1.0})
    return dataset.map_batches(
        TeacherReplica,
        fn_constructor_args=(replica_teacher(teacher, alive_nodes()).model_dump_json(), backend_factory),
        batch_size=engine.batch_size,
        concurrency=engine.replicas,
        num_cpus=resources.pop("CPU", 0.0),
        num_gpus=resources.pop("GPU", 0.0),
        resources=resources or None,
    )


# The vLLM and HTTP routes' preprocess/postprocess, module-level so a CPU test runs them
# inside Ray's own stage code (tests/test_ray_vllm_stage.py).


def vllm_request(row: dict[str, Any]) -> dict[str, Any]:
    """Preprocess of the vLLM route: the columns Ray's stages read (chat template: `messages`;
    vLLM engine: `sampling_params`), added to the row."""
    params = json.loads(row[PARAMS])
    return {"messages": json.loads(row[MESSAGES]), "sampling_params": {
        "temperature": params["temperature"], "top_p": params["top_p"], "max_tokens": params["max_tokens"],
        "stop": params["stop"] or None, "seed": params["seed"]}}


def vllm_reply(row: dict[str, Any]) -> dict[str, Any]:
    """Postprocess of the vLLM route: a result row from what the engine stage wrote."""
    # the processor reports no finish reason: a reply that used its whole budget was cut off
    generated, budget = int(row["num_generated_tokens"]), json.loads(row[PARAMS])["max_tokens"]
    return result_row(row, Completion(str(row["generated_text"]), "length" if generated >= budget else "stop",
                                      int(row["num_input_tokens"]), generated))


def http_request(row: dict[str, Any], model: str) -> dict[str, Any]:
    """Preprocess of the HTTP route: the `payload` Ray's HTTP stage POSTs to /chat/completions."""
    params = json.loads(row[PARAMS])
    return {"payload": {
        "model": model, "messages": json.loads(row[MESSAGES]), "temperature": params["temperature"],
        "top_p": params["top_p"], "max_tokens": params["max_tokens"], "stop": params["stop"] or None,
        "seed": params["seed"], "n": 1}}


def http_reply(row: dict[str, Any]) -> dict[str, Any]:
    """Postprocess of the HTTP route: a result row from the response body. Ray's HTTP stage
    hands back the JSON body of any status it does not retry (400 context too long, 403, 404,
    500 ...) as `http_response`, with no status code: a body without `choices` is the server's
    error, and becomes this request's error, not the run's."""
    response = row["http_response"]
    choices = response.get("choices") if isinstance(response, dict) else None
    if not choices:
        reason = http_error_reason(response)
        if _error_code(response) in RUN_ENDING_CODES:
            # a refused key fails every request alike: stop the run, as the openai backend
            # does, instead of rejecting every task with the same reason
            raise TeacherError(f"the server refused the run's requests: {reason}")
        return error_row(row, f"HTTP error reply: {reason}")
    choice, usage = choices[0], response.get("usage") or {}
    return result_row(row, Completion((choice.get("message") or {}).get("content") or "",
                                      choice.get("finish_reason") or "stop", int(usage.get("prompt_tokens") or 0),
                                      int(usage.get("completion_tokens") or 0)))


# OpenAI's code for a refused key (401, which Ray hands back; a 429, a spent quota included, it
# retries and then fails the pipeline itself)
RUN_ENDING_CODES = {"invalid_api_key"}


def _error_code(body: Any) -> str | None:
    error = body.get("error", body) if isinstance(body, dict) else None
    return str(error.get("code")) if isinstance(error, dict) and error.get("code") is not None else None


def http_error_reason(body: Any) -> str:
    """The reason in an error body: OpenAI's and vLLM's {"error": {"message", "type", "code"}},
    vLLM's older {"object": "error", "message", ...}, FastAPI's {"detail"}; else the body itself."""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict) and (error.get("message") or error.get("detail")):
        kind = " ".join(f"({value})" if name == "code" else str(value) for name in ("type", "code")
                        if (value := error.get(name)) not in (None, ""))
        message = str(error.get("message") or error.get("detail"))
        return f"{kind}: {message}" if kind else message
    return error if isinstance(error, str) and error else json.dumps(body, ensure_ascii=False, default=str)


def settled_reply(row: dict[str, Any]) -> dict[str, Any]:
    """Every row out of a processor as a result row. A row Ray's vLLM stage failed skipped the
    postprocess and still holds every column; in the same block, the other rows got those
    columns too (as None): only RESULT_COLUMNS go on."""
    if row.get(INFERENCE_ERROR):
        return error_row(row, str(row[INFERENCE_ERROR]))
    return {column: row[column] for column in RESULT_COLUMNS}


def vllm_processor_config(teacher: TeacherConfig, engine: EngineConfig):
    """The vLLM route's `vLLMEngineProcessorConfig` (building the processor starts Ray; this does not)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from datagen.model_paths import resolve_model

    engine_kwargs = {"dtype": teacher.dtype, "seed": 0, **teacher.engine_args,
                     "tensor_parallel_size": engine.tensor_parallel}
    extra = {"placement_group_config": {"bundle_per_worker": engine.resources}} if engine.resources else {}
    return vLLMEngineProcessorConfig(
        model_source=resolve_model(teacher.model), engine_kwargs=engine_kwargs, concurrency=engine.replicas,
        batch_size=engine.batch_size,
        # a request the engine refuses (a prompt past max_model_len ...) fails alone, as an
        # error row, instead of failing the run (and every rerun) at the same request
        should_continue_on_error=True,
        # vLLM's export to Ray's Prometheus endpoint needs ray.serve in the engine actor, and
        # without it (datagen[ray] installs ray[data] only) the engine fails to start; the run
        # summary counts tokens itself
        log_engine_metrics=False, **extra,
    )


def _vllm_processor(teacher: TeacherConfig, engine: EngineConfig):
    from ray.data.llm import build_processor

    return build_processor(vllm_processor_config(teacher, engine), preprocess=vllm_request, postprocess=vllm_reply)


def http_qps(teacher: TeacherConfig, engine: EngineConfig) -> int | None:
    """Ray's HTTP stage paces each replica to `qps` requests a second: the run's
    `requests_per_minute` split exactly over the replicas (this route does not share the
    openai backend's budget file). It has no token budget, so `tokens_per_minute` is refused."""
    if teacher.tokens_per_minute:
        raise ConfigError("teacher.tokens_per_minute: Ray's HTTP route paces requests only; drop it, or list "
                          "the server twice in teacher.base_url to run the openai backend in Ray's actors")
    if not teacher.requests_per_minute:
        return None
    per_replica = teacher.requests_per_minute / 60 / engine.replicas
    if per_replica < 1:
        raise ConfigError(f"teacher.requests_per_minute: {teacher.requests_per_minute:g} a minute over "
                          f"{engine.replicas} replicas is below Ray's 1 request a second per replica; use fewer "
                          "replicas")
    return int(per_replica)


def _http_processor(teacher: TeacherConfig, engine: EngineConfig):
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    from datagen.teachers.openai_api import OPENAI_URL, api_key_for

    base_url = (teacher.base_url or OPENAI_URL).rstrip("/")
    config = HttpRequestProcessorConfig(
        url=f"{base_url}/chat/completions",
        headers={"Authorization": f"Bearer {api_key_for(teacher, base_url)}"},
        concurrency=engine.replicas, batch_size=engine.batch_size, qps=http_qps(teacher, engine),
        max_retries=teacher.max_retries, base_retry_wait_time_in_s=max(teacher.backoff_base_s, 0.1),
    )
    return build_processor(config, preprocess=partial(http_request, model=teacher.model), postprocess=http_reply)


def stream_replies(
    rows: list[dict[str, Any]], route: str, teacher: TeacherConfig, engine: EngineConfig,
    backend_factory: BackendFactory | None,
) -> Iterator[dict[str, Any]]:
    """Result rows for `rows` (request rows) through `route`, streamed back as shards finish, in order."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / engine.batch_size)))
    if route == ROUTE_VLLM:
        dataset = _vllm_processor(teacher, engine)(dataset).map(settled_reply)
    elif route == ROUTE_HTTP:
        dataset = _http_processor(teacher, engine)(dataset).map(settled_reply)
    else:
        dataset = _actor_pool(dataset, teacher, engine, backend_factory or make_backend)
    try:
        yield from dataset.iter_rows()
    except Exception as error:  # noqa: BLE001 - a replica's failure arrives wrapped in Ray's exception types
        raise TeacherError(f"engine: ray: the pipeline failed ({route}): {_root_cause(error)}") from error


def _root_cause(error: BaseException) -> str:
    """The replica's own error line ("RuntimeError: ...") from under Ray's wrappers."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    text = "\n".join(str(e) for e in chain)
    own = [line.strip() for line in re.findall(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt): .+)$", text, re.M)
           if not line.strip().startswith(("ray.", "UserCodeException", "RayTaskError"))]
    return own[-1] if own else f"{type(chain[-1]).__name__}: {str(chain[-1]).strip().splitlines()[-1:]}"


# -- the driver's backend ----------------------------------------------------------------------


class RayBackend:
    """A `Backend` whose replies come from Ray Data (see the module docstring).

    `name` and `model` are the configured teacher's, so cache keys do not change. Requests
    announced with `plan` are answered from one streaming pipeline started on the first
    `generate`, read by a thread that caches each reply as it arrives (in `cache_path`,
    when set); any other request goes out in a pipeline of its own call. Ray is joined (or
    started) by `connect`, at the latest before the first pipeline, and shut down on
    `close` when this backend started it.
    """

    def __init__(self, teacher: TeacherConfig, engine: EngineConfig, backend_factory: BackendFactory | None = None,
                 name: str | None = None):
        self.teacher_config = teacher
        self.engine = engine
        self.backend_factory = backend_factory
        self.name = name or teacher.backend
        self.model = teacher.model
        self.counters = BackendCounters()
        # an injected backend can only run inside actors
        self.route = ROUTE_ACTORS if backend_factory else ray_route(teacher.backend, teacher.base_url)
        self.cache_path: Path | None = None  # where arriving planned replies are cached (RayTeacher sets it)
        self._planned: set[str] = set()  # requests announced and not yet handed to the loop
        self._rows: list[dict[str, Any]] = []
        self._reader: _StreamReader | None = None
        self._ahead: dict[str, Completion] = {}  # replies streamed back before the loop asked for them
        self.pipelines = 0
        self._connected = False
        self._started_ray = False

    def connect(self) -> None:
        """Join the cluster (`datagen.engines.ray_cluster.join_ray`: engine.address, else
        RAY_ADDRESS, else a Ray started on this machine) unless Ray is up already."""
        if self._connected:
            return
        self._started_ray = join_ray(self.engine.address)
        self._connected = True

    def key(self, request: Request) -> str:
        return request_key(self.name, self.model, request)

    def pending(self, key: str) -> bool:
        """Whether `key` is planned and not yet handed to the loop."""
        return key in self._planned

    def plan(self, requests: Iterable[Request], skip: Callable[[str], bool] = lambda _key: False) -> int:
        """Announce requests the run will send, in the order it will send them; those
        `skip` says are answered already (cached) stay out. Returns how many will be sent."""
        for request in requests:
            key = self.key(request)
            if skip(key):
                continue
            if key not in self._planned:
                self._rows.append(request_row(len(self._rows), key, request))
                self._planned.add(key)
        return len(self._rows)

    def generate(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        keys = [self.key(request) for request in requests]
        unplanned = [index for index, key in enumerate(keys) if key not in self._planned and key not in self._ahead]
        if unplanned:
            self.connect()
            self.pipelines += 1
            rows = [request_row(seq, keys[index], requests[index]) for seq, index in enumerate(unplanned)]
            for row in stream_replies(rows, self.route, self.teacher_config, self.engine, self.backend_factory):
                on_result(unplanned[int(row["seq"])], row_completion(row))
        for index, key in enumerate(keys):
            if key in self._planned:
                on_result(index, self._take(key))
            elif key in self._ahead:  # taken before, and kept: there is no cache to ask
                on_result(index, self._ahead[key])

    def _take(self, key: str) -> Completion:
        if self._reader is None:
            self.connect()
            self.pipelines += 1
            stream = stream_replies(self._rows, self.route, self.teacher_config, self.engine, self.backend_factory)
            self._reader = _StreamReader(stream, self.cache_path)
            self._rows = []
        while key not in self._ahead:
            arrived_key, completion = self._reader.next()
            self._ahead[arrived_key] = completion
        # a planned request is handed over once: later asks find it in the cache the reader
        # wrote (a cache hit, as on engine: local); with no cache it is kept for them
        self._planned.discard(key)
        return self._ahead.pop(key) if self.cache_path is not None else self._ahead[key]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()  # stops the pipeline when the loop finished early (num reached)
            self._reader = None
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = self._connected = False


class _StreamReader:
    """Reads a stream of result rows in a thread, caching each reply as it arrives.

    The loop may be busy (parsing, writing OUT) while shards stream back; without this the
    replies would wait in Ray's buffers, uncached, and a kill would pay for them again.
    `next()` hands them to the loop in stream order and re-raises the stream's failure.
    """

    _END = object()

    def __init__(self, stream: Iterator[dict[str, Any]], cache_path: Path | None):
        self._stream, self._cache_path = stream, cache_path
        self._arrived: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="datagen-ray-replies", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        # SQLite connections belong to one thread: this one has its own (WAL allows both)
        cache = RequestCache(self._cache_path) if self._cache_path else None
        try:
            for row in self._stream:
                completion = row_completion(row)
                if cache is not None:
                    cache.put(str(row["key"]), completion)
                self._arrived.put((str(row["key"]), completion))
                if self._stop.is_set():
                    break
            self._arrived.put(self._END)
        except BaseException as error:  # noqa: BLE001 - handed to the loop's thread, which raises it
            self._arrived.put(error)
        finally:
            self._stream.close()
            if cache is not None:
                cache.close()

    def next(self) -> tuple[str, Completion]:
        item = self._arrived.get()
        if item is self._END:
            self._arrived.put(item)
            raise RuntimeError("the Ray pipeline ended without answering a planned request")
        if isinstance(item, BaseException):
            self._arrived.put(item)
            raise item
        return item

    def close(self, wait_s: float = 30.0) -> None:
        """Stop reading after the reply in flight (it is cached too) and wait for the thread."""
        self._stop.set()
        self._thread.join(wait_s)


def ray_teacher(teacher: TeacherConfig, engine: EngineConfig, backend_factory: BackendFactory | None = None,
                name: str | None = None, connect_now: bool = True) -> RayTeacher:
    """A Teacher (cache and statistics in the driver) whose backend is `RayBackend`.

    Joins Ray (`join_ray`: engine.address, else RAY_ADDRESS, else a Ray started on this
    machine) unless Ray is already up:
    here (`connect_now`, so an unreachable cluster fails before any output is written), or
    else at the first request not in the cache (a rerun answered from the cache never
    starts Ray). A Ray started here is shut down when the teacher closes.
    `backend_factory` replaces the configured backend in the actor route (tests inject a
    scripted one, named `name` in cache keys).
    """
    if teacher.backend == BATCH_BACKEND:
        raise ConfigError("engine.kind: ray: the openai-batch backend sends each teacher call as one batch and the "
                          "provider spreads it; run it on engine: local")
    if engine.tensor_parallel > 1 and teacher.backend != "vllm":
        raise ConfigError("engine.tensor_parallel: only teacher.backend: vllm splits a model across devices")
    import_ray()  # a missing install is one line now, not at the first request
    backend = RayBackend(teacher, engine, backend_factory, name)
    if connect_now:
        backend.connect()
    return RayTeacher(backend, teacher)


class _PlannedFirst:
    """The request cache as the run's `Teacher` sees it: a planned reply the stream reader
    cached on arrival is not a hit until the loop has taken it from the stream, so it is
    counted once, as sent (tokens, cost), like any reply this run paid for."""

    def __init__(self, cache: RequestCache, backend: RayBackend):
        self.cache, self.backend = cache, backend

    def get(self, key: str) -> Completion | None:
        return None if self.backend.pending(key) else self.cache.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)

    def __len__(self) -> int:
        return len(self.cache)


class RayTeacher(Teacher):
    """`Teacher` over `RayBackend`; `plan` announces requests, leaving out cached ones."""

    backend: RayBackend

    def __init__(self, backend: RayBackend, config: TeacherConfig):
        super().__init__(backend, config)
        if self.cache is not None:
            backend.cache_path = self.cache.path
            self.cache = _PlannedFirst(self.cache, backend)  # type: ignore[assignment]

    def plan(self, conversations: Iterable[tuple[Sequence[Message], SamplingParams]]) -> int:
        """Announce `(messages, params)` pairs in the order the loop will ask for them."""
        requests = (request for messages, params in conversations for request in self.requests(messages, params))
        cached = (lambda key: self.cache.get(key) is not None) if self.cache else (lambda _key: False)
        return self.backend.plan(requests, cached)

    @staticmethod
    def requests(messages: Sequence[Message], params: SamplingParams) -> list[Request]:
        return sample_requests(messages, params)

