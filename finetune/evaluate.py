"""`datagen eval`: the base student against the tuned student on held-out tasks.

    datagen eval out/dataset --base smollm2-135m --tuned out/student --out out/eval

On the held-out conversations (an export folder's `test.jsonl`, split by task, so no
evaluated task was trained on; or any file `datagen finetune` reads, rendered by the same
`datagen.chat` functions, so the prompts are the ones the student was trained on) both
models are scored on:

- mean loss on the teacher's replies (completion tokens only, token-weighted), and its
  perplexity;
- ROUGE-L F1 of the model's greedy reply against the teacher's (the same ROUGE-L as
  the generators; equal to `rouge-score`);
- optionally (`eval.judge: true`) a teacher-judged win rate of tuned over base: each
  pair is judged twice with the answers swapped, so a judge that favours position A
  scores a tie, not a win.

External benchmarks (`eval.benchmarks`, `datagen eval --benchmark`: Super-NaturalInstructions,
IFEval and other lm-eval tasks, a judged win rate against reference outputs) are scored for
both models in the same report (`datagen.finetune.benchmarks`); without held-out data an eval
is those alone. The held-out references are called "teacher replies" only when the tasks'
lineage says a teacher wrote them, else "reference replies".

It writes `OUT/report.json` and `OUT/report.md` (figures side by side, and a few replies).
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from datagen.config import SamplingParams, Strict
from datagen.errors import ConfigError, InputError
from datagen.finetune.benchmarks import BenchmarkOptions
from datagen.finetune.judged import JUDGE_TEMPLATE, judge_messages, parse_verdict  # noqa: F401 (eval's judge)
from datagen.io import atomic_write_json, atomic_write_text
from datagen.teachers import TeacherConfig

TEACHER_LABEL = "teacher replies"
REFERENCE_LABEL = "reference replies"


class EvalConfig(Strict):
    max_examples: int | None = Field(64, ge=1)  # the first N held-out examples; None: all
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    judge: bool = False
    judge_sampling: SamplingParams = SamplingParams(temperature=0.0, max_tokens=96)
    samples_in_report: int = Field(3, ge=0)
    # held-out task JSONL: Orca tasks with the generic system message, as finetune.prompt_erasure
    prompt_erasure: bool = False
    generic_system: str | None = Field(None, min_length=1)  # as finetune.generic_system
    # external benchmarks scored beside the held-out data: NAME, NAME:PATH or PATH (datagen.finetune.benchmarks)
    benchmarks: list[str] = Field(default_factory=list)
    benchmark: BenchmarkOptions = BenchmarkOptions()
    # how the students answer: vLLM where installed for runs of VLLM_MIN_PROMPTS replies or more
    engine: Literal["auto", "vllm", "local"] = "auto"


def held_out_path(data: str | Path) -> Path:
    """An export folder's `test.jsonl`, or the file given."""
    data = Path(data)
    return data / "test.jsonl" if data.is_dir() else data


def resolve_student(path: str) -> str:
    """A model folder for `path`: a finetune output folder means its merged model."""
    folder = Path(path)
    if (folder / "merged" / "config.json").exists():
        return str(folder / "merged")
    if (folder / "adapter_config.json").exists():
        raise InputError(f"{folder}: an adapter alone; pass the finetune output's merged/ folder")
    return path


def score_model(model_name: str, conversations: list, config: EvalConfig, label: str) -> dict[str, Any]:
    """Loss, perplexity, greedy replies and their ROUGE-L for one model; its replies show
    progress as `eval LABEL` (examples done, rate, ETA), the slow part of an eval."""
    from datagen.finetune.benchmarks import answer, choose_engine, student_backend
    from datagen.finetune.data import encode_all
    from datagen.finetune.losses import mean_completion_loss
    from datagen.rouge import rouge_l_f1
    from datagen.teachers.local import LocalBackend

    started = time.monotonic()
    backend = LocalBackend(TeacherConfig(backend="local", model=model_name, batch_size=config.batch_size))
    tokenizer = backend.tokenizer
    pad_id = tokenizer.pad_token_id
    encoded = encode_all(tokenizer, conversations, max_length=None, auto_cap=1 << 30)
    loss = mean_completion_loss(backend.network, encoded.examples, pad_id, backend.device, config.batch_size)
    prompts = [c.chat()[:-1] for c in conversations]
    engine = choose_engine(config.engine, len(prompts))
    if engine == "local":
        replies = answer(backend, prompts, config.max_new_tokens, f"eval {label}")
        backend.close()
    else:  # the transformers copy goes before vLLM claims its memory
        backend.close()
        with student_backend(model_name, engine, config.batch_size) as generator:
            replies = answer(generator, prompts, config.max_new_tokens, f"eval {label}")
    references = [c.messages[-1][1] for c in conversations]
    rouge = [rouge_l_f1(reference, reply) for reference, reply in zip(references, replies)]
    return {
        "model": model_name,
        "loss": round(loss, 4),
        "perplexity": round(math.exp(min(loss, 50)), 3),
        "rouge_l": round(sum(rouge) / len(rouge), 4),
        "replies": replies,
        "seconds": round(time.monotonic() - started, 1),
    }


