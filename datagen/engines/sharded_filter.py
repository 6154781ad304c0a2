"""`datagen filter --engine datatrove|ray|slurm`: the filter passes as datatrove stages over shards.

The same outputs as the single-process `run_filter` (kept tasks and their order, rejects with
their stage, reason, detail and keeper, in the order `run_filter` writes them, the per-pass
counts in stats.json), computed by datatrove tasks that each stream one byte-range shard of
the input, so no process holds the whole input:

    datagen filter raw.jsonl --out kept.jsonl --passes heuristics,decontaminate,exact-dedup,near-dedup \\
        --eval mmlu.jsonl --engine datatrove --tasks 8
    datagen filter raw.jsonl --out kept.jsonl --passes heuristics,judge --engine ray --tasks 64
    datagen filter raw.jsonl --out kept.jsonl --engine slurm --tasks 256 --partition cpu

    from datagen.engines.sharded_filter import ScaleFilterPlan, run_scaled_filter
    stats = run_scaled_filter(ScaleFilterPlan(source, out, rejects, work, config, tasks=4), "datatrove")

Stages (datatrove `PipelineStep`s; files, logs and completion marks under the work folder,
`KEPT.work/` by default, so a rerun after a kill skips the tasks that finished):

1. check (N): parse each line of the shard; per task a blake2b of its id and of the task.
2. lines (1): invalid lines and repeated ids over all shards, worded and ordered as
   `read_tasks_lenient` does (`datagen.engines.shards.invalid_lines`): the run stops with one error
   line, or (skip_invalid) they become `read` rejects. 32 bytes a task, no text.
3. the passes, in the configured order, as segments; each pass's registry entry
   (`datagen.filters.registry.PASSES`, `FilterPass.sharding`) says which:
   - PER_TASK passes (heuristics, decontaminate, judge, manual) in one stage of N tasks:
     each streams its shard in chunks of `chunk` tasks through the passes' own functions,
     with one `PassContext` per pass a task (so what a pass builds, the eval n-gram index,
     is built once a task; a pass that `uses_teacher` gets a teacher each task builds from the
     config, sharing the on-disk request cache), writing kept tasks and each pass's rejects;
     a pass's chunk reports are joined by its `merge_reports`;
   - DEDUP passes (exact-dedup / near-dedup): `datagen.engines.sharded_dedup`'s stages on
     what the passes before kept (memory: its bound, growing with the candidate pairs);
   - a segment that is not the last joins its kept shards into one file (streamed) for the
     next one to shard again.
   A pass registered WHOLE_SET (novelty: each task against the whole set kept so far), or
   with no sharding, is refused with one error line before anything starts.
4. collect (1): kept.jsonl, the rejects file (invalid lines, then each pass's rejects in
   input order) and stats.json, concatenating the shards' files.
"""
from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.pipeline.base import PipelineStep

from datagen.engines.datatrove_run import (
    EngineOptions,
    check_engine,
    executors_for,
    run_executors,
    shard_count,
    start_engine,
    submit_to_slurm,
)
from datagen.engines.ray_cluster import alive_nodes
from datagen.engines.sharded_dedup import DEDUP_PASSES, DedupStage, ScaleDedupPlan, stage_tasks
from datagen.engines.shards import (
    ShardTasks,
    check_work_folder,
    concatenate_files,
    decode_line,
    first_lines,
    invalid_lines,
    load_json,
    load_npz,
    read_lines_at,
    report_stage_error,
    save_json,
    save_npz,
    shard_lines,
    text_key,
)
from datagen.errors import ConfigError, DatagenError, InputError
from datagen.filters.base import DEDUP, PER_TASK, WHOLE_SET, LazyTeacher, PassContext
from datagen.filters.registry import PASSES, FilterConfig
from datagen.io import atomic_write_json, spend_path, stats_path
from datagen.records import Reject, Task
from datagen.rejects import INVALID_LINE, STAGE_READ
from datagen.teachers.spending import SpendingCapReached, SpendingLedger, check_priced

CAP_FILE = "cap.txt"  # a shard's pass reached the spending cap: the driver stops the run with it
RECORDS, DEDUP_SEGMENT = "records", "dedup"


