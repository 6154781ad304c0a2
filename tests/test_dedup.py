"""Tests for datagen.filters.dedup: exact and near-duplicate removal, reasons and keep rules.

Fast (no model, no server): `.venv/bin/python -m pytest tests/test_dedup.py -q`.
Every near-duplicate pair below is built so that LSH proposes it with near certainty
(identical word sets, or a weighted Jaccard well above the bands' 0.5 point); the
outcome is then decided by the exact tests, which is what these tests pin.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash, MinHashLSH
from pydantic import ValidationError

from datagen.filters import dedup as dedup_module
from datagen.filters.dedup import (
    MINHASH_SCHEME,
    DedupConfig,
    affine32_permutations,
    affine32_signature,
    candidate_pairs,
    dedup,
    exact_dedup,
    idf_weights,
    lsh_bands,
    minhash_elements,
    minhash_signatures,
    near_dedup,
    normalize,
    rouge_tokens,
    shingle_sets,
    weighted_jaccard,
)
from datagen.records import Instance, Lineage, Task
from datagen.rouge import rouge_l_f1
from tests.helpers import run_cli


def task(id_: str, instruction: str, instances: int = 0, output: str = "out", inputs: str = "", **lineage) -> Task:
    return Task(
        id=id_,
        instruction=instruction,
        instances=[Instance(input=inputs, output=output) for _ in range(instances)],
        lineage=Lineage(**lineage) if lineage else None,
    )


def removed(rejections) -> dict[str, str]:
    """Rejected id -> the id it duplicates."""
    return {r.task.id: r.duplicate_of for r in rejections}


def assert_partition(tasks, kept, rejected) -> None:
    """Nothing lost, nothing doubled: in == kept + rejected, and both keep input order."""
    assert sorted(t.id for t in tasks) == sorted([t.id for t in kept] + [r.task.id for r in rejected])
    order = {t.id: i for i, t in enumerate(tasks)}
    assert [t.id for t in kept] == sorted((t.id for t in kept), key=order.get)
    assert [r.task.id for r in rejected] == sorted((r.task.id for r in rejected), key=order.get)


# -- normalize and exact dedup ----------------------------------------------------------


def test_normalize_folds_case_punctuation_whitespace_and_width() -> None:
    assert normalize("  Explain   PHOTOSYNTHESIS!\n") == "explain photosynthesis"
    assert normalize("Hello,world") == normalize("hello world")  # punctuation separates rouge_tokens
    assert normalize("ＷＲＩＴＥ a ﬁne poem.") == "write a fine poem"  # NFKC: full width, ligature
    assert normalize("Straße") == normalize("STRASSE")  # casefold, not just lower
    assert normalize("Compute 2+2.") != normalize("Compute 2=2.")  # symbols are not punctuation


def test_exact_dedup_reason_duplicate_of_and_first_wins() -> None:
    tasks = [
        task("a", "Explain photosynthesis."),
        task("b", "Write a haiku about rain."),
        task("c", "  explain PHOTOSYNTHESIS!!"),
        task("d", "Explain photosynthesis to a child."),  # more words: not exact
        task("e", "Explain, photosynthesis"),
    ]
    kept, rejected = exact_dedup(tasks)
    assert [t.id for t in kept] == ["a", "b", "d"]
    assert removed(rejected) == {"c": "a", "e": "a"}
    assert {r.reason for r in rejected} == {"exact duplicate"}
    assert all(r.detail is None for r in rejected)
    assert_partition(tasks, kept, rejected)


def test_exact_dedup_keep_rule_and_fields() -> None:
    tasks = [
        task("a", "Sort the list.", instances=1, inputs="3 1 2"),
        task("b", "sort the list", instances=3, inputs="9 8"),
    ]
    assert removed(exact_dedup(tasks)[1]) == {"b": "a"}  # default: first occurrence
    assert removed(exact_dedup(tasks, keep="most_instances")[1]) == {"a": "b"}
    kept, rejected = exact_dedup(tasks, fields="instruction+input")  # the inputs differ
    assert rejected == [] and len(kept) == 2


# -- near dedup: reasons and a set with known pairs -------------------------------------

BASES = {
    "poem": "Write a short poem about the ocean at night for a child who cannot sleep.",
    "stack": "Explain the difference between a stack and a queue using a real world example.",
    "remote": "Summarize the main arguments of the article about remote work in three sentences.",
    "interview": "Generate five interview questions for a junior data analyst position at a bank.",
    "review": "Classify the following movie review as positive or negative and explain your reasoning.",
    "cake": "Give me a recipe for a vegan chocolate cake that does not use any nuts.",
    "spanish": "Translate the following paragraph from English into Spanish while keeping the formal tone.",
    "traffic": "List three ways a small city can reduce traffic congestion during rush hour.",
    "palindrome": "Write a Python function that checks whether a given string is a palindrome.",
    "volcano": "Why do some volcanoes erupt explosively while others release lava slowly?",
}
# One- and two-word edits: swap, insertion, deletion, substitution, and case/punctuation only.
VARIANTS = {
    "poem~swap": ("poem", "Write a poem short about the ocean at night for a child who cannot sleep."),
    "stack~insert": ("stack", "Please explain the difference between a stack and a queue using a real world "
                     "example."),
    "remote~delete": ("remote", "Summarize the arguments of the article about remote work in three sentences."),
    "interview~synonym": ("interview", "Generate five interview questions for a junior data analyst role at a bank."),
    "review~two": ("review", "Classify this movie review as positive or negative and explain the "
                   "reasoning."),
    "cake~two": ("cake", "Give me a recipe for a vegan chocolate cake which does not use nuts."),
    "spanish~case": ("spanish", "translate the following paragraph from english into spanish, while "
                     "keeping the formal tone"),
    "traffic~swaps": ("traffic", "List three ways a city small can reduce congestion traffic during rush hour."),
}
# Different tasks, some from the same templates as the bases.
DISTINCT = {
    "prime": "Write a Python function that returns the largest prime factor of a given integer.",
    "frost": "List three ways a farmer can protect young crops from frost during a cold winter.",
    "sonnet": "Write a short sonnet about autumn leaves for a grandmother who misses her garden.",
    "sql": "Explain the difference between an inner join and a left join in SQL with a table.",
    "rivers": "Summarize the history of the Danube river in five sentences for tourists.",
}


def known_corpus() -> list[Task]:
    rng = random.Random(7)
    items = [*BASES.items(), *((k, v) for k, (_, v) in VARIANTS.items()), *DISTINCT.items()]
    rng.shuffle(items)
    return [task(key, text) for key, text in items]


def test_known_pairs_are_caught_exactly_precision_and_recall() -> None:
    tasks = known_corpus()
    (kept, rejected), report = near_dedup(tasks, DedupConfig(keep="first"))
    truth = {variant: base for variant, (base, _) in VARIANTS.items()}
    order = {t.id: i for i, t in enumerate(tasks)}
    # keep="first": whichever of base and variant comes first stays.
    expected = {(v if order[v] > order[b] else b): (b if order[v] > order[b] else v) for v, b in truth.items()}
    got = removed(rejected)
    correct = {k for k, v in got.items() if expected.get(k) == v}
    precision, recall = len(correct) / len(got), len(correct) / len(expected)
    assert (precision, recall) == (1.0, 1.0), (got, expected)
    assert_partition(tasks, kept, rejected)
    assert report.removed == len(rejected) == len(VARIANTS)
    assert (report.b, report.r) == (25, 5)  # what datasketch picks for 0.5 at 128 permutations
    assert report.candidate_pairs >= report.scored_pairs >= report.duplicate_pairs >= len(VARIANTS) - 1


def test_near_duplicate_rejection_carries_reason_keeper_and_scores() -> None:
    tasks = [task("base", BASES["review"]), task("edit", VARIANTS["review~two"][1]),
             task("other", DISTINCT["sql"])]
    (kept, rejected), _ = near_dedup(tasks)
    [rejection] = rejected
    assert (rejection.task.id, rejection.reason, rejection.duplicate_of) == ("edit", "near duplicate", "base")
    sets = shingle_sets([rouge_tokens(t.instruction) for t in tasks], DedupConfig())
    overlap = weighted_jaccard(sets[0], sets[1], idf_weights(sets))
    rouge = rouge_l_f1(BASES["review"], VARIANTS["review~two"][1])  # rouge-score's value exactly
    assert rejection.detail == f"rouge_l={rouge:.3f} weighted_jaccard={overlap:.3f}"
    assert rouge > 0.7 and overlap >= 0.5


def test_one_and_two_word_edits_of_a_twelve_word_instruction_are_caught() -> None:
    base = "Write a formal email asking my landlord to repair the broken heater."
    edits = {
        "sub1": "Write a formal email asking my landlord to fix the broken heater.",
        "sub2": "Write a polite email asking my landlord to fix the broken heater.",
        "ins2": "Please write a formal email asking my landlord to quickly repair the broken heater.",
        "del2": "Write an email asking my landlord to repair the heater.",
        "swap": "Write a formal email asking my landlord to repair the heater broken.",
    }
    assert len(rouge_tokens(base)) == 12
    for name, text in edits.items():
        (_, rejected), _ = near_dedup([task("base", base), task(name, text)])
        assert removed(rejected) == {name: "base"}, (name, rouge_l_f1(base, text))


def test_distinct_tasks_from_one_template_are_kept() -> None:
    languages = "French German Spanish Italian Japanese Swahili Polish Korean Portuguese Dutch".split()
    languages += "Turkish Greek Hindi Finnish Vietnamese Czech Danish Welsh Latvian Malay".split()
    tasks = [task(language, f"Translate the sentence into {language}.") for language in languages]
    tasks.append(task("paraphrase", "Please translate the sentence into French."))
    (kept, rejected), _ = near_dedup(tasks)
    # Twenty tasks show "translate the sentence into" is common: the language carries the
    # weight (weighted Jaccard 0.36 < 0.5) even though ROUGE-L is 0.8; the paraphrase goes.
    assert removed(rejected) == {"paraphrase": "French"}
    assert [t.id for t in kept] == languages


def test_two_template_variants_alone_count_as_duplicates_unless_the_task_differs() -> None:
    cat = "The cat sleeps."
    french = task("fr", "Translate the sentence into French.", instances=1, inputs=cat, output="Le chat dort.")
    german = task("de", "Translate the sentence into German.", instances=1, inputs=cat, output="Die Katze schläft.")
    # Nothing says which words are common: Jaccard 0.67, ROUGE-L 0.8 -- Self-Instruct's verdict.
    assert removed(near_dedup([french, german], DedupConfig(keep="first"))[0][1]) == {"de": "fr"}
    # Comparing whole tasks, the outputs differ and both are kept.
    (kept, rejected), _ = near_dedup([french, german], DedupConfig(fields="task"))
    assert rejected == [] and [t.id for t in kept] == ["fr", "de"]


def test_fields_choice_changes_the_outcome() -> None:
    tasks = [
        task("a", "Summarize the text.", instances=1,
             inputs="The committee approved the new budget for public libraries on Monday."),
        task("b", "Summarize the text!", instances=1,
             inputs="Heavy rain flooded three villages in the northern valley overnight."),
    ]
    assert removed(near_dedup(tasks)[0][1]) == {"b": "a"}
    assert near_dedup(tasks, DedupConfig(fields="instruction+input"))[0][1] == []
    assert near_dedup(tasks, DedupConfig(fields="task"))[0][1] == []


# -- keep rules -------------------------------------------------------------------------


def keep_fixture() -> list[Task]:
    text = "Describe the main causes of the French Revolution for a high school history class."
    return [
        task("few", text, instances=1, output="a" * 500),
        task("many", text.replace("main", "primary"), instances=3, output="b"),
        task("long", text.replace("high school", "secondary school"), instances=2, output="c" * 400),
        task("scored", text.replace("Describe", "Explain"), instances=1, output="d", judge_score=9.0),
    ]


@pytest.mark.parametrize(
    ("rule", "winner"),
    [("most_instances", "many"), ("longest_output", "long"), ("first", "few"), ("judge_score", "scored")],
)
def test_keep_rule_picks_the_best_member(rule: str, winner: str) -> None:
    tasks = keep_fixture()
    (kept, rejected), _ = near_dedup(tasks, DedupConfig(keep=rule))
    assert [t.id for t in kept] == [winner]
    assert set(removed(rejected).values()) == {winner}
    assert_partition(tasks, kept, rejected)


def test_judge_score_falls_back_to_most_instances_then_earliest() -> None:
    tasks = [t.model_copy(update={"lineage": None}) for t in keep_fixture()]  # nobody scored
    assert [t.id for t in near_dedup(tasks, DedupConfig(keep="judge_score"))[0][0]] == ["many"]
    tied = [task("x", "Sort these numbers in ascending order please."),
            task("y", "Sort these numbers in ascending order.")]
    assert removed(near_dedup(tied, DedupConfig(keep="most_instances"))[0][1]) == {"y": "x"}


# -- clustering -------------------------------------------------------------------------

# Same rouge_tokens, different order: every pair is an LSH candidate (identical sets), and only
# ROUGE-L separates them. A~B and B~C at 0.8, A~C at 0.6.
CHAIN = [
    task("A", "alpha bravo charlie delta echo foxtrot golf hotel india juliet"),
    task("B", "bravo alpha delta charlie echo foxtrot golf hotel india juliet"),
    task("C", "bravo alpha delta charlie foxtrot echo hotel golf india juliet"),
]


def test_star_removes_only_direct_duplicates_of_a_kept_task() -> None:
    a, b, c = (t.instruction for t in CHAIN)
    assert rouge_l_f1(a, b) == pytest.approx(0.8) and rouge_l_f1(b, c) == pytest.approx(0.8)
    assert rouge_l_f1(a, c) == pytest.approx(0.6)
    (kept, rejected), report = near_dedup(CHAIN, DedupConfig(keep="first"))
    assert [t.id for t in kept] == ["A", "C"]
    assert removed(rejected) == {"B": "A"}
    assert report.duplicate_pairs == 2


def test_connected_collapses_chains_and_says_through_what() -> None:
    (kept, rejected), _ = near_dedup(CHAIN, DedupConfig(keep="first", cluster="connected"))
    assert [t.id for t in kept] == ["A"]
    assert removed(rejected) == {"B": "A", "C": "A"}
    chained = next(r for r in rejected if r.task.id == "C")
    assert chained.detail.startswith("rouge_l=0.600 weighted_jaccard=1.000; linked via B (rouge_l=0.800")


def test_identical_token_sequences_group_and_the_keep_rule_still_decides() -> None:
    tasks = [task("plain", "List five fruits."), task("shout", "LIST FIVE FRUITS!!!", instances=2),
             task("other", "Name a river.")]
    (kept, rejected), report = near_dedup(tasks)
    assert [t.id for t in kept] == ["shout", "other"]
    assert [(r.task.id, r.duplicate_of, r.detail) for r in rejected] == [
        ("plain", "shout", "rouge_l=1.000 weighted_jaccard=1.000")
    ]
    assert (report.identical, report.indexed) == (1, 2)


def test_verify_false_decides_by_the_minhash_estimate() -> None:
    tasks = [task("a", BASES["cake"]), task("b", VARIANTS["cake~two"][1]), task("c", DISTINCT["frost"])]
    (kept, rejected), report = near_dedup(tasks, DedupConfig(verify=False))
    [rejection] = rejected
    assert (rejection.task.id, rejection.duplicate_of) == ("b", "a")
    assert rejection.detail.startswith("minhash_jaccard=")
    assert float(rejection.detail.split("=")[1]) >= 0.5
    assert report.scored_pairs == report.candidate_pairs


def test_non_latin_text_is_tokenized_and_deduplicated() -> None:
    assert rouge_tokens("把这句话翻译成法语。Hello wörld") == [*"把这句话翻译成法语", "hello", "wörld"]
    tasks = [
        task("zh", "请用三句话总结这篇关于远程工作的文章。"),  # summarize this article on remote work in 3 sentences
        task("zh2", "请用三句话概括这篇关于远程工作的文章。"),  # one character pair reworded
        task("en", "Summarize it."),
    ]
    assert removed(near_dedup(tasks)[0][1]) == {"zh2": "zh"}


def test_texts_without_words_are_left_alone_by_near_dedup() -> None:
    tasks = [task("a", "!!!"), task("b", "???"), task("c", "")]
    (kept, rejected), report = near_dedup(tasks)
    assert rejected == [] and len(kept) == 3 and report.indexed == 0
    assert removed(exact_dedup(tasks)[1]) == {"b": "a", "c": "a"}  # all normalize to ""


def test_dedup_runs_exact_then_near_with_one_keep_rule() -> None:
    tasks = [
        task("a", BASES["traffic"]),
        task("b", BASES["traffic"].upper(), instances=2),
        task("c", VARIANTS["traffic~swaps"][1], instances=1),
        task("d", DISTINCT["rivers"]),
    ]
    (kept, rejected), report = dedup(tasks)
    assert [t.id for t in kept] == ["b", "d"]
    assert [(r.task.id, r.reason, r.duplicate_of) for r in rejected] == [
        ("a", "exact duplicate", "b"),
        ("c", "near duplicate", "b"),
    ]
    assert report.tasks == 3  # near dedup saw what exact dedup kept
    assert_partition(tasks, kept, rejected)


def test_results_are_deterministic() -> None:
    tasks = known_corpus()
    first, second = near_dedup(tasks)[0], near_dedup(tasks)[0]
    assert [(r.task.id, r.duplicate_of, r.detail) for r in first[1]] == [
        (r.task.id, r.duplicate_of, r.detail) for r in second[1]
    ]


# -- the MinHash LSH machinery against datasketch ---------------------------------------


def random_texts(n: int, seed: int = 0) -> list[list[str]]:
    """Short texts over a small vocabulary, so that many share buckets."""
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(40)]
    return [rng.sample(vocabulary, rng.randint(3, 8)) for _ in range(n)]


def test_signatures_are_datasketch_minhash_values() -> None:
    elements = [[1, 2, 3], [4, 5], [2**32 - 1, 0, 7]]
    signatures = minhash_signatures(elements, num_perm=64, seed=3)
    expected = [m.hashvalues for m in MinHash.bulk(elements, num_perm=64, seed=3, hashfunc=int, scheme=MINHASH_SCHEME)]
    np.testing.assert_array_equal(signatures, np.array(expected))


# -- the pinned MinHash scheme: the same kept set whatever datasketch's default ---------


class LegacyDefaultMinHash(MinHash):
    """A datasketch whose default scheme is 1.x's "legacy" (2.0 changed it to affine32)."""

    def __init__(self, *args, scheme: str = "legacy", **kwargs) -> None:
        super().__init__(*args, scheme=scheme, **kwargs)


