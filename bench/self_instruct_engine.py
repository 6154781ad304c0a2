"""Self-Instruct against a simulated GPU serving engine: how much of the engine's peak the
whole loop uses, with one batch at a time (`batches_ahead: 1`, the reference loop) and with
many batches in flight.

The engine is `SimulatedEngine` (tests/helpers.py): `--slots` sequences at once, `--latency`
seconds per wave of `--slots` requests (a call of n requests takes ceil(n / slots) waves),
deterministic Self-Instruct-shaped replies. Its time runs on a virtual clock, so a 10,000-task
run of the reference loop finishes in minutes; the loop's own CPU time (prompts, ROUGE-L
screening, parsing, writing) is measured for real and added, as the loop does not overlap it
with the engine. Peak = slots / latency requests per second; the loop's figure = requests /
(CPU time + engine time). `fill` is the share of the engine's slot-time that served requests.

    .venv/bin/python bench/self_instruct_engine.py                       # 10,000 tasks, W = 1, 128 and 512
    .venv/bin/python bench/self_instruct_engine.py --tasks 2000 --batches-ahead 1,64,256 --latency 5

Each run has its own empty request cache (batches in flight need it) and writes to a
scratch folder; `--keep DIR` keeps the outputs.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers holds the engine

from datagen.generators.common import RunContext, TaskSink  # noqa: E402
from datagen.generators.self_instruct import SelfInstructConfig, run_self_instruct  # noqa: E402
from datagen.io import read_records  # noqa: E402
from datagen.records import Task  # noqa: E402
from datagen.teachers.teacher import Teacher, TeacherConfig  # noqa: E402
from tests.helpers import SimulatedEngine  # noqa: E402

SEEDS = Path(__file__).resolve().parents[1] / "datagen" / "data" / "seed_tasks.jsonl"


def measure(folder: Path, tasks: int, batches_ahead: int, slots: int, latency: float) -> dict:
    engine = SimulatedEngine(slots=slots, latency_s=latency)
    seeds = list(read_records(SEEDS, Task))
    settings = SelfInstructConfig(batches_ahead=batches_ahead)
    out = folder / f"ahead{batches_ahead}" / "raw.jsonl"
    out.parent.mkdir(parents=True)
    started = time.perf_counter()
    with Teacher(engine, TeacherConfig(cache="use", cache_dir=str(out.parent / "cache"))) as teacher, \
            TaskSink(out) as sink:
        run_self_instruct(seeds, settings, RunContext(teacher, sink, num=tasks, seed=0))
    cpu_s = time.perf_counter() - started
    waves = sum(math.ceil(size / slots) for size in engine.sizes)
    wall = cpu_s + engine.engine_seconds
    return {
        "tasks": sum(1 for _ in read_records(out, Task)),
        "calls": engine.calls,
        "requests": engine.requests,
        "fill": engine.requests / (waves * slots),
        "cpu_s": cpu_s,
        "engine_s": engine.engine_seconds,
        "per_s": engine.requests / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--slots", type=int, default=256, help="sequences the engine serves at once")
    parser.add_argument("--latency", type=float, default=20.0,
                        help="seconds a wave takes (20: a 70B-class teacher, a few hundred tokens a reply)")
    parser.add_argument("--batches-ahead", default="1,128,512", help="comma-separated; the first is the baseline")
    parser.add_argument("--keep", type=Path, help="keep the outputs here")
    args = parser.parse_args()
    peak = args.slots / args.latency
    print(f"simulated engine: {args.slots} slots, {args.latency:g} s a wave, peak {peak:.2f} requests/s; "
          f"{args.tasks} tasks, prompts_per_batch 8")
    print(f"{'batches_ahead':>13} {'tasks':>6} {'calls':>6} {'requests':>9} {'fill':>5} {'cpu s':>7} "
          f"{'engine s':>9} {'req/s':>7} {'of peak':>7} {'vs first':>8}")
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        baseline = None
        for ahead in (int(value) for value in args.batches_ahead.split(",")):
            run = measure(folder, args.tasks, ahead, args.slots, args.latency)
            baseline = baseline or run["per_s"]
            print(f"{ahead:>13} {run['tasks']:>6} {run['calls']:>6} {run['requests']:>9} {run['fill']:>5.2f} "
                  f"{run['cpu_s']:>7.1f} {run['engine_s']:>9.0f} {run['per_s']:>7.2f} {run['per_s'] / peak:>7.2f} "
                  f"{run['per_s'] / baseline:>7.1f}x", flush=True)


if __name__ == "__main__":
    main()
