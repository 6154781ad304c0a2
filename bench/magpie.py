"""Benchmark: Magpie on the embedded model, against Self-Instruct on the same teacher.

Run from the repository root (OMP_NUM_THREADS=1 on a shared machine; minutes on 2 quiet CPU cores):

    .venv/bin/python bench/magpie.py                 # N=20 raw prefixes, Self-Instruct up to 10 tasks
    .venv/bin/python bench/magpie.py --n 20 --out /tmp/magpie-bench

What it measures, through `datagen.generate.run_generate` (the code `datagen generate` runs):

1. Magpie, one turn, `max_attempts: 1`, so exactly N pre-query prefixes are sent: how many give
   an instruction at all (not empty, not cut at max_tokens, no error), how many of those are
   *usable* (they also pass the `magpie` filter pass on the user turn: 3+ words, no repetition
   loop, English), how many conversations are kept (the reply also made and the whole
   conversation passes the pass), how many got parseable tags from the judge, and the teacher
   requests and tokens per kept conversation.
2. Self-Instruct from the bundled seeds until it holds as many tasks as Magpie wrote usable
   instructions (at most `--self-instruct`), with its requests and tokens per task.
3. Diversity of the two instruction sets, cut to the same size: distinct-1 and distinct-2
   (unique word n-grams over all n-grams) and the mean ROUGE-L F1 of each instruction to its
   nearest neighbour in the set (`datagen.rouge`; lower is more diverse).

Prints a markdown table (the one in docs/benchmarks.md) and writes it to OUT/magpie.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datagen.config_file import load_config  # noqa: E402
from datagen.filters.magpie import MagpieFilterConfig, conversation_reason  # noqa: E402
from datagen.generate import run_generate  # noqa: E402
from datagen.io import read_tasks, rejects_path  # noqa: E402
from datagen.records import Task  # noqa: E402
from datagen.rouge import RougeLIndex, tokenize  # noqa: E402


def distinct(texts: list[str], n: int) -> float:
    """Unique word n-grams over all word n-grams of `texts`."""
    grams = [tuple(words[i:i + n]) for text in texts for words in [tokenize(text)] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def nearest_rouge(texts: list[str]) -> float:
    """Mean ROUGE-L F1 of each text to its nearest other text."""
    scores = []
    for position, text in enumerate(texts):
        others = RougeLIndex(texts[:position] + texts[position + 1:])
        scores.append(others.max_score(text))
    return sum(scores) / len(scores) if scores else 0.0


def run(config: dict, folder: Path, name: str) -> tuple[dict, float]:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    summary = run_generate(load_config(path), f"bench/magpie.py {name}")
    return summary, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20, help="raw prefixes Magpie sends")
    parser.add_argument("--self-instruct", type=int, default=10, help="Self-Instruct tasks at most")
    parser.add_argument("--out", type=Path, default=Path("/tmp/magpie-bench"))
    parser.add_argument("--backend", default="local", help="teacher backend (local or vllm)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = {"backend": args.backend, "cache_dir": str(args.out / "cache")}

    magpie_out = args.out / "magpie.jsonl"
    magpie, magpie_s = run({"generate": {"method": "magpie", "num": args.n, "out": str(magpie_out), "magpie": {
        "turns": 1, "max_attempts": 1.0, "items_per_batch": 20,
        "instruction_sampling": {"temperature": 1.0, "max_tokens": 64},
        "response_sampling": {"temperature": 0.0, "max_tokens": 192}}}, "teacher": teacher}, args.out, "magpie")
    records = list(read_tasks(magpie_out)) if magpie_out.exists() else []
    rejects = [json.loads(line) for line in rejects_path(magpie_out).read_text().splitlines() if line.strip()] \
        if rejects_path(magpie_out).exists() else []
    failed_user = [r for r in rejects if "turn 1, user" in (r.get("detail") or "")]
    written = [task.instruction for task in records] + [r["task"]["instruction"] for r in rejects
                                                        if r.get("task") and "turn 1, assistant" in r.get("detail", "")]
    settings = MagpieFilterConfig()
    usable = [text for text in written
              if conversation_reason(Task(id="x", instruction=text), settings) is None]
    kept = [task for task in records if conversation_reason(task, settings) is None]
    tagged = sum(1 for task in records if (task.model_extra or {}).get("tags"))

    si_out = args.out / "self_instruct.jsonl"
    target = min(args.self_instruct, max(2, len(usable)))
    self_instruct, si_s = run({"generate": {"method": "self-instruct", "num": target, "out": str(si_out)},
                               "teacher": teacher}, args.out, "self_instruct")
    si_instructions = [task.instruction for task in read_tasks(si_out)]

    size = min(len(usable), len(si_instructions))
    ours, theirs = usable[:size], si_instructions[:size]

    def per(summary: dict, count: int, key: str) -> str:
        return f"{(summary[key] + summary['cache_hits']) / count:.1f}" if count else "-"

    tokens = {name: s["prompt_tokens"] + s["completion_tokens"] for name, s in
              (("magpie", magpie), ("self", self_instruct))}
    lines = [
        f"Magpie on the embedded SmolLM2-135M-Instruct ({args.backend} backend), {args.n} raw prefixes; "
        f"Self-Instruct to {target} tasks on the same teacher.",
        "",
        "| | Magpie | Self-Instruct |",
        "|---|---|---|",
        f"| prefixes sent | {args.n} | - |",
        f"| instruction written (not empty, not cut, no error) | {args.n - len(failed_user)} of {args.n} | - |",
        f"| usable instruction (also passes the `magpie` pass: 3+ words, no loop, English) | "
        f"{len(usable)} of {args.n} | - |",
        f"| conversations / tasks kept | {len(kept)} | {len(si_instructions)} |",
        f"| judge tags parsed (schema-constrained where the backend can) | {tagged} of {len(records)} | - |",
        f"| teacher requests per kept conversation / task | {per(magpie, len(kept), 'requests_sent')} | "
        f"{per(self_instruct, len(si_instructions), 'requests_sent')} |",
        f"| tokens (prompt + completion) per kept conversation / task | "
        f"{tokens['magpie'] / len(kept) if kept else 0:.0f} | "
        f"{tokens['self'] / len(si_instructions) if si_instructions else 0:.0f} |",
        f"| distinct-1 of {size} instructions | {distinct(ours, 1):.3f} | {distinct(theirs, 1):.3f} |",
        f"| distinct-2 of {size} instructions | {distinct(ours, 2):.3f} | {distinct(theirs, 2):.3f} |",
        f"| mean ROUGE-L to the nearest neighbour (lower: more diverse) | {nearest_rouge(ours):.3f} | "
        f"{nearest_rouge(theirs):.3f} |",
        f"| wall time (s) | {magpie_s:.0f} | {si_s:.0f} |",
    ]
    table = "\n".join(lines)
    print(table)
    (args.out / "magpie.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
