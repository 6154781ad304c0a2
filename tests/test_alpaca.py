"""Alpaca: the exact prompt, exact parses, every Alpaca rule with its reason, a real run with resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from datagen.config import SamplingParams
from datagen.errors import DatagenError
from datagen.generators.alpaca import (
    ALPACA_BLACKLIST,
    AlpacaConfig,
    AlpacaItem,
    ParsedReply,
    alpaca_messages,
    copied_from_prompt,
    item_reject_reason,
    parse_alpaca_reply,
    run_alpaca,
)
from datagen.generators.common import COPY_OVERLAP, RunContext, TaskSink, stable_id
from datagen.generators.self_instruct import REFERENCE_BLACKLIST, GenerationStalled, sample_prompt_tasks
from datagen.io import read_records, read_tasks, rejects_path
from datagen.records import Instance, Task
from datagen.teachers.base import Completion, Request
from datagen.teachers.cache import RequestCache, request_key
from tests.helpers import WORDS, alpaca_reply

SEEDS = [
    Task(id="seed_a", instruction="Give three tips for staying\n healthy:",
         instances=[Instance(input="", output="1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep enough."),
                    Instance(input="ignored", output="only the first instance is shown")]),
    Task(id="seed_b", instruction="Classify the sentiment of the review.",
         instances=[Instance(input="The soup was cold and bland.", output="Negative")]),
    Task(id="seed_c", instruction="Translate the sentence into French.",
         instances=[Instance(input="  ", output="Il pleut.")]),
]

PROMPT = (
    "We are collecting a varied set of tasks to teach an AI assistant to follow instructions. "
    "Make a list of 20 tasks. Each task has an instruction, an input and an output. "
    "The first 3 tasks are already written below; continue the list from task 4.\n"
    "\n"
    "Guidelines:\n"
    "1. Vary the verbs: avoid starting two instructions with the same verb.\n"
    "2. Vary the phrasing: mix direct commands with questions.\n"
    "3. Vary the kind of task: open-ended writing, classification, rewriting, extraction, reasoning, "
    "brainstorming, advice and so on.\n"
    "4. A text-only language model must be able to do every task. Do not ask for pictures, sound or any "
    "other output that is not text, and do not ask for actions in the world, such as setting an alarm or "
    "sending a message.\n"
    "5. Write each instruction in English, as one or two sentences: a command or a question.\n"
    "6. When an instruction needs an input, write a specific and realistic one, with real content instead "
    "of placeholders, that gives the task some substance. Keep it under about 100 words.\n"
    "7. When an instruction needs no input, for example a general knowledge question, write <noinput> as "
    "its input.\n"
    "8. The output is a correct and complete response to the instruction and its input, in fewer than "
    "100 words.\n"
    "\n"
    'Format: a line with only ### comes before every task. Task N is written as "N. Instruction:" followed '
    'by the instruction, then "N. Input:" on a new line followed by the input, then "N. Output:" on a new '
    "line followed by the output.\n"
    "\n"
    "List of 20 tasks:\n"
    "###\n"
    "1. Instruction: Give three tips for staying healthy\n"
    "1. Input:\n"
    "<noinput>\n"
    "1. Output:\n"
    "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep enough.\n"
    "###\n"
    "2. Instruction: Classify the sentiment of the review.\n"
    "2. Input:\n"
    "The soup was cold and bland.\n"
    "2. Output:\n"
    "Negative\n"
    "###\n"
    "3. Instruction: Translate the sentence into French.\n"
    "3. Input:\n"
    "<noinput>\n"
    "3. Output:\n"
    "Il pleut.\n"
    "###\n"
    "4. Instruction:"
)


def test_prompt_is_pinned():
    assert alpaca_messages(SEEDS) == [{"role": "user", "content": PROMPT}]


def test_prompt_follows_the_task_count():
    [message] = alpaca_messages(SEEDS[:2], tasks_per_prompt=10)
    assert "Make a list of 10 tasks." in message["content"]
    assert "continue the list from task 3." in message["content"]
    assert message["content"].endswith("List of 10 tasks:\n###\n1. Instruction: Give three tips for staying healthy\n"
                                       "1. Input:\n<noinput>\n1. Output:\n1. Eat a balanced diet.\n2. Exercise "
                                       "regularly.\n3. Sleep enough.\n###\n2. Instruction: Classify the sentiment "
                                       "of the review.\n2. Input:\nThe soup was cold and bland.\n2. Output:\n"
                                       "Negative\n###\n3. Instruction:")


def test_three_seeds_per_prompt_from_the_seeds_only():
    seeds = [Task(id=f"s{i}", instruction=f"seed {i}", instances=[Instance(output="x")]) for i in range(10)]
    shown = sample_prompt_tasks(seeds, (), random.Random("alpaca:0:0"), 3, 0)
    assert len(shown) == 3 and len({t.id for t in shown}) == 3
    assert shown == sample_prompt_tasks(seeds, (), random.Random("alpaca:0:0"), 3, 0)


def test_config_defaults_are_the_references():
    config = AlpacaConfig()
    assert (config.seeds_per_prompt, config.tasks_per_prompt, config.prompts_per_batch) == (3, 20, 5)
    assert config.sampling == SamplingParams(temperature=1.0, top_p=1.0, max_tokens=3072, stop=("\n20", "20."))
    assert config.similarity_threshold == 0.7 and config.most_similar_kept == 10
    assert config.blacklist == REFERENCE_BLACKLIST + ("video", "audio", "music", "flowchart", "diagram")
    assert AlpacaConfig(tasks_per_prompt=12).sampling.stop == ("\n12", "12.")
    custom = SamplingParams(max_tokens=50, stop=("END",))
    assert AlpacaConfig(tasks_per_prompt=12, sampling=custom).sampling == custom
    with pytest.raises(ValueError, match="must exceed seeds_per_prompt"):
        AlpacaConfig(tasks_per_prompt=4)


# -- parsing ------------------------------------------------------------------------------------

WELL_FORMED = (
    " Name the largest planet in the solar system.\n4. Input:\n<noinput>\n4. Output:\nJupiter.\n"
    "###\n5. Instruction: Summarize the paragraph in one sentence.\n5. Input:\n"
    "Bees pollinate crops. Without them, many fruits would vanish.\n5. Output:\n"
    "Bees are essential for the fruit we eat.\n###\n"
)


def triples(parsed: ParsedReply) -> list[tuple[str, str, str]]:
    return [(i.instruction, i.input, i.output) for i in parsed.items]


def test_parse_well_formed_reply_with_noinput():
    parsed = parse_alpaca_reply(WELL_FORMED, 4, "stop")
    assert triples(parsed) == [
        ("Name the largest planet in the solar system.", "", "Jupiter."),
        ("Summarize the paragraph in one sentence.",
         "Bees pollinate crops. Without them, many fruits would vanish.",
         "Bees are essential for the fruit we eat."),
    ]
    assert parsed.malformed == [] and parsed.cut_off is None
    assert parsed.items[0].raw == (
        "4. Instruction: Name the largest planet in the solar system.\n4. Input:\n<noinput>\n4. Output:\nJupiter.\n"
    )
    assert parsed.items[0] == AlpacaItem("Name the largest planet in the solar system.", "", "Jupiter.")


def test_noinput_is_case_insensitive_and_multiline_fields_survive():
    reply = " List two\nprime numbers.\n4. Input:\n<NoInput>\n4. Output:\n2\n3"
    assert triples(parse_alpaca_reply(reply, 4, "stop")) == [("List two\nprime numbers.", "", "2\n3")]


def test_a_repeated_leading_label_is_not_doubled():
    reply = "4. Instruction: Name a river in Egypt.\n4. Input:\n<noinput>\n4. Output:\nThe Nile."
    assert triples(parse_alpaca_reply(reply, 4, "stop")) == [("Name a river in Egypt.", "", "The Nile.")]
    parsed = parse_alpaca_reply("###\n" + reply, 4, "stop")  # a fresh item: no empty label piece
    assert triples(parsed) == [("Name a river in Egypt.", "", "The Nile.")] and parsed.malformed == []


def test_any_consistent_number_is_accepted():
    reply = (" Name a river.\n4. Input:\n<noinput>\n4. Output:\nNile\n"
             "###\n9. Instruction: Name a sea.\n9. Input:\n<noinput>\n9. Output:\nRed Sea")
    assert [i.instruction for i in parse_alpaca_reply(reply, 4, "stop").items] == ["Name a river.", "Name a sea."]


def test_malformed_pieces_are_kept_with_their_raw_text():
    missing_output = "\n5. Instruction: Describe a sunset.\n5. Input:\n<noinput>\n"
    mixed_numbers = "\n6. Instruction: Name a colour.\n6. Input:\n<noinput>\n7. Output:\nRed\n"
    reply = " Name a fruit.\n4. Input:\n<noinput>\n4. Output:\nApple\n###" + missing_output + "###" + mixed_numbers
    parsed = parse_alpaca_reply(reply, 4, "stop")
    assert triples(parsed) == [("Name a fruit.", "", "Apple")]
    assert parsed.malformed == [
        (missing_output, "expected 'N. Instruction:', 'N. Input:', 'N. Output:' once each in that order; "
                         "found '5. Instruction:', '5. Input:'"),
        (mixed_numbers, "the fields carry different numbers: 6, 6, 7"),
    ]


def test_unparseable_and_empty_replies():
    chatty = "Let me add some more tasks for you."
    assert parse_alpaca_reply(chatty, 4, "stop").malformed == [
        ("4. Instruction:" + chatty, "expected 'N. Instruction:', 'N. Input:', 'N. Output:' once each in that "
                                     "order; found '4. Instruction:'"),
    ]
    assert parse_alpaca_reply("  \n", 4, "stop").malformed == [("  \n", "empty reply")]
    assert parse_alpaca_reply("###\n###", 4, "stop").malformed == [("###\n###", "no items in the reply")]


@pytest.mark.parametrize("preamble", ["Sure! Here are some more tasks for you.", "Here are 16 more tasks:"])
def test_a_chat_preamble_is_set_apart_and_the_list_after_it_kept(preamble):
    assert parse_alpaca_reply(preamble, 4, "stop") == ParsedReply(preamble=preamble)
    parsed = parse_alpaca_reply(f"{preamble}\n4. Instruction:{WELL_FORMED}", 4, "stop")
    assert parsed.preamble == preamble and parsed.malformed == []
    assert [i.instruction for i in parsed.items] == ["Name the largest planet in the solar system.",
                                                     "Summarize the paragraph in one sentence."]


def test_the_last_item_of_a_cut_off_reply_is_dropped():
    cut = "\n6. Instruction: Write a haiku about rain.\n6. Input:\n<noinput>\n6. Output:\nSoft rain on"
    parsed = parse_alpaca_reply(WELL_FORMED + cut, 4, "length")
    assert len(parsed.items) == 2 and parsed.cut_off == "\n" + cut and parsed.malformed == []
    assert len(parse_alpaca_reply(WELL_FORMED + cut, 4, "stop").items) == 3  # kept when not cut off
    # the reference drops the last piece even when it looks complete
    parsed = parse_alpaca_reply(WELL_FORMED.rstrip("#\n"), 4, "length")
    assert len(parsed.items) == 1 and parsed.cut_off.startswith("\n5. Instruction:")
    # a reply that stopped right after a separator loses nothing
    assert parse_alpaca_reply(WELL_FORMED, 4, "length").cut_off is None


# -- rules --------------------------------------------------------------------------------------


def item(instruction: str, output: str = "An answer.") -> AlpacaItem:
    return AlpacaItem(instruction, "", output)


@pytest.mark.parametrize(
    ("instruction", "reason"),
    [
        ("Compose a short video script about recycling.", "blacklisted word: video"),
        ("Transcribe the AUDIO of this lecture for me.", "blacklisted word: audio"),
        ("Recommend some relaxing music for studying tonight.", "blacklisted word: music"),
        ("Create a flowchart of the hiring process.", "blacklisted word: flowchart"),
        ("Sketch a diagram of the water cycle.", "blacklisted word: diagram"),
        ("Describe a musical instrument from Peru.", None),  # whole words only
        ("Draw a cat in the style of Picasso, please.", "blacklisted word: draw"),  # Self-Instruct's list too
        ("Name a planet.", "too short"),
        ("Write a program that prints the first ten primes.", "starts with 'Write a program'"),
        ("(Optional) Suggest a name for a bakery in Paris.", "starts with punctuation"),
        ("Ümlaut words: list three German examples here.", "starts with a non-ASCII character"),
        ("Suggest a name for a bakery in Paris.", None),
    ],
)
def test_instruction_rules_with_the_alpaca_blacklist(instruction, reason):
    assert item_reject_reason(item(instruction)) == reason


def test_empty_output_is_rejected():
    assert item_reject_reason(item("Suggest a name for a bakery in Paris.", output="")) == "empty output"


def test_alpaca_blacklist_extends_self_instructs():
    assert ALPACA_BLACKLIST[: len(REFERENCE_BLACKLIST)] == REFERENCE_BLACKLIST
    assert item_reject_reason(item("Recommend some relaxing music for studying."), REFERENCE_BLACKLIST) is None


# -- the loop, on replies pinned in the real request cache ---------------------------------------

LOOP_SEEDS = [*SEEDS, Task(id="seed_d", instruction="Write a limerick about a cat who loves boxes.",
                            instances=[Instance(output="There once was a cat named Lou...")])]
NOT_A_LIST = Completion("SUBTRAILED\n", "stop", 600, 4)


def replay_teacher(cache_dir: Path):
    """A real teacher that may only answer from its cache (the OpenAI backend is never reached)."""
    from datagen.teachers import TeacherConfig, make_teacher

    return make_teacher(TeacherConfig(backend="openai", base_url="http://127.0.0.1:9/v1", cache="only",
                                      cache_dir=str(cache_dir)))


def pin_batch(
    cache_dir: Path, settings: AlpacaConfig, seed: int, batch: int, replies: list[Completion]
) -> list[list[Task]]:
    """Store `replies` as the answers to batch `batch`'s prompts; returns the seeds each prompt shows."""
    rng = random.Random(f"alpaca:{seed}:{batch}")
    shown = [sample_prompt_tasks(LOOP_SEEDS, (), rng, settings.seeds_per_prompt, 0)
             for _ in range(settings.prompts_per_batch)]
    params = settings.sampling.model_copy(update={"seed": seed * 1_000_003 + batch, "n": 1})
    cache = RequestCache(cache_dir / "requests.sqlite")
    for tasks, reply in zip(shown, replies, strict=True):
        request = Request.build(alpaca_messages(tasks, settings.tasks_per_prompt), params)
        cache.put(request_key("openai", "smollm2-135m", request), reply)
    cache.close()
    return shown


