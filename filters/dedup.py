"""Exact and near-duplicate removal for task records: MinHash LSH proposes, exact similarity decides.

Two passes, both returning the shared `PassResult` (kept tasks, rejections with reasons):

- `exact_dedup`: tasks whose `normalize`d text (case-folded, punctuation removed, whitespace
  collapsed) is identical. Reason "exact duplicate", `duplicate_of` = the kept task's id.
- `near_dedup`: tasks that say the same thing with a few words changed. Reason
  "near duplicate", `duplicate_of` = the kept task's id, `detail` = the similarities to it.

    from datagen.filters.dedup import DedupConfig, dedup, exact_dedup, near_dedup

    kept, rejected = exact_dedup(tasks)                          # first occurrence wins
    (kept, rejected), report = near_dedup(tasks, DedupConfig())  # report.b, report.r, counts
    (kept, rejected), report = dedup(tasks, DedupConfig(keep="judge_score"))  # exact, then near
    print(report.summary())

What counts as a near duplicate (defaults in brackets). Two tasks' texts (`fields`
["instruction"]) are duplicates when both hold:

- ROUGE-L F1 > `similarity_threshold` [0.7]: Self-Instruct's rule for "the same instruction".
  A one- or two-word edit (swap, insertion, deletion, substitution) of a 12-word instruction
  scores 0.83-0.96.
- IDF-weighted Jaccard of their word sets >= `threshold` [0.5]: they share most of their
  distinctive words. Each distinct word weighs round(log2(N / df)), at least 1, over the N
  distinct texts of the input: a word in half the texts weighs 1, one in a thousandth of
  them 10. Template and function words ("translate the sentence into") weigh little, names,
  topics and languages a lot.

Why both. ROUGE-L alone cannot tell a paraphrase from a sibling made from the same template,
and generated data is full of those; the IDF term adds "and they are about the same things".
On bench/dedup.py's templated corpus (5,000-task sample, all pairs, no LSH), ROUGE-L > 0.7
alone removes with precision 0.986, both tests with 0.998, at the same recall (0.998-0.999).
The second test is also exactly what the LSH stage estimates, so the candidates are tuned
to the decision.

Template variants. "Translate the sentence into French." / "... into German." score ROUGE-L
0.8. In a corpus that shows the template is common -- say twenty "Translate the sentence
into <language>." tasks -- the language names carry most of the weight, the weighted Jaccard
of the two is 0.36, and both are kept; "Please translate the sentence into French." is still
removed as a duplicate of the French one (0.91 and 0.64). Given only the two tasks, nothing
says which words are common: all weights are 1, the Jaccard is 0.67, and one of them is
removed, as Self-Instruct's filter would. `fields="task"` also tells them apart (their
outputs differ); `weighting="none"` makes the second test plain Jaccard.

How `near_dedup` finds them:

1. Tokens: the tokens rouge-score uses (lower-cased ASCII letter/digit runs), so on English
   text the ROUGE-L here is rouge-score's exactly. Non-ASCII text is NFKC-normalized and split
   into Unicode letter/digit runs, CJK ideographs, kana and Thai one token per character
   (rouge-score would drop them). Tasks with identical token sequences are grouped up front
   (similarity 1.0); only one text of each group is indexed.
2. Shingles [`shingle="word"`, `word_ngram=1`: distinct words] with IDF weights
   [`weighting="idf"`]. A shingle of weight w enters MinHash as w distinct elements, so the
   plain MinHash estimates the weighted Jaccard (weighted MinHash by replication). Each
   distinct shingle is hashed once (blake2b: stable across runs, unlike `hash()`), and each
   text's ints go through datasketch's batch path, `MinHash.update_batch` [`num_perm=128`,
   `seed=1`] with `hashfunc=int`: no sha1 and no Python `update` call per token. The
   permutation scheme is pinned to `MINHASH_SCHEME` ("affine32") and passed explicitly:
   datasketch 2.0 made affine32 its default where 1.x only had "legacy", so leaving it to
   the default would make the same data dedup differently by datasketch version. Where the
   installed datasketch predates `scheme=` (1.x), `affine32_signature` computes the same
   values in numpy (tests check it bit for bit against datasketch 2.x).
3. LSH: datasketch's `MinHashLSH` optimizer picks bands x rows for `threshold` and `weights`
   [(0.5, 0.5)]: 25 bands of 5 rows, which proposes a pair at weighted Jaccard 0.5 with
   probability 0.55, 0.6 with 0.87, 0.7 with 0.99, 0.2 with 0.008. Texts that agree on all
   rows of a band share a bucket, as in `MinHashLSH`; the buckets are found by sorting each
   band in numpy (`candidate_pairs` says why not `insertion_session`).
4. Verify [`verify=True`]: both tests above, exactly, on every candidate pair, so LSH false
   positives never cost a good task. `verify=False` takes the MinHash estimate of the
   weighted Jaccard >= `threshold` instead: faster, approximate, no ROUGE-L.
5. Cluster [`cluster="star"`]: components of the duplicate graph (union-find) are walked best
   task first by `keep`; a task is removed only if it is a duplicate of a task already kept,
   and names the most similar one. `cluster="connected"` (plain union-find clusters) removes
   all but the best of each component instead: chains (A~B, B~C, A!~C) collapse too, which
   on the bench corpus costs precision (0.990 -> 0.975) and gains no recall.

Why words and not n-grams: a one-word edit changes one word but five word 5-grams, so 5-gram
shingles would put a two-word edit of a 12-word instruction near Jaccard 0.3, where LSH
rarely proposes it; single words do not change at all when words swap places. Why IDF for
LSH too: a 100,000-task corpus has 5e9 pairs, and unweighted word sets make template
siblings look alike. On the bench corpus the 99.9th percentile of unrelated pairs is
Jaccard 0.33 unweighted and 0.19 weighted, while 99% of true duplicate pairs keep a weighted
Jaccard >= 0.61; at 25x5 bands that is 6.2 million candidate pairs unweighted (56 s,
precision 0.91) against 0.35 million weighted (~10 s, precision 0.99).

Keep rules, each falling back to the ones after it in this order, then to the earliest task:
"judge_score" (the `judge_score` extra field on `task.lineage`; scored tasks beat unscored),
"most_instances", "longest_output" (total characters over instance outputs), "first".
`exact_dedup` keeps the first occurrence unless given `keep`; `dedup` passes the config's rule
to both passes, so exact-then-near keeps the task near-only would.

Cost is linear in the tasks plus the candidate pairs; `NearDedupReport` has the counts and
per-stage seconds. bench/dedup.py runs 100,000 tasks against a plain datasketch loop and an
all-pairs ROUGE-L reference.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from itertools import chain
from typing import Literal

import numpy as np
from datasketch import MinHash, MinHashLSH
from pydantic import BaseModel, ConfigDict, Field, field_validator

from datagen.filters.base import Fields, PassContext, PassResult, Rejection, text_of
from datagen.records import Task
from datagen.rouge import f1_from_lcs, lcs_length
from datagen.rouge import tokenize as ascii_tokenize

__all__ = [
    "DedupConfig",
    "KeepRule",
    "MINHASH_SCHEME",
    "NearDedupReport",
    "affine32_permutations",
    "affine32_signature",
    "candidate_pairs",
    "dedup",
    "exact_dedup",
    "idf_weights",
    "band_pair_codes",
    "keep_clusters",
    "keep_rank",
    "lsh_bands",
    "pairs_of_codes",
    "datasketch_version",
    "minhash_elements",
    "minhash_signatures",
    "near_dedup",
    "normalize",
    "hash_elements",
    "shingle_hash",
    "shingle_sets",
    "shingles",
    "weighted_jaccard",
    "rouge_tokens",
]

KeepRule = Literal["most_instances", "longest_output", "first", "judge_score"]
# The order in which keep rules fall back to one another; "first" (earliest) ends every chain.
_KEEP_CHAIN: tuple[str, ...] = ("judge_score", "most_instances", "longest_output", "first")

_MASK32 = 0xFFFF_FFFF
_MERGE_EVERY = 4_000_000  # pending candidate pairs (32 MB) before they are deduplicated

# datasketch's permutation scheme, pinned: 2.0 changed the default from "legacy" to
# "affine32". affine32 is bijective on 32-bit hashes (no collisions added by the
# permutation), stores uint32 and needs no 61-bit modulo; bench/dedup.py's figures use it.
MINHASH_SCHEME = "affine32"

EXACT_REASON = "exact duplicate"
NEAR_REASON = "near duplicate"


# -- text -------------------------------------------------------------------------------


class _PunctuationToSpace(dict):
    """A `str.translate` table mapping every Unicode punctuation character (P*) to a space.

    Filled lazily on first sight of each code point: building it for all 1.1M code points
    up front would cost a noticeable fraction of a second at import.
    """

    def __missing__(self, codepoint: int) -> str:
        char = chr(codepoint)
        value = " " if unicodedata.category(char).startswith("P") else char
        self[codepoint] = value
        return value


_PUNCTUATION_TO_SPACE = _PunctuationToSpace()


def normalize(text: str) -> str:
    """`text` case-folded, punctuation removed, whitespace collapsed: the exact-dedup key.

    NFKC first, so full-width letters and ligatures compare equal to their plain forms.
    Punctuation becomes a space rather than nothing, so "well-known" and "well known" match
    and "end.Next" does not glue into one word. Symbols (+, =, $, %) are kept: "2+2" and
    "2-2" are different tasks.
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(folded.translate(_PUNCTUATION_TO_SPACE).split())