class SchemelessMinHash(MinHash):
    """datasketch 1.x's constructor: no `scheme=`, legacy values."""

    def __init__(self, num_perm=128, seed=1, hashfunc=None, hashobj=None, hashvalues=None, permutations=None):
        super().__init__(num_perm=num_perm, seed=seed, hashfunc=hashfunc, hashvalues=hashvalues,
                         permutations=permutations, scheme="legacy")


@pytest.fixture
def installed_minhash(monkeypatch):
    """Swap in another datasketch MinHash class for the duration of a test."""

    def install(cls) -> None:
        monkeypatch.setattr(dedup_module, "MinHash", cls)
        dedup_module._datasketch_takes_scheme.cache_clear()

    yield install
    dedup_module._datasketch_takes_scheme.cache_clear()


def near_dedup_outcome(tasks):
    (kept, rejected), report = near_dedup(tasks)
    return [t.id for t in kept], [(r.task.id, r.duplicate_of, r.detail) for r in rejected], report.candidate_pairs


def test_numpy_affine32_equals_datasketch_affine32() -> None:
    """The fallback for a datasketch without `scheme=` computes the pinned scheme bit for bit."""
    rng = random.Random(0)
    a, b = affine32_permutations(128, 1)
    for size in (1, 5, 300):
        values = [rng.randrange(2**32) for _ in range(size)]
        reference = MinHash(num_perm=128, seed=1, hashfunc=int, scheme="affine32")
        reference.update_batch(values)
        np.testing.assert_array_equal(affine32_signature(values, a, b), reference.hashvalues)
    empty = MinHash(num_perm=128, seed=1, hashfunc=int, scheme="affine32")
    np.testing.assert_array_equal(affine32_signature([], a, b), empty.hashvalues)