def win_rate(teacher, requests: list[str], tuned: list[str], base: list[str],
             sampling: SamplingParams) -> dict[str, Any]:
    """Tuned-over-base win rate, each pair judged in both orders (win 1, tie 0.5, loss 0).

    Unreadable verdicts are counted and left out of the rate, not guessed.
    """
    conversations = []
    for request, mine, theirs in zip(requests, tuned, base):
        conversations.append(judge_messages(request, mine, theirs))  # tuned is A
        conversations.append(judge_messages(request, theirs, mine))  # tuned is B
    from datagen.structured import VERDICT_SCHEMA

    replies = teacher.complete(conversations, sampling, schema=VERDICT_SCHEMA)
    points, unreadable = [], 0
    for position, [reply] in enumerate(replies):
        verdict = parse_verdict(reply.text) if reply.ok else None
        if verdict is None:
            unreadable += 1
            continue
        tuned_label = "A" if position % 2 == 0 else "B"
        points.append(0.5 if verdict == "tie" else float(verdict == tuned_label))
    return {
        "win_rate": round(sum(points) / len(points), 4) if points else None,
        "judgements": len(points),
        "unreadable": unreadable,
        "judge": teacher.name,
    }


def evaluate(
    config: EvalConfig,
    data: str | Path | None,
    base: str,
    tuned: str,
    out_dir: str | Path,
    teacher_config: TeacherConfig | None = None,
    input_format: str | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """Score base and tuned on the held-out data (any format `datagen.readers` reads, `input_format`
    and `split` as there; None: the benchmarks alone) and on `config.benchmarks`; write
    report.json and report.md; return the report."""
    from datagen.finetune.benchmarks import make_benchmarks, run_benchmarks

    benchmarks = make_benchmarks(config.benchmarks, config.benchmark)  # a bad one fails before any model loads
    if data is None and not benchmarks:
        raise ConfigError("eval: nothing to score; give held-out data, a --benchmark, or both")
    tuned_model = resolve_student(tuned)
    out_dir = Path(out_dir)
    judge_config = teacher_config or TeacherConfig()
    with ExitStack() as stack:
        opened: list = []

        def judge():  # one judge for eval.judge and the judged benchmarks, opened when first asked
            if not opened:
                opened.append(stack.enter_context(open_judge(judge_config, out_dir)))
            return opened[0]

        if data is not None:
            report = held_out_report(config, data, base, tuned_model, judge, input_format, split)
        else:
            report = {"data": None, "examples": 0, "base": {"model": base}, "tuned": {"model": tuned_model},
                      "samples": []}
        if benchmarks:
            report["benchmarks"] = run_benchmarks(
                benchmarks, {"base": base, "tuned": tuned_model}, options=config.benchmark, engine=config.engine,
                batch_size=config.batch_size, out_dir=out_dir, judge=judge, judge_model=judge_config.model,
                judge_sampling=config.judge_sampling, samples=config.samples_in_report)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", format_report(report))
    return report


def held_out_report(config: EvalConfig, data: str | Path, base: str, tuned_model: str, judge,
                    input_format: str | None, split: str | None) -> dict[str, Any]:
    """Loss, ROUGE-L and (eval.judge) the win rate of tuned over base on the held-out data."""
    from datagen.finetune.data import load_conversations

    source = held_out_path(data)
    if Path(data).is_dir() and not source.exists():  # a saved dataset or split files: its test split
        source, split = Path(data), split or "test"
    conversations = load_conversations(source, prompt_erasure=config.prompt_erasure,
                                       generic_system=config.generic_system, input_format=input_format, split=split)
    if config.max_examples:
        conversations = conversations[: config.max_examples]
    results = {"base": score_model(base, conversations, config, "base"),
               "tuned": score_model(tuned_model, conversations, config, "tuned")}
    report: dict[str, Any] = {
        "data": str(source),
        "examples": len(conversations),
        "reference": reference_kind(source),
        "base": {k: v for k, v in results["base"].items() if k != "replies"},
        "tuned": {k: v for k, v in results["tuned"].items() if k != "replies"},
    }
    if config.judge:
        report["judge"] = win_rate(
            judge(), [_as_request(c) for c in conversations],
            results["tuned"]["replies"], results["base"]["replies"], config.judge_sampling,
        )
    report["samples"] = [
        {"request": _as_request(c), "reference": c.messages[-1][1],
         "base": results["base"]["replies"][i], "tuned": results["tuned"]["replies"][i]}
        for i, c in enumerate(conversations[: config.samples_in_report])
    ]
    return report


def reference_kind(source: Path) -> dict[str, Any]:
    """What the held-out references are: "teacher replies" when the lineage of every task they
    come from (the file itself, or the task JSONL an export folder's export.json names) says a
    teacher wrote them, else "reference replies" (human-written seeds, someone else's data)."""
    import json

    from datagen.io import read_jsonl

    tasks_file = source
    manifest = source.parent / "export.json" if source.is_file() else source / "export.json"
    try:
        if manifest.is_file():
            tasks_file = Path(json.loads(manifest.read_text(encoding="utf-8")).get("input") or source)
        teachers: set[str] = set()
        rows = 0
        if tasks_file.is_file() and tasks_file.suffix == ".jsonl":
            for _number, row in read_jsonl(tasks_file):
                rows += 1
                model = ((row.get("lineage") or {}) if isinstance(row, dict) else {}).get("teacher_model")
                if not model:
                    return {"label": REFERENCE_LABEL, "teachers": []}
                teachers.add(model)
    except (OSError, ValueError, InputError):  # unreadable provenance: claim nothing
        return {"label": REFERENCE_LABEL, "teachers": []}
    if rows and teachers:
        return {"label": TEACHER_LABEL, "teachers": sorted(teachers)}
    return {"label": REFERENCE_LABEL, "teachers": []}


def open_judge(config: TeacherConfig, out_dir: Path):
    """The judge's teacher. With `teacher.max_cost` it is capped like every stage that pays a
    teacher: it reserves in the ledger beside the report (`OUT/report.spend.json`), so a rerun
    with a higher cap goes on from what it spent, every answered verdict from the cache."""
    from datagen.io import spend_path
    from datagen.teachers.spending import SpendingLedger, check_priced
    from datagen.teachers.teacher import make_teacher

    if config.max_cost:
        check_priced(config, config.backend, "the judge")
    teacher = make_teacher(config)
    if config.max_cost:
        teacher.ledger = SpendingLedger(spend_path(out_dir / "report.json"), config.max_cost, fresh=True)
    return teacher


def _as_request(conversation) -> str:
    return "\n\n".join(content for role, content in conversation.messages[:-1] if role == "user")


def format_report(report: dict[str, Any]) -> str:
    """The markdown report: the figures side by side, then sample replies."""
    from datagen.finetune.benchmarks import format_benchmarks

    base, tuned = report["base"], report["tuned"]
    lines = ["# Student evaluation", ""]
    if report.get("data") is not None:
        label = reference_label(report)
        made_by = report.get("reference", {}).get("teachers") or []
        lines += [
            f"Held-out data: `{report['data']}` ({report['examples']} examples, split by task); "
            f"references: {label}" + (f" ({', '.join(made_by)})" if made_by else "") + ".",
            "",
            "| metric | base | tuned |",
            "| --- | --- | --- |",
            f"| loss on {label} (lower is better) | {base['loss']:.4f} | {tuned['loss']:.4f} |",
            f"| perplexity | {base['perplexity']:.3f} | {tuned['perplexity']:.3f} |",
            f"| ROUGE-L F1 vs {label} (higher is better) | {base['rouge_l']:.4f} | {tuned['rouge_l']:.4f} |",
        ]
        judge = report.get("judge")
        if judge:
            rate = "n/a" if judge["win_rate"] is None else f"{judge['win_rate']:.3f}"
            lines.append(f"| judged win rate of tuned over base ({judge['judge']}, both orders) | | {rate} |")
        lines.append("")
    lines += [f"Models: base `{base['model']}`, tuned `{tuned['model']}`.", ""]
    if report.get("benchmarks"):
        lines += format_benchmarks(report["benchmarks"])
    reference = reference_label(report).capitalize()
    for number, sample in enumerate(report["samples"], start=1):
        lines += [f"## Sample {number}", "", *_sample_lines(sample, reference)]
    for entry in report.get("benchmarks", []):
        for number, sample in enumerate(entry.get("samples", []), start=1):
            lines += [f"## {entry['name']} sample {number}", "", *_sample_lines(sample, "Reference")]
    return "\n".join(lines) + "\n"


def reference_label(report: dict[str, Any]) -> str:
    """"teacher replies" or "reference replies" (see `reference_kind`)."""
    return (report.get("reference") or {}).get("label", REFERENCE_LABEL)


def _sample_lines(sample: dict[str, Any], reference: str) -> list[str]:
    return ["**Request**", "", _quote(sample["request"]), "",
            f"**{reference}**", "", _quote(sample["reference"]), "",
            "**Base**", "", _quote(sample["base"]), "",
            "**Tuned**", "", _quote(sample["tuned"]), ""]


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def format_summary(report: dict[str, Any]) -> str:
    """Before/after in a few lines, for the terminal (and distill's closing report)."""
    from datagen.finetune.benchmarks import summary_lines

    base, tuned = report["base"], report["tuned"]
    lines = []
    if report.get("data") is not None:
        label = reference_label(report)
        lines += [
            f"held-out examples: {report['examples']} ({report['data']})",
            f"loss on {label}: base {base['loss']:.4f} -> tuned {tuned['loss']:.4f}",
            f"ROUGE-L vs {label}: base {base['rouge_l']:.4f} -> tuned {tuned['rouge_l']:.4f}",
        ]
        if report.get("judge"):
            lines.append(f"judged win rate of tuned over base: {report['judge']['win_rate']}")
    if report.get("benchmarks"):
        lines += ["external benchmarks:", *("  " + line for line in summary_lines(report["benchmarks"]))]
    return "\n".join(lines)