# Scripts written without spaces: one token per character, or a whole sentence would be
# one "word". Han (+ extension A and compatibility), hiragana, katakana, Thai.
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0e7f"
_UNICODE_TOKEN_RE = re.compile(rf"[{_UNSPACED}]|[^\W_{_UNSPACED}]+")


def rouge_tokens(text: str) -> list[str]:
    """The tokens ROUGE-L is computed over: rouge-score's tokens for ASCII text.

    rouge-score keeps only [a-z0-9] runs, which turns a Chinese or accented instruction into
    nothing or fragments; non-ASCII text gets Unicode letter/digit runs instead (and CJK /
    Thai characters one by one), which agrees with rouge-score wherever rouge-score is sane.
    """
    if text.isascii():
        return ascii_tokenize(text)
    return _UNICODE_TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


# -- config and report ------------------------------------------------------------------


class DedupConfig(BaseModel):
    """Settings of the dedup passes; every default is explained in the module docstring."""

    model_config = ConfigDict(extra="forbid")

    fields: Fields = "instruction"
    """What is compared: the instruction, plus instance inputs, or the whole task."""
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """IDF-weighted Jaccard a duplicate needs; the LSH bands are tuned for it too."""
    num_perm: int = Field(128, ge=2)
    """MinHash permutations; more gives sharper bands and slower hashing."""
    weights: tuple[float, float] = (0.5, 0.5)
    """datasketch's (false positive, false negative) weights when it picks bands x rows."""
    seed: int = 1
    """MinHash permutation seed."""
    shingle: Literal["word", "char"] = "word"
    """Shingles for MinHash: word n-grams, or character n-grams of the joined words."""
    word_ngram: int = Field(1, ge=1)
    """Word n-gram size for shingle="word". Texts with fewer words fall back to char n-grams."""
    char_ngram: int = Field(4, ge=1)
    """Character n-gram size for shingle="char" and for that short-text fallback."""
    weighting: Literal["idf", "none"] = "idf"
    """Shingle weights: round(log2(N/df)), at least 1 ("idf"), or all 1 ("none")."""
    verify: bool = True
    """Check LSH candidates with the exact tests; if False, the MinHash estimate decides."""
    similarity_threshold: float = Field(0.7, ge=0.0, lt=1.0)
    """With verify, a duplicate also needs ROUGE-L F1 > this (Self-Instruct's 0.7)."""
    keep: KeepRule = "most_instances"
    """Which member of a duplicate cluster survives (ties: the next rule, then the earliest)."""
    cluster: Literal["star", "connected"] = "star"
    """"star": a task is removed only for a kept task it is itself a duplicate of; "connected":
    whole union-find components collapse to one task, chains (A~B~C) included."""

    @field_validator("weights")
    @classmethod
    def _weights_sum_to_one(cls, value: tuple[float, float]) -> tuple[float, float]:
        if min(value) < 0.0 or abs(sum(value) - 1.0) > 1e-9:
            raise ValueError(f"weights must be two non-negative numbers summing to 1, got {value}")
        return value