BATCH0_PROMPT0 = (
    " Suggest a name for a new bakery in Paris.\n4. Input:\n<noinput>\n4. Output:\nLe Petit Croissant.\n"
    "###\n5. Instruction: Summarize the paragraph in one sentence.\n5. Input:\n"
    "Bees pollinate crops. Without them, many fruits would vanish.\n5. Output:\nBees matter for fruit.\n"
    "###\n6. Instruction: Recommend some relaxing music for a rainy afternoon.\n6. Input:\n<noinput>\n"
    "6. Output:\nTry Debussy.\n"
    "###\n7. Instruction: Suggest a name for a new bakery in Rome.\n7. Input:\n<noinput>\n7. Output:\nDolce Forno.\n"
    "###\n8. Instruction: Describe a sunset.\n8. Output:\nOrange sky.\n###\n"
)
BATCH0_PROMPT1 = (
    " Explain why the sky is blue during the day.\n4. Input:\n<noinput>\n4. Output:\nRayleigh scattering.\n"
    "###\n5. Instruction: Classify the sentiment of the review below.\n5. Input:\nGreat value.\n"
    "5. Output:\nPositive\n"
    "###\n6. Instruction: Write a haiku about the ocean.\n6. Input:\n<noinput>\n6. Output:\nWaves"
)


