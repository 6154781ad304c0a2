"""Unparseable judge replies before and after structured outputs, on the embedded model.

For each of ratings (preferences' rating prompt), pairwise verdicts (preferences' pairwise
prompt) and the judge filter's score, N prompts go to the local backend twice: as plain text
(the reply parsed by the text parser) and with the reply schema (decoded under xgrammar, parsed
as JSON). Prints a markdown table of unparseable replies and seconds per reply.

    .venv/bin/python bench/structured_outputs.py --n 20 --max-tokens 96
"""

from __future__ import annotations

import argparse
import tempfile
import time

from datagen.config import SamplingParams
from datagen.filters.judge import judge_messages, parse_judgement
from datagen.generators.preferences import (
    Rating,
    Verdict,
    pairwise_messages,
    parse_rating,
    parse_verdict,
    rating_messages,
)
from datagen.structured import RATING_SCHEMA, SCORE_SCHEMA, VERDICT_SCHEMA
from datagen.teachers import TeacherConfig, make_teacher

QUESTIONS = [
    ("What is the capital of France?", "Paris is the capital of France.", "The capital of France is Lyon."),
    ("Name a prime number greater than 10.", "11 is a prime number.", "12 is prime."),
    ("Translate 'good morning' into Spanish.", "Buenos días.", "Bonjour."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have six legs."),
    ("Give a synonym for 'happy'.", "Joyful.", "Sad."),
    ("What is 7 times 8?", "7 times 8 is 56.", "7 times 8 is 54."),
    ("Which planet is closest to the sun?", "Mercury.", "Venus is the closest planet to the sun."),
    ("What gas do plants absorb from the air?", "Carbon dioxide.", "Plants absorb oxygen and nothing else."),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare.", "Charles Dickens wrote it."),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees Celsius.", "50 degrees."),
    ("Summarize: 'The meeting moved from Monday to Tuesday.'", "The meeting is now on Tuesday.", "Meetings are long."),
    ("Is 15 even or odd?", "15 is odd.", "15 is even."),
    ("What is the plural of 'mouse'?", "Mice.", "Mouses."),
    ("Convert 1 kilometre to metres.", "1 kilometre is 1000 metres.", "1 kilometre is 100 metres."),
    ("What colour do you get by mixing blue and yellow?", "Green.", "Purple."),
    ("Name the largest ocean on Earth.", "The Pacific Ocean.", "The Atlantic Ocean is the largest."),
    ("What is the square root of 81?", "9.", "8."),
    ("Which language is mainly spoken in Brazil?", "Portuguese.", "Spanish."),
    ("What is H2O commonly called?", "Water.", "Salt."),
    ("How many days are in a leap year?", "366.", "365."),
]


def prompts(kind: str, n: int) -> list[list[dict[str, str]]]:
    rows = (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]
    user = lambda q: [{"role": "user", "content": q}]  # noqa: E731
    if kind == "rating":
        return [rating_messages(user(q), good if i % 2 == 0 else bad) for i, (q, good, bad) in enumerate(rows)]
    if kind == "verdict":
        return [pairwise_messages(user(q), *((good, bad) if i % 2 == 0 else (bad, good)))
                for i, (q, good, bad) in enumerate(rows)]
    return [judge_messages(q, "", good if i % 2 == 0 else bad) for i, (q, good, bad) in enumerate(rows)]


PARSERS = {
    "rating": (lambda text: isinstance(parse_rating(text), Rating), RATING_SCHEMA),
    "verdict": (lambda text: isinstance(parse_verdict(text), Verdict), VERDICT_SCHEMA),
    "judge score": (lambda text: parse_judgement(text) is not None, SCORE_SCHEMA),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as cache, \
            make_teacher(TeacherConfig(cache_dir=cache, batch_size=args.batch_size)) as teacher:
        for kind, (readable, schema) in PARSERS.items():
            conversations = prompts(kind, args.n)
            for mode, shape in (("text", None), ("JSON schema", schema)):
                started = time.monotonic()
                replies = [r for [r] in teacher.complete(conversations, params, schema=shape)]
                seconds = time.monotonic() - started
                bad = sum(1 for r in replies if not (r.ok and readable(r.text)))
                cut = sum(1 for r in replies if r.finish_reason == "length")
                rows.append((kind, mode, bad, len(replies), cut, seconds / len(replies)))
                print(f"{kind} / {mode}: e.g. {replies[0].text[:120]!r}", flush=True)
    print(f"\n{args.n} prompts each, local backend, {teacher.name}, greedy, max_tokens {args.max_tokens}\n")
    print("| reply | decoding | unparseable | cut off at max_tokens | s / reply |")
    print("|---|---|---|---|---|")
    for kind, mode, bad, total, cut, per in rows:
        print(f"| {kind} | {mode} | {bad} of {total} | {cut} | {per:.2f} |")


if __name__ == "__main__":
    main()