@dataclass
class NearDedupReport:
    """What `near_dedup` did: the LSH shape datasketch chose and how many pairs each stage saw."""

    tasks: int = 0
    identical: int = 0  # tasks whose token sequence repeats an earlier task's
    indexed: int = 0  # distinct non-empty token sequences, the texts MinHash LSH sees
    num_perm: int = 0
    b: int = 0  # bands
    r: int = 0  # rows per band
    candidate_pairs: int = 0  # distinct pairs sharing at least one bucket
    scored_pairs: int = 0  # candidates scored (pairs whose lengths rule out ROUGE-L are not)
    duplicate_pairs: int = 0  # candidates that passed the duplicate test
    clusters: int = 0  # kept tasks that have duplicates removed in their favour
    removed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    # what the signatures depend on beyond the config: the same data, scheme and seed give
    # the same candidates whatever datasketch computed them
    minhash_scheme: str = MINHASH_SCHEME
    datasketch_version: str = field(default_factory=lambda: datasketch_version())

    def summary(self) -> str:
        """One line for logs, the CLI and stats.json."""
        return (
            f"near dedup: {self.tasks} tasks, {self.removed} removed in {self.clusters} clusters; "
            f"LSH {self.b} bands x {self.r} rows of {self.num_perm}, "
            f"{self.candidate_pairs} candidate pairs, {self.scored_pairs} scored, "
            f"{self.duplicate_pairs} duplicates, {sum(self.seconds.values()):.2f} s; "
            f"minhash_scheme={self.minhash_scheme} datasketch_version={self.datasketch_version}"
        )


# -- keep rules -------------------------------------------------------------------------