def test_loop_decisions_lineage_and_resume(tmp_path):
    settings = AlpacaConfig(prompts_per_batch=2, max_stalled_batches=2)
    cache_dir, out = tmp_path / "cache", tmp_path / "raw.jsonl"
    shown = pin_batch(cache_dir, settings, 7, 0, [
        Completion(BATCH0_PROMPT0, "stop", 600, 301), Completion(BATCH0_PROMPT1, "length", 580, 3072)])
    done: list[int] = []
    with replay_teacher(cache_dir) as teacher, TaskSink(out) as sink:
        context = RunContext(teacher, sink, num=2, seed=7, instances_per_task=5, on_batch_done=done.append)
        run_alpaca(LOOP_SEEDS, settings, context)
        assert teacher.stats.cache_hits == 2 and teacher.stats.requests_sent == 0
    assert done == [1]

    tasks = read_tasks(out)
    assert [(t.instruction, t.instances) for t in tasks] == [
        ("Suggest a name for a new bakery in Paris.", [Instance(input="", output="Le Petit Croissant.")]),
        (
            "Summarize the paragraph in one sentence.",
            [
                Instance(
                    input="Bees pollinate crops. Without them, many fruits would vanish.",
                    output="Bees matter for fruit.",
                )
            ],
        ),
    ]
    first = tasks[0]
    assert first.id == first.name == stable_id("alpaca", first.instruction) and not first.is_classification
    assert first.lineage.generator == "alpaca" and first.lineage.operation == "generate"
    assert first.lineage.parent_ids == [t.id for t in shown[0]]
    assert first.lineage.teacher_backend == "openai" and first.lineage.seed == 7
    assert first.lineage.sampling["seed"] == 7 * 1_000_003 and first.lineage.sampling["max_tokens"] == 3072
    assert first.lineage.usage.prompt_tokens == 300 and first.lineage.usage.completion_tokens == 150
    similar = first.lineage.most_similar
    assert list(similar) == sorted(similar, key=similar.get, reverse=True)  # best first
    assert len(similar) == 4 and set(similar) == {t.instruction for t in LOOP_SEEDS}
    assert len(tasks[1].lineage.most_similar) == 5  # the four seeds and the task before it in the batch

    rejects = [json.loads(line) for line in rejects_path(out).read_text().splitlines()]
    assert [(r["reason"], r["stage"]) for r in rejects] == [
        ("parse failure", "alpaca"),
        ("blacklisted word: music", "alpaca"),
        ("too similar to an existing instruction", "alpaca"),
        ("reply hit the length limit", "alpaca"),
        ("too similar to an existing instruction", "alpaca"),
        ("surplus beyond num", "alpaca"),
    ]
    assert rejects[0]["raw"] == "\n8. Instruction: Describe a sunset.\n8. Output:\nOrange sky.\n"
    assert rejects[1]["task"]["instruction"] == "Recommend some relaxing music for a rainy afternoon."
    assert rejects[2]["detail"].endswith("with: Suggest a name for a new bakery in Paris.")  # same batch
    assert rejects[3]["raw"].startswith("\n6. Instruction: Write a haiku about the ocean.")
    assert rejects[4]["detail"].endswith("with: Classify the sentiment of the review.")  # a seed
    assert rejects[5]["task"]["instruction"] == "Explain why the sky is blue during the day."

    # resume at batch 1: what is on disk counts toward num and is in the novelty pool
    pin_batch(cache_dir, settings, 7, 1, [Completion(BATCH0_PROMPT0.split("###")[0], "stop", 600, 30), NOT_A_LIST])
    pin_batch(cache_dir, settings, 7, 2, [NOT_A_LIST, NOT_A_LIST])
    with replay_teacher(cache_dir) as teacher, TaskSink(out) as sink:
        with pytest.raises(GenerationStalled, match="alpaca: 2 batches in a row produced no task.*2 of 3"):
            run_alpaca(
                LOOP_SEEDS,
                settings,
                RunContext(
                    teacher, sink, num=3, seed=7, instances_per_task=1, batches_done=1, on_batch_done=done.append
                ),
            )
    assert done == [1, 2, 3]
    assert read_tasks(out) == tasks
    more = [json.loads(line) for line in rejects_path(out).read_text().splitlines()][len(rejects) :]
    assert [r["reason"] for r in more] == ["too similar to an existing instruction"] + ["parse failure"] * 3
    assert more[0]["detail"] == "ROUGE-L 1.000 with: Suggest a name for a new bakery in Paris."
    assert more[1] == {
        "reason": "parse failure",
        "stage": "alpaca",
        "raw": "4. Instruction:SUBTRAILED\n",
        "detail": "expected 'N. Instruction:', 'N. Input:', 'N. Output:' once each in that order; "
        "found '4. Instruction:'",
        "batch": 1,
    }  # the resumed run's first batch