@dataclass
class ScaleFilterPlan:
    """One sharded filter run: where it reads and writes, the config (`filter` and `teacher`
    sections, kept as data: workers rebuild them), the shard count and chunk size."""

    source: Path
    out: Path
    rejects: Path
    work: Path
    config: InitVar[Any]  # the loaded Config: its filter and teacher sections are kept
    tasks: int = 2
    command: str = ""
    chunk: int = 1000  # tasks a per-record stage hands its passes at once
    filter_settings: dict = field(default_factory=dict, init=False)
    teacher: Any = field(default=None, init=False)
    skip_invalid: bool = field(default=False, init=False)
    # 1: the shards share the teacher's rate budget and spending ledger through files locked on
    # one machine; N: they run on several machines, each with 1/N of every limit
    limit_shares: int = field(default=1, init=False)

    def __post_init__(self, config) -> None:
        self.source, self.out, self.rejects, self.work = map(Path, (self.source, self.out, self.rejects, self.work))
        if self.tasks < 1:
            raise ConfigError(f"--tasks: must be at least 1, got {self.tasks}")
        # FilterConfig is built at import time and cannot be pickled: workers rebuild it from data
        self.filter_settings = config.filter.model_dump(mode="json")
        self.teacher = config.teacher
        self.skip_invalid = config.filter.skip_invalid

    def settings(self):
        return FilterConfig.model_validate(self.filter_settings)

    def segments(self) -> list[tuple[str, list[str]]]:
        return segments_of(self.filter_settings["passes"])

    def uses_teacher(self) -> bool:
        """Whether a pass of the run asks the teacher (its stats and limits go in stats.json)."""
        return any(PASSES[name].uses_teacher for name in self.filter_settings["passes"])

    def dir(self, name: str) -> Path:
        return self.work / name

    def shard_teacher(self, rank: int) -> LazyTeacher:
        """The teacher in shard `rank`, made on first use, within its share of the limits and
        reserving in the run's spending ledger (one per shard when the limits are split)."""
        config = self.teacher.share(self.limit_shares)
        return LazyTeacher(config, self.spend_file(rank) if config.max_cost else None)

    def spend_file(self, rank: int) -> Path:
        shared = spend_path(self.out)
        return shared if self.limit_shares == 1 else shared.with_suffix(f".{rank:05d}.json")

    def dedup_plan(self, segment: int) -> ScaleDedupPlan:
        """The sharded dedup's plan for a dedup segment: it reads what the segment before kept."""
        kind, passes = self.segments()[segment]
        assert kind == DEDUP_SEGMENT
        work = self.dir(f"seg{segment}")
        return ScaleDedupPlan(self.segment_source(segment), work / "kept.jsonl", work / "rejects.jsonl", work,
                              self.settings().dedup, tasks=self.tasks, skip_invalid=True, passes=tuple(passes))

    def segment_source(self, segment: int) -> Path:
        return self.source if segment == 0 else self.dir(f"seg{segment - 1}") / "kept.jsonl"


def segments_of(passes: list[str]) -> list[tuple[str, list[str]]]:
    """The passes grouped into stages, as their registry entries say (`FilterPass.sharding`):
    runs of PER_TASK passes; DEDUP passes together when the dedup stages run them in that order.

    A pass that needs the whole set (WHOLE_SET) or does not say how it shards is refused.
    """
    segments: list[tuple[str, list[str]]] = []
    for name in passes:
        sharding = PASSES[name].sharding
        if sharding == DEDUP and name not in DEDUP_PASSES:
            sharding = None  # the sharded dedup stages implement exactly DEDUP_PASSES
        if sharding not in (PER_TASK, DEDUP):
            why = ("compares each task with the whole set kept before it" if sharding == WHOLE_SET
                   else "does not say how it shards (its `sharding` in datagen.filters.registry.PASSES)")
            raise ConfigError(f"--engine: the {name} pass {why} and cannot run sharded; run it with --engine local "
                              f"(e.g. `datagen filter KEPT --passes {name}` on this run's output)")
        kind = RECORDS if sharding == PER_TASK else DEDUP_SEGMENT
        last = segments[-1] if segments else None
        if last and last[0] == kind and (kind == RECORDS or DEDUP_PASSES.index(name) > DEDUP_PASSES.index(last[1][-1])):
            last[1].append(name)
        else:
            segments.append((kind, [name]))
    return segments


