"""`datagen generate`: run a generation method with progress, resume and a closing summary.

Accepted tasks stream to OUT, rejects to OUT's `.rejects.jsonl`, a progress marker to
`.progress.json` and the run summary to `.summary.json`, all beside OUT. Kill the run
and rerun the same command: it reads OUT back, skips the batches it finished, answers
the interrupted batch from the request cache, and writes no task twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from datagen.config import Strict, with_sections
from datagen.engines.open_teacher import open_teacher
from datagen.errors import ConfigError
from datagen.generators import alpaca, evol_instruct, magpie, orca, persona, preferences, self_instruct
from datagen.generators.common import GenerationMethod, RunContext, TaskSink, instances_toward_target
from datagen.io import atomic_write_json, progress_path, read_tasks, rejects_path, spend_path, summary_path
from datagen.progress import progress
from datagen.records import Task
from datagen.teachers.spending import SpendingCapReached, SpendingLedger, check_priced
from datagen.teachers.teacher import Teacher, TeacherConfig, make_teacher, run_summary

# The methods by name. Adding one: write generators/NAME.py with its settings model and
# `run(seeds, settings, context)`, add a line here; its name becomes a `--method` choice
# and its section a `generate:` key.
GENERATORS: dict[str, GenerationMethod] = {
    "self-instruct": GenerationMethod(self_instruct.run_self_instruct, "self_instruct",
                                      self_instruct.SelfInstructConfig),
    "alpaca": GenerationMethod(alpaca.run_alpaca, "alpaca", alpaca.AlpacaConfig, looks_ahead=True),
    "evol-instruct": GenerationMethod(evol_instruct.run_evol_instruct, "evol_instruct",
                                      evol_instruct.EvolInstructConfig, looks_ahead=True),
    "orca": GenerationMethod(orca.run_orca, "orca", orca.OrcaConfig, plan=orca.planned_requests),
    "preferences": GenerationMethod(preferences.run_preferences, "preferences", preferences.PreferencesConfig,
                                    preferences.PreferencePair, looks_ahead=True),
    "magpie": GenerationMethod(magpie.run_magpie, "magpie", magpie.MagpieConfig),
    "persona": GenerationMethod(persona.run_persona, "persona", persona.PersonaConfig),
}

Method = Literal[tuple(GENERATORS)]  # type: ignore[valid-type]


class _GenerateBase(Strict):
    method: Method = "self-instruct"
    seeds: str | None = None  # default: the seed set bundled with the package
    seeds_format: str | None = None  # any format datagen.readers reads; None: detected
    seeds_split: str | None = None  # the split of a dataset given as seeds
    out: str | None = None
    num: int = Field(20, ge=1)
    seed: int = 0
    instances_per_task: int = Field(1, ge=1)


GenerateConfig = with_sections(
    "GenerateConfig", _GenerateBase, {entry.section: entry.settings for entry in GENERATORS.values()},
    "The `generate:` section: which method, from which seeds, how many tasks; one settings section per method.",
)


def bundled_seeds_path() -> Path:
    return Path(str(resources.files("datagen").joinpath("data/seed_tasks.jsonl")))


def load_seeds(config) -> list[Task]:
    """The seed tasks, in any format `datagen.readers` reads (`generate.seeds_format` / `seeds_split`)."""
    from datagen.readers import read_tasks_any

    settings = config.generate
    return read_tasks_any(settings.seeds or bundled_seeds_path(), settings.seeds_format, settings.seeds_split)


def _batches_done(output: Path, method: str) -> int:
    path = progress_path(output)
    if not path.exists() or not output.exists():
        return 0
    state = json.loads(path.read_text())
    return state["batches_done"] if state.get("method") == method else 0


def make_run_teacher(config) -> Teacher:
    """The run's teacher: in this process (`engine: local`) or over Ray (`engine: ray`, for
    the methods that can use it)."""
    method = GENERATORS[config.generate.method]
    if config.engine.kind == "ray" and method.plan is None and not method.looks_ahead:
        raise ConfigError(
            f"engine.kind: ray runs {', '.join(n for n, m in GENERATORS.items() if m.plan or m.looks_ahead)}; "
            f"{config.generate.method} runs on engine: local only (to spread it over several servers, list them in "
            "teacher.base_url)"
        )
    return open_teacher(config.teacher, config.engine)


def run_generate(config, command_line: str, teacher_factory: Callable[[], Teacher] | None = None,
                 other_teacher_factory: Callable[[str, TeacherConfig], Teacher] | None = None) -> dict[str, Any]:
    """Run `config.generate` and return the summary it also writes beside the output.

    `teacher_factory` replaces `make_run_teacher(config)` (tests use a scripted backend);
    `other_teacher_factory(name, config)` opens the further teachers a method asks for (the
    preferences responders with a backend of their own; default `make_teacher`). Those are
    counted in the summary's `responders`.
    """
    settings = config.generate
    if not settings.out:
        raise ConfigError("--out: where to write the tasks is required")
    output = Path(settings.out)
    seeds = load_seeds(config)
    started = time.monotonic()
    record = GENERATORS[settings.method].record
    # the teacher first: a teacher that cannot be used (no API key, no server) fails
    # before OUT is created
    make = teacher_factory or (lambda: make_run_teacher(config))
    if config.teacher.max_cost and config.engine.kind == "ray" and GENERATORS[settings.method].plan:
        raise ConfigError(f"teacher.max_cost: engine: ray streams all of {settings.method}'s requests ahead of the "
                          "loop, past any cap; run it on engine: local to cap it")
    with ExitStack() as stack:
        teacher = stack.enter_context(make())
        ledger = _spending_ledger(config.teacher, output, teacher)
        sink = stack.enter_context(TaskSink(output, record))
        bar = stack.enter_context(progress(
            settings.method, total=settings.num, done=min(len(sink.existing), settings.num),
            detail=lambda: f"teacher: {teacher.stats.requests_sent} requests, {teacher.stats.cache_hits} cached"))

        def mark_done(batches: int) -> None:
            atomic_write_json(progress_path(output), {"method": settings.method, "batches_done": batches})

        others: dict[str, Teacher] = {}

        def open_teacher(name: str, teacher_config: TeacherConfig) -> Teacher:
            others[name] = (other_teacher_factory or (lambda _name, c: make_teacher(c)))(name, teacher_config)
            if ledger is not None:
                check_priced(teacher_config, others[name].backend.name, f"responder {name}")
                others[name].ledger = ledger
            return others[name]

        resumed_from = len(sink.existing)
        method = GENERATORS[settings.method]
        section = getattr(settings, method.section)
        on_ray = config.engine.kind == "ray"
        context = RunContext(
            teacher, sink, num=settings.num, seed=settings.seed, instances_per_task=settings.instances_per_task,
            batches_done=_batches_done(output, settings.method), progress=bar.advance, on_batch_done=mark_done,
            open_teacher=open_teacher,
            lookahead=config.engine.replicas * config.engine.batch_size if on_ray else 0,
        )
        stopped = None
        try:
            if on_ray and method.plan:
                teacher.plan(method.plan(seeds, section, context))
            method.run(seeds, section, context)
        except SpendingCapReached as cap:
            sink.flush()
            stopped = cap
        summary = run_summary(
            teacher,
            time.monotonic() - started,
            method=settings.method,
            output=str(output),
            rejects=str(rejects_path(output)),
            tasks_total=resumed_from + sink.produced,
            tasks_produced=sink.produced,
            tasks_resumed=resumed_from,
            parse_failures=sink.parse_failures,
            rejects_by_reason=dict(sink.reject_reasons.most_common()),
            **_instance_target(output, settings),
            **_other_teachers(teacher, others),
            engine={"kind": config.engine.kind, **({"route": teacher.backend.route, "replicas": config.engine.replicas,
                                                    "pipelines": teacher.backend.pipelines}
                                                   if config.engine.kind == "ray" else {})},
            command=command_line,
            config=config.model_dump(mode="json"),
            **({"spend": {"max_cost": ledger.limit, "spent": round(ledger.spent, 6),
                          **({"stopped": str(stopped)} if stopped else {})}} if ledger else {}),
        )
    atomic_write_json(summary_path(output), summary)
    if stopped is not None:
        raise stopped
    return summary


def _spending_ledger(config: TeacherConfig, output: Path, teacher: Teacher) -> SpendingLedger | None:
    """When `teacher.max_cost` caps the run: its ledger (spend over all its teachers and
    resumes), given to the run's teacher; checked before anything is written."""
    if not config.max_cost:
        return None
    check_priced(config, teacher.backend.name, "the teacher")
    teacher.ledger = SpendingLedger(spend_path(output), config.max_cost, fresh=True)
    return teacher.ledger