@pytest.mark.parametrize(
    ("instruction", "instance_input", "output", "copied"),
    [
        ("classify the  sentiment of the review", "Lovely staff.", "Positive", "Classify the sentiment of the review."),
        ("Rate the soup review from 1 to 5.", "the soup was cold and  bland.", "1", "The soup was cold and bland."),
        (
            "List some healthy habits.",
            "",
            "1. Eat a balanced diet. 2. Exercise regularly. 3. Sleep enough.",
            "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep enough.",
        ),
        # part of a shown output inside a longer one, or a shown input inside a longer input
        ("Suggest habits for a healthy week.", "", "Plan your meals.\nEat a balanced diet.\nWalk to work.",
         "Eat a balanced diet."),
        ("Summarise the complaint.", "Dinner review: the soup was cold and bland, the bread stale.", "Bad food.",
         "The soup was cold and bland."),
        # a few common words are not a copy
        ("Describe a relaxing evening.", "", "A warm soup, a balanced mix of music and quiet, then sleep.", None),
        # a shared label and a seed's second instance (never shown) are not copies
        ("Classify the sentiment of the tweet.", "Worst phone ever.", "Negative", None),
        ("Say what the seed's unseen example says.", "", "only the first instance is shown", None),
    ],
)
def test_an_item_copying_its_prompt(instruction, instance_input, output, copied):
    assert copied_from_prompt(AlpacaItem(instruction, instance_input, output), SEEDS, COPY_OVERLAP) == copied


