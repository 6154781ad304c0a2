"""Sharded stages on datatrove's executors: this machine's processes, a Ray cluster, or Slurm.

A sharded route (`datagen.engines.sharded_dedup`, `datagen.engines.sharded_filter`) is a list of
datatrove `PipelineStep`s, each run over N tasks; this module turns them into one executor per
step (`executors_for`), runs them in order and stops at a failed task or an error a stage wrote
(`run_executors`), or submits them to Slurm as a chain of array jobs (`submit_to_slurm`).
Which executor: `--engine datatrove` (LocalPipelineExecutor), `ray` (RayPipelineExecutor, Ray
joined by `datagen.engines.ray_cluster.join_ray`), `slurm` (SlurmPipelineExecutor).

    executors = executors_for([(step, tasks), ...], work, "datatrove", EngineOptions(workers=4))
    timings = run_executors(work, executors, "dedup", {work / "error.txt": InputError})
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from datagen.engines import SHARD_ENGINES
from datagen.engines.ray_cluster import join_ray
from datagen.errors import ConfigError, DatagenError

if TYPE_CHECKING:
    from datatrove.pipeline.base import PipelineStep

SHARDED_ENGINES = tuple(name for name in SHARD_ENGINES if name != "local")  # local: filtering's own path


@dataclass
class EngineOptions:
    """What an executor needs beyond the plan (workers: tasks at once; Slurm: partition and time)."""

    workers: int = -1
    partition: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2
    venv_path: str | None = None
    ray_address: str | None = None  # `--engine ray`: engine.address (see datagen.engines.ray_cluster)


def executors_for(steps: list[tuple[PipelineStep, int]], work: Path, engine: str, options: EngineOptions,
                  job_prefix: str = "datagen-dedup", after=None) -> list:
    """One executor per (step, tasks), in order; logs under work/logs/STAGE (a step's `stage`).
    Slurm: each job waits for the one before (the first for `after`, an executor, when given)."""
    check_engine(engine, options)
    executors = []
    for step, tasks in steps:
        stage = step.stage
        common = {"pipeline": [step], "tasks": tasks, "logging_dir": str(work / "logs" / stage)}
        workers = min(options.workers, tasks) if options.workers > 0 and tasks > 1 else -1
        if engine == "datatrove":
            from datatrove.executor import LocalPipelineExecutor

            executors.append(LocalPipelineExecutor(**common, workers=workers, start_method="fork"))
        elif engine == "ray":
            from datatrove.executor import RayPipelineExecutor

            executors.append(RayPipelineExecutor(**common, workers=workers, cpus_per_task=options.cpus_per_task,
                                                 mem_per_cpu_gb=options.mem_per_cpu_gb))
        else:
            from datatrove.executor import SlurmPipelineExecutor

            venv = options.venv_path or str(Path(sys.prefix) / "bin" / "activate")
            executors.append(SlurmPipelineExecutor(
                **common, workers=workers, time=options.time, partition=options.partition,
                cpus_per_task=options.cpus_per_task, mem_per_cpu_gb=options.mem_per_cpu_gb,
                job_name=f"{job_prefix}-{stage}", venv_path=venv, depends=executors[-1] if executors else after,
                slurm_logs_folder=str(work / "slurm_logs" / stage),
                # a failed job cancels the chain after it, rather than leaving it pending forever
                sbatch_args={"kill-on-invalid-dep": "yes"}))
    return executors


def run_executors(work: Path, executors: list, what: str,
                  error_files: dict[Path, type[DatagenError]]) -> dict[str, float]:
    """Run the executors in order; seconds per stage. A failed task stops the run (DatagenError);
    so does an error a stage wrote to one of `error_files` (raised as the class it maps to, the
    work folder removed: the input or the settings must change before a rerun can succeed, and
    the rerun does every task again)."""
    timings = {}
    for executor in executors:
        stage, clock = executor.pipeline[0].stage, time.monotonic()
        _quietly(work, executor.run)
        timings[stage] = round(time.monotonic() - clock, 3)
        failed = executor.get_incomplete_ranks(range(executor.world_size))
        if failed:
            raise DatagenError(f"{what} stage {stage}: tasks {failed} failed; logs in {work / 'logs' / stage}")
        for error, kind in error_files.items():
            if error.exists():
                message = error.read_text(encoding="utf-8")
                shutil.rmtree(work)
                raise kind(message)
    return timings


def start_engine(engine: str, options: EngineOptions) -> None:
    """What a route needs before its first executor runs here: `ray` joins the cluster (datatrove's
    Ray executor sends its tasks through this process's Ray)."""
    if engine == "ray":
        join_ray(options.ray_address)


def submit_to_slurm(executors: list) -> list:
    """Submit a chain of Slurm executors (each `depends` on the one before) with sbatch; their job ids."""
    if shutil.which("sbatch") is None:
        raise ConfigError("--engine slurm: sbatch is not on PATH; run this on a Slurm login node")
    executors[-1].run()  # launches the chain through `depends`
    return [executor.job_id for executor in executors]


def _quietly(work: Path, run) -> None:
    """Run an executor with datatrove's console log (loguru on stderr) going to work/logs/console.log."""
    from loguru import logger

    (work / "logs").mkdir(parents=True, exist_ok=True)
    with (work / "logs" / "console.log").open("a", encoding="utf-8") as log, contextlib.redirect_stderr(log):
        logger.remove()
        logger.add(sys.stderr, level="INFO")
        try:
            run()
        finally:
            logger.remove()


def shard_count(tasks: int | None) -> int:
    """`--tasks`, or one shard per CPU of this machine."""
    return tasks if tasks is not None else max(1, os.cpu_count() or 1)


def check_engine(engine: str, options: EngineOptions) -> None:
    if engine not in SHARDED_ENGINES:
        raise ConfigError(f"--engine: expected one of {', '.join(SHARD_ENGINES)}, got {engine!r}")
    if engine == "slurm" and not options.partition:
        raise ConfigError("--engine slurm needs --partition")
