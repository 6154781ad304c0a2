"""Benchmark: how often each heuristic of the `heuristics` pass is right on real teacher data.

Run from the repository root:

    .venv/bin/python bench/filter_precision.py                          # the labelled sample in the repo
    .venv/bin/python bench/filter_precision.py --source alpaca_5000.json  # + firings on the whole source

The labelled sample (tests/data/filter_precision/alpaca_labelled.jsonl, see the README there)
holds 191 rows of a 5,000-row slice of Stanford Alpaca's text-davinci-003 data: every row
on which a rule fired (with the rules before and after the fixes of issue 27), rows looked
for on purpose because a rule nearly fires on them (apologies inside content, markers,
notation, repeated lines), and 150 random rows on which nothing fires. Each row lists the
rules whose defect it really has, judged by reading it. For every rule the bench prints how
often it fired on the sample, how many firings were right, precision, and recall (right
firings over the sample's rows with that defect: the random rows estimate what the rules
miss), our rules first, then the Self-Instruct reference rules (kept as the method has them).

`--source` (the slice as JSON, e.g. `git show 5e69c50:data/alpaca_5000.json` in
tatsu-lab/stanford_alpaca, or the full alpaca_data.json) runs the rules over every row of it
as well and lists any firing the labels do not cover, so a changed rule is relabelled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datagen.filters.heuristics import (  # noqa: E402
    OUR_REASONS,
    REFERENCE_REASONS,
    HeuristicsConfig,
    RuleScore,
    checks_for,
    fired_rules,
    score_rules,
)
from datagen.records import Instance, Task  # noqa: E402

LABELLED = Path(__file__).resolve().parents[1] / "tests" / "data" / "filter_precision" / "alpaca_labelled.jsonl"


def as_task(row: dict, number: int) -> Task:
    return Task(id=f"row-{number}", instruction=row["instruction"],
                instances=[Instance(input=row["input"], output=row["output"])])


def read_labelled(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _figure(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def table(scores: dict[str, RuleScore], source_fired: dict[str, int] | None) -> str:
    header = "| rule | group | fired | correct | precision | recall |"
    if source_fired is not None:
        header += " fired on the whole source |"
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    others = sorted(rule for rule in scores if rule not in OUR_REASONS + REFERENCE_REASONS)
    for group, rules in (("ours", OUR_REASONS + tuple(others)), ("Self-Instruct reference", REFERENCE_REASONS)):
        for rule in rules:
            s = scores[rule]
            line = (f"| {rule} | {group} | {s.fired} | {s.correct} | {_figure(s.precision)} "
                    f"| {_figure(s.recall)} ({s.correct}/{s.defective}) |")
            if source_fired is not None:
                line += f" {source_fired.get(rule, 0)} |"
            lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", type=Path, default=LABELLED)
    parser.add_argument("--source", type=Path, help="the rows the sample was drawn from (Alpaca JSON list)")
    parser.add_argument("--floor", type=float, default=0.95, help="precision our rules must reach")
    args = parser.parse_args()

    checks = checks_for(HeuristicsConfig())
    rows = read_labelled(args.labelled)
    scores = score_rules(((as_task(r, r["row"]), r["defects"]) for r in rows), checks)
    for rule in OUR_REASONS + REFERENCE_REASONS:
        scores.setdefault(rule, RuleScore())

    source_fired = None
    unlabelled: list[tuple[int, set[str]]] = []
    if args.source:
        labelled_rows = {r["row"] for r in rows}
        source_fired = {}
        for number, row in enumerate(json.loads(args.source.read_text(encoding="utf-8"))):
            fired = fired_rules(as_task(row, number), checks)
            for rule in fired:
                source_fired[rule] = source_fired.get(rule, 0) + 1
            if fired and number not in labelled_rows:
                unlabelled.append((number, fired))

    print(f"{len(rows)} labelled rows ({args.labelled.name}); default heuristics (preset self-instruct)\n")
    print(table(scores, source_fired))
    low = [rule for rule, s in scores.items()
           if rule not in REFERENCE_REASONS and s.precision is not None and s.precision < args.floor]
    for number, fired in unlabelled:
        print(f"unlabelled firing: row {number}: {sorted(fired)}")
    if low:
        print(f"\nbelow the {args.floor} precision floor: {', '.join(low)}")
    return 1 if low or unlabelled else 0


if __name__ == "__main__":
    sys.exit(main())