def test_copies_and_inputs_shared_by_too_many_tasks_are_rejected_also_after_a_resume(tmp_path):
    settings = AlpacaConfig(prompts_per_batch=1, max_stalled_batches=1, max_other_tasks_per_input=1)
    rng = random.Random("alpaca:7:0")
    [shown] = [sample_prompt_tasks(LOOP_SEEDS, (), rng, settings.seeds_per_prompt, 0)]
    museum = "The museum opens at nine and closes at five on weekdays."
    reply = "".join(
        f"{'###' if n > 4 else ''}\n{n}. Instruction: {instruction}\n{n}. Input:\n{text}\n{n}. Output:\n{answer}\n"
        for n, (instruction, text, answer) in enumerate(
            [
                ("Say when the museum closes on a weekday.", museum, "At five."),
                ("How many hours is the museum open each weekday?", museum, "Eight hours."),
                ("Translate the notice into German for visitors.", f"  {museum.upper()} ", "Das Museum ..."),
                (shown[0].instruction, "A fresh input for the copied instruction.", "Something new."),
            ],
            start=4,
        )
    ).lstrip()
    cache_dir, out = tmp_path / "cache", tmp_path / "raw.jsonl"
    pin_batch(cache_dir, settings, 7, 0, [Completion(reply, "stop", 600, 200)])
    pin_batch(cache_dir, settings, 7, 1, [NOT_A_LIST])
    with replay_teacher(cache_dir) as teacher, TaskSink(out) as sink, pytest.raises(GenerationStalled):
        run_alpaca(LOOP_SEEDS, settings, RunContext(teacher, sink, num=10, seed=7, instances_per_task=1))
    assert [t.instruction for t in read_tasks(out)] == [
        "Say when the museum closes on a weekday.",
        "How many hours is the museum open each weekday?",
    ]
    rejects = [json.loads(line) for line in rejects_path(out).read_text().splitlines()]
    assert [(r["reason"], r["task"]["instruction"]) for r in rejects[:2]] == [
        ("input shared by too many tasks", "Translate the notice into German for visitors."),
        ("copies a demonstration", shown[0].instruction),
    ]
    assert rejects[1]["detail"] == f"shown in its prompt: {shown[0].instruction}"

    # resumed: the two tasks on disk already carry the museum input, so a third is rejected
    fresh = "\n4. Instruction: Write a polite reminder about the closing time.\n4. Input:\n" + museum
    pin_batch(cache_dir, settings, 7, 2, [Completion(fresh + "\n4. Output:\nWe close at five.\n###", "stop", 600, 20)])
    with replay_teacher(cache_dir) as teacher, TaskSink(out) as sink, pytest.raises(GenerationStalled):
        run_alpaca(
            LOOP_SEEDS, settings, RunContext(teacher, sink, num=10, seed=7, instances_per_task=1, batches_done=2)
        )
    more = [json.loads(line) for line in rejects_path(out).read_text().splitlines()][len(rejects) :]
    assert [(r["reason"], r["task"]["instruction"]) for r in more] == [
        ("input shared by too many tasks", "Write a polite reminder about the closing time.")
    ]


