"""`datagen generate ... --estimate`: what a run will cost, from a small pilot run.

The pilot is the real run cut short: the same config and teacher, `--num` lowered to
`pilot` tasks, written to a scratch file (OUT is not touched). Its requests go through the
request cache, so the real run that follows answers them from there and pays for none of
them again. From the pilot's requests, tokens and teacher time per accepted task it
projects the requested `--num`:

    requests   = pilot requests          x num / pilot tasks accepted
    tokens     = pilot prompt/completion tokens, scaled the same way
    wall time  = pilot seconds per request sent x projected requests (the pilot ran at the
                 configured concurrency: teacher.max_concurrency, or engine.replicas on Ray)
    cost       = projected tokens priced by teacher.prices (on the openai-batch backend at
                 its batch prices: teacher.batch_prices, or half of teacher.prices)

On the Batch API each teacher call is one batch and they run one after another, so the wall
time is the pilot's seconds per batch x the projected number of teacher calls (a provider may
take up to 24 h for each; the pilot's own batches take that long too).

Every teacher of the run counts: for `--method preferences` the responders with a backend of
their own (e.g. the local student) are tallied beside the judge, each projected the same way
and priced by its own `prices` (an unpriced one is named, not guessed).

and says what it assumed: the pilot's requests per accepted task (rejected tasks, retries and
per-instance rejects are all inside that figure).

    summary = run_estimate(config, pilot=8); print(format_estimate(summary))
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datagen.config import SamplingParams
from datagen.errors import ConfigError
from datagen.generate import make_run_teacher, run_generate
from datagen.teachers.base import Message
from datagen.teachers.batch_api import BATCH_BACKEND
from datagen.teachers.teacher import Teacher, TeacherConfig, make_teacher

DEFAULT_PILOT_TASKS = 8


class TallyingTeacher:
    """A Teacher as it is, plus the tokens of every reply it hands out (cached ones too, so a
    repeated estimate projects the same tokens) and the time spent waiting for the teacher."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.seconds_sending = 0.0
        self.calls_sending = 0  # calls that sent anything: one batch each on the Batch API

    def __getattr__(self, name: str) -> Any:
        return getattr(self.teacher, name)

    @property
    def ledger(self):
        return self.teacher.ledger

    @ledger.setter
    def ledger(self, ledger) -> None:  # the spending cap is the wrapped teacher's to keep
        self.teacher.ledger = ledger

    def complete(self, conversations: Sequence[Sequence[Message]], params: SamplingParams | None = None,
                 progress: Callable[[int], None] | None = None, schema: dict[str, Any] | str | None = None):
        replies = self._timed(lambda: self.teacher.complete(conversations, params, progress, schema=schema))
        if self.teacher.in_look_ahead:  # tallied when the loop takes them from the cache
            return replies
        for samples in replies:
            for reply in samples:
                self.requests += 1
                self.prompt_tokens += reply.prompt_tokens
                self.completion_tokens += reply.completion_tokens
        return replies

    def complete_many(self, jobs, progress: Callable[[int], None] | None = None):
        # a window answered ahead: its time counts; its replies are tallied when the loop
        # takes them from the cache through `complete`
        return self._timed(lambda: self.teacher.complete_many(jobs, progress))

    def _timed(self, call):
        """`call()`, its time counted when it sent anything."""
        sent_before = self.teacher.stats.requests_sent
        started = time.monotonic()
        replies = call()
        if self.teacher.stats.requests_sent > sent_before:
            self.seconds_sending += time.monotonic() - started
            self.calls_sending += 1
        return replies

    def __enter__(self) -> TallyingTeacher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.teacher.close()


