"""Benchmark: near-duplicate removal, datagen.filters.dedup against a plain datasketch loop.

Run from the repository root (about 5 minutes on 2 cores, most of it the baselines):

    .venv/bin/python bench/dedup.py                  # 100,000 tasks
    .venv/bin/python bench/dedup.py --n 20000        # quicker
    .venv/bin/python bench/dedup.py --sample 2000 --rouge-score-n 300   # smaller references

The corpus is synthetic and deterministic (`random.Random(--seed)`): instruction-like tasks of
8-30 words from 20 templates and 12 constraint clauses, filled from ~550 real words and
syllable-made names ("the Korvath institute"). A quarter of the base tasks get 1-3
near-duplicate variants, each made from the base (or, one time in four, from an earlier
variant) by paraphrase-style edits: adjacent words swapped, a filler word inserted
("please", "briefly"), a word deleted, a word replaced by a synonym or another word,
staying within 8-30 words; 1 to min(3, words // 5) edits, so an 8-word task gets one edit
and a 15-word task up to three. One variant in ten only changes case and punctuation. A
base and its variants form a true cluster; tasks are shuffled.

Scoring against the true clusters: every removed task names the task it duplicates. A
removal is correct when both are in the same true cluster. precision = correct removals /
removals; recall = correct removals / (tasks - true clusters), the removals a perfect
dedup makes (all but one task of every cluster).

Rows, all scored the same way:

- ours: `near_dedup` with the default `DedupConfig` (IDF-weighted MinHash LSH candidates;
  ROUGE-L F1 > 0.7 and weighted Jaccard >= 0.5, exactly, decide; star clustering), and
  three variants: union-find clusters, the MinHash estimate deciding, unweighted word sets.
- naive: the textbook datasketch loop with the same shingles (IDF-weighted distinct words),
  threshold, num_perm and MinHash scheme: a `MinHash(scheme=MINHASH_SCHEME)` per task,
  `update(element.encode())` per element (default sha1 hashfunc), `MinHashLSH.insert` per task,
  `lsh.query` per task, then the same exact tests, clustering and keep rule as ours.
- LSH stage only: our numpy banding against the same signatures inserted into a datasketch
  `MinHashLSH` with `insertion_session` (LeanMinHash) and its buckets read back; the two
  candidate-pair sets must be equal.
- On a `--sample`-task sub-corpus (whole true clusters): the reference, Self-Instruct's
  rule on all pairs -- ROUGE-L F1 > 0.7 by datagen.rouge's `RougeLIndex`, bit-identical to
  rouge-score -- with the same clustering and keep rule; and our own rule on all pairs (no
  LSH), which with "LSH recall" shows what the LSH approximation costs.
- On a `--rouge-score-n`-task sub-corpus: the all-pairs scan with rouge-score's
  `RougeScorer` (the Self-Instruct code path), checked to find the same pairs as RougeLIndex.

Each method runs in a forked child process so its peak memory can be measured: the child
resets its peak RSS (`/proc/self/clear_refs`), and the figure is VmHWM minus the RSS at its
start (Linux only; "n/a" elsewhere). Wall times are the child's own.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasketch import LeanMinHash, MinHash, MinHashLSH  # noqa: E402

from datagen.filters.dedup import (  # noqa: E402
    MINHASH_SCHEME,
    DedupConfig,
    candidate_pairs,
    idf_weights,
    keep_rank,
    lsh_bands,
    minhash_elements,
    minhash_signatures,
    near_dedup,
    rouge_tokens,
    weighted_jaccard,
)
from datagen.records import Instance, Task  # noqa: E402
from datagen.rouge import RougeLIndex, rouge_l_f1  # noqa: E402

# -- corpus -----------------------------------------------------------------------------

VERBS = "Write Compose Draft Create Prepare Produce Generate Design Outline Sketch Plan Invent".split()
ARTIFACTS = [
    "a poem", "a short story", "an email", "a blog post", "a product review", "a speech",
    "a lesson plan", "a news article", "a limerick", "a cover letter", "a tweet", "a dialogue",
    "a riddle", "a press release", "a recipe", "a song chorus", "a job advert", "a haiku",
    "a memo", "a newsletter", "a quiz", "a fable", "a toast", "a eulogy", "a slogan", "a sonnet",
    "a podcast intro", "a museum label", "a grant proposal", "a travel guide", "a menu",
    "a comic strip script", "a horoscope", "an apology letter", "a wedding vow", "a user manual",
]
ADJECTIVES = """ancient modern urban rural coastal digital local global hidden public private early
late rapid slow fragile robust small large northern southern eastern western quiet noisy frozen
tropical medieval futuristic seasonal remote crowded abandoned experimental traditional wild
domestic volcanic electric nuclear organic sustainable toxic rare common bitter sweet golden
silver wooden stone glass floating underground invisible broken forgotten sacred secular
informal hostile friendly cheap expensive narrow wide shallow deep bright dark humid arid
salty fertile barren ornate minimal rusty polished hollow solid magnetic acoustic thermal
lunar solar marine alpine nomadic imperial colonial rebel royal civic academic rustic
""".split()
NOUNS = """river forest market bridge library harbor garden factory village museum railway glacier
desert island vineyard orchard bakery hospital school stadium theater prison castle monastery
airport canal tunnel lighthouse observatory reef swamp prairie canyon volcano festival election
treaty budget tariff vaccine algorithm telescope satellite battery engine robot drone microscope
compass calendar alphabet currency mortgage pension census drought flood earthquake pandemic
migration harvest famine revolution empire dynasty parliament violin piano drum painting
sculpture novel opera ballet mosaic tapestry manuscript coin stamp map clock lantern kettle
bicycle tram ferry submarine rocket balloon glider tractor loom mill forge quarry mine well dam
windmill greenhouse beehive aquarium zoo circus arcade casino bank courthouse embassy
cathedral mosque temple shrine cemetery plaza fountain statue tower wall gate moat fortress
barracks shipyard dock warehouse pharmacy clinic laboratory archive gallery studio workshop
cafe tavern inn hostel camp cabin igloo tent yacht canoe raft sled wagon chariot carriage
spice salt silk cotton wool leather paper ink glue soap candle mirror lens prism crystal
""".split()
PLACES = """Lisbon Nairobi Osaka Lima Oslo Hanoi Quito Dakar Perth Tbilisi Montreal Seville Krakow
Mumbai Cairo Reykjavik Santiago Manila Tunis Vienna Bergen Cusco Hobart Tallinn Accra Baku
Porto Leeds Kyoto Durban Zagreb Medan Tromso Bogota Havana Lhasa Muscat Ghent Turin Sapporo
""".split()
SYLLABLES = "kor vath mir ato trel win zel mora bran tel quor vid sal ith nem ust pol aro fen dri".split()
KINDS = ["institute", "protocol", "expedition", "treaty", "festival", "algorithm", "company",
         "river", "theorem", "movement", "dynasty", "mission", "school", "index", "reactor"]
AUDIENCES = [
    "a five-year-old", "a busy manager", "high school students", "new employees", "my grandmother",
    "software engineers", "tourists", "a skeptical investor", "nursing students", "city planners",
    "retired teachers", "a museum curator", "first-time voters", "farmers", "a hiring committee",
    "astronauts", "a chess club", "night-shift nurses", "beekeepers", "a rival CEO", "lawyers",
    "a village council", "marathon runners", "stamp collectors", "exchange students", "pilots",
]
LANGUAGES = ["French", "German", "Spanish", "Italian", "Japanese", "Swahili", "Polish", "Korean",
             "Portuguese", "Dutch", "Turkish", "Greek", "Hindi", "Finnish", "Vietnamese", "Czech"]
TEXT_KINDS = ["paragraph", "sentence", "review", "headline", "email", "dialogue", "abstract",
              "complaint", "tweet", "report", "letter", "transcript", "poem", "speech", "memo",
              "caption", "footnote", "interview", "contract", "diary entry"]
LABELS = [("positive", "negative"), ("fact", "opinion"), ("spam", "not spam"), ("formal", "informal"),
          ("true", "false"), ("urgent", "routine"), ("question", "statement"), ("safe", "unsafe"),
          ("literal", "ironic"), ("cause", "effect"), ("ancient", "modern"), ("legal", "illegal")]
TONES = ["playful", "formal", "sarcastic", "optimistic", "neutral", "urgent", "warm", "solemn",
         "dry", "poetic", "clinical", "nostalgic", "furious", "gentle"]
FORMATS = ["numbered list", "table", "short paragraph", "JSON object", "bullet list", "single sentence",
           "haiku", "dialogue", "timeline", "FAQ"]
PROGRAMMING = ["Python", "Rust", "Go", "SQL", "JavaScript", "Haskell", "Bash", "Java"]
CODE_VERBS = ["parses", "counts", "sorts", "validates", "merges", "detects", "plots", "caches",
              "compresses", "encrypts", "ranks", "deduplicates", "schedules", "summarizes"]
IMPROVE = ["improve", "protect", "fund", "promote", "modernize", "restore", "measure", "simplify"]
FILLERS = ["please", "briefly", "carefully", "clearly", "also", "now", "simply", "really",
           "quickly", "concisely", "thoroughly", "kindly"]
SYNONYMS = {
    "write": ["compose", "draft"], "compose": ["write"], "draft": ["write"], "create": ["make", "design"],
    "explain": ["describe", "clarify"], "describe": ["explain", "portray"], "short": ["brief"],
    "summarize": ["condense", "recap"], "suggest": ["propose", "recommend"], "list": ["enumerate"],
    "about": ["on", "regarding"], "improve": ["enhance", "strengthen"], "facts": ["details"],
    "ways": ["methods"], "plan": ["strategy"], "examples": ["instances"], "affects": ["influences"],
    "include": ["add"], "avoid": ["skip"], "mention": ["cite"], "keep": ["maintain"],
    "students": ["pupils"], "answer": ["response"], "find": ["locate"], "give": ["offer"],
    "questions": ["queries"], "advice": ["tips"], "cost": ["price"], "name": ["identify"],
}


def plural(noun: str) -> str:
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def topic(rng: random.Random) -> str:
    """A noun phrase with two or three free slots."""
    kind = rng.randrange(6)
    if kind == 0:
        return f"{rng.choice(ADJECTIVES)} {plural(rng.choice(NOUNS))}"
    if kind == 1:
        return f"the {rng.choice(NOUNS)} of {name(rng)}"
    if kind == 2:
        return f"the {name(rng)} {rng.choice(KINDS)}"
    if kind == 3:
        return f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} in {rng.choice(PLACES)}"
    if kind == 4:
        return f"{rng.choice(NOUNS)} {plural(rng.choice(NOUNS))}"
    return f"{name(rng)}'s {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"


def opening(rng: random.Random) -> str:
    """One of 20 templates; their fixed words are few next to the free slots."""
    t = lambda: topic(rng)  # noqa: E731
    n = rng.randint(2, 12)
    kind = lambda: rng.choice(TEXT_KINDS)  # noqa: E731
    choices = [
        lambda: f"{rng.choice(VERBS)} {rng.choice(ARTIFACTS)} about {t()} for {rng.choice(AUDIENCES)}.",
        lambda: f"Explain how {t()} affects {t()}.",
        lambda: f"Translate this {kind()} about {t()} into {rng.choice(LANGUAGES)}.",
        lambda: "Classify each {} about {} as {} or {}.".format(kind(), t(), *rng.choice(LABELS)),
        lambda: f"What separates {t()} from {t()}?",
        lambda: f"Summarize the {kind()} on {t()} in {n} sentences.",
        lambda: f"Suggest {n} ways to {rng.choice(IMPROVE)} {t()}.",
        lambda: f"Find every {rng.choice(NOUNS)} linked to {t()} in the {kind()}.",
        lambda: f"Describe {t()} to {rng.choice(AUDIENCES)}.",
        lambda: f"Create a {rng.choice(ADJECTIVES)} plan for {t()}.",
        lambda: f"Write a {rng.choice(PROGRAMMING)} function that {rng.choice(CODE_VERBS)} {t()}.",
        lambda: f"Did {t()} cause {t()}?",
        lambda: f"List {n} facts about {t()}.",
        lambda: f"Rewrite this {kind()} about {t()} in a {rng.choice(TONES)} tone.",
        lambda: f"Name {n} {rng.choice(ADJECTIVES)} {plural(rng.choice(NOUNS))} near {rng.choice(PLACES)}.",
        lambda: f"How would {rng.choice(AUDIENCES)} {rng.choice(IMPROVE)} {t()}?",
        lambda: f"Estimate the cost of {t()} for {rng.choice(AUDIENCES)}.",
        lambda: f"Give {rng.choice(AUDIENCES)} advice about {t()}.",
        lambda: f"Draft {n} questions about {t()}.",
        lambda: f"Argue that {t()} matters more than {t()}.",
    ]
    return rng.choice(choices)()


def clause(rng: random.Random) -> str:
    choices = [
        lambda: f"Use at most {rng.choice([30, 40, 50, 80, 100, 150, 200])} words.",
        lambda: f"Include {rng.randint(2, 6)} examples from {topic(rng)}.",
        lambda: f"Mention {name(rng)}.",
        lambda: f"Focus on {topic(rng)}.",
        lambda: f"Address it to {rng.choice(AUDIENCES)}.",
        lambda: f"Keep a {rng.choice(TONES)} tone.",
        lambda: f"Avoid {topic(rng)}.",
        lambda: f"End with {topic(rng)}.",
        lambda: f"Answer as a {rng.choice(FORMATS)}.",
        lambda: f"Compare with {topic(rng)}.",
        lambda: f"Cite {name(rng)} and {name(rng)}.",
        lambda: f"Assume {topic(rng)} is {rng.choice(ADJECTIVES)}.",
    ]
    return rng.choice(choices)()


def base_instruction(rng: random.Random) -> list[str]:
    """8-30 words: a template opening plus constraint clauses up to a random target length."""
    target = rng.randint(8, 30)
    text = opening(rng).split()
    for _ in range(12):
        if len(text) >= target:
            break
        extra = clause(rng).split()
        if len(text) + len(extra) <= 30:
            text += extra
    while len(text) < 8:
        text += clause(rng).split()
    return text[:30]


def edit(rng: random.Random, text: list[str]) -> list[str]:
    """A paraphrase-style variant: 1 to min(3, words // 5) swaps, insertions, deletions, rewordings."""
    words_ = list(text)
    if rng.random() < 0.1:  # formatting only: case and punctuation
        joined = " ".join(words_).lower() if rng.random() < 0.5 else " ".join(words_).upper()
        return (joined.rstrip(".?") + rng.choice(["", "!", "?", "..."])).split()
    for _ in range(rng.randint(1, min(3, max(1, len(words_) // 5)))):
        operation = rng.choice(["swap", "insert", "delete", "substitute"])
        if operation == "insert" and len(words_) >= 30 or operation == "delete" and len(words_) <= 8:
            operation = "swap"
        position = rng.randrange(len(words_) - 1)
        if operation == "swap":
            words_[position], words_[position + 1] = words_[position + 1], words_[position]
        elif operation == "insert":
            words_.insert(position, rng.choice(FILLERS))
        elif operation == "delete":
            del words_[position]
        else:
            replaceable = [i for i, w in enumerate(words_) if w.lower().strip(".,?") in SYNONYMS]
            if replaceable:
                position = rng.choice(replaceable)
                bare = words_[position].lower().strip(".,?")
                words_[position] = words_[position].lower().replace(bare, rng.choice(SYNONYMS[bare]))
            else:
                words_[position] = rng.choice(ADJECTIVES + NOUNS)
    return words_


def build_corpus(n: int, seed: int) -> tuple[list[Task], list[int]]:
    """`n` shuffled tasks and, for each, the id of its true near-duplicate cluster."""
    rng = random.Random(seed)
    texts: list[str] = []
    cluster_of: list[int] = []
    cluster = 0
    while len(texts) < n:
        members = [base_instruction(rng)]
        if rng.random() < 0.25:
            for _ in range(rng.randint(1, 3)):
                parent = members[0] if rng.random() < 0.75 else rng.choice(members)
                members.append(edit(rng, parent))
        for member in members[: n - len(texts)]:
            texts.append(" ".join(member))
            cluster_of.append(cluster)
        cluster += 1
    order = list(range(n))
    rng.shuffle(order)
    tasks = []
    for position, source in enumerate(order):
        instances = [Instance(output=" ".join(rng.choice(NOUNS) for _ in range(rng.randint(3, 12))))
                     for _ in range(rng.randint(0, 3))]
        tasks.append(Task(id=f"t{position:06d}", instruction=texts[source], instances=instances))
    return tasks, [cluster_of[source] for source in order]


def cluster_sample(cluster_of: Sequence[int], size: int, seed: int) -> list[int]:
    """Positions of whole true clusters, drawn at random until `size` tasks, in corpus order."""
    by_cluster: dict[int, list[int]] = {}
    for position, cluster in enumerate(cluster_of):
        by_cluster.setdefault(cluster, []).append(position)
    clusters = sorted(by_cluster)
    random.Random(seed).shuffle(clusters)
    chosen: list[int] = []
    for cluster in clusters:
        if len(chosen) >= size:
            break
        chosen += by_cluster[cluster][: size - len(chosen)]
    return sorted(chosen)


# -- methods: each returns ({removed position: kept position}, summary, extra) -----------

Removals = dict[int, int]


def ours(tasks: Sequence[Task], config: DedupConfig) -> tuple[Removals, str, dict]:
    (_, rejected), report = near_dedup(tasks, config)
    position = {task.id: i for i, task in enumerate(tasks)}
    removals = {position[r.task.id]: position[r.duplicate_of] for r in rejected}
    return removals, report.summary(), {"seconds": report.seconds, "candidates": report.candidate_pairs}


def star_removals(tasks: Sequence[Task], edges: Sequence[tuple[int, int, tuple]], keep: str) -> Removals:
    """near_dedup's default clustering, over task positions: best task first, a task is
    removed only for an already kept task it has an edge to (the most similar one)."""
    neighbours: dict[int, list[tuple[tuple, int]]] = {}
    for a, b, scores in edges:
        neighbours.setdefault(a, []).append((scores, b))
        neighbours.setdefault(b, []).append((scores, a))
    order = sorted(neighbours, key=lambda i: keep_rank(tasks[i], i, keep), reverse=True)
    kept: set[int] = set()
    removals: Removals = {}
    for task in order:
        links = [(scores, keep_rank(tasks[other], other, keep), other)
                 for scores, other in neighbours[task] if other in kept]
        if links:
            removals[task] = max(links)[2]
        else:
            kept.add(task)
    return removals


def word_sets_and_weights(tasks: Sequence[Task]) -> tuple[list[set], dict]:
    """Distinct words per task and their IDF weights, as near_dedup computes them."""
    sets = [set(rouge_tokens(task.instruction)) for task in tasks]
    distinct = list({tuple(rouge_tokens(task.instruction)) for task in tasks})  # weights count distinct texts
    return sets, idf_weights([set(tokens) for tokens in distinct])


def naive(tasks: Sequence[Task], config: DedupConfig) -> tuple[Removals, str, dict]:
    """The textbook loop on the same weighted shingles: a MinHash per task, `update` per
    element (default sha1 hashfunc), `MinHashLSH.insert` per task, `query` per task; then
    the same exact tests and clustering as near_dedup."""
    sets, weight = word_sets_and_weights(tasks)
    lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm, weights=config.weights)
    minhashes = []
    for position, shingles in enumerate(sets):
        minhash = MinHash(num_perm=config.num_perm, seed=config.seed, scheme=MINHASH_SCHEME)
        for shingle in shingles:
            for copy in range(weight[shingle]):  # weight w = w distinct elements, as in ours
                minhash.update(f"{shingle}#{copy}".encode("utf-8"))
        lsh.insert(position, minhash)
        minhashes.append(minhash)
    candidates = set()
    for position, minhash in enumerate(minhashes):
        candidates.update((min(position, other), max(position, other))
                          for other in lsh.query(minhash) if other != position)
    edges = []
    for a, b in sorted(candidates):
        rouge = rouge_l_f1(tasks[a].instruction, tasks[b].instruction)
        if rouge > config.similarity_threshold:
            overlap = weighted_jaccard(sets[a], sets[b], weight)
            if overlap >= config.threshold:
                edges.append((a, b, (rouge, overlap)))
    return (star_removals(tasks, edges, config.keep),
            f"naive: LSH {lsh.b} bands x {lsh.r} rows, {len(candidates)} candidate pairs, "
            f"{len(edges)} duplicates", {"candidates": len(candidates)})


def all_pairs_index(tasks: Sequence[Task], config: DedupConfig) -> list[tuple[int, int, float]]:
    """Every pair with ROUGE-L F1 > similarity_threshold, by datagen.rouge.RougeLIndex."""
    index = RougeLIndex()
    pairs = []
    for position, task in enumerate(tasks):
        if len(index):
            scores = index.scores(task.instruction)
            pairs += [(int(j), position, float(scores[j])) for j in
                      np.flatnonzero(scores > config.similarity_threshold)]
        index.add(task.instruction)
    return pairs


def reference_index(tasks: Sequence[Task], config: DedupConfig) -> tuple[Removals, str, dict]:
    """Self-Instruct's rule on all pairs: ROUGE-L F1 > 0.7 (RougeLIndex), star clustering."""
    pairs = all_pairs_index(tasks, config)
    removals = star_removals(tasks, [(a, b, (s,)) for a, b, s in pairs], config.keep)
    return removals, f"{len(tasks) * (len(tasks) - 1) // 2} pairs scored, {len(pairs)} above " \
                     f"{config.similarity_threshold}", {"pairs": [(a, b) for a, b, _ in pairs]}


def exact_rule(tasks: Sequence[Task], config: DedupConfig) -> tuple[Removals, str, dict]:
    """near_dedup's own decision on all pairs, no LSH: ROUGE-L > 0.7 and weighted Jaccard >= 0.5."""
    sets, weight = word_sets_and_weights(tasks)
    edges = [(a, b, (s, w)) for a, b, s in all_pairs_index(tasks, config)
             if (w := weighted_jaccard(sets[a], sets[b], weight)) >= config.threshold]
    return star_removals(tasks, edges, config.keep), f"{len(edges)} pairs pass both tests", \
        {"pairs": [(a, b) for a, b, _ in edges]}


def reference_rouge_score(tasks: Sequence[Task], config: DedupConfig) -> tuple[Removals, str, dict]:
    """The same all-pairs ROUGE-L scan with rouge-score's scorer (Self-Instruct's code path)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = []
    for b in range(len(tasks)):
        for a in range(b):
            score = scorer.score(tasks[a].instruction, tasks[b].instruction)["rougeL"].fmeasure
            if score > config.similarity_threshold:
                pairs.append((a, b, score))
    removals = star_removals(tasks, [(a, b, (s,)) for a, b, s in pairs], config.keep)
    return removals, f"{len(pairs)} pairs above {config.similarity_threshold}", \
        {"pairs": [(a, b) for a, b, _ in pairs]}


def lsh_candidates(tasks: Sequence[Task], config: DedupConfig) -> set[tuple[int, int]]:
    """near_dedup's candidate pairs over task positions (for LSH recall on a sample)."""
    sets, weight = word_sets_and_weights(tasks)
    signatures = minhash_signatures(minhash_elements(sets, weight), config.num_perm, config.seed)
    b, r = lsh_bands(config.threshold, config.num_perm, config.weights)
    return set(map(tuple, candidate_pairs(signatures, b, r).tolist()))


def lsh_stage_numpy(signatures: np.ndarray, b: int, r: int) -> set[tuple[int, int]]:
    return set(map(tuple, candidate_pairs(signatures, b, r).tolist()))


def lsh_stage_datasketch(signatures: np.ndarray, b: int, r: int, num_perm: int, seed: int) -> set[tuple[int, int]]:
    """The same buckets through datasketch: LeanMinHash + insertion_session, buckets read back."""
    lsh = MinHashLSH(num_perm=num_perm, params=(b, r))
    with lsh.insertion_session() as session:
        for row, values in enumerate(signatures):
            session.insert(row, LeanMinHash(seed=seed, hashvalues=values, scheme=MINHASH_SCHEME),
                           check_duplication=False)
    pairs = set()
    for table in lsh.hashtables:
        for key in table.keys():
            members = sorted(table.get(key))
            pairs.update((members[i], members[j]) for i in range(len(members)) for j in range(i + 1, len(members)))
    return pairs


# -- measuring ---------------------------------------------------------------------------


def _status(field: str) -> int | None:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def in_child(function: Callable[[], object]) -> tuple[object, float, int | None]:
    """Run `function` in a forked child: (its result, wall seconds, peak RSS growth in bytes).

    The child inherits the corpus without copying it, resets its peak-RSS mark, and reports
    how far above its starting RSS it peaked; each method is measured on a clean process.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            try:
                with open("/proc/self/clear_refs", "w") as clear:
                    clear.write("5")  # 5 = reset the peak resident set size to the current one
                start_rss = _status("VmRSS")
            except OSError:
                start_rss = None
            start = time.perf_counter()
            result = function()
            seconds = time.perf_counter() - start
            peak = _status("VmHWM")
            growth = peak - start_rss if peak is not None and start_rss is not None else None
            payload = pickle.dumps(("ok", (result, seconds, growth)))
        except BaseException:  # noqa: BLE001 - reported to the parent
            payload = pickle.dumps(("error", traceback.format_exc()))
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        status, value = pickle.loads(pipe.read())
    os.waitpid(pid, 0)
    if status == "error":
        raise RuntimeError(f"child failed:\n{value}")
    return value


def precision_recall(removals: Removals, cluster_of: Sequence[int]) -> tuple[float, float, int]:
    correct = sum(cluster_of[removed] == cluster_of[kept] for removed, kept in removals.items())
    should = len(cluster_of) - len(set(cluster_of))
    precision = correct / len(removals) if removals else 1.0
    return precision, (correct / should if should else 1.0), correct


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def row(label: str, n: int, seconds: float, peak: int | None, removals: Removals, cluster_of) -> tuple:
    precision, recall, _ = precision_recall(removals, cluster_of)
    print(f"  {label:<50} {n:>7} {seconds:>9.2f} {mib(peak):>9} {len(removals):>8} "
          f"{precision:>9.4f} {recall:>8.4f}")
    return precision, recall


def header(title: str) -> None:
    print(f"\n{title}")
    print(f"  {'method':<50} {'tasks':>7} {'wall s':>9} {'peak MiB':>9} {'removed':>8} "
          f"{'precision':>9} {'recall':>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="tasks in the corpus (default 100000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=5000, help="tasks for the all-pairs references")
    parser.add_argument("--rouge-score-n", type=int, default=600, help="tasks for the rouge-score scan")
    args = parser.parse_args()
    config = DedupConfig()

    start = time.perf_counter()
    tasks, cluster_of = build_corpus(args.n, args.seed)
    lengths = [len(task.instruction.split()) for task in tasks]
    clusters = len(set(cluster_of))
    print(f"near-duplicate removal on {args.n} synthetic tasks (seed {args.seed}, built in "
          f"{time.perf_counter() - start:.1f} s): {min(lengths)}-{max(lengths)} words, {clusters} true "
          f"clusters, {args.n - clusters} removals expected; {os.cpu_count()} CPUs; "
          f"datasketch {version('datasketch')} (MinHash scheme {MINHASH_SCHEME}, ours and naive), "
          f"numpy {np.__version__}, rouge-score {version('rouge-score')}")
    b, r = lsh_bands(config.threshold, config.num_perm, config.weights)
    print(f"config: {config.model_dump()}\nLSH: datasketch chose b={b} bands x r={r} rows "
          f"for threshold {config.threshold}, num_perm {config.num_perm}, weights {config.weights}")

    header(f"full corpus ({args.n} tasks)")
    (our_removals, summary, info), our_s, our_peak = in_child(lambda: ours(tasks, config))
    row("ours: near_dedup (defaults)", args.n, our_s, our_peak, our_removals, cluster_of)
    variants = [("ours: cluster='connected' (union-find clusters)", {"cluster": "connected"}),
                ("ours: verify=False (MinHash estimate decides)", {"verify": False}),
                ("ours: weighting='none' (plain word sets)", {"weighting": "none"})]
    for label, update in variants:
        variant = config.model_copy(update=update)
        (removals, _, _), seconds, peak = in_child(lambda variant=variant: ours(tasks, variant))
        row(label, args.n, seconds, peak, removals, cluster_of)
    (naive_removals, naive_summary, _), naive_s, naive_peak = in_child(lambda: naive(tasks, config))
    row("naive: datasketch update/insert/query loop", args.n, naive_s, naive_peak, naive_removals, cluster_of)
    print(f"  {summary}\n    stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in info["seconds"].items()))
    print(f"  {naive_summary}")
    print(f"  ours vs naive: {naive_s / our_s:.1f}x faster"
          + (f", peak memory {our_peak / naive_peak:.2f}x of naive's" if our_peak and naive_peak else ""))

    print(f"\nLSH candidate stage only, same {args.n} signatures, b={b} x r={r}")
    sets, weight = word_sets_and_weights(tasks)
    signatures = minhash_signatures(minhash_elements(sets, weight), config.num_perm, config.seed)
    numpy_pairs, numpy_s, numpy_peak = in_child(lambda: lsh_stage_numpy(signatures, b, r))
    sketch_pairs, sketch_s, sketch_peak = in_child(
        lambda: lsh_stage_datasketch(signatures, b, r, config.num_perm, config.seed))
    print(f"  numpy banding (candidate_pairs):          {numpy_s:7.2f} s, peak {mib(numpy_peak):>5} MiB, "
          f"{len(numpy_pairs)} pairs")
    print(f"  MinHashLSH insertion_session + buckets:   {sketch_s:7.2f} s, peak {mib(sketch_peak):>5} MiB, "
          f"{len(sketch_pairs)} pairs")
    print(f"  same candidate pairs: {numpy_pairs == sketch_pairs}; numpy banding {sketch_s / numpy_s:.1f}x faster")

    for size, methods in [
        (args.sample, [("reference: all-pairs ROUGE-L > 0.7, RougeLIndex", reference_index),
                       ("exact all-pairs version of our rule (no LSH)", exact_rule)]),
        (args.rouge_score_n, [("reference: all-pairs ROUGE-L > 0.7, RougeLIndex", reference_index),
                              ("reference: all-pairs ROUGE-L > 0.7, rouge-score", reference_rouge_score)]),
    ]:
        positions = cluster_sample(cluster_of, size, args.seed)
        sample, sample_clusters = [tasks[i] for i in positions], [cluster_of[i] for i in positions]
        header(f"sub-corpus of {len(sample)} tasks (whole true clusters, "
               f"{len(sample) - len(set(sample_clusters))} removals expected)")
        (sub_removals, _, _), sub_s, sub_peak = in_child(lambda sample=sample: ours(sample, config))
        row("ours: near_dedup (defaults)", len(sample), sub_s, sub_peak, sub_removals, sample_clusters)
        found = {}
        for label, method in methods:
            (removals, summary, extra), seconds, peak = in_child(
                lambda method=method, sample=sample: method(sample, config))
            row(label, len(sample), seconds, peak, removals, sample_clusters)
            print(f"    {summary}; {seconds / sub_s:.0f}x the time of ours")
            found[method] = set(extra["pairs"])
        if exact_rule in found:
            candidates = lsh_candidates(sample, config)
            exact = found[exact_rule]
            print(f"  LSH recall on the exact rule's pairs: {len(exact & candidates)} of {len(exact)} "
                  f"({len(exact & candidates) / max(1, len(exact)):.4f}); {len(candidates)} candidates")
        if reference_rouge_score in found:
            print(f"  rouge-score and RougeLIndex find the same pairs: "
                  f"{found[reference_rouge_score] == found[reference_index]}")

    precision, recall, _ = precision_recall(our_removals, cluster_of)
    print(f"\ntargets (100k tasks < 60 s, precision and recall >= 0.95, >= 5x faster than naive):\n"
          f"  ours {our_s:.1f} s on {args.n} tasks, precision {precision:.4f}, recall {recall:.4f}, "
          f"{naive_s / our_s:.1f}x faster than the naive loop")


if __name__ == "__main__":
    main()