# -- stage 1: check; stage 2: lines ----------------------------------------------------------------


def check_shard(plan: ScaleFilterPlan, rank: int, world_size: int) -> None:
    """Which lines of the shard are tasks; the id and task hashes the `lines` stage compares."""
    indexes, offsets, ident, whole = [], [], [], []
    shard = ShardTasks(plan.source, rank, world_size)
    for offset, index, task in shard:
        indexes.append(index)
        offsets.append(offset)
        ident.append(text_key(task.id))
        whole.append(text_key(task.to_json()))
    out = plan.dir("check")
    save_npz(out / f"{rank:05d}.npz", index=np.array(indexes, dtype=np.int64),
              offset=np.array(offsets, dtype=np.int64), ident=np.array(ident, dtype="<u8").reshape(-1, 2),
              whole=np.array(whole, dtype="<u8").reshape(-1, 2))
    save_json(out / f"{rank:05d}.json", {"lines": shard.lines, "errors": shard.errors, "fatal": shard.fatal})


def check_lines(plan: ScaleFilterPlan, world_size: int, engine: str) -> None:
    """Invalid lines and repeated ids over all shards: stop (error.txt) or one `read` reject each."""
    out = plan.dir("check")
    metas = [load_json(out / f"{rank:05d}.json") for rank in range(world_size)]
    try:
        first_line = first_lines(plan.source, metas)
        shards = [load_npz(out / f"{rank:05d}.npz") for rank in range(world_size)]
        shard = np.concatenate([np.full(len(s["index"]), rank, dtype=np.int64) for rank, s in enumerate(shards)])
        index = np.concatenate([s["index"] for s in shards])
        offset = np.concatenate([s["offset"] for s in shards])
        line = first_line[shard] + index + 1

        def id_of(row: int) -> str:
            return Task.model_validate_json(read_lines_at(plan.source, [int(offset[row])])[int(offset[row])]).id

        invalid, repeated, _ = invalid_lines(plan.source, metas, first_line, line,
                                             np.concatenate([s["ident"] for s in shards]),
                                             np.concatenate([s["whole"] for s in shards]), id_of, plan.skip_invalid)
    except InputError as error:
        report_stage_error(out / "error.txt", error, engine)
        return
    problems = dict(invalid)
    bad: list[dict[str, str]] = [{} for _ in range(world_size)]  # shard -> index in shard -> detail
    for rank, meta in enumerate(metas):
        for at, _problem in meta["errors"]:
            number = int(first_line[rank]) + at + 1
            bad[rank][str(at)] = f"{plan.source}:{number}: {problems[number]}"
    for row in repeated.tolist():
        bad[int(shard[row])][str(int(index[row]))] = f"{plan.source}:{line[row]}: {problems[int(line[row])]}"
    for rank in range(world_size):
        save_json(out / f"{rank:05d}.bad.json", bad[rank])
    save_json(out / "summary.json", {"in": len(line) - len(repeated) + len(invalid), "invalid_lines": len(invalid)})


# -- stage 3: per-task passes -------------------------------------------------------------------------


