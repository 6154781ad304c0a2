"""The `openai` backend: the official async client against any OpenAI-compatible server.

Works with vLLM's server, OpenAI itself, or anything else that speaks
`/v1/chat/completions` (and `/v1/completions` for raw-prefix requests, Magpie's: a server
answering 404 there stops the run with one line). What it adds over a bare `asyncio.gather`:

- bounded concurrency (`max_concurrency`, over all servers) and request/token-per-minute budgets
  that are the account's, shared by every process of the run on this machine
  (`datagen.teachers.rate_budget`), taken in the concurrency slot just before each send;
- several base URLs serving the same model (replicas; `vllm serve --data-parallel-size N`
  behind one URL needs none of this): each request goes to the server with the fewest
  requests in flight, and a request that failed on one server is retried on another;
- retries with exponential backoff and jitter on 429, 5xx, timeouts, dropped
  connections and unparseable bodies, honouring `Retry-After` / `retry-after-ms`;
- a per-request timeout; a fatal error (unreachable server, bad key) stops the run
  with one clear line instead of failing every request;
- the API key is read from the environment variable `api_key_env` and never stored.

    datagen teacher "Hi" --backend openai --base-url http://127.0.0.1:8000/v1 --model NAME
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from datagen.errors import TeacherError
from datagen.teachers.base import BackendCounters, Completion, Request, ResultCallback
from datagen.teachers.cache import cache_folder
from datagen.teachers.rate_budget import SharedBucket, bucket_path

if TYPE_CHECKING:  # a type hint only: the teacher module imports this one
    from datagen.teachers.teacher import TeacherConfig

OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def retry_after_seconds(headers) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        moment = email.utils.parsedate_to_datetime(value)
        return max(0.0, moment.timestamp() - time.time()) if moment else None


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: uniform in [half, full] of min(cap, base * 2^attempt)."""
    ceiling = min(cap, base * (2**attempt))
    return rng.uniform(ceiling / 2, ceiling)


def api_key_for(config: TeacherConfig, base_url: str) -> str:
    """The API key from `config.api_key_env`; "EMPTY" for a loopback server without one."""
    key = os.environ.get(config.api_key_env)
    if key:
        return key
    if urlparse(base_url).hostname not in LOOPBACK_HOSTS:
        # Said here, before the first request, not as a 401 from the server later.
        raise TeacherError(
            f"--api-key-env: environment variable {config.api_key_env} is not set (needed for {base_url})"
        )
    if config.api_key_env != DEFAULT_KEY_ENV:  # the user named a variable: say it is unset
        print(f"warning: --api-key-env: environment variable {config.api_key_env} is not set; {base_url} is "
              "local, so no key is sent", file=sys.stderr)
    return "EMPTY"  # local servers ignore the key but the client wants one