def test_kept_set_does_not_depend_on_the_datasketch_default(installed_minhash) -> None:
    sets = shingle_sets(random_texts(200), DedupConfig())
    elements = list(minhash_elements(sets, idf_weights(sets)))
    tasks = known_corpus()
    pinned_signatures, pinned_outcome = minhash_signatures(elements), near_dedup_outcome(tasks)

    installed_minhash(LegacyDefaultMinHash)  # a datasketch defaulting to legacy, taking scheme=
    np.testing.assert_array_equal(minhash_signatures(elements), pinned_signatures)
    assert near_dedup_outcome(tasks) == pinned_outcome

    installed_minhash(SchemelessMinHash)  # datasketch 1.x: no scheme=, so our numpy affine32
    np.testing.assert_array_equal(minhash_signatures(elements), pinned_signatures)
    assert near_dedup_outcome(tasks) == pinned_outcome

    # and the default would have mattered: legacy signatures are other values
    legacy = [m.hashvalues for m in MinHash.bulk(elements[:5], num_perm=128, seed=1, hashfunc=int, scheme="legacy")]
    assert not np.array_equal(np.array(legacy, dtype=np.uint32), pinned_signatures[:5])


def test_report_and_stats_record_the_scheme_and_datasketch_version(tmp_path) -> None:
    import datasketch

    _result, report = near_dedup(known_corpus())
    assert (report.minhash_scheme, report.datasketch_version) == ("affine32", datasketch.__version__)
    source = tmp_path / "raw.jsonl"
    source.write_text("".join(t.model_dump_json() + "\n" for t in known_corpus()))
    result = run_cli("dedup", str(source), "--out", str(tmp_path / "kept.jsonl"))
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "kept.stats.json").read_text())
    [near] = [entry for entry in stats["passes"] if entry["pass"] == "near-dedup"]
    assert f"minhash_scheme=affine32 datasketch_version={datasketch.__version__}" in near["report"]