def judge_score(task: Task) -> float | None:
    """The LLM judge's score stored on `task.lineage` as the extra field `judge_score`."""
    score = getattr(task.lineage, "judge_score", None) if task.lineage is not None else None
    if isinstance(score, (int, float)) and not isinstance(score, bool):
        return float(score)
    return None


def _criterion(name: str, task: Task) -> tuple:
    if name == "judge_score":
        score = judge_score(task)
        return (0, 0.0) if score is None else (1, score)  # any score beats none
    if name == "most_instances":
        return (len(task.instances),)
    if name == "longest_output":
        return (sum(len(instance.output) for instance in task.instances),)
    return ()  # "first": position decides, below


def keep_rank(task: Task, position: int, rule: KeepRule) -> tuple:
    """Sort key, larger is better: `rule`, then the rules after it, then earlier position."""
    chain = _KEEP_CHAIN[_KEEP_CHAIN.index(rule) :]
    return (*(value for name in chain for value in _criterion(name, task)), -position)


def _best(members: Sequence[int], tasks: Sequence[Task], rule: KeepRule) -> int:
    return max(members, key=lambda i: keep_rank(tasks[i], i, rule))


# -- exact ------------------------------------------------------------------------------


def exact_dedup(tasks: Sequence[Task], fields: Fields = "instruction", keep: KeepRule = "first") -> PassResult:
    """Remove tasks whose `normalize`d text equals another's; keeps the first by default.

    Rejections: reason "exact duplicate", `duplicate_of` the kept task's id. Kept and
    rejected tasks stay in input order.
    """
    groups: dict[str, list[int]] = {}
    for position, task in enumerate(tasks):
        groups.setdefault(normalize(text_of(task, fields)), []).append(position)
    kept_of = {}
    for members in groups.values():
        best = _best(members, tasks, keep)
        kept_of.update((member, best) for member in members)
    return _split(tasks, kept_of, lambda position, best: Rejection(
        tasks[position], EXACT_REASON, duplicate_of=tasks[best].id))


def _split(tasks: Sequence[Task], kept_of: dict[int, int], reject) -> PassResult:
    """Kept tasks and rejections in input order; `kept_of` maps a position to its keeper."""
    kept, rejected = [], []
    for position, task in enumerate(tasks):
        best = kept_of.get(position, position)
        if best == position:
            kept.append(task)
        else:
            rejected.append(reject(position, best))
    return kept, rejected


# -- shingles and MinHash LSH -----------------------------------------------------------


def _char_ngrams(tokens: Sequence[str], size: int) -> set[str]:
    joined = " ".join(tokens)
    if len(joined) <= size:
        return {joined}
    return {joined[start : start + size] for start in range(len(joined) - size + 1)}


def shingles(tokens: Sequence[str], config: DedupConfig) -> set[Hashable]:
    """A text's distinct shingles: word n-grams (str) or character n-grams (("c", gram)).

    A text with fewer than `word_ngram` words has no word n-gram, so it falls back to
    character n-grams; the tuple keeps those apart from a word that happens to match.
    """
    n = config.word_ngram
    if config.shingle == "word" and len(tokens) >= n:
        return set(tokens) if n == 1 else {" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}
    return {("c", gram) for gram in _char_ngrams(tokens, config.char_ngram)}


def shingle_sets(token_lists: Iterable[Sequence[str]], config: DedupConfig) -> list[set[Hashable]]:
    """`shingles` of each text."""
    return [shingles(tokens, config) for tokens in token_lists]


def idf_weight(document_frequency: int, documents: int) -> int:
    """round(log2(N / df)), at least 1: the number of times a shingle counts."""
    return max(1, round(math.log2(documents / document_frequency)))


def idf_weights(sets: Iterable[set[Hashable]], weighting: Literal["idf", "none"] = "idf") -> dict[Hashable, int]:
    """Every distinct shingle -> its weight over these sets (all 1 for weighting="none")."""
    frequency: Counter = Counter()
    documents = 0
    for shingle_set in sets:  # one pass, so `sets` may be a generator
        frequency.update(shingle_set)
        documents += 1
    if weighting == "none":
        return dict.fromkeys(frequency, 1)
    return {shingle: idf_weight(df, documents) for shingle, df in frequency.items()}


def weighted_jaccard(a: set[Hashable], b: set[Hashable], weight: dict[Hashable, int]) -> float:
    """sum of weights of the shared shingles / sum of weights of all shingles of either."""
    shared = sum(weight[shingle] for shingle in a & b)
    total = sum(weight[shingle] for shingle in a) + sum(weight[shingle] for shingle in b) - shared
    return shared / total if total else 0.0


def _hash64(shingle: Hashable) -> int:
    """A stable 64-bit hash of a shingle; `hash()` would change with every process."""
    data = b"c" + shingle[1].encode("utf-8") if isinstance(shingle, tuple) else b"w" + shingle.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def shingle_hash(shingle: Hashable) -> int:
    """The stable 64-bit hash a shingle enters MinHash (and datagen.engines.sharded_dedup's IDF table) by."""
    return _hash64(shingle)


def hash_elements(digest: int, count: int) -> list[int]:
    """A shingle of hash `digest` and weight `count` as `count` distinct 32-bit MinHash inputs."""
    low, step = digest & _MASK32, (digest >> 32) | 1
    return [(low + k * step) & _MASK32 for k in range(count)]


def minhash_elements(sets: Iterable[set[Hashable]], weight: dict[Hashable, int]) -> Iterator[list[int]]:
    """What MinHash sees: each shingle as `weight[shingle]` distinct 32-bit ints.

    The plain MinHash of sets expanded this way estimates `weighted_jaccard` (weighted
    MinHash by replication, exact for integer weights). Each distinct shingle in `weight` is
    hashed once; its w elements are spaced by an odd step from that hash, so they differ.
    Lazy: one text's list exists at a time (100,000 lists of ~100 ints would take ~400 MB).
    """
    elements = {shingle: hash_elements(_hash64(shingle), count) for shingle, count in weight.items()}
    return (list(chain.from_iterable(map(elements.__getitem__, shingle_set))) for shingle_set in sets)


def datasketch_version() -> str:
    """The installed datasketch's version ("unknown" when its metadata is missing)."""
    try:
        return package_version("datasketch")
    except PackageNotFoundError:
        return "unknown"


@cache
def _datasketch_takes_scheme() -> bool:
    """datasketch 2.x's MinHash takes `scheme=`; 1.x's does not (it only has "legacy")."""
    return "scheme" in inspect.signature(MinHash.__init__).parameters


_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))