class OpenAIBackend:
    name = "openai"

    def __init__(self, config: TeacherConfig):
        import openai  # noqa: F401  (fail here, clearly, if the client is missing)

        self.config = config
        self.model = config.model
        urls = config.base_url if isinstance(config.base_url, list) else [config.base_url or OPENAI_URL]
        self.base_urls = [url.rstrip("/") for url in urls]
        self.base_url = ", ".join(self.base_urls)  # for messages
        self.counters = BackendCounters()
        # the same for every server (raises for a remote one when the variable is unset)
        self._api_key = [api_key_for(config, url) for url in self.base_urls][0]
        self._rng = random.Random(0)
        self._requests_budget = self._bucket("requests", config.requests_per_minute)
        self._tokens_budget = self._bucket("tokens", config.tokens_per_minute)
        self._checked = False

    # -- public --------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        run_to_end(self._generate_all(requests, on_result))

    def close(self) -> None:
        pass

    # -- internals -----------------------------------------------------------------------

    def _bucket(self, unit: str, per_minute: float | None) -> SharedBucket | None:
        if not per_minute:
            return None
        folder = cache_folder(self.config.cache_dir)
        return SharedBucket(bucket_path(folder, self.base_urls, self.config.api_key_env, unit), per_minute)

    def _client(self, base_url: str):
        import httpx
        from openai import AsyncOpenAI

        limit = self.config.max_concurrency
        return AsyncOpenAI(
            base_url=base_url,
            api_key=self._api_key,
            max_retries=0,  # retries are ours: they honour Retry-After and are counted
            timeout=self.config.timeout_s,
            http_client=httpx.AsyncClient(
                limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
                timeout=self.config.timeout_s,
            ),
        )

    async def _generate_all(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(self._client(url)) for url in self.base_urls]
            if not self._checked:
                for url, client in zip(self.base_urls, clients):
                    await check_server(client, url, self.model, self.config)
                self._checked = True
            slots = asyncio.Semaphore(self.config.max_concurrency)
            endpoints = Endpoints(clients)
            await asyncio.gather(
                *(self._answer(endpoints, slots, i, r, on_result) for i, r in enumerate(requests))
            )

    async def _answer(self, endpoints: Endpoints, slots, index: int, request: Request, on_result) -> None:
        estimate = (sum(len(content) for _role, content in request.messages) + len(request.prefix or "")) / 4 \
            + request.params.max_tokens
        attempt = 0
        failed_on: int | None = None
        while True:
            try:
                async with slots:
                    # the budget is taken in the slot, just before the send: taken while waiting
                    # for a slot, a slow spell piles tokens up and the sends then burst past the rate
                    if self._requests_budget:
                        await self._requests_budget.acquire(1)
                    if self._tokens_budget:
                        await self._tokens_budget.acquire(estimate)
                    async with endpoints.use(avoid=failed_on) as (endpoint, client):
                        failed_on = endpoint
                        if request.prefix is not None:  # Magpie's raw prefix: /v1/completions
                            response = await client.completions.create(**completion_body(self.model, request))
                        else:
                            response = await client.chat.completions.create(**chat_body(self.model, request))
                # a body the SDK could not read as a completion (e.g. not JSON) is a bad response
                completion = completion_from_body(response.model_dump() if hasattr(response, "model_dump")
                                                  else response)
            except Exception as error:  # noqa: BLE001 - sorted into fatal, retryable or not below
                fatal = fatal_error(error, self.base_urls[failed_on or 0], self.config) \
                    or no_raw_completion(error, self.base_urls[failed_on or 0], request)
                if fatal is not None:
                    raise fatal from None
                reason, wait = classify_error(error)
                if reason is None or attempt >= self.config.max_retries:
                    if self._tokens_budget:
                        self._tokens_budget.settle(estimate, 0)
                    on_result(index, Completion("", "error", error=f"{type(error).__name__}: {error}"[:500]))
                    return
                self.counters.count_retry(reason)
                if wait is None:
                    wait = backoff_seconds(
                        attempt, self.config.backoff_base_s, self.config.backoff_max_s, self._rng
                    )
                await asyncio.sleep(min(wait, self.config.backoff_max_s))
                attempt += 1
                continue
            if self._tokens_budget:
                self._tokens_budget.settle(
                    estimate, completion.prompt_tokens + completion.completion_tokens
                )
            on_result(index, completion)
            return


class Endpoints:
    """Client-side balancing over the servers of one backend: the least busy server (fewest
    requests in flight, then list order), never the one a retried request just failed on
    when there is another."""

    def __init__(self, clients: Sequence):
        self.clients = list(clients)
        self.in_flight = [0] * len(self.clients)

    def pick(self, avoid: int | None = None) -> int:
        choices = [i for i in range(len(self.clients)) if i != avoid] or list(range(len(self.clients)))
        return min(choices, key=lambda i: (self.in_flight[i], i))

    @contextlib.asynccontextmanager
    async def use(self, avoid: int | None = None):
        endpoint = self.pick(avoid)
        self.in_flight[endpoint] += 1
        try:
            yield endpoint, self.clients[endpoint]
        finally:
            self.in_flight[endpoint] -= 1