@pytest.mark.parametrize(("b", "r"), [(25, 5), (8, 2)])
def test_candidate_pairs_equal_minhashlsh_buckets(b: int, r: int) -> None:
    config = DedupConfig()
    sets = shingle_sets(random_texts(300), config)
    signatures = minhash_signatures(minhash_elements(sets, idf_weights(sets)), 128, 1)
    lsh = MinHashLSH(num_perm=128, params=(b, r))
    with lsh.insertion_session() as session:
        for row, values in enumerate(signatures):
            session.insert(row, LeanMinHash(seed=1, hashvalues=values, scheme="affine32"))
    expected = set()
    for row, values in enumerate(signatures):
        query = LeanMinHash(seed=1, hashvalues=values, scheme="affine32")
        expected.update((min(row, other), max(row, other)) for other in lsh.query(query) if other != row)
    got = candidate_pairs(signatures, b, r)
    assert set(map(tuple, got.tolist())) == expected and len(expected) > 0
    assert got.tolist() == sorted(got.tolist())  # (i, j) order, no repeats


def test_weighted_minhash_by_replication_estimates_weighted_jaccard() -> None:
    config = DedupConfig()
    sets = shingle_sets(random_texts(200, seed=1), config)
    weights = idf_weights(sets)
    assert len(set(weights.values())) > 1  # the weights do vary
    signatures = minhash_signatures(minhash_elements(sets, weights), num_perm=1024, seed=1)
    for a, b in [(0, 1), (2, 3), (4, 4), (5, 9)]:
        estimate = float(np.mean(signatures[a] == signatures[b]))
        assert estimate == pytest.approx(weighted_jaccard(sets[a], sets[b], weights), abs=0.06)


def test_idf_weights() -> None:
    sets = [{"the", "cat"}, {"the", "dog"}, {"the", "cat", "eel"}, {"the"}]
    assert idf_weights(sets) == {"the": 1, "cat": 1, "dog": 2, "eel": 2}  # log2(4/1) = 2
    assert set(idf_weights(sets, "none").values()) == {1}


def test_lsh_bands_come_from_datasketch() -> None:
    assert lsh_bands(0.5, 128) == (25, 5)
    lsh = MinHashLSH(threshold=0.3, num_perm=64, weights=(0.3, 0.7))
    assert lsh_bands(0.3, 64, (0.3, 0.7)) == (lsh.b, lsh.r)


# -- config -----------------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError):
        DedupConfig(treshold=0.5)
    with pytest.raises(ValidationError):
        DedupConfig(threshold=1.5)
    with pytest.raises(ValidationError):
        DedupConfig(weights=(0.5, 0.6))
    with pytest.raises(ValidationError):
        DedupConfig(keep="random")
    assert DedupConfig.model_validate({"fields": "task", "keep": "judge_score"}).fields == "task"