def test_seeds_without_instances_cannot_be_shown(tmp_path):
    with TaskSink(tmp_path / "raw.jsonl") as sink, pytest.raises(DatagenError, match="no seed task has an instance"):
        run_alpaca(
            [Task(id="bare", instruction="Name a colour.")],
            AlpacaConfig(),
            RunContext(None, sink, num=1, seed=0, instances_per_task=1),
        )


# -- a real run on the embedded model -------------------------------------------------------------


class Killed(Exception):
    pass


class KilledAfterReplies:
    """The real teacher, 'killed' right after its first batch of replies reached the cache."""

    def __init__(self, teacher):
        self.teacher, self.backend = teacher, teacher.backend

    def complete(self, conversations, params=None, progress=None):
        self.teacher.complete(conversations, params, progress)
        raise Killed


def test_end_to_end_on_the_embedded_model_with_resume(tmp_path, recorded):
    """The embedded model's replies, recorded (tests/recorded.py): kill, resume and replay run on real text."""
    from datagen.teachers import TeacherConfig

    recording = recorded("alpaca_end_to_end")

    seeds = read_tasks(Path("datagen/data/seed_tasks.jsonl"))
    settings = AlpacaConfig(
        prompts_per_batch=2,
        max_stalled_batches=6,
        sampling=SamplingParams(temperature=0.7, top_p=1.0, max_tokens=300, stop=("\n20", "20.")),
        batches_ahead=1,  # the kill below comes after batch 0's replies: no window ahead
    )
    teacher_config = TeacherConfig(backend="local", cache_dir=str(tmp_path / "cache"), batch_size=4)
    out = tmp_path / "raw.jsonl"

    # 1. a run killed after batch 0's replies were cached, before anything was written
    with recording.teacher(teacher_config) as teacher, TaskSink(out) as sink:
        with pytest.raises(Killed):
            run_alpaca(
                seeds, settings, RunContext(KilledAfterReplies(teacher), sink, num=1, seed=0, instances_per_task=1)
            )
        killed_requests = teacher.stats.requests_sent
    assert killed_requests == 2

    # 2. the rerun (same cache, same output) answers batch 0 from the cache
    sent_after_batch: dict[int, int] = {}
    with recording.teacher(teacher_config) as teacher, TaskSink(out) as sink:
        try:
            run_alpaca(
                seeds,
                settings,
                RunContext(
                    teacher,
                    sink,
                    num=1,
                    seed=0,
                    instances_per_task=1,
                    on_batch_done=lambda n: sent_after_batch.setdefault(n, teacher.stats.requests_sent),
                ),
            )
            stalled = False
        except GenerationStalled:
            stalled = True
        first_run = teacher.stats
    assert sent_after_batch[1] == 0 and first_run.cache_hits == 2
    # the 135M teacher does not write a usable Alpaca list in six batches (recorded, so always
    # the same run): the loop stops as stalled and every item it rejected is kept with its reason;
    # the lineage of accepted tasks is pinned by test_loop_decisions_lineage_and_resume
    assert stalled and len(sent_after_batch) == settings.max_stalled_batches

    assert list(read_records(out, Task)) == []  # read_tasks refuses an empty file
    rejects = [json.loads(line) for line in rejects_path(out).read_text().splitlines()]
    assert len(rejects) == 46
    assert {r["reason"] for r in rejects} == {"empty output", "parse failure", "reply hit the length limit",
                                              "too short"}
    for reject in rejects:
        assert reject["stage"] == "alpaca"
        assert reject.get("raw") is not None or reject.get("detail")

    # 3. the same run into a fresh output replays every batch from the cache, decision for decision
    replay = tmp_path / "replay" / "raw.jsonl"
    replay.parent.mkdir()
    with recording.teacher(teacher_config) as teacher, TaskSink(replay) as sink:
        try:
            run_alpaca(seeds, settings, RunContext(teacher, sink, num=1, seed=0, instances_per_task=1))
        except GenerationStalled:
            pass
        assert teacher.stats.requests_sent == 0
    assert replay.read_text() == out.read_text()
    assert rejects_path(replay).read_text() == rejects_path(out).read_text()