def run_to_end(coroutine) -> None:
    """Run `coroutine` to its end from synchronous code, also when called inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:  # called from inside an event loop
        pool.submit(asyncio.run, coroutine).result()


def chat_body(model: str, request: Request) -> dict:
    """The `/v1/chat/completions` body for one request: what the openai backend sends and what
    a Batch API line carries."""
    params = request.params
    body = {
        "model": model,
        "messages": request.chat(),
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "n": 1,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if request.schema is not None:
        # structured outputs: OpenAI's and vLLM's servers constrain the reply to the schema
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "reply", "schema": json.loads(request.schema), "strict": True}}
    return body


def completion_body(model: str, request: Request) -> dict:
    """The `/v1/completions` body for a raw-prefix request (`Request.prefix`): the prefix is
    the prompt, continued as it stands, with the same sampling as a chat body."""
    body = chat_body(model, request)
    del body["messages"]
    return {"prompt": request.prefix, **body}


def no_raw_completion(error: Exception, base_url: str, request: Request) -> TeacherError | None:
    """The one line for a raw-prefix request the server cannot answer: a chat-only API (OpenAI's
    chat models, most hosted APIs) answers 404 on `/v1/completions`; None for anything else."""
    import openai

    if request.prefix is None or not isinstance(error, openai.NotFoundError):
        return None
    return TeacherError(
        f"{base_url} has no raw completion for this model (/v1/completions answered 404): Magpie needs a "
        "teacher that continues a raw prefix (the local or vllm backend, or a server such as vLLM's)")


def completion_from_body(body: dict) -> Completion:
    """A chat completion's JSON body (a reply, or a Batch API output line's `response.body`)
    as a Completion; ValueError when it has no choice."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not choices:
        raise ValueError("response has no choices")
    choice = choices[0]
    usage = body.get("usage") or {}
    return Completion(
        # a chat completion's message, or a raw completion's text (`/v1/completions`)
        text=(choice.get("message") or {}).get("content") or choice.get("text") or "",
        finish_reason=choice.get("finish_reason") or "stop",
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
    )


async def check_server(client, base_url: str, model: str, config: TeacherConfig) -> None:
    """Fail fast, with one line, if the server is unreachable, refuses the key or lacks the model."""
    import openai

    try:
        page = await client.models.list(timeout=min(30.0, config.timeout_s))
    except openai.APIConnectionError as error:
        cause = error.__cause__ or error
        raise TeacherError(f"cannot reach the teacher at {base_url}: {cause}") from None
    except openai.AuthenticationError:
        raise TeacherError(f"{base_url} refused the API key in {config.api_key_env}") from None
    except openai.APIError:
        return  # some compatible servers have no /models; the first request will tell
    served = [entry.id for entry in page.data]
    if served and model not in served:
        shown = ", ".join(served[:5]) + (" ..." if len(served) > 5 else "")
        raise TeacherError(f"{base_url} does not serve model {model!r} (it serves: {shown})")


def fatal_error(error: Exception, base_url: str, config: TeacherConfig) -> TeacherError | None:
    """The one line that stops the run for an error no retry can cure: a refused key, a spent
    quota; None for any other error."""
    import openai

    if isinstance(error, openai.AuthenticationError):
        return TeacherError(f"{base_url} refused the API key in {config.api_key_env}")
    if isinstance(error, openai.RateLimitError) and error_code(error) == "insufficient_quota":
        # no wait refills a quota: every later request would fail the same way
        return TeacherError(
            f"{base_url}: the account behind {config.api_key_env} is out of quota (429 insufficient_quota); "
            f"check its plan and billing, then rerun (the cache keeps what was answered)")
    return None


def error_code(error) -> str | None:
    """The `code` (or `type`) of an API error body: OpenAI tells a spent quota from a rate
    limit only there (both are 429)."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner.get("code") or inner.get("type")
    return getattr(error, "code", None)


def classify_error(error: Exception) -> tuple[str | None, float | None]:
    """(retry reason, server-requested wait) for a failed call; reason None means give up."""
    import openai

    if isinstance(error, openai.APITimeoutError):
        return "timeout", None
    if isinstance(error, openai.APIConnectionError):
        return "connection", None
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        wait = retry_after_seconds(error.response.headers)
        if status == 429:
            return "429", wait
        if status >= 500 or status in (408, 409):
            return str(status), wait
        return None, None
    if isinstance(error, (openai.APIResponseValidationError, json.JSONDecodeError, ValueError)):
        return "bad response", None
    return None, None