def run_records(plan: ScaleFilterPlan, segment: int, rank: int, world_size: int, engine: str) -> None:
    """Stream this shard through the segment's per-task passes, `plan.chunk` tasks at a time.

    Each pass gets one `PassContext` for the whole shard (what it builds once, it builds once
    here); the reports of passes that merge them are kept per chunk for `collect`."""
    passes = plan.segments()[segment][1]
    source, out = plan.segment_source(segment), plan.dir(f"seg{segment}")
    out.mkdir(parents=True, exist_ok=True)
    bad = load_json(plan.dir("check") / f"{rank:05d}.bad.json") if segment == 0 else {}
    settings, teacher = plan.settings(), plan.shard_teacher(rank)
    contexts = {name: PassContext(settings=PASSES[name].section_of(settings), teacher=teacher) for name in passes}
    counts = {name: {"in": 0, "reasons": Counter()} for name in passes}
    reports: dict[str, list[dict]] = {name: [] for name in passes}
    parts = {part: (out / f"{rank:05d}.{part}.jsonl").open("w", encoding="utf-8")
             for part in ("kept", STAGE_READ, *passes)}
    try:

        def flush(chunk: list[Task]) -> None:
            for name in passes:
                counts[name]["in"] += len(chunk)
                context = contexts[name]
                chunk, rejected = PASSES[name].run(chunk, context)
                if PASSES[name].merge_reports is not None:
                    reports[name].append(dict(context.report))
                context.report.clear()
                for r in rejected:
                    counts[name]["reasons"][r.reason] += 1
                    parts[name].write(Reject(reason=r.reason, stage=name, detail=r.detail, task=r.task,
                                             duplicate_of=r.duplicate_of).to_json() + "\n")
            parts["kept"].writelines(task.to_json() + "\n" for task in chunk)

        chunk: list[Task] = []
        for offset, index, raw in shard_lines(source, rank, world_size):
            line = decode_line(raw, offset)
            if not line or not line.strip():
                continue
            detail = bad.get(str(index))
            if detail is not None:
                parts[STAGE_READ].write(Reject(reason=INVALID_LINE, stage=STAGE_READ, detail=detail,
                                               raw=line).to_json() + "\n")
                continue
            chunk.append(Task.model_validate_json(line))
            if len(chunk) >= plan.chunk:
                flush(chunk)
                chunk = []
        if chunk:
            flush(chunk)
    except SpendingCapReached as stop:  # the driver stops the run with it; a rerun redoes every shard
        report_stage_error(out / CAP_FILE, stop, engine)
        return
    finally:
        for handle in parts.values():
            handle.close()
        if teacher.teacher is not None:
            teacher_stats = teacher.teacher.stats.as_dict()
            teacher.teacher.close()
        else:
            teacher_stats = None
    save_json(out / f"{rank:05d}.json", {
        "passes": {name: {"in": c["in"], "reasons": dict(c["reasons"])} for name, c in counts.items()},
        "teacher": teacher_stats, "reports": reports})


def join_kept(plan: ScaleFilterPlan, segment: int, world_size: int) -> None:
    """The segment's kept shards as one file, for the next segment to shard again."""
    out = plan.dir(f"seg{segment}")
    concatenate_files([out / f"{rank:05d}.kept.jsonl" for rank in range(world_size)], out / "kept.jsonl")


# -- stage 4: collect -------------------------------------------------------------------------------


def _merge_teacher_stats(found: list[dict], prices: bool) -> dict[str, Any]:
    from datagen.teachers.teacher import RunStats

    merged = RunStats(cost=0.0 if prices else None).as_dict()
    for stats in found:
        for key, value in stats.items():
            if key == "retry_reasons":
                for reason, count in value.items():
                    merged[key][reason] = merged[key].get(reason, 0) + count
            elif key == "failure_examples":
                merged[key] = (merged[key] + value)[:5]
            elif value is not None:
                merged[key] = (merged[key] or 0) + value
    return merged


def _parts(plan: ScaleFilterPlan, segment: int, part: str, world_size: int) -> list[Path]:
    kind = plan.segments()[segment][0]
    folder = plan.dir(f"seg{segment}") / ("write" if kind == DEDUP_SEGMENT else "")
    return [folder / f"{rank:05d}.{part}.jsonl" for rank in range(world_size)]