# -- batches answered ahead (batches_ahead): the same run, fewer teacher calls --------------------

class SeededScript:
    """A Backend answering with `alpaca_reply(prompt, sampling seed)`; records each call's
    request keys. With `die_at` (call number, 1-based) it answers half of that call, then raises."""

    name, model = "scripted", "script"

    def __init__(self, die_at: int | None = None):
        from datagen.teachers.base import BackendCounters

        self.counters, self.die_at = BackendCounters(), die_at
        self.calls: list[list[str]] = []
        self.answered: list[str] = []

    def generate(self, requests, on_result) -> None:
        self.calls.append([request_key(self.name, self.model, r) for r in requests])
        for index, request in enumerate(requests):
            if len(self.calls) == self.die_at and index == len(requests) // 2:
                raise RuntimeError("teacher killed")
            on_result(index, alpaca_reply(request.messages[-1][1], str(request.params.seed)))
            self.answered.append(self.calls[-1][index])

    def sent(self) -> list[str]:
        return [key for call in self.calls for key in call]

    def close(self) -> None:
        pass


def alpaca_run(tmp_path: Path, name: str, backend: SeededScript, batches_ahead: int, num: int = 40):
    """`datagen generate --method alpaca` into tmp_path/name.jsonl with its own cache; the summary."""
    from datagen.config_file import Config
    from datagen.generate import run_generate
    from datagen.io import write_jsonl_atomic
    from datagen.teachers.teacher import Teacher

    seeds = tmp_path / "seeds.jsonl"
    if not seeds.exists():
        write_jsonl_atomic(seeds, [*LOOP_SEEDS, *(Task(id=f"seed_{w}", instruction=f"Name a {w} you like.",
                                                       instances=[Instance(output=f"The {w}.")]) for w in WORDS[:4])])
    config = Config.model_validate({
        "teacher": {"cache_dir": str(tmp_path / f"cache-{name}")},
        "generate": {"method": "alpaca", "seeds": str(seeds), "out": str(tmp_path / f"{name}.jsonl"), "num": num,
                     "seed": 3, "alpaca": {"prompts_per_batch": 2, "batches_ahead": batches_ahead}},
    })
    return run_generate(config, "test", lambda: Teacher(backend, config.teacher))


