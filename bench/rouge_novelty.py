"""Benchmark: the Self-Instruct ROUGE-L novelty filter, datagen.rouge against rouge-score.

Run from the repository root:

    .venv/bin/python bench/rouge_novelty.py            # 5,000 instructions (reference takes minutes)
    .venv/bin/python bench/rouge_novelty.py --n 2000   # quicker
    .venv/bin/python bench/rouge_novelty.py --reference pretokenized   # Alpaca-style baseline

It builds `--n` instruction-like texts deterministically (templates and vocabulary, 4-40
words, with some near and exact duplicates), then filters them sequentially the way
Self-Instruct does: a text is accepted when its ROUGE-L F1 against every previously
accepted text is <= 0.7, and then joins the pool; accepted texts also get the 10 most
similar pool texts and the mean similarity. It does this twice in one process:

- reference: rouge-score over the whole pool per candidate, single process. `score`
  (default) calls `RougeScorer.score(candidate, pooled)` per pair like
  yizhongw/self-instruct; `pretokenized` tokenizes once and calls `rouge_scorer._score_lcs`
  like stanford_alpaca.
- datagen.rouge: `RougeLIndex.exceeds` then, for accepted texts, `RougeLIndex.nearest`.

It checks that both accept the same texts with the same statistics and prints the times
and the speed-up.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from rouge_score import rouge_scorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datagen.rouge import RougeLIndex  # noqa: E402

THRESHOLD = 0.7
TOP_K = 10

VERBS = (
    "Write Generate Create Compose Draft Explain Describe Summarize List Suggest Give Outline "
    "Design Plan Rewrite"
).split()
PIECES = [
    "a poem", "a short story", "an email", "a tweet", "a product review", "a list of tips",
    "a recipe", "a haiku", "a cover letter", "a summary", "three questions", "a dialogue",
    "a slogan", "a limerick", "a blog post introduction", "a job description", "a speech",
    "a riddle", "a lesson plan", "a news headline", "five interview questions", "a motto",
]
TOPICS = [
    "climate change", "the ocean", "a rainy day", "machine learning", "friendship", "the moon",
    "coffee", "remote work", "a lost cat", "the French revolution", "photosynthesis", "taxes",
    "a job interview", "healthy breakfast options", "electric cars", "the stock market",
    "learning a new language", "time management", "the solar system", "ancient Rome",
    "a birthday party", "urban gardening", "cybersecurity", "the human heart", "volcanoes",
    "social media", "a mountain hike", "renewable energy", "chess openings", "jazz music",
    "quantum computing", "the water cycle", "public libraries", "a haunted house", "recycling",
    "sleep hygiene", "the printing press", "a city at night", "honey bees", "space tourism",
]
AUDIENCES = [
    "a five-year-old", "a busy manager", "high school students", "a new employee", "my grandmother",
    "software engineers", "a tourist", "a skeptical investor", "first-year nursing students",
]
INPUTS = [
    "a paragraph", "a customer complaint", "a list of numbers", "a tweet", "a news article",
    "a product description", "a recipe", "a movie review", "a short dialogue", "an email thread",
]
TASKS = [
    "identify the main argument", "extract all the dates", "find the sentiment",
    "suggest a better title", "list the people mentioned", "rewrite it in a formal tone",
    "count the adjectives", "detect any logical fallacies", "summarize it in one sentence",
    "translate it into Spanish", "find the odd one out", "correct the grammar mistakes",
]
LABELS = [("positive", "negative"), ("fact", "opinion"), ("spam", "not spam"), ("formal", "informal"),
          ("true", "false"), ("sports", "politics"), ("question", "statement")]
SUFFIXES = [
    "Use no more than {n} words.", "Keep the tone {tone}.", "Include at least one example.",
    "Format the answer as a numbered list.", "Avoid technical jargon.", "Start with a question.",
    "Mention {topic} at least once.", "End with a call to action.", "Explain your reasoning step by step.",
    "Do not use the letter e.", "Write it from the point of view of {audience}.",
]
TONES = ["playful", "formal", "sarcastic", "optimistic", "neutral", "urgent", "warm"]


def instruction(rng: random.Random) -> str:
    """One instruction-like text from a random template and constraints."""
    topic = rng.choice(TOPICS)
    template = rng.randrange(7)
    if template == 0:
        text = f"{rng.choice(VERBS)} {rng.choice(PIECES)} about {topic}."
    elif template == 1:
        text = f"{rng.choice(VERBS)} {rng.choice(PIECES)} about {topic} for {rng.choice(AUDIENCES)}."
    elif template == 2:
        text = f"Given {rng.choice(INPUTS)} about {topic}, {rng.choice(TASKS)}."
    elif template == 3:
        text = f"Explain {topic} to {rng.choice(AUDIENCES)} in {rng.randint(2, 6)} sentences."
    elif template == 4:
        first, second = rng.choice(LABELS)
        text = f"Classify the following {rng.choice(INPUTS)[2:]} about {topic} as {first} or {second}."
    elif template == 5:
        kind = rng.choice(["main", "hidden", "long-term", "surprising"])
        text = f"What are the {kind} effects of {topic}?"
    else:
        text = f"Is this statement about {topic} true or false: {rng.choice(TOPICS)} is overrated?"
    for suffix in rng.sample(SUFFIXES, rng.choice([0, 0, 1, 1, 2, 3])):
        text += " " + suffix.format(n=rng.choice([20, 50, 100]), tone=rng.choice(TONES),
                                    topic=rng.choice(TOPICS), audience=rng.choice(AUDIENCES))
    words = text.split()
    return " ".join(words[:40]) if len(words) > 40 else text


def near_duplicate(rng: random.Random, text: str) -> str:
    """The same instruction with one to three words replaced, dropped or inserted."""
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        position = rng.randrange(len(words))
        operation = rng.randrange(3)
        if operation == 0:
            words[position] = rng.choice(rng.choice([VERBS, TONES, ["simple", "the", "new", "two"]]))
        elif operation == 1 and len(words) > 4:
            del words[position]
        else:
            words.insert(position, rng.choice(["please", "very", "short", "quickly", "also"]))
    return " ".join(words)


def build_instructions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(n):
        roll = rng.random()
        if texts and roll < 0.03:
            texts.append(rng.choice(texts))
        elif texts and roll < 0.15:
            texts.append(near_duplicate(rng, rng.choice(texts)))
        else:
            texts.append(instruction(rng))
    return texts


def run_reference(texts: list[str], mode: str) -> tuple[list[str], list[tuple]]:
    """Self-Instruct's loop: score against the whole pool, keep if max <= 0.7."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    accepted: list[str] = []
    pool_tokens: list[list[str]] = []
    stats: list[tuple] = []
    for text in texts:
        if mode == "score":
            scores = [scorer.score(text, pooled)["rougeL"].fmeasure for pooled in accepted]
        else:
            tokens = scorer._tokenizer.tokenize(text)
            scores = [rouge_scorer._score_lcs(tokens, pooled).fmeasure for pooled in pool_tokens]
        if scores and max(scores) > THRESHOLD:
            continue
        if scores:
            top = sorted((scores[i] for i in np.argsort(scores)[-TOP_K:]), reverse=True)
            stats.append((top, float(np.mean(scores))))
        accepted.append(text)
        if mode == "pretokenized":
            pool_tokens.append(tokens)
    return accepted, stats


