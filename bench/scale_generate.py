"""Rows/s of Orca generation with `engine: ray` (1 and 2 replicas) against `engine: local`;
with `--method alpaca`, Alpaca answering `--batches-ahead` batches at once against one at a time.

The teacher is a fixed-latency stand-in: each replica answers one request at a time and
takes `--latency` seconds for it (a model server's time per request), with a deterministic
reply, so the outputs of the three runs can be compared byte for byte. Same input, same
config, each run with its own empty request cache; Ray on this machine with `--cpus` CPUs.

Alpaca (`engine: local`): the stand-in is a server with `--concurrency` slots, so a call of
n requests takes ceil(n / concurrency) x `--latency`; its replies hold four tasks each,
derived from the prompt and the sampling seed. Runs: `batches_ahead` 1 (one batch of 5
requests a call) and `--batches-ahead` (default 4: 20 requests a call).

    python bench/scale_generate.py                 # 60 tasks x 2 instances, 0.1 s a request
    python bench/scale_generate.py --tasks 200 --latency 0.05
    python bench/scale_generate.py --method alpaca --tasks 200 --latency 0.5

Prints rows/s per run, the ratio to the baseline (engine: local; Alpaca: batches_ahead 1),
and whether the outputs are identical.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from datagen.config_file import Config  # noqa: E402
from datagen.generate import run_generate  # noqa: E402
from datagen.io import write_jsonl_atomic  # noqa: E402
from datagen.records import Instance, Task  # noqa: E402
from datagen.teachers.base import BackendCounters, Completion, Request, ResultCallback  # noqa: E402
from datagen.teachers.teacher import Teacher, TeacherConfig  # noqa: E402


class FixedLatencyBackend:
    """Answers one request at a time, `latency_s` each, with a reply derived from the input."""

    name = "fixed-latency"

    def __init__(self, latency_s: float, model: str):
        self.latency_s = latency_s
        self.model = model
        self.counters = BackendCounters()

    def generate(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        for index, request in enumerate(requests):
            time.sleep(self.latency_s)
            prompt = request.messages[-1][1]
            answer = f"The input has {len(prompt)} characters.\nFinal answer: {len(prompt) % 7}"
            on_result(index, Completion(answer, "stop", len(prompt.split()), len(answer.split())))

    def close(self) -> None:
        pass


class SlotsBackend:
    """A server with `slots` requests in flight at once, `latency_s` each; answers Alpaca
    prompts with four tasks drawn from the prompt and the request's sampling seed."""

    name = "fixed-latency-slots"
    words = ("river bakery ledger comet violin harbor pepper glacier tunnel orchard lantern compass meadow quarry "
             "falcon pillow satchel thistle beacon canyon walnut saddle cobalt ferry marble nectar oyster parcel "
             "quiver ribbon summit timber umbrella velvet wagon yarrow zephyr anchor bramble").split()

    def __init__(self, latency_s: float, slots: int, model: str):
        self.latency_s, self.slots, self.model = latency_s, slots, model
        self.counters = BackendCounters()
        self.calls = 0

    def generate(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        self.calls += 1
        time.sleep(math.ceil(len(requests) / self.slots) * self.latency_s)
        for index, request in enumerate(requests):
            rng = random.Random(f"{request.messages[-1][1]}|{request.params.seed}")
            items = []
            for number in range(4, 8):
                a, b, c, d = rng.sample(self.words, 4)
                items.append(f"{number}. Instruction: Describe the {a} {b} near a {c} {d}.\n{number}. Input:\n"
                             f"<noinput>\n{number}. Output:\nIt is about the {c}.\n")
            text = "###\n".join(items).split(". Instruction:", 1)[1]
            on_result(index, Completion(text, "stop", 600, len(text.split())))

    def close(self) -> None:
        pass


def alpaca_run(workdir: Path, name: str, tasks: int, latency: float, slots: int,
               batches_ahead: int) -> tuple[float, bytes, int]:
    config = Config.model_validate({
        "teacher": {"cache_dir": str(workdir / f"cache-{name}")},
        "generate": {"method": "alpaca", "out": str(workdir / f"{name}.jsonl"), "num": tasks,
                     "alpaca": {"batches_ahead": batches_ahead}},
    })
    backend = SlotsBackend(latency, slots, config.teacher.model)
    started = time.monotonic()
    summary = run_generate(config, "bench", lambda: Teacher(backend, config.teacher))
    seconds = time.monotonic() - started
    assert summary["tasks_produced"] == tasks, summary
    return seconds, Path(config.generate.out).read_bytes(), backend.calls


def alpaca_main(args) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        rows = {f"batches_ahead {w}": alpaca_run(Path(scratch), f"ahead{w}", args.tasks, args.latency,
                                                 args.concurrency, w)
                for w in (1, args.batches_ahead)}
    print(f"Alpaca, {args.tasks} tasks, a server with {args.concurrency} slots, {args.latency:.3f} s a request")
    base_seconds, base_output, _calls = rows["batches_ahead 1"]
    print(f"{'run':<20}{'calls':>7}{'seconds':>9}{'rows/s':>9}{'vs 1':>8}  identical")
    for name, (seconds, output, calls) in rows.items():
        print(f"{name:<20}{calls:>7}{seconds:>9.2f}{args.tasks / seconds:>9.2f}{base_seconds / seconds:>7.2f}x  "
              f"{'✓' if output == base_output else '✗'}")


class Replicas:
    """Builds the backend inside each Ray actor."""

    def __init__(self, latency_s: float):
        self.latency_s = latency_s

    def __call__(self, config: TeacherConfig) -> FixedLatencyBackend:
        return FixedLatencyBackend(self.latency_s, config.model)


def one_run(workdir: Path, name: str, seeds: Path, tasks: int, latency: float,
            replicas: int | None) -> tuple[float, bytes]:
    config = Config.model_validate({
        "teacher": {"cache_dir": str(workdir / f"cache-{name}")},
        "generate": {"method": "orca", "seeds": str(seeds), "out": str(workdir / f"{name}.jsonl"), "num": tasks,
                     "orca": {"items_per_batch": 16, "max_instances_per_task": 2}},
        "engine": {"kind": "ray", "replicas": replicas, "batch_size": 4} if replicas else {},
    })
    if replicas:
        from datagen.engines.ray_teacher import ray_teacher

        def factory():
            return ray_teacher(config.teacher, config.engine, Replicas(latency), name=FixedLatencyBackend.name)
    else:
        def factory():
            return Teacher(FixedLatencyBackend(latency, config.teacher.model), config.teacher)
    started = time.monotonic()
    summary = run_generate(config, "bench", factory)
    seconds = time.monotonic() - started
    assert summary["tasks_produced"] == tasks, summary
    return seconds, Path(config.generate.out).read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds per request per replica")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--method", choices=["orca", "alpaca"], default="orca")
    parser.add_argument("--batches-ahead", type=int, default=4, help="alpaca: compared with 1")
    parser.add_argument("--concurrency", type=int, default=32, help="alpaca: the server's slots")
    args = parser.parse_args()
    if args.method == "alpaca":
        alpaca_main(args)
        return

    import ray  # classes of __main__ reach the Ray workers by value

    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        seeds = workdir / "seeds.jsonl"
        write_jsonl_atomic(seeds, [
            Task(id=f"t{n}", instruction=f"Count the characters of the input ({n}).",
                 instances=[Instance(input=f"input {n}-{k} " * (k + 1), output="") for k in range(2)])
            for n in range(args.tasks)])
        rows: dict[str, tuple[float, bytes]] = {"engine: local": one_run(workdir, "local", seeds, args.tasks,
                                                                          args.latency, None)}
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            for replicas in (1, 2):
                rows[f"engine: ray, {replicas} replica{'s' * (replicas > 1)}"] = one_run(
                    workdir, f"ray{replicas}", seeds, args.tasks, args.latency, replicas)
        finally:
            ray.shutdown()
    requests = args.tasks * 2
    print(f"Orca, {args.tasks} tasks ({requests} requests), {args.latency:.3f} s a request per replica, "
          f"Ray on {args.cpus} CPUs (pipeline start-up included)")
    base_seconds, base_output = rows["engine: local"]
    print(f"{'run':<26}{'seconds':>9}{'rows/s':>9}{'vs local':>10}  identical")
    for name, (seconds, output) in rows.items():
        print(f"{name:<26}{seconds:>9.2f}{args.tasks / seconds:>9.2f}{base_seconds / seconds:>9.2f}x  "
              f"{'✓' if output == base_output else '✗'}")


if __name__ == "__main__":
    main()