def written(tmp_path: Path, name: str) -> tuple[bytes, bytes]:
    out = tmp_path / f"{name}.jsonl"
    return out.read_bytes(), rejects_path(out).read_bytes()


RECORD_FIELDS = ("tasks_total", "tasks_produced", "parse_failures", "rejects_by_reason")


def test_batches_answered_ahead_give_the_same_run_in_fewer_teacher_calls(tmp_path):
    one, ahead = SeededScript(), SeededScript()
    by_one = alpaca_run(tmp_path, "one", one, batches_ahead=1)
    by_three = alpaca_run(tmp_path, "three", ahead, batches_ahead=3)

    assert written(tmp_path, "three") == written(tmp_path, "one")
    assert {k: by_three[k] for k in RECORD_FIELDS} == {k: by_one[k] for k in RECORD_FIELDS}
    batches = len(one.calls)  # one call a batch, 2 requests each
    assert batches >= 5 and {len(call) for call in one.calls} == {2}
    assert len(ahead.calls) == -(-batches // 3) and {len(call) for call in ahead.calls} == {6}
    # every request of the one-at-a-time run went out once, in the windows; the rest is at
    # most the last window's unneeded batches
    assert set(one.sent()) <= set(ahead.sent()) and len(ahead.sent()) - len(one.sent()) <= 2 * 2
    assert len(set(ahead.sent())) == len(ahead.sent())


def test_a_run_killed_inside_a_window_resumes_to_the_same_run_without_asking_twice(tmp_path):
    whole = SeededScript()
    alpaca_run(tmp_path, "whole", whole, batches_ahead=3)
    assert len(whole.calls) >= 3

    killed = SeededScript(die_at=2)  # half of the second window reaches the cache, then the kill
    with pytest.raises(RuntimeError, match="teacher killed"):
        alpaca_run(tmp_path, "killed", killed, batches_ahead=3)
    assert len(read_tasks(tmp_path / "killed.jsonl")) > 0  # the first window's batches were flushed
    rerun = SeededScript()
    alpaca_run(tmp_path, "killed", rerun, batches_ahead=3)

    assert written(tmp_path, "killed") == written(tmp_path, "whole")
    assert len(killed.answered) < len(killed.sent())
    assert sorted(killed.answered + rerun.sent()) == sorted(whole.sent())


def test_an_extended_run_sends_the_same_groups_of_requests_as_an_uninterrupted_one(tmp_path):
    # a batched engine's reply depends on its batch: windows must not shift with where a run starts
    whole = SeededScript()
    alpaca_run(tmp_path, "whole", whole, batches_ahead=3)
    short, longer = SeededScript(), SeededScript()
    alpaca_run(tmp_path, "grown", short, batches_ahead=3, num=6)
    alpaca_run(tmp_path, "grown", longer, batches_ahead=3)  # (its tasks differ: num 6 cut a batch short)
    grouped = [set(call) for call in whole.calls]
    assert all(set(call) in grouped for call in short.calls)
    # the extended run re-asks nothing; its first window is the rest of the group it stopped in
    assert not set(longer.sent()) & set(short.sent())
    assert longer.calls and all(set(call) in grouped for call in longer.calls)


def test_no_window_without_a_cache_that_reads_and_writes(tmp_path):
    from datagen.generators.alpaca import batches_window
    from datagen.teachers import TeacherConfig
    from datagen.teachers.teacher import Teacher

    settings = AlpacaConfig(prompts_per_batch=5, batches_ahead=3)
    for cache, lookahead, window in [("use", 0, 3), ("use", 32, 7), ("off", 32, 1), ("only", 0, 1)]:
        teacher = Teacher(SeededScript(), TeacherConfig(cache=cache, cache_dir=str(tmp_path)))
        assert batches_window(settings, RunContext(teacher, None, num=1, lookahead=lookahead)) == window
        teacher.close()