def collect(plan: ScaleFilterPlan, world_size: int, engine: str) -> dict[str, Any]:
    """kept.jsonl, the rejects file and stats.json, in the shape `run_filter` writes them."""
    settings, segments = plan.settings(), plan.segments()
    summary = load_json(plan.dir("check") / "summary.json")
    stats: dict[str, Any] = {"input": str(plan.source), "in": summary["in"], "invalid_lines": summary["invalid_lines"],
                             "passes": []}
    rejects = _parts(plan, 0, STAGE_READ, world_size)
    teacher_stats: list[dict] = []
    for segment, (kind, passes) in enumerate(segments):
        if kind == DEDUP_SEGMENT:
            stats["passes"] += load_json(stats_path(plan.dedup_plan(segment).out))["passes"]
            rejects += [path for name in passes for path in _parts(plan, segment, name, world_size)]
            continue
        shards = [load_json(plan.dir(f"seg{segment}") / f"{rank:05d}.json") for rank in range(world_size)]
        teacher_stats += [shard["teacher"] for shard in shards if shard["teacher"]]
        for name in passes:
            reasons = sum((Counter(shard["passes"][name]["reasons"]) for shard in shards), Counter())
            tasks_in = sum(shard["passes"][name]["in"] for shard in shards)
            rejected = sum(reasons.values())
            entry = {"pass": name, "in": tasks_in, "out": tasks_in - rejected, "rejected": rejected,
                     "reasons": dict(reasons.most_common())}
            registered = PASSES[name]
            if registered.merge_reports is not None:  # the report as one run over every shard's tasks words it
                chunks = [report for shard in shards for report in shard["reports"][name]]
                entry.update(registered.merge_reports(registered.section_of(settings), chunks))
            stats["passes"].append(entry)
            rejects += _parts(plan, segment, name, world_size)
    if plan.uses_teacher():
        stats["teacher"] = _merge_teacher_stats(teacher_stats, plan.teacher.billed_prices is not None)
    concatenate_files(_parts(plan, len(segments) - 1, "kept", world_size), plan.out)
    concatenate_files(rejects, plan.rejects)
    kept_count = stats["passes"][-1]["out"]
    stats.update(kept=kept_count, rejected=stats["in"] - kept_count,
                 wall_seconds=round(time.time() - load_json(plan.work / "run.json")["started"], 3),
                 command=plan.command, config=settings.model_dump(mode="json"),
                 engine={"name": engine, "tasks": world_size, "work": str(plan.work)})
    if plan.uses_teacher():
        stats["engine"]["teacher_limits"] = teacher_limits(plan)
    atomic_write_json(stats_path(plan.out), stats)
    return stats


def teacher_limits(plan: ScaleFilterPlan) -> dict[str, Any]:
    """How the shards kept the teacher within the configured limits, for the run's stats."""
    if plan.limit_shares == 1:
        return {"shared": "one rate budget and spending ledger, files locked on this machine"}
    share = plan.teacher.share(plan.limit_shares)
    return {"split_over_shards": plan.limit_shares,
            "each_shard": share.model_dump(include={"requests_per_minute", "tokens_per_minute", "max_concurrency",
                                                    "max_cost"})}


# -- datatrove steps and the driver -------------------------------------------------------------------


class FilterStage(PipelineStep):
    """One stage of the sharded filter as a datatrove step: datatrove gives it its rank."""

    type = "datagen filter"

    def __init__(self, plan: ScaleFilterPlan, stage: str, shards: int, engine: str, segment: int = -1) -> None:
        super().__init__()
        self.plan, self.stage, self.shards, self.engine, self.segment = plan, stage, shards, engine, segment
        self.name = stage

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with self.track_time("task"):
            if self.stage == "check":
                check_shard(self.plan, rank, world_size)
            elif self.stage == "lines":
                check_lines(self.plan, self.shards, self.engine)
            elif self.stage.startswith("records"):
                run_records(self.plan, self.segment, rank, world_size, self.engine)
            elif self.stage.startswith("join"):
                join_kept(self.plan, self.segment, self.shards)
            elif self.stage == "collect":
                collect(self.plan, self.shards, self.engine)
        yield from ()


