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

It writes `OUT/report.json` and `OUT/report.md` (figures side by side, and a few replies).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from datagen.config import SamplingParams, Strict
from datagen.errors import InputError
from datagen.io import atomic_write_json, atomic_write_text
from datagen.progress import progress
from datagen.teachers import TeacherConfig

JUDGE_TEMPLATE = "judge_pairwise.jinja"


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
    from datagen.finetune.data import encode_all
    from datagen.finetune.losses import mean_completion_loss
    from datagen.rouge import rouge_l_f1
    from datagen.teachers.base import Request
    from datagen.teachers.local import LocalBackend

    started = time.monotonic()
    backend = LocalBackend(TeacherConfig(backend="local", model=model_name, batch_size=config.batch_size))
    tokenizer = backend.tokenizer
    pad_id = tokenizer.pad_token_id
    encoded = encode_all(tokenizer, conversations, max_length=None, auto_cap=1 << 30)
    loss = mean_completion_loss(backend.network, encoded.examples, pad_id, backend.device, config.batch_size)
    greedy = SamplingParams(temperature=0.0, max_tokens=config.max_new_tokens)
    requests = [Request.build(c.chat()[:-1], greedy) for c in conversations]
    replies: list[str] = [""] * len(requests)
    with progress(f"eval {label}", total=len(requests)) as bar:

        def keep(index: int, completion) -> None:
            replies[index] = completion.text
            bar.advance(1)

        backend.generate(requests, keep)
    backend.close()
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


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from a judge reply; None when it names none."""
    match = re.search(r"verdict\s*[:=]?\s*\**\s*(tie|a|b)\b", text, flags=re.IGNORECASE)
    if match is None:
        match = re.match(r"\s*(tie|a|b)\b", text, flags=re.IGNORECASE)
    if match is None:
        return None
    word = match.group(1).lower()
    return "tie" if word == "tie" else word.upper()


def judge_messages(request: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    from datagen.prompts import load_template

    text = load_template(JUDGE_TEMPLATE).render(request=request, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "user", "content": text}]


def win_rate(teacher, requests: list[str], tuned: list[str], base: list[str],
             sampling: SamplingParams) -> dict[str, Any]:
    """Tuned-over-base win rate, each pair judged in both orders (win 1, tie 0.5, loss 0).

    Unreadable verdicts are counted and left out of the rate, not guessed.
    """
    conversations = []
    for request, mine, theirs in zip(requests, tuned, base):
        conversations.append(judge_messages(request, mine, theirs))  # tuned is A
        conversations.append(judge_messages(request, theirs, mine))  # tuned is B
    replies = teacher.complete(conversations, sampling)
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
    data: str | Path,
    base: str,
    tuned: str,
    out_dir: str | Path,
    teacher_config: TeacherConfig | None = None,
) -> dict[str, Any]:
    """Score base and tuned on the held-out data; write report.json and report.md; return the report."""
    from datagen.finetune.data import load_conversations

    source = held_out_path(data)
    conversations = load_conversations(source, prompt_erasure=config.prompt_erasure,
                                       generic_system=config.generic_system)
    if config.max_examples:
        conversations = conversations[: config.max_examples]
    tuned_model = resolve_student(tuned)
    results = {"base": score_model(base, conversations, config, "base"),
               "tuned": score_model(tuned_model, conversations, config, "tuned")}
    report: dict[str, Any] = {
        "data": str(source),
        "examples": len(conversations),
        "base": {k: v for k, v in results["base"].items() if k != "replies"},
        "tuned": {k: v for k, v in results["tuned"].items() if k != "replies"},
    }
    if config.judge:
        with open_judge(teacher_config or TeacherConfig(), Path(out_dir)) as teacher:
            report["judge"] = win_rate(
                teacher, [_as_request(c) for c in conversations],
                results["tuned"]["replies"], results["base"]["replies"], config.judge_sampling,
            )
    report["samples"] = [
        {"request": _as_request(c), "reference": c.messages[-1][1],
         "base": results["base"]["replies"][i], "tuned": results["tuned"]["replies"][i]}
        for i, c in enumerate(conversations[: config.samples_in_report])
    ]
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", format_report(report))
    return report


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
    base, tuned = report["base"], report["tuned"]
    lines = [
        "# Student evaluation",
        "",
        f"Held-out data: `{report['data']}` ({report['examples']} examples, split by task).",
        "",
        "| metric | base | tuned |",
        "| --- | --- | --- |",
        f"| loss on teacher replies (lower is better) | {base['loss']:.4f} | {tuned['loss']:.4f} |",
        f"| perplexity | {base['perplexity']:.3f} | {tuned['perplexity']:.3f} |",
        f"| ROUGE-L F1 vs teacher (higher is better) | {base['rouge_l']:.4f} | {tuned['rouge_l']:.4f} |",
    ]
    judge = report.get("judge")
    if judge:
        rate = "n/a" if judge["win_rate"] is None else f"{judge['win_rate']:.3f}"
        lines.append(f"| judged win rate of tuned over base ({judge['judge']}, both orders) | | {rate} |")
    lines += ["", f"Models: base `{base['model']}`, tuned `{tuned['model']}`.", ""]
    for number, sample in enumerate(report["samples"], start=1):
        lines += [
            f"## Sample {number}", "", "**Request**", "", _quote(sample["request"]), "",
            "**Teacher**", "", _quote(sample["reference"]), "",
            "**Base**", "", _quote(sample["base"]), "",
            "**Tuned**", "", _quote(sample["tuned"]), "",
        ]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def format_summary(report: dict[str, Any]) -> str:
    """Before/after in a few lines, for the terminal."""
    base, tuned = report["base"], report["tuned"]
    lines = [
        f"held-out examples: {report['examples']} ({report['data']})",
        f"loss on teacher replies: base {base['loss']:.4f} -> tuned {tuned['loss']:.4f}",
        f"ROUGE-L vs teacher:      base {base['rouge_l']:.4f} -> tuned {tuned['rouge_l']:.4f}",
    ]
    if report.get("judge"):
        lines.append(f"judged win rate of tuned over base: {report['judge']['win_rate']}")
    return "\n".join(lines)
