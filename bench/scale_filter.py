"""Benchmark: `datagen filter` in one process against its datatrove stages (local, Ray).

Run from the repository root (the lock keeps other heavy jobs off the cores meanwhile):

    flock /work/wt/cpu.lock .venv/bin/python bench/scale_filter.py               # 50,000 tasks
    flock /work/wt/cpu.lock .venv/bin/python bench/scale_filter.py --n 200000 --ray

The input is bench/dedup.py's synthetic corpus (templated instructions, a quarter of them with
1-3 near-duplicate variants, 0-3 instances each), written as one JSONL file, with an eval file
holding 200 of its instructions (decontamination hits) and hand marks dropping every 97th task.
Passes: heuristics, decontaminate (8-grams), exact-dedup, near-dedup, manual. (The judge is
left out: its time is the teacher's, which sharding spreads over workers but does not change.)
Rows, each on the same file:

- single process: `run_filter`, what `datagen filter` runs today (the baseline);
- datatrove local, 1 task / 2 tasks (2 workers): `run_scaled_filter(..., "datatrove")`;
- with --ray: datatrove on a local Ray (`ray.init(address="local", num_cpus=2)`), 2 tasks.

Each row runs in a forked child (bench/dedup.py's `in_child`): wall seconds, records/s, and the
peak RSS growth of that child: for the datatrove rows the driver plus the stages run in-process
(1 task: all of them; 2 workers: the single-task stages; the sharded ones run in forked or Ray
workers not counted here). "same" compares the kept and rejects files byte for byte with the
single-process run's. The ratio is the single-process wall time over the row's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dedup import build_corpus, in_child, mib  # noqa: E402  (bench/dedup.py, run as a script)
from scale_dedup import same  # noqa: E402

from datagen.config_file import load_config  # noqa: E402
from datagen.filtering import run_filter  # noqa: E402
from datagen.io import write_jsonl_atomic  # noqa: E402

PASSES = ["heuristics", "decontaminate", "exact-dedup", "near-dedup", "manual"]


def settings(work: Path):
    config = load_config(None, {"filter.passes": ("--passes", PASSES),
                                "filter.decontaminate.eval_files": ("--eval", [str(work / "evals.txt")]),
                                "filter.manual.overrides": ("--overrides", str(work / "marks.jsonl"))})
    config.filter.decontaminate.ngram = 8
    return config


def single(work: Path, source: Path, out: Path) -> None:
    run_filter(settings(work), source, out, out.with_suffix(".rejects.jsonl"), "bench")


def scaled(work: Path, source: Path, out: Path, engine: str, tasks: int, workers: int) -> None:
    from datagen.engines.datatrove_run import EngineOptions
    from datagen.engines.sharded_filter import ScaleFilterPlan, run_scaled_filter

    if engine == "ray":
        import ray

        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    plan = ScaleFilterPlan(source, out, out.with_suffix(".rejects.jsonl"), out.with_suffix(".work"), settings(work),
                           tasks=tasks)
    try:
        run_scaled_filter(plan, engine, EngineOptions(workers=workers, mem_per_cpu_gb=0.5))
    finally:
        if engine == "ray":
            ray.shutdown()


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
        rng = random.Random(args.seed)
        (work / "evals.txt").write_text("".join(task.instruction + "\n" for task in rng.sample(tasks, 200)))
        (work / "marks.jsonl").write_text("".join(json.dumps({"id": task.id, "decision": "drop"}) + "\n"
                                                  for task in tasks[::97]))
        del tasks
        print(f"{args.n} tasks, {source.stat().st_size / 2**20:.1f} MiB, {os.cpu_count()} CPUs; "
              f"passes {','.join(PASSES)}")
        print(f"  {'method':<36} {'wall s':>8} {'records/s':>10} {'peak MiB':>9} {'ratio':>6} same")
        reference = work / "single.jsonl"
        _, base, peak = in_child(lambda: single(work, source, reference))
        print(f"  {'single process (baseline)':<36} {base:>8.2f} {args.n / base:>10.0f} {mib(peak):>9} "
              f"{1.0:>6.2f}", flush=True)
        rows = [("datatrove local, 1 task", "datatrove", 1, 1),
                ("datatrove local, 2 tasks, 2 workers", "datatrove", 2, 2)]
        if args.ray:
            rows.append(("datatrove Ray, 2 tasks, 2 CPUs", "ray", 2, 2))
        for label, engine, shards, workers in rows:
            out = work / f"{engine}{shards}.jsonl"
            _, seconds, peak = in_child(lambda engine=engine, shards=shards, workers=workers, out=out:
                                        scaled(work, source, out, engine, shards, workers))
            print(f"  {label:<36} {seconds:>8.2f} {args.n / seconds:>10.0f} {mib(peak):>9} "
                  f"{base / seconds:>6.2f} {same(out, reference)}", flush=True)


if __name__ == "__main__":
    main()