def affine32_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 parameters: odd a and any b, uint32, from RandomState(seed)."""
    generator = np.random.RandomState(seed)
    a = generator.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = generator.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def affine32_signature(values: Sequence[int], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The affine32 MinHash of 32-bit ints: MurmurHash3's fmix32, then min over a*h + b mod 2^32.

    What datasketch 2.x's `MinHash(scheme="affine32", hashfunc=int).update_batch` computes;
    used where the installed datasketch (1.x) cannot be asked for that scheme.
    """
    if len(values) == 0:
        return np.full(len(a), np.iinfo(np.uint32).max, dtype=np.uint32)
    s1, m1, s2, m2, s3 = _FMIX32
    h = np.asarray(values, dtype=np.uint32).reshape(-1, 1)
    h = h ^ (h >> s1)
    h = h * m1  # uint32 arithmetic wraps: that is the mod 2^32
    h = h ^ (h >> s2)
    h = h * m2
    h = h ^ (h >> s3)
    return (h * a + b).min(axis=0)


def minhash_signatures(elements: Iterable[Sequence[int]], num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """MinHash values (scheme `MINHASH_SCHEME`) of each element list, one uint32 row each.

    Each list goes through `MinHash.update_batch`, datasketch's batch path (one numpy pass
    per text), into one sketch cleared between texts; the values equal `MinHash.bulk`'s
    (tests check it), which builds a full sketch copy per text and is ~20% slower. The
    inputs are ints already, so `hashfunc=int` passes them through (the scheme's murmur
    finalizer still mixes them). The scheme is always named: datasketch's default depends on
    its version. A datasketch without `scheme=` gets `affine32_signature`, the same values.
    """
    if _datasketch_takes_scheme():
        minhash = MinHash(num_perm=num_perm, seed=seed, hashfunc=int, scheme=MINHASH_SCHEME)

        def rows() -> Iterator[np.ndarray]:
            for batch in elements:
                minhash.clear()
                minhash.update_batch(batch)
                yield minhash.hashvalues
    else:
        a, b = affine32_permutations(num_perm, seed)

        def rows() -> Iterator[np.ndarray]:
            return (affine32_signature(batch, a, b) for batch in elements)

    return np.fromiter(rows(), dtype=np.dtype((np.uint32, num_perm))).reshape(-1, num_perm)


def lsh_bands(threshold: float, num_perm: int, weights: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int]:
    """The (bands, rows) datasketch's `MinHashLSH` chooses for this threshold and weights."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=weights)
    return lsh.b, lsh.r


def candidate_pairs(signatures: np.ndarray, b: int, r: int) -> np.ndarray:
    """Distinct row pairs (i < j) that agree on all r values of at least one of b bands.

    These are exactly the pairs that share a bucket in a datasketch `MinHashLSH` with params
    (b, r) holding the same MinHashes (tests check it). Inserting 100,000 sketches through
    `MinHashLSH.insertion_session` costs b byte conversions and set updates per sketch in
    Python, more than hashing them; sorting each band in numpy finds the same buckets in a
    fraction of that (bench/dedup.py times both). Returns an (n, 2) int64 array in (i, j) order.
    """
    n = len(signatures)
    codes = np.empty(0, dtype=np.int64)  # pair (i, j) as i * n + j; sorted, so in (i, j) order
    found: list[np.ndarray] = []
    rows = np.arange(n, dtype=np.int64)
    for band in range(b):
        found.append(band_pair_codes(signatures[:, band * r : (band + 1) * r], rows, n))
        if sum(map(len, found)) > _MERGE_EVERY or band == b - 1:
            # The same pair turns up in several bands: merging now and then keeps memory
            # near the distinct pairs without sorting everything 25 times.
            codes = np.unique(np.concatenate([codes, *found]))
            found = []
    return pairs_of_codes(codes, n)


def band_pair_codes(columns: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Pairs of `rows` (i < j) whose values agree on every column of one band, as i * n + j.

    `columns` holds one band of the signatures of `rows` (any order); `n` is the number of
    rows of the whole signature matrix, so codes of bands computed apart (datatrove's bucket
    tasks, datagen.engines.sharded_dedup) merge by a plain union. Not deduplicated.
    """
    count = len(columns)
    found: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    if count < 2:
        return found[0]
    order = np.lexsort(columns.T[::-1])
    ordered = columns[order]
    starts_bucket = np.ones(count, dtype=bool)
    starts_bucket[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    starts = np.flatnonzero(starts_bucket)
    sizes = np.diff(np.append(starts, count))
    for size in np.unique(sizes[sizes > 1]):
        # Every pair inside every bucket of this size, in one go.
        first, second = np.triu_indices(int(size), k=1)
        base = starts[sizes == size][:, None]
        left, right = rows[order[base + first].ravel()], rows[order[base + second].ravel()]
        found.append(np.minimum(left, right).astype(np.int64) * n + np.maximum(left, right))
    return np.concatenate(found)


def pairs_of_codes(codes: np.ndarray, n: int) -> np.ndarray:
    """Pair codes i * n + j back to an (m, 2) int64 array of (i, j)."""
    return np.stack([codes // n, codes % n], axis=1)


# -- the duplicate test -----------------------------------------------------------------


@dataclass
class TextNodes:
    """Distinct texts: tasks with identical token sequences form one node.

    Node i is row i of the MinHash signatures; a node's tasks are duplicates of each other
    with similarity 1.0. Tokens are kept as ids into one vocabulary, so each distinct word
    is stored once however many texts use it.
    """

    token_ids: list[list[int]]  # per node; ints also make the LCS cheap
    members: list[list[int]]  # per node: its tasks, in input order
    vocabulary: list[str]  # token id -> token

    def tokens(self, node: int) -> list[str]:
        return [self.vocabulary[i] for i in self.token_ids[node]]


class Vocabulary(dict):
    """token -> id, handing out the next id to a token seen for the first time."""

    def __missing__(self, token: str) -> int:
        self[token] = len(self)
        return self[token]


def _nodes(tasks: Sequence[Task], fields: Fields) -> TextNodes:
    ids_of = Vocabulary()
    node_of: dict[tuple[int, ...], int] = {}
    nodes = TextNodes([], [], [])
    for position, task in enumerate(tasks):
        tokens = rouge_tokens(text_of(task, fields))
        if not tokens:  # nothing to compare; exact_dedup handles empty or symbol-only texts
            continue
        ids = tuple(map(ids_of.__getitem__, tokens))
        node = node_of.setdefault(ids, len(nodes.members))
        if node == len(nodes.members):
            nodes.members.append([])
            nodes.token_ids.append(list(ids))
        nodes.members[node].append(position)
    nodes.vocabulary = list(ids_of)
    return nodes


def _rouge_l(a: Sequence[int], b: Sequence[int]) -> float:
    return f1_from_lcs(lcs_length(a, b), len(a), len(b))


def _may_exceed(len_a: int, len_b: int, threshold: float) -> bool:
    """F1 = 2*lcs/(la+lb) with lcs <= min(la, lb), so lengths alone can rule a pair out.

    The 1e-9 slack covers rouge-score's float F1 sitting a few ulps above the exact ratio.
    """
    return 2 * min(len_a, len_b) > (threshold - 1e-9) * (len_a + len_b)


@dataclass
class Similarity:
    """The duplicate test on node pairs, and how its scores read in a rejection's detail."""

    config: DedupConfig
    nodes: TextNodes
    weight: dict[Hashable, int]
    signatures: np.ndarray

    def _overlap(self, a: int, b: int) -> float:
        # Shingle sets are rebuilt for the few pairs that get here rather than kept for all.
        nodes, config = self.nodes, self.config
        return weighted_jaccard(shingles(nodes.tokens(a), config), shingles(nodes.tokens(b), config), self.weight)

    @property
    def names(self) -> tuple[str, ...]:
        return ("rouge_l", "weighted_jaccard") if self.config.verify else ("minhash_jaccard",)

    def measure(self, a: int, b: int) -> tuple[float, ...]:
        if not self.config.verify:
            return (float(np.mean(self.signatures[a] == self.signatures[b])),)
        ids = self.nodes.token_ids
        return _rouge_l(ids[a], ids[b]), self._overlap(a, b)

    def passes(self, scores: tuple[float, ...]) -> bool:
        if not self.config.verify:
            return scores[0] >= self.config.threshold
        return scores[0] > self.config.similarity_threshold and scores[1] >= self.config.threshold

    def describe(self, scores: tuple[float, ...]) -> str:
        return " ".join(f"{name}={score:.3f}" for name, score in zip(self.names, scores))

    def edges(self, pairs: np.ndarray, report: NearDedupReport) -> list[tuple[int, int, tuple[float, ...]]]:
        """The candidate pairs that pass, with their scores; cheapest test first."""
        config = self.config
        if not config.verify:
            estimates = _jaccard_estimates(self.signatures, pairs)
            report.scored_pairs = len(pairs)
            chosen = estimates >= config.threshold
            return [(a, b, (s,)) for (a, b), s in zip(pairs[chosen].tolist(), estimates[chosen].tolist())]
        ids, found = self.nodes.token_ids, []
        for start in range(0, len(pairs), 65536):  # Python pairs a block at a time
            for a, b in pairs[start : start + 65536].tolist():
                if not _may_exceed(len(ids[a]), len(ids[b]), config.similarity_threshold):
                    continue
                report.scored_pairs += 1
                rouge = _rouge_l(ids[a], ids[b])
                if rouge > config.similarity_threshold:
                    overlap = self._overlap(a, b)
                    if overlap >= config.threshold:
                        found.append((a, b, (rouge, overlap)))
        return found


def _jaccard_estimates(signatures: np.ndarray, pairs: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """MinHash Jaccard estimates (share of equal values) of row pairs, in bounded memory."""
    out = np.empty(len(pairs), dtype=np.float64)
    for start in range(0, len(pairs), chunk):
        block = pairs[start : start + chunk]
        out[start : start + chunk] = np.mean(signatures[block[:, 0]] == signatures[block[:, 1]], axis=1)
    return out


# -- clusters ---------------------------------------------------------------------------


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps the trees shallow
            x = parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        x, y = self.find(x), self.find(y)
        if x != y:
            self.parent[max(x, y)] = min(x, y)


Scores = tuple[float, ...]


def adjacency(edges: list[tuple[int, int, Scores]]) -> dict[int, list[tuple[int, Scores]]]:
    """Each node with a duplicate edge -> its (neighbour, scores) list."""
    neighbours: dict[int, list[tuple[int, Scores]]] = {}
    for a, b, scores in edges:
        neighbours.setdefault(a, []).append((b, scores))
        neighbours.setdefault(b, []).append((a, scores))
    return neighbours


def keep_clusters(neighbours: dict[int, list[tuple[int, Scores]]], rank: dict[int, tuple],
                  cluster: Literal["star", "connected"]) -> dict[int, tuple[int, Scores | None]]:
    """The decision rule on the duplicate graph: every removed node -> (its keeper, scores).

    `neighbours` is `adjacency` of the verified edges, `rank` each of their nodes' sort key
    (`keep_rank` of its best task, larger is better; all distinct). Components come from
    union-find; "star" walks each best node first and removes a node only if it has an edge
    to a node already kept (the most similar one, ties to the better-ranked, becomes its
    keeper; scores are that edge's); "connected" keeps each component's best node and
    removes the rest (scores None). Needs only the nodes that have edges, so its memory
    grows with the duplicate pairs, not the tasks (datagen.engines.sharded_dedup relies on that).
    """
    components = _UnionFind(max(neighbours, default=-1) + 1)
    for a, links in neighbours.items():
        for b, _ in links:
            components.union(a, b)
    groups: dict[int, list[int]] = {}
    for node in sorted(neighbours):
        groups.setdefault(components.find(node), []).append(node)

    keeper_of: dict[int, tuple[int, Scores | None]] = {}  # removed node -> (kept node, scores)
    for group in groups.values():
        order = sorted(group, key=rank.__getitem__, reverse=True)
        if cluster == "connected":
            keeper_of.update((node, (order[0], None)) for node in order[1:])
            continue
        kept: set[int] = set()
        for node in order:
            links = [(scores, rank[other], other) for other, scores in neighbours[node] if other in kept]
            if links:
                scores, _, other = max(links)
                keeper_of[node] = (other, scores)
            else:
                kept.add(node)
    return keeper_of


def _assign(neighbours: dict[int, list[tuple[int, Scores]]], nodes: TextNodes, tasks: Sequence[Task],
            config: DedupConfig) -> dict[int, tuple[int, Scores | None]]:
    """Every removed task -> (the task kept in its place, their scores if they are a direct edge).

    `keep_clusters` decides between nodes. Inside a node, its best task stands for it and the
    node's other tasks are removed in its favour (or in favour of the node's keeper).
    """
    rule = config.keep
    face = [members[0] if len(members) == 1 else _best(members, tasks, rule) for members in nodes.members]
    rank = {node: keep_rank(tasks[face[node]], face[node], rule) for node in neighbours}
    keeper_of = keep_clusters(neighbours, rank, config.cluster)

    removed: dict[int, tuple[int, Scores | None]] = {}
    identical: Scores = (1.0, 1.0) if config.verify else (1.0,)
    for node, members in enumerate(nodes.members):
        kept_node, scores = keeper_of.get(node, (node, identical))
        for task in members:
            if task != face[kept_node]:
                removed[task] = (face[kept_node], scores)
    return removed


# -- near -------------------------------------------------------------------------------


def near_dedup(tasks: Sequence[Task], config: DedupConfig | None = None) -> tuple[PassResult, NearDedupReport]:
    """Remove near duplicates; returns ((kept, rejected), report). See the module docstring.

    Rejections: reason "near duplicate", `duplicate_of` the kept task's id, `detail` the
    scores against it: "rouge_l=0.833 weighted_jaccard=0.712" ("minhash_jaccard=0.781"
    without verify). With cluster="connected" a task can be removed for a task it reaches
    only through others; its detail then also names that link.
    """
    config = config or DedupConfig()
    report = NearDedupReport(tasks=len(tasks), num_perm=config.num_perm)
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report.seconds[stage] = now - clock
        clock = now

    nodes = _nodes(tasks, config.fields)
    report.indexed = len(nodes.members)
    report.identical = sum(len(members) - 1 for members in nodes.members)
    lap("tokenize")

    def node_shingles() -> Iterator[set[Hashable]]:  # built twice rather than held for all nodes
        return (shingles(nodes.tokens(node), config) for node in range(len(nodes.members)))

    weight = idf_weights(node_shingles(), config.weighting)
    signatures = np.empty((0, config.num_perm), dtype=np.uint32)
    pairs = np.empty((0, 2), dtype=np.int64)
    lap("weights")
    if len(nodes.members) > 1:
        signatures = minhash_signatures(minhash_elements(node_shingles(), weight), config.num_perm, config.seed)
        lap("minhash")
        report.b, report.r = lsh_bands(config.threshold, config.num_perm, config.weights)
        pairs = candidate_pairs(signatures, report.b, report.r)
        report.candidate_pairs = len(pairs)
        lap("lsh")
    similarity = Similarity(config, nodes, weight, signatures)
    edges = similarity.edges(pairs, report)
    report.duplicate_pairs = len(edges)
    lap("verify")

    neighbours = adjacency(edges)
    removed = _assign(neighbours, nodes, tasks, config)
    node_of = {task: node for node, members in enumerate(nodes.members) for task in members}

    def reject(position: int, kept: int) -> Rejection:
        scores = removed[position][1]
        if scores is not None:
            detail = similarity.describe(scores)
        else:  # "connected": the kept task may be reachable only through other tasks
            scores = similarity.measure(node_of[position], node_of[kept])
            detail = similarity.describe(scores)
            if not similarity.passes(scores):
                other, link = max(neighbours[node_of[position]], key=lambda edge: edge[1])
                detail += f"; linked via {tasks[nodes.members[other][0]].id} ({similarity.describe(link)})"
        return Rejection(tasks[position], NEAR_REASON, detail=detail, duplicate_of=tasks[kept].id)

    kept, rejected = _split(tasks, {task: keeper for task, (keeper, _) in removed.items()}, reject)
    report.removed = len(rejected)
    report.clusters = len({keeper for keeper, _ in removed.values()})
    lap("cluster")
    return (kept, rejected), report


def dedup(tasks: Sequence[Task], config: DedupConfig | None = None) -> tuple[PassResult, NearDedupReport]:
    """`exact_dedup` then `near_dedup` with one config; rejections of both, in pass order."""
    config = config or DedupConfig()
    kept, exact_rejected = exact_dedup(tasks, config.fields, config.keep)
    (kept, near_rejected), report = near_dedup(kept, config)
    return (kept, exact_rejected + near_rejected), report


def exact_dedup_pass(tasks: Sequence[Task], context: PassContext) -> PassResult:
    """The `exact-dedup` pass (reads the `dedup` section's fields and keep rule)."""
    return exact_dedup(tasks, context.settings.fields, context.settings.keep)


def near_dedup_pass(tasks: Sequence[Task], context: PassContext) -> PassResult:
    """The `near-dedup` pass; its report (bands, candidates, timings) goes to stats.json."""
    result, report = near_dedup(tasks, context.settings)
    context.report["report"] = report.summary()
    return result
