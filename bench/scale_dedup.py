"""Benchmark: `datagen dedup` in one process against its datatrove stages (local, Ray).

Run from the repository root (the lock keeps other heavy jobs off the cores meanwhile):

    flock /work/wt/cpu.lock .venv/bin/python bench/scale_dedup.py               # 50,000 tasks
    flock /work/wt/cpu.lock .venv/bin/python bench/scale_dedup.py --n 200000 --ray

The input is bench/dedup.py's synthetic corpus (templated instructions, a quarter of them
with 1-3 near-duplicate variants), written as one JSONL file. Rows, each on the same file:

- single process: `run_filter` with exact-dedup + near-dedup, what `datagen dedup` runs today
  (the baseline);
- datatrove local, 1 task / 2 tasks (2 workers): `run_scaled_dedup(..., "datatrove")`;
- with --ray: datatrove on a local Ray (`ray.init(address="local", num_cpus=N)`): 1 task on
  1 CPU, 2 tasks on 2 CPUs (1 vs 2 workers).

Each row runs in a forked child (bench/dedup.py's `in_child`): wall seconds, records/s, and the
peak RSS growth of that child, which for the datatrove rows is the driver plus every stage
run in-process (1 task: all of them; 2 workers: the single-task stages group, decide and
collect; the sharded ones run in forked workers not counted here). "same" compares the kept
and rejects files byte for byte with the single-process run's. The ratio is the
single-process wall time over the row's. On 2 cores the 2-task rows can at best halve the
sharded stages; group and decide stay one process by design.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dedup import build_corpus, in_child, mib  # noqa: E402  (bench/dedup.py, run as a script)

from datagen.config_file import load_config  # noqa: E402
from datagen.filtering import run_filter  # noqa: E402
from datagen.filters.dedup import DedupConfig  # noqa: E402
from datagen.io import write_jsonl_atomic  # noqa: E402


def single(source: Path, out: Path) -> None:
    settings = load_config(None, {"filter.passes": ("--passes", ["exact-dedup", "near-dedup"])})
    run_filter(settings, source, out, out.with_suffix(".rejects.jsonl"), "bench")


def scaled(source: Path, out: Path, engine: str, tasks: int, workers: int) -> None:
    """On Ray, `workers` is the local Ray's CPUs (the most tasks that run at once)."""
    from datagen.engines.datatrove_run import EngineOptions
    from datagen.engines.sharded_dedup import ScaleDedupPlan, run_scaled_dedup

    if engine == "ray":
        import ray

        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    plan = ScaleDedupPlan(source, out, out.with_suffix(".rejects.jsonl"), out.with_suffix(".work"), DedupConfig(),
                          tasks=tasks)
    try:
        run_scaled_dedup(plan, engine, EngineOptions(workers=workers, mem_per_cpu_gb=0.5))
    finally:
        if engine == "ray":
            ray.shutdown()


def same(out: Path, reference: Path) -> str:
    equal = all(a.read_bytes() == b.read_bytes() for a, b in (
        (out, reference), (out.with_suffix(".rejects.jsonl"), reference.with_suffix(".rejects.jsonl"))))
    return "✓" if equal else "✗"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ray", action="store_true", help="also run datatrove on a local Ray")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        tasks, _ = build_corpus(args.n, args.seed)
        source = work / "in.jsonl"
        write_jsonl_atomic(source, tasks)
        del tasks
        print(f"{args.n} tasks, {source.stat().st_size / 2**20:.1f} MiB, {os.cpu_count()} CPUs")
        print(f"  {'method':<34} {'wall s':>8} {'records/s':>10} {'peak MiB':>9} {'ratio':>6} same")
        reference = work / "single.jsonl"
        _, base, peak = in_child(lambda: single(source, reference))
        print(f"  {'single process (baseline)':<34} {base:>8.2f} {args.n / base:>10.0f} {mib(peak):>9} "
              f"{1.0:>6.2f}")
        rows = [("datatrove local, 1 task", "datatrove", 1, 1),
                ("datatrove local, 2 tasks, 2 workers", "datatrove", 2, 2)]
        if args.ray:
            rows += [("datatrove Ray, 1 task, 1 CPU", "ray", 1, 1),
                     ("datatrove Ray, 2 tasks, 2 CPUs", "ray", 2, 2)]
        for label, engine, shards, workers in rows:
            out = work / f"{engine}{shards}-{workers}.jsonl"
            _, seconds, peak = in_child(lambda engine=engine, shards=shards, workers=workers, out=out:
                                        scaled(source, out, engine, shards, workers))
            print(f"  {label:<34} {seconds:>8.2f} {args.n / seconds:>10.0f} {mib(peak):>9} "
                  f"{base / seconds:>6.2f} {same(out, reference)}")


if __name__ == "__main__":
    main()