def executor_groups(plan: ScaleFilterPlan, engine: str,
                    options: EngineOptions) -> list[tuple[Path, list, dict[Path, type[DatagenError]]]]:
    """(work folder of their logs, executors, error files to check after each) in run order; on
    Slurm every job waits for the one before."""
    n, groups, last = plan.tasks, [], None

    def add(work: Path, steps: list, errors: dict[Path, type[DatagenError]]) -> None:
        nonlocal last
        executors = executors_for(steps, work, engine, options, job_prefix="datagen-filter", after=last)
        last = executors[-1]
        groups.append((work, executors, errors))

    add(plan.work, [(FilterStage(plan, "check", n, engine), n), (FilterStage(plan, "lines", n, engine), 1)],
        {plan.dir("check") / "error.txt": InputError})
    segments = plan.segments()
    for segment, (kind, _passes) in enumerate(segments):
        if kind == RECORDS:
            steps = [(FilterStage(plan, f"records{segment}", n, engine, segment), n)]
            if segment < len(segments) - 1:
                steps.append((FilterStage(plan, f"join{segment}", n, engine, segment), 1))
            add(plan.work, steps, {plan.dir(f"seg{segment}") / CAP_FILE: SpendingCapReached})
        else:
            dedup = plan.dedup_plan(segment)
            steps = [(DedupStage(dedup, stage, n, engine), tasks) for stage, tasks in stage_tasks(dedup).items()]
            add(dedup.work, steps, {dedup.dir("group") / "error.txt": InputError})
    add(plan.work, [(FilterStage(plan, "collect", n, engine), 1)], {})
    return groups


def _preflight(plan: ScaleFilterPlan) -> None:
    """Settings errors (no eval file, no overrides file, a bad one) as the single-process run
    gives them, before any stage starts: each per-task pass run on no tasks. A pass that uses the
    teacher is not (the workers make the teacher); under a cap, the teacher must have prices."""
    settings = plan.settings()
    for name in settings.passes:
        entry = PASSES[name]
        if entry.uses_teacher:
            if plan.teacher.max_cost:
                check_priced(plan.teacher, plan.teacher.backend, f"the {name} pass")
        elif entry.sharding == PER_TASK:
            entry.run([], PassContext(settings=entry.section_of(settings), teacher=None))


def run_scaled_filter(plan: ScaleFilterPlan, engine: str, options: EngineOptions | None = None) -> dict[str, Any]:
    """Run every stage on `engine` and write kept, rejects and stats; return the stats.

    Slurm: submits the chained array jobs and returns {"submitted": [job ids], "work": folder}.
    """
    options = options or EngineOptions()
    check_engine(engine, options)
    if not plan.segments():
        raise ConfigError("--passes: no passes to run")
    _preflight(plan)
    check_work_folder(plan, {"filter": plan.filter_settings, "teacher": plan.teacher.model_dump(mode="json")})
    start_engine(engine, options)
    plan.limit_shares = plan.tasks if engine == "slurm" or (engine == "ray" and alive_nodes() > 1) else 1
    if plan.teacher.max_cost:  # a run starts: what a killed run left reserved becomes spend
        share = plan.teacher.share(plan.limit_shares).max_cost
        for rank in range(plan.limit_shares):
            SpendingLedger(plan.spend_file(rank), share, fresh=True)
    groups = executor_groups(plan, engine, options)
    for segment, (kind, _passes) in enumerate(plan.segments()):
        if kind == DEDUP_SEGMENT and not (marker := plan.dedup_plan(segment).work / "run.json").exists():
            save_json(marker, {"started": time.time()})  # the sharded dedup's collect reads its start time
    if engine == "slurm":
        return {"submitted": submit_to_slurm([executor for _, executors, _ in groups for executor in executors]),
                "work": str(plan.work)}
    timings: dict[str, float] = {}
    for work, executors, errors in groups:
        try:
            for stage, seconds in run_executors(work, executors, "filter", errors).items():
                timings[f"{work.name}/{stage}" if work != plan.work else stage] = seconds
        except (InputError, SpendingCapReached):
            # the input or the cap must change before a rerun can succeed, and it redoes every shard
            shutil.rmtree(plan.work, ignore_errors=True)
            raise
    stats = load_json(stats_path(plan.out))
    stats["engine"]["stage_seconds"] = timings
    atomic_write_json(stats_path(plan.out), stats)
    shutil.rmtree(plan.work)
    return stats


def filter_command(config, source: Path, out: Path, rejects: Path, engine: str, tasks: int | None,
                   options: EngineOptions, work: Path | None, command_line: str) -> dict[str, Any]:
    """`datagen filter --engine ...` (`config`: the loaded config): `run_scaled_filter`'s result."""
    plan = ScaleFilterPlan(source, out, rejects, work or out.with_name(out.name + ".work"), config,
                           tasks=shard_count(tasks), command=command_line)
    return run_scaled_filter(plan, engine, options)