def run_estimate(config, pilot: int = DEFAULT_PILOT_TASKS,
                 teacher_factory: Callable[[], Teacher] | None = None,
                 other_teacher_factory: Callable[[str, TeacherConfig], Teacher] | None = None) -> dict[str, Any]:
    """Run the pilot for `config` and return the projection for `config.generate.num`
    (the factories as in `run_generate`)."""
    if pilot < 1:
        raise ConfigError("--pilot: give at least 1 task")
    settings = config.generate
    pilot_config = config.model_copy(deep=True)
    pilot_config.generate.num = min(settings.num, pilot)
    tally: TallyingTeacher | None = None
    others: dict[str, tuple[TallyingTeacher, TeacherConfig]] = {}

    def make() -> TallyingTeacher:
        nonlocal tally
        tally = TallyingTeacher((teacher_factory or (lambda: make_run_teacher(pilot_config)))())
        return tally

    def make_other(name: str, teacher_config: TeacherConfig) -> TallyingTeacher:
        others[name] = (TallyingTeacher((other_teacher_factory or (lambda _n, c: make_teacher(c)))(
            name, teacher_config)), teacher_config)
        return others[name][0]

    with tempfile.TemporaryDirectory(prefix="datagen-pilot-") as scratch:
        pilot_config.generate.out = str(Path(scratch) / "pilot.jsonl")
        summary = run_generate(pilot_config, "datagen generate --estimate (pilot)", make, make_other)
    assert tally is not None
    accepted = summary["tasks_produced"]
    rejected = sum(summary["rejects_by_reason"].values())
    if accepted == 0:
        raise ConfigError(f"--estimate: the pilot of {pilot_config.generate.num} tasks accepted none "
                          f"({rejected} rejects); nothing to project from (see the rejects with a real run)")
    scale = settings.num / accepted

    def projected(counted: TallyingTeacher, prices) -> dict[str, Any]:
        prompt, completion = round(counted.prompt_tokens * scale), round(counted.completion_tokens * scale)
        return {"requests": math.ceil(counted.requests * scale), "prompt_tokens": prompt,
                "completion_tokens": completion, "cost": prices.cost(prompt, completion) if prices else None}

    own = projected(tally, config.teacher.billed_prices)
    responders = {name: {"backend": counted.backend.name, "model": counted.backend.model,
                         "pilot_requests": counted.requests, **projected(counted, responder_config.billed_prices)}
                  for name, (counted, responder_config) in others.items()}
    every = [own, *responders.values()]
    requests = sum(p["requests"] for p in every)
    prompt_tokens = sum(p["prompt_tokens"] for p in every)
    completion_tokens = sum(p["completion_tokens"] for p in every)
    pilot_requests = tally.requests + sum(counted.requests for counted, _c in others.values())
    responder_summaries = summary.get("responders", {}).values()
    sent = summary["requests_sent"] + sum(r["requests_sent"] for r in responder_summaries)
    seconds = tally.seconds_sending + sum(counted.seconds_sending for counted, _c in others.values())
    costs = [p["cost"] for p in every if p["cost"] is not None]
    batched = config.teacher.backend == BATCH_BACKEND
    calls = tally.calls_sending + sum(counted.calls_sending for counted, _c in others.values())
    batches = math.ceil(calls * scale) if batched else None
    if batched:
        wall = seconds / calls * batches if calls else None
    else:
        wall = seconds / sent * requests if sent else None
    return {
        "method": settings.method,
        "num": settings.num,
        "pilot_tasks": accepted,
        "pilot_requests": pilot_requests,
        "pilot_requests_sent": sent,
        "pilot_cache_hits": summary["cache_hits"] + sum(r["cache_hits"] for r in responder_summaries),
        # what the projection assumes; reject records also count per-instance rejects, so they
        # are reported, not turned into a per-task rate
        "requests_per_task": pilot_requests / accepted,
        "pilot_rejects": rejected,
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        # seconds per request as the pilot saw them, at the configured concurrency (on the
        # Batch API: seconds per batch, one batch per teacher call, one after another)
        "wall_seconds": wall,
        "batches": batches,
        # the teacher's cost plus the priced responders' (`unpriced`: the others, left out)
        "cost": sum(costs) if own["cost"] is not None else None,
        "teacher": own,
        "responders": responders,
        "unpriced": [name for name, projection in responders.items() if projection["cost"] is None],
        "concurrency": (f"engine: ray, {config.engine.replicas} replicas" if config.engine.kind == "ray"
                        else f"the Batch API's pace: {batches} batches one after another (one per teacher call, "
                             f"{seconds / calls if calls else 0:.0f} s each in the pilot; a provider may take up to "
                             "24 h for each)" if batched
                        else f"teacher.max_concurrency {config.teacher.max_concurrency}"
                        if config.teacher.backend == "openai" else f"teacher.batch_size {config.teacher.batch_size}"),
    }


def format_estimate(estimate: dict[str, Any]) -> str:
    wall = estimate["wall_seconds"]
    cost = estimate["cost"]
    return "\n".join([
        f"estimate for {estimate['method']} --num {estimate['num']}, from a pilot of {estimate['pilot_tasks']} "
        f"accepted tasks ({estimate['pilot_requests']} requests: {estimate['pilot_requests_sent']} sent, "
        f"{estimate['pilot_cache_hits']} from the cache; the real run reuses them)",
        f"assumed: {estimate['requests_per_task']:.2f} requests per accepted task, as in the pilot "
        f"({estimate['pilot_rejects']} reject records there: see a real run's rejects for why)",
        f"requests: {estimate['requests']}",
        f"tokens: {estimate['prompt_tokens']} prompt + {estimate['completion_tokens']} completion",
        *(f"  of which responder {name} ({r['backend']}:{r['model']}): {r['requests']} requests, "
          f"{r['prompt_tokens']} prompt + {r['completion_tokens']} completion tokens"
          + (f", cost {r['cost']:.4f}" if r["cost"] is not None else ", no prices")
          for name, r in estimate["responders"].items()),
        "wall time: " + (f"{wall:.0f} s at {estimate['concurrency']}" if wall is not None
                         else "unknown (every pilot request came from the cache)"),
        "cost: " + (f"{cost:.4f}" + (" at batch prices" if estimate.get("batches") is not None else "")
                    if cost is not None else "unknown (set teacher.prices)")
        + (f" (not counted, no prices: responder {', '.join(estimate['unpriced'])})"
           if cost is not None and estimate["unpriced"] else ""),
    ])