def _instance_target(output: Path, settings: GenerateConfig) -> dict[str, Any]:
    """For Self-Instruct with `instances_per_task` > 1 (the others ignore it): how many tasks
    in OUT reached it, so a short run is visible before export --strict finds out."""
    if settings.method != "self-instruct" or settings.instances_per_task == 1 or not output.exists():
        return {}
    counts = [instances_toward_target(task.instances) for task in read_tasks(output)]
    return {"instances_per_task": settings.instances_per_task,
            "tasks_reaching_instances_per_task": sum(count >= settings.instances_per_task for count in counts)}


def _other_teachers(teacher: Teacher, others: dict[str, Teacher]) -> dict[str, Any]:
    """The teachers a method opened besides the run's (preferences responders with a backend of
    their own): each one's requests, tokens and cost, and the totals over every teacher (cost
    over the priced ones; `unpriced` names the others)."""
    if not others:
        return {}
    every = {"teacher": teacher, **others}
    costs = {name: t.stats.cost for name, t in every.items()}
    return {
        "responders": {name: {"backend": t.backend.name, "model": t.backend.model, **t.stats.as_dict()}
                       for name, t in others.items()},
        "all_teachers": {
            **{key: sum(getattr(t.stats, key) for t in every.values())
               for key in ("requests_sent", "cache_hits", "failures", "prompt_tokens", "completion_tokens")},
            "cost": sum(c for c in costs.values() if c is not None) if any(c is not None for c in costs.values())
            else None,
            "unpriced": [name for name, cost in costs.items() if cost is None],
        },
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The closing one-screen summary."""
    cost = summary["cost"]
    lines = [
        f"{summary['method']}: {summary['tasks_produced']} new tasks "
        f"({summary['tasks_total']} in {summary['output']}, {summary['tasks_resumed']} from before)",
        f"teacher {summary['teacher']['backend']}:{summary['teacher']['model']}: "
        f"{summary['requests_sent']} requests, {summary['cache_hits']} cache hits, "
        f"{summary['retries']} retries, {summary['failures']} failures",
        f"tokens: {summary['prompt_tokens']} prompt + {summary['completion_tokens']} completion"
        + (f", cost {cost:.4f}" if cost is not None else ""),
    ]
    for name, other in summary.get("responders", {}).items():
        lines.append(f"responder {name} {other['backend']}:{other['model']}: {other['requests_sent']} requests, "
                     f"{other['cache_hits']} cache hits, {other['failures']} failures; tokens {other['prompt_tokens']} "
                     f"prompt + {other['completion_tokens']} completion"
                     + (f", cost {other['cost']:.4f}" if other["cost"] is not None else ""))
    if "all_teachers" in summary:
        total = summary["all_teachers"]
        lines.append(f"all teachers: {total['requests_sent']} requests, {total['cache_hits']} cache hits; tokens "
                     f"{total['prompt_tokens']} prompt + {total['completion_tokens']} completion"
                     + (f", cost {total['cost']:.4f}" if total["cost"] is not None else "")
                     + (f" (no prices: {', '.join(total['unpriced'])})" if total["unpriced"] else ""))
    lines.append(f"parse failures: {summary['parse_failures']}; rejects by reason:")
    lines += [f"  {count:6d}  {reason}" for reason, count in summary["rejects_by_reason"].items()] or ["  none"]
    if "instances_per_task" in summary:
        reached, total = summary["tasks_reaching_instances_per_task"], summary["tasks_total"]
        lines.append(f"{reached} of {total} tasks have {summary['instances_per_task']} instances (--instances-per-task)"
                     + ("" if reached == total else "; more max_instance_rounds would give the rest more"))
    lines.append(f"time: {summary['wall_seconds']:.1f} s; rejects in {summary['rejects']}")
    return "\n".join(lines)
