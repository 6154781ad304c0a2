"""`datagen generate`: run a generation method with progress, resume and a closing summary.

Accepted tasks stream to OUT, rejects to OUT's `.rejects.jsonl`, a progress marker to
`.progress.json` and the run summary to `.summary.json`, all beside OUT. Kill the run
and rerun the same command: it reads OUT back, skips the batches it finished, answers
the interrupted batch from the request cache, and writes no task twice.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from datagen.config import Strict
from datagen.errors import ConfigError
from datagen.generators.alpaca import AlpacaConfig, run_alpaca
from datagen.generators.common import TaskSink, instances_toward_target
from datagen.generators.evol_instruct import EvolInstructConfig, run_evol_instruct
from datagen.generators.orca import OrcaConfig, run_orca
from datagen.generators.self_instruct import SelfInstructConfig, run_self_instruct
from datagen.io import atomic_write_json, progress_path, read_tasks, rejects_path, summary_path
from datagen.progress import progress
from datagen.records import Task
from datagen.teachers.teacher import make_teacher, run_summary

# method -> (entry point, section of GenerateConfig holding its settings)
METHODS = {
    "self-instruct": (run_self_instruct, "self_instruct"),
    "alpaca": (run_alpaca, "alpaca"),
    "evol-instruct": (run_evol_instruct, "evol_instruct"),
    "orca": (run_orca, "orca"),
}

Method = Literal[tuple(METHODS)]  # type: ignore[valid-type]


class GenerateConfig(Strict):
    """The `generate:` section: which method, from which seeds, how many tasks."""

    method: Method = "self-instruct"
    seeds: str | None = None  # default: the seed set bundled with the package
    out: str | None = None
    num: int = Field(20, ge=1)
    seed: int = 0
    instances_per_task: int = Field(1, ge=1)
    self_instruct: SelfInstructConfig = SelfInstructConfig()
    alpaca: AlpacaConfig = AlpacaConfig()
    evol_instruct: EvolInstructConfig = EvolInstructConfig()
    orca: OrcaConfig = OrcaConfig()


def bundled_seeds_path() -> Path:
    return Path(str(resources.files("datagen").joinpath("data/seed_tasks.jsonl")))


def load_seeds(config) -> list[Task]:
    return read_tasks(config.generate.seeds or bundled_seeds_path())


def _batches_done(output: Path, method: str) -> int:
    path = progress_path(output)
    if not path.exists() or not output.exists():
        return 0
    state = json.loads(path.read_text())
    return state["batches_done"] if state.get("method") == method else 0


def run_generate(config, command_line: str) -> dict[str, Any]:
    """Run `config.generate` and return the summary it also writes beside the output."""
    settings = config.generate
    if not settings.out:
        raise ConfigError("--out: where to write the tasks is required")
    output = Path(settings.out)
    seeds = load_seeds(config)
    started = time.monotonic()
    with TaskSink(output) as sink, make_teacher(config.teacher) as teacher, progress(
        settings.method, total=settings.num, done=min(len(sink.existing), settings.num),
    ) as bar:

        def mark_done(batches: int) -> None:
            atomic_write_json(progress_path(output), {"method": settings.method, "batches_done": batches})

        resumed_from = len(sink.existing)
        runner, section = METHODS[settings.method]
        runner(
            seeds, teacher, sink, getattr(settings, section),
            num=settings.num, seed=settings.seed, instances_per_task=settings.instances_per_task,
            progress=bar.advance,
            batches_done=_batches_done(output, settings.method), on_batch_done=mark_done,
        )
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
            command=command_line,
            config=config.model_dump(mode="json"),
        )
    atomic_write_json(summary_path(output), summary)
    return summary


def _instance_target(output: Path, settings: GenerateConfig) -> dict[str, Any]:
    """For Self-Instruct with `instances_per_task` > 1 (the others ignore it): how many tasks
    in OUT reached it, so a short run is visible before export --strict finds out."""
    if settings.method != "self-instruct" or settings.instances_per_task == 1 or not output.exists():
        return {}
    counts = [instances_toward_target(task.instances) for task in read_tasks(output)]
    return {"instances_per_task": settings.instances_per_task,
            "tasks_reaching_instances_per_task": sum(count >= settings.instances_per_task for count in counts)}


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
        f"parse failures: {summary['parse_failures']}; rejects by reason:",
    ]
    lines += [f"  {count:6d}  {reason}" for reason, count in summary["rejects_by_reason"].items()] or ["  none"]
    if "instances_per_task" in summary:
        reached, total = summary["tasks_reaching_instances_per_task"], summary["tasks_total"]
        lines.append(f"{reached} of {total} tasks have {summary['instances_per_task']} instances (--instances-per-task)"
                     + ("" if reached == total else "; more max_instance_rounds would give the rest more"))
    lines.append(f"time: {summary['wall_seconds']:.1f} s; rejects in {summary['rejects']}")
    return "\n".join(lines)
