"""External benchmarks, base vs tuned student: a table of each benchmark's metrics and the time it took.

    python bench/external_eval.py --model smollm2-135m --benchmarks ifeval
    python bench/external_eval.py --model smollm2-135m --tuned out/demo/student --benchmarks ifeval \
        --out out/external_eval

A thin loop over benchmark names: each one is an lm-eval task run by datagen.finetune.harness
("ifeval" is the 541 shipped prompts, lm-eval's own checks), on vLLM where it is installed.
Each (model, benchmark) runs in its own child process, so one vLLM engine is freed before the
next starts. With --out, every run keeps its results, samples and request cache under
OUT/LABEL/BENCHMARK (rerun the same command and a killed run resumes); the table goes to
OUT/table.md and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def resolve(path: str) -> str:
    """A model folder: an embedded alias is converted, a finetune output means its merged/ model."""
    from datagen.finetune.evaluate import resolve_student
    from datagen.model_paths import resolve_model

    return resolve_model(resolve_student(path))


def run_one(model: str, benchmark: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """One benchmark on one model in a child process; {"metrics": ..., "seconds": ...}."""
    command = [sys.executable, __file__, "--one", model, "--benchmarks", benchmark, "--out", str(out_dir),
               "--backend", args.backend, "--batch-size", str(args.batch_size)]
    if args.limit is not None:
        command += ["--limit", str(args.limit)]
    if args.max_gen_toks is not None:
        command += ["--max-gen-toks", str(args.max_gen_toks)]
    for folder in args.include:
        command += ["--include", folder]
    started = time.monotonic()
    subprocess.run(command, check=True)
    seconds = time.monotonic() - started
    metrics = json.loads((out_dir / "metrics.json").read_text())[benchmark]
    return {"metrics": metrics, "seconds": round(seconds, 1)}


def one(args: argparse.Namespace) -> None:
    """The child: run the benchmark, write metrics.json into --out."""
    from datagen.finetune.harness import run_lm_eval

    out = Path(args.out)
    metrics = run_lm_eval(args.one, args.benchmarks.split(","), include=[Path(p) for p in args.include],
                          limit=args.limit, max_gen_toks=args.max_gen_toks, batch_size=args.batch_size,
                          backend=args.backend, out_dir=out, progress_label=f"{out.parent.name} {out.name}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def table(results: dict[str, dict[str, dict]], labels: list[str]) -> str:
    """Markdown: one row per benchmark metric, a column per model, and each run's time."""
    lines = ["| benchmark | metric | " + " | ".join(labels) + (" | Δ |" if len(labels) == 2 else " |"),
             "|---|---|" + "---|" * len(labels) + ("---|" if len(labels) == 2 else "")]
    for benchmark, by_label in results.items():
        metrics = next(iter(by_label.values()))["metrics"]
        for metric in metrics:
            values = [by_label[label]["metrics"].get(metric) for label in labels]
            cells = [f"{v:.4f}" if v is not None else "-" for v in values]
            delta = [f"{values[1] - values[0]:+.4f}"] if len(labels) == 2 and None not in values else []
            lines.append(f"| {benchmark} | {metric} | " + " | ".join(cells + delta) + " |")
        times = [f"{by_label[label]['seconds'] / 60:.1f} min" for label in labels]
        lines.append(f"| {benchmark} | time | " + " | ".join(times) + (" | |" if len(labels) == 2 else " |"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the base model (alias or folder)")
    parser.add_argument("--tuned", help="the tuned student: a finetune output folder or a model folder")
    parser.add_argument("--benchmarks", default="ifeval", help="comma-separated lm-eval task names")
    parser.add_argument("--include", action="append", default=[], help="a folder of lm-eval task YAMLs")
    parser.add_argument("--limit", type=int, help="examples per benchmark (default: all)")
    parser.add_argument("--max-gen-toks", type=int, help="new tokens per reply (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm"))
    parser.add_argument("--out", help="folder for results, samples and the resume cache")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args)

    models = {"base": resolve(args.model)}
    if args.tuned:
        models["tuned"] = resolve(args.tuned)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="external_eval_"))
    results: dict[str, dict[str, dict]] = {}
    for benchmark in args.benchmarks.split(","):
        for label, model in models.items():
            print(f"== {benchmark} on {label} ({model})", file=sys.stderr, flush=True)
            results.setdefault(benchmark, {})[label] = run_one(model, benchmark, args, out / label / benchmark)
    text = table(results, list(models))
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"models": models, "results": results}, indent=2))


if __name__ == "__main__":
    main()
