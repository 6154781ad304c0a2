"""datagen.rouge gives exactly rouge-score's ROUGE-L F1 (no stemming) and the same decisions."""

from __future__ import annotations

import random

import numpy as np
import pytest
from rouge_score import rouge_scorer

from datagen.rouge import Match, RougeLIndex, lcs_length, rouge_l_f1, tokenize

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

WORDS = (
    "write a short poem story list summary of the about for given text explain why how to "
    "cats dogs weather python code 42 3.14 2nd e-mail don't naïve café Straße İstanbul "
    "日本語 emoji 🙂 x x x (see) [note] #tag @user C++ R&D U.S.A. -- ... ,;: \t \n"
).split(" ")


def reference(target: str, prediction: str) -> float:
    return SCORER.score(target, prediction)["rougeL"].fmeasure


def random_text(rng: random.Random, max_words: int, vocabulary: list[str] = WORDS) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, max_words)))


def mutate(rng: random.Random, text: str) -> str:
    """A near duplicate: a few words replaced, dropped or inserted."""
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        position = rng.randint(0, len(words))
        operation = rng.choice("rdi") if words else "i"
        if operation == "r" and position < len(words):
            words[position] = rng.choice(WORDS)
        elif operation == "d" and position < len(words):
            del words[position]
        else:
            words.insert(position, rng.choice(WORDS))
    return " ".join(words)


def instruction_pool(seed: int, size: int, lengths: tuple[int, ...] = (12, 30, 90)) -> list[str]:
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(size):
        if texts and rng.random() < 0.3:
            texts.append(mutate(rng, rng.choice(texts)))
        else:
            texts.append(random_text(rng, rng.choice(lengths)))
    return texts


EDGE_TEXTS = [
    "",
    "   ",
    "!!! ... ---",
    "日本語 🙂",
    "Hello, World!",
    "hello world",
    "HELLO-WORLD",
    "e-mail e mail email",
    "the the the the the",
    "the",
    "3.14 is pi; 2nd place, 42!",
    "İstanbul naïve café Straße",
    "a\tb\nc\r\nd",
    " ".join(["w"] * 64),
    " ".join(f"t{i}" for i in range(64)),
    " ".join(f"t{i}" for i in range(65)),
    " ".join(f"t{i % 7}" for i in range(200)),
]


def test_tokenize_matches_rouge_score() -> None:
    rng = random.Random(1)
    texts = EDGE_TEXTS + [random_text(rng, 40) for _ in range(200)]
    for text in texts:
        assert tokenize(text) == SCORER._tokenizer.tokenize(text), text


def test_lcs_length_small_cases() -> None:
    assert lcs_length([], ["a"]) == 0
    assert lcs_length("abcbdab", "bdcaba") == 4
    assert lcs_length(["x"] * 70, ["x"] * 3) == 3


def test_f1_equals_rouge_score_both_orders() -> None:
    rng = random.Random(2)
    pairs = [(a, b) for a in EDGE_TEXTS for b in EDGE_TEXTS]
    pairs += [(random_text(rng, 20), random_text(rng, 20)) for _ in range(200)]
    pairs += [(random_text(rng, 120), random_text(rng, 120)) for _ in range(50)]
    base = [random_text(rng, 40) for _ in range(100)]
    pairs += [(text, mutate(rng, text)) for text in base]
    for a, b in pairs:
        expected = reference(a, b)
        assert rouge_l_f1(a, b) == expected, (a, b)
        assert rouge_l_f1(b, a) == expected, (a, b)
        assert reference(b, a) == expected  # the symmetry the index relies on


def test_scores_at_exactly_the_threshold_ratio() -> None:
    # lcs 7 of 10 + 10 tokens: the exact F1 is 0.7, the float may land on either side.
    a = " ".join(f"w{i}" for i in range(10))
    b = " ".join([f"w{i}" for i in range(7)] + ["y1", "y2", "y3"])
    assert rouge_l_f1(a, b) == reference(a, b)
    index = RougeLIndex([a])
    assert index.exceeds(b, 0.7) == (reference(a, b) > 0.7)


def brute_force(pool: list[str], candidate: str) -> list[float]:
    return [reference(text, candidate) for text in pool]


def test_index_scores_max_nearest_mean_match_brute_force() -> None:
    pool = instruction_pool(seed=3, size=150) + EDGE_TEXTS
    index = RougeLIndex(pool)
    rng = random.Random(4)
    candidates = EDGE_TEXTS + [mutate(rng, rng.choice(pool)) for _ in range(40)]
    candidates += [random_text(rng, 100) for _ in range(10)] + ["never seen tokens qqq zzz"]
    for candidate in candidates:
        expected = brute_force(pool, candidate)
        assert index.scores(candidate).tolist() == expected, candidate
        assert index.max_score(candidate) == max(expected)

        near = index.nearest(candidate, k=10)
        order = sorted(range(len(pool)), key=lambda i: (-expected[i], i))[:10]
        assert [m.index for m in near.matches] == order
        assert [m.score for m in near.matches] == [expected[i] for i in order]
        assert [m.text for m in near.matches] == [pool[i] for i in order]
        assert near.mean == float(np.mean(expected))  # what Self-Instruct stores


def test_first_above_decisions_and_matches() -> None:
    pool = instruction_pool(seed=5, size=100) + EDGE_TEXTS
    index = RougeLIndex(pool)
    rng = random.Random(6)
    candidates = EDGE_TEXTS + pool[:20] + [mutate(rng, rng.choice(pool)) for _ in range(40)]
    for candidate in candidates:
        expected = brute_force(pool, candidate)
        for threshold in (0.0, 0.5, 0.7, 0.9, 1.0):
            match = index.first_above(candidate, threshold)
            assert (match is not None) == (max(expected) > threshold), (candidate, threshold)
            assert index.exceeds(candidate, threshold) == (match is not None)
            if match is not None:
                assert match.score == expected[match.index] > threshold
                assert match.text == pool[match.index]


def test_self_instruct_novelty_filter_matches_reference_loop() -> None:
    generated = instruction_pool(seed=7, size=200, lengths=(8, 20, 40))
    index = RougeLIndex()
    accepted_ours = []
    for text in generated:
        if not index.exceeds(text, 0.7):
            index.add(text)
            accepted_ours.append(text)

    accepted_reference: list[str] = []
    for text in generated:
        scores = brute_force(accepted_reference, text)
        if not scores or max(scores) <= 0.7:
            accepted_reference.append(text)

    assert accepted_ours == accepted_reference
    assert 0 < len(accepted_ours) < len(generated)  # the set really exercises both outcomes


def test_empty_pool_and_growth() -> None:
    index = RougeLIndex()
    assert len(index) == 0
    assert index.scores("anything").tolist() == []
    assert index.max_score("anything") == 0.0
    assert index.nearest("anything").matches == [] and index.nearest("anything").mean == 0.0
    assert index.first_above("anything", 0.0) is None

    # Grow past the initial capacity, width and vocabulary to exercise reallocation.
    texts = [" ".join(f"tok{i}_{j}" for j in range(i % 100 + 1)) for i in range(300)]
    for position, text in enumerate(texts):
        assert index.add(text) == position
    assert index[5] == texts[5]
    assert index.first_above(texts[250], 0.7) == Match(250, texts[250], 1.0)
    assert index.scores(texts[10]).tolist() == brute_force(texts, texts[10])


def test_threshold_must_be_non_negative() -> None:
    with pytest.raises(ValueError):
        RougeLIndex(["a"]).first_above("a", -0.1)