def run_index(texts: list[str], with_stats: bool) -> tuple[list[str], list[tuple]]:
    index = RougeLIndex()
    accepted: list[str] = []
    stats: list[tuple] = []
    for text in texts:
        if index.exceeds(text, THRESHOLD):
            continue
        if with_stats and len(index):
            near = index.nearest(text, k=TOP_K)
            stats.append(([m.score for m in near.matches], near.mean))
        index.add(text)
        accepted.append(text)
    return accepted, stats


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="instructions to filter (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", choices=["score", "pretokenized"], default="score")
    args = parser.parse_args()

    texts = build_instructions(args.n, args.seed)
    lengths = [len(t.split()) for t in texts]
    print(f"ROUGE-L novelty filter (F1 > {THRESHOLD} rejects), {args.n} instructions, "
          f"seed {args.seed}, {min(lengths)}-{max(lengths)} words; "
          f"rouge-score {version('rouge-score')}, numpy {np.__version__}")

    (ours, _), ours_time = timed(run_index, texts, False)
    (ours_full, ours_stats), ours_full_time = timed(run_index, texts, True)
    (reference, reference_stats), reference_time = timed(run_reference, texts, args.reference)

    rows = [
        (f"rouge-score loop ({args.reference}), max + top-{TOP_K}/mean", reference, reference_time),
        ("RougeLIndex.exceeds + add", ours, ours_time),
        (f"RougeLIndex.exceeds + nearest(top-{TOP_K}/mean) + add", ours_full, ours_full_time),
    ]
    print(f"\n{'method':<52} {'accepted':>9} {'rejected':>9} {'time (s)':>10} {'speed-up':>9}")
    for name, accepted, seconds in rows:
        print(f"{name:<52} {len(accepted):>9} {args.n - len(accepted):>9} {seconds:>10.2f} "
              f"{reference_time / seconds:>8.1f}x")

    same_accepted = ours == reference == ours_full
    same_stats = ours_stats == reference_stats
    print(f"\naccepted sets identical: {'yes' if same_accepted else 'NO'}")
    print(f"top-{TOP_K} scores and mean similarity identical: {'yes' if same_stats else 'NO'}")
    if not (same_accepted and same_stats):
        sys.exit(1)


if __name__ == "__main__":
    main()
