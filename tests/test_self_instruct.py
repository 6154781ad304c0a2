"""Self-Instruct: exact prompts, exact parses, every reference filter rule, a real run, resume."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datagen.config import SamplingParams
from datagen.generators.alpaca import AlpacaConfig
from datagen.generators.common import COPY_OVERLAP, InputTally, RunContext, TaskSink
from datagen.generators.self_instruct import (
    INPUT_FIRST_DEMONSTRATIONS,
    INSTANCE_STOP,
    OUTPUT_FIRST_DEMONSTRATIONS,
    GenerationStalled,
    SelfInstructConfig,
    _add_instances,
    _Candidate,
    _InputUse,
    _more_prompts,
    _screen_reply,
    _take_instances,
    bootstrap_messages,
    classification_messages,
    continue_opening,
    copied_demonstration,
    copied_instruction,
    has_conflicting_outputs,
    instance_messages,
    instance_reject_reason,
    instruction_reject_reason,
    more_instances_messages,
    parse_bootstrap_reply,
    parse_classification_reply,
    parse_instances,
    sample_prompt_tasks,
)
from datagen.io import read_tasks, rejects_path
from datagen.records import Instance, Task
from datagen.teachers import TeacherConfig
from datagen.teachers.base import Completion
from datagen.teachers.cache import RequestCache
from datagen.teachers.teacher import Teacher
from tests.helpers import ScriptedBackend, SimulatedEngine, run_cli
from tests.recorded import hung_marker

REPOSITORY = Path(__file__).parent.parent  # `python -m tests.recorded` runs from here

HEADER = (
    "Below is a numbered list of varied tasks that a person could ask a capable AI assistant to do. "
    "Continue the list with new tasks that differ from the ones already listed in topic and in kind. "
    "Write every task as a single instruction on its own numbered line.\n\n"
)


def test_bootstrap_prompt_is_pinned():
    [message] = bootstrap_messages(["Say hi to the user:", "Add  two\nnumbers.", "Name a river."])
    assert message == {
        "role": "user",
        "content": HEADER + "1. Say hi to the user\n2. Add two numbers.\n3. Name a river.\n4.",
    }


def test_classification_and_instance_prompts_end_with_the_task():
    [message] = classification_messages("Is the email spam or not spam?")
    assert message["content"].endswith("Classification: Yes\n\nTask: Is the email spam or not spam?\nClassification:")
    assert message["content"].startswith("For each task, decide whether it is a classification task")
    [message] = instance_messages("Sort the numbers.", is_classification=False)
    assert message["content"].startswith("Write examples for each task.")
    assert message["content"].endswith("Output: Curiosity\n\nTask: Sort the numbers.")
    [message] = instance_messages("Is it even or odd?", is_classification=True)
    assert message["content"].endswith("Class label: Neither, they weigh the same.\n\nTask: Is it even or odd?")


def test_prompt_mixes_six_seeds_and_two_generated_tasks():
    seeds = [Task(id=f"s{i}", instruction=f"seed {i}") for i in range(20)]
    machine = [Task(id=f"m{i}", instruction=f"machine {i}") for i in range(5)]
    chosen = sample_prompt_tasks(seeds, machine, random.Random(0), total=8, from_machine=2)
    assert len(chosen) == 8 and sum(t.id.startswith("m") for t in chosen) == 2
    early = sample_prompt_tasks(seeds, machine[:1], random.Random(0), total=8, from_machine=2)
    assert sum(t.id.startswith("m") for t in early) == 1 and len(early) == 8


@pytest.mark.parametrize(
    ("reply", "instructions", "preamble"),
    [
        (" Plan a picnic for six people.\n10. Explain how tides work.\n11 . Name three uses of baking soda.",
         ["Plan a picnic for six people.", "Explain how tides work.", "Name three uses of baking soda."], None),
        ("9. describe the  water cycle\nin simple words.\n10. List four   jazz musicians.",
         ["Describe the water cycle in simple words.", "List four jazz musicians."], None),
        ("Here are some more tasks:\n9. Give a synonym for happy.\n10. Count vowels in a word.",
         ["Give a synonym for happy.", "Count vowels in a word."], "Here are some more tasks:"),
        ("", [], None),
        # the "\n\n" stop cuts a chat reply right after its preamble
        ("Sure! Here are more tasks:", [], "Sure! Here are more tasks:"),
        ("Here are 7 more tasks:", [], "Here are 7 more tasks:"),
        ("Certainly, here you go.", [], "Certainly, here you go."),
        ("Sure! Here are some more:\n9. Give a synonym for happy.", ["Give a synonym for happy."],
         "Sure! Here are some more:"),
        # an instruction that ends with ':' is not a preamble
        (" Rewrite the following sentence in the passive voice:",
         ["Rewrite the following sentence in the passive voice:"], None),
        (" Surely you can name three rivers in Africa?", ["Surely you can name three rivers in Africa?"], None),
    ],
)
def test_bootstrap_reply_parse(reply, instructions, preamble):
    assert parse_bootstrap_reply(reply) == (instructions, preamble)


def _screen(tmp_path, text, shown=(), settings=None):
    from datagen.generators.common import InstructionPool
    from datagen.teachers.base import Completion

    sink = TaskSink(tmp_path / "raw.jsonl")
    shown = [Task(id=f"s{n}", instruction=instruction) for n, instruction in enumerate(shown)]
    kept = _screen_reply(Completion(text, "stop", 10, 10), shown, settings or SelfInstructConfig(), sink,
                         InstructionPool())
    sink.flush()
    rejects = [json.loads(line) for line in rejects_path(tmp_path / "raw.jsonl").read_text().splitlines()]
    return [c.instruction for c in kept], [(r["reason"], r.get("raw"), r.get("detail")) for r in rejects]


def test_a_reply_that_is_only_a_preamble_is_one_preamble_reject(tmp_path):
    assert _screen(tmp_path, "Sure! Here are more tasks:") == (
        [], [("chat preamble", "Sure! Here are more tasks:", None)])


def test_an_instruction_copied_from_the_prompt_is_rejected(tmp_path):
    shown = ["Name a river in  Europe:", "Translate the sentence into French."]
    assert copied_instruction("name a river in Europe", shown) == "Name a river in  Europe:"
    assert copied_instruction("Name a river in Asia.", shown) is None
    # the similarity threshold allows exact copies at 1.0; the copy rule still catches them
    settings = SelfInstructConfig(similarity_threshold=1.0)
    kept, rejects = _screen(tmp_path, " Translate the sentence into  french.\n10. Name a mountain in South America.",
                            shown, settings)
    assert kept == ["Name a mountain in South America."]
    assert rejects == [("copies a demonstration", "Translate the sentence into french.",
                        "shown in its prompt: Translate the sentence into French.")]


def test_classification_reply():
    assert parse_classification_reply(" Yes") is True
    assert parse_classification_reply("No") is False


@pytest.mark.parametrize(
    ("instruction", "reason"),
    [
        ("Sort the list.", "too short"),
        ("Tell me a joke now", None),
        (" ".join(["word"] * 151), "too long"),
        (" ".join(["word"] * 150), None),
        ("Describe the image of a sunset over the sea.", "blacklisted word: image"),
        ("Describe the IMAGES of a sunset over the sea.", "blacklisted word: images"),
        ("Plot the sales for the last four quarters.", "blacklisted word: plot"),
        ("Please go to the store and buy milk.", "blacklisted word: go to"),
        ("Explain the plotline of the novel Dune.", None),  # whole words only
        ("Write a program that sorts a list of numbers.", "starts with 'Write a program'"),
        ("\"Quote\" the famous speech by Lincoln here.", "starts with punctuation"),
        ("Éxplain why the sky looks blue at noon.", "starts with a non-ASCII character"),
    ],
)
def test_reference_instruction_rules(instruction, reason):
    assert instruction_reject_reason(instruction) == reason


def test_alpaca_blacklist_is_a_parameter():
    words = ("video", "audio", "music", "flowchart", "diagram")
    assert instruction_reject_reason("Describe the music of the Baroque era.", words) == "blacklisted word: music"


@pytest.mark.parametrize(
    ("reply", "lenient", "reference"),
    [(" Yes", True, True), ("YES", True, True), ("Yes.", True, False), ("yes, it is", True, False),
     ("No", False, False), ("Not really", False, False)],
)
def test_classification_match_lenient_and_reference(reply, lenient, reference):
    assert parse_classification_reply(reply) is lenient
    assert parse_classification_reply(reply, "lenient") is lenient
    assert parse_classification_reply(reply, "reference") is reference


def test_input_first_parse_drops_the_cut_off_last_instance():
    reply = "Example 1\nInput: 3, 1, 2\nOutput: 1, 2, 3\nExample 2\nInput: 9, 7\nOutput: 7, 9\nExample 3\nInput: 5, 4"
    assert parse_instances(reply, False, "stop") == [
        Instance(input="3, 1, 2", output="1, 2, 3"), Instance(input="9, 7", output="7, 9"),
        Instance(input="", output=""),  # as the reference parses an input with no output; filtered later
    ]
    assert parse_instances(reply, False, "length") == [
        Instance(input="3, 1, 2", output="1, 2, 3"), Instance(input="9, 7", output="7, 9"),
    ]
    assert parse_instances("Output: Breathe deeply and count to ten.", False, "stop") == [
        Instance(input="", output="Breathe deeply and count to ten."),
    ]
    assert parse_instances("I cannot think of any.", False, "stop") is None


def test_output_first_parse():
    reply = ("Class label: positive\nInput: I loved it.\nClass label: negative\nInput: Never again.\n"
             "Class label: neutral")
    assert parse_instances(reply, True, "stop") == [
        Instance(input="I loved it.", output="positive"),
        Instance(input="Never again.", output="negative"),
        Instance(input="", output="neutral"),
    ]
    assert parse_instances("positive", True, "stop") is None


@pytest.mark.parametrize(
    ("instance", "reason"),
    [
        (Instance(input="same", output="same"), "input equals output"),
        (Instance(input="x", output=""), "empty output"),
        (Instance(input="List:", output="a"), "input or output ends with ':'"),
        (Instance(input="a", output="Answer:"), "input or output ends with ':'"),
        (Instance(input="2+2", output="4"), None),
    ],
)
def test_instance_rules(instance, reason):
    assert instance_reject_reason(instance) == reason


def test_same_input_different_output_drops_the_task():
    assert has_conflicting_outputs([Instance(input="a", output="1"), Instance(input="a", output="2")])
    assert not has_conflicting_outputs([Instance(input="", output="1"), Instance(input="", output="2")])
    assert not has_conflicting_outputs([Instance(input="a", output="1"), Instance(input="b", output="1")])


def test_more_instances_prompt_is_pinned():
    shown = [Instance(input="3, 1, 2", output="1, 2, 3"), Instance(input="9, 7", output="7, 9")]
    [message], opening = more_instances_messages("Sort the numbers.", shown, False, None)
    assert opening == "Example 3\nInput:"
    assert message["content"] == (
        "Below is a task with some examples. Write more examples for it: each one gives an input and "
        "then the correct output for that input. Every new input must differ from all the inputs shown.\n\n"
        "Task: Sort the numbers.\nExample 1\nInput: 3, 1, 2\nOutput: 1, 2, 3\n"
        "Example 2\nInput: 9, 7\nOutput: 7, 9\nExample 3\nInput:"
    )
    shown = [Instance(input="48", output="even")]
    [message], opening = more_instances_messages("Even or odd?", shown, True, "odd")
    assert message["content"].startswith("Below is a classification task with some labelled examples.")
    assert message["content"].endswith("Task: Even or odd?\nClass label: even\nInput: 48\nClass label: odd\nInput:")
    assert more_instances_messages("Even or odd?", shown, True, None)[1] == "Class label:"


def test_a_reply_continues_the_opening_unless_it_restarts_the_example():
    opening = "Example 3\nInput:"
    text = continue_opening(" 5, 4\nOutput: 4, 5\nExample 4\nInput: 2, 0\nOutput: 0, 2", opening)
    assert [(i.input, i.output) for i in parse_instances(text, False, "stop")] == [("5, 4", "4, 5"), ("2, 0", "0, 2")]
    text = continue_opening("Example 3\nInput: 8, 6\nOutput: 6, 8", opening)
    assert [(i.input, i.output) for i in parse_instances(text, False, "stop")] == [("8, 6", "6, 8")]
    text = continue_opening(" 31\nClass label: even\nInput: 10", "Class label: odd\nInput:")
    assert [(i.input, i.output) for i in parse_instances(text, True, "stop")] == [("31", "odd"), ("10", "even")]
    text = continue_opening(" even\nInput: 12", "Class label:")
    assert [(i.input, i.output) for i in parse_instances(text, True, "stop")] == [("12", "even")]


def test_instance_prompts_show_the_demonstrations_the_copy_rule_checks():
    [message] = instance_messages("Sort the numbers.", is_classification=False)
    for demonstration in INPUT_FIRST_DEMONSTRATIONS:
        assert f"Task: {demonstration.instruction}\n" in message["content"]
        for example in demonstration.instances:
            assert f"Output: {example.output}\n" in message["content"]
            assert not example.input or f"Input: {example.input}\n" in message["content"]
    [message] = instance_messages("Even or odd?", is_classification=True)
    for demonstration in OUTPUT_FIRST_DEMONSTRATIONS:
        for example in demonstration.instances:
            assert f"Class label: {example.output}\n" in message["content"]


@pytest.mark.parametrize(
    ("instance", "copied"),
    [
        # the demo's inputs and outputs from `make demo`: pasted as input or as output
        (
            Instance(
                input="1. Keep your phone in another room. 2. Work in blocks of 25 minutes with short "
                "breaks. 3. Tidy your desk before you start.",
                output="Done.",
            ),
            "1. Keep your phone in another room. 2. Work in blocks of 25 minutes with short breaks. "
            "3. Tidy your desk before you start.",
        ),
        (
            Instance(input="Write a sentence about an animal.", output="The  elephant walked slowly across the FIELD."),
            "The elephant walked slowly across the field.",
        ),
        (Instance(input="curiosity drives discovery.", output="3"), "Curiosity drives discovery."),
        # partial copies, as `make demo` kept them: a demonstration's sentence inside a longer text
        (
            Instance(output="Tips for better sleep:\n1. Keep your phone in another room.\n2. Go to bed at the same "
                            "time every night.\n3. Avoid coffee after lunch."),
            "Keep your phone in another room.",
        ),
        (
            Instance(input="The elephant walked slowly across the dusty road to the river.", output="11"),
            "The elephant walked slowly across the field.",
        ),
        # sharing a few common words is not copying
        (Instance(output="Put your phone away, keep the room quiet and start with the hardest task."), None),
        (Instance(input="Before you start, tidy up the kitchen.", output="Tidy the kitchen first."), None),
        (Instance(input="Curiosity drives discovery in science and art.", output="9"), None),
        # short texts (labels, numbers, one word) are shared by design
        (Instance(input="An elephant is big.", output="elephant"), None),
        (Instance(input="25 °C", output="298 K"), None),
        (Instance(input="The tiger ran quickly across the road.", output="tiger"), None),
    ],
)
def test_copied_demonstration(instance, copied):
    assert copied_demonstration(instance, INPUT_FIRST_DEMONSTRATIONS, COPY_OVERLAP) == copied


def test_copy_overlap_is_a_threshold_on_the_sentence_share():
    partial = Instance(output="Step one: keep your phone in the hallway, not your room.")
    # shares "keep your phone" and "your phone in" of the sentence's four trigrams
    assert copied_demonstration(partial, INPUT_FIRST_DEMONSTRATIONS, COPY_OVERLAP) is None
    assert copied_demonstration(partial, INPUT_FIRST_DEMONSTRATIONS, 0.5) == "Keep your phone in another room."
    # on by default in both generators that show demonstrations; null turns it off (whole copies only)
    assert SelfInstructConfig().copy_overlap == AlpacaConfig().copy_overlap == COPY_OVERLAP
    assert SelfInstructConfig(copy_overlap=None).copy_overlap is None
    whole_list = Instance(output="Tips:\n1. Keep your phone in another room.\n2. Sleep early.")
    assert copied_demonstration(whole_list, INPUT_FIRST_DEMONSTRATIONS) is None
    with pytest.raises(ValueError):
        SelfInstructConfig(copy_overlap=0)


def test_an_instance_copying_its_prompt_is_rejected_with_its_own_reason(tmp_path):
    from datagen.teachers.base import Completion

    sink = TaskSink(tmp_path / "raw.jsonl")
    candidate = _candidate([], False)
    candidate.instruction = "Count the words in the sentence."
    reply = (
        "Example 1\nInput: The elephant walked slowly across the field.\nOutput: 7\n"
        "Example 2\nInput: Rain fell all night.\nOutput: 4"
    )
    _take_instances(
        candidate, Completion(reply, "stop", 1, 1), "", False, sink, demonstrations=INPUT_FIRST_DEMONSTRATIONS
    )
    assert candidate.instances == [Instance(input="Rain fell all night.", output="4")]
    sink.flush()
    [reject] = [json.loads(line) for line in rejects_path(tmp_path / "raw.jsonl").read_text().splitlines()]
    assert reject["reason"] == "instance: copies a demonstration" and reject["stage"] == "instances"
    assert json.loads(reject["raw"]) == {
        "input": "The elephant walked slowly across the field.",
        "output": "7",
        "explanation": None,
    }
    assert reject["detail"] == (
        "Count the words in the sentence. | shown in its prompt: The elephant walked slowly across the field."
    )
    # the more-prompt shows the task's own instances: no demonstrations to compare with
    _take_instances(candidate, Completion(" Snow fell.\nOutput: 2", "stop", 1, 1), "Example 2\nInput:", True, sink)
    assert candidate.instances[-1] == Instance(input="Snow fell.", output="2")


def test_an_input_shared_by_more_than_k_other_tasks_is_rejected(tmp_path):
    from datagen.teachers.base import Completion

    on_disk = [
        Task(
            id=f"t{n}",
            instruction=f"Task {n}.",
            instances=[Instance(input="Shared  TEXT here", output="x"), Instance(input="Shared text here", output="y")],
        )
        for n in range(2)
    ]
    inputs = _InputUse(InputTally(on_disk), limit=2)
    sink = TaskSink(tmp_path / "raw.jsonl")
    first, second = _candidate([], False), _candidate([], False)
    reply = Completion(
        "Example 1\nInput: shared text here\nOutput: 1\nExample 2\nInput: Own text.\nOutput: 2", "stop", 1, 1
    )
    _take_instances(first, reply, "", False, sink, inputs=inputs)  # 2 other tasks carry it: allowed
    assert [i.input for i in first.instances] == ["shared text here", "Own text."]
    assert inputs.reason(first, "Shared text here") is None  # its own use does not count against it
    _take_instances(second, reply, "", False, sink, inputs=inputs)  # 2 on disk + the first candidate
    assert [i.input for i in second.instances] == ["Own text."]
    sink.flush()
    reasons = [json.loads(line)["reason"] for line in rejects_path(tmp_path / "raw.jsonl").read_text().splitlines()]
    assert reasons == ["instance: input shared by too many tasks"]
    stricter = _InputUse(InputTally(on_disk), limit=1)
    assert stricter.reason(second, "Shared text here") == "input shared by too many tasks"
    assert _InputUse(InputTally(on_disk), limit=0).reason(second, "  ") is None  # an empty input is never shared


def scripted_backend(unparseable_reverse: bool = False) -> ScriptedBackend:
    """Instant replies: two instructions per bootstrap prompt, "No" to the classification
    check, and one instance on the input "banana" (the word-reversing task's reply cannot
    be parsed when `unparseable_reverse`)."""

    def reply(prompt: str) -> Completion:
        if prompt.startswith("Below is a numbered list"):
            text = " Count the vowels in the given word.\n10. Reverse the letters of the given word."
        elif prompt.startswith("For each task, decide"):
            text = "No"
        elif prompt.endswith("Task: Reverse the letters of the given word.") and unparseable_reverse:
            text = "I do not know."
        elif prompt.startswith("Below is a task with some examples."):  # a later round
            text = " The elephant walked slowly across the field.\nOutput: 7"
        else:
            text = "Example 1\nInput: banana\nOutput: " + ("3" if "vowels" in prompt[-40:] else "ananab")
        return Completion(text, "stop", 10, 5)

    return ScriptedBackend(reply, name="scripted", model="scripted")


def run_scripted(out: Path, num: int, backend=None, instances_per_task=1, **settings) -> list[tuple[str, str]]:
    """Run the loop on `scripted_backend()`; the (reason, instruction or raw) of every reject."""
    from datagen.generators.self_instruct import run_self_instruct
    from datagen.io import read_records
    from datagen.records import Reject
    from datagen.teachers.teacher import Teacher

    seeds = [
        Task(id=f"seed{n}", instruction=text)
        for n, text in enumerate(
            ["Name a famous painter from Spain.", "Suggest a title for a mystery novel.", "Explain how rainbows form."]
        )
    ]
    config = SelfInstructConfig(prompts_per_batch=1, max_stalled_batches=1, **settings)
    teacher = Teacher(backend or scripted_backend(), TeacherConfig(cache="off"))
    with TaskSink(out) as sink:
        try:
            run_self_instruct(
                seeds, config, RunContext(teacher, sink, num=num, seed=0, instances_per_task=instances_per_task)
            )
        except GenerationStalled:
            pass
    rejects = read_records(rejects_path(out), Reject) if rejects_path(out).exists() else []
    return [(r.reason, r.task.instruction if r.task else r.raw) for r in rejects]


def test_candidates_beyond_num_are_rejects(tmp_path):
    rejects = run_scripted(tmp_path / "raw.jsonl", num=1)
    assert [t.instruction for t in read_tasks(tmp_path / "raw.jsonl")] == ["Count the vowels in the given word."]
    assert rejects == [("surplus beyond num", "Reverse the letters of the given word.")]


def test_a_later_round_copying_the_first_rounds_demonstrations_is_rejected(tmp_path):
    rejects = run_scripted(tmp_path / "raw.jsonl", num=1, instances_per_task=2, max_instance_rounds=2)
    copied = [raw for reason, raw in rejects if reason == "instance: copies a demonstration"]
    assert copied and all(json.loads(raw)["input"] == "The elephant walked slowly across the field." for raw in copied)
    [task] = read_tasks(tmp_path / "raw.jsonl")
    assert task.instances == [Instance(input="banana", output="3")]


def test_the_shared_input_count_is_rebuilt_from_the_output_on_resume(tmp_path):
    out = tmp_path / "raw.jsonl"
    rejects = run_scripted(out, num=2, max_other_tasks_per_input=0)
    # the second candidate of the batch pastes the first one's input
    assert [t.instruction for t in read_tasks(out)] == ["Count the vowels in the given word."]
    assert (
        "instance: input shared by too many tasks",
        '{"input":"banana","output":"ananab","explanation":null}',
    ) in rejects
    # a fresh run over an OUT whose task already carries "banana" decides the same for both
    out2 = tmp_path / "resumed.jsonl"
    out2.write_text(
        Task(
            id="old",
            instruction="Spell the given word backwards, letter by letter.",
            instances=[Instance(input="Banana", output="ananaB")],
        ).to_json()
        + "\n"
    )
    rejects = run_scripted(out2, num=3, max_other_tasks_per_input=0)
    assert [t.id for t in read_tasks(out2)] == ["old"]
    assert [r for r in rejects if r[0] == "no valid instances"] == [
        ("no valid instances", "Count the vowels in the given word."),
        ("no valid instances", "Reverse the letters of the given word."),
    ]
    assert (
        run_scripted(tmp_path / "loose.jsonl", num=3, max_other_tasks_per_input=1).count(
            ("no valid instances", "Count the vowels in the given word.")
        )
        == 0
    )


@pytest.mark.parametrize(
    ("pool", "second_run"),
    [("accepted", "no valid instances"), ("reference", "too similar to an existing instruction")],
)
def test_novelty_pool_keeps_candidates_that_failed_at_the_instance_step_when_asked(tmp_path, pool, second_run):
    out = tmp_path / "raw.jsonl"
    first = run_scripted(out, num=3, backend=scripted_backend(unparseable_reverse=True), novelty_pool=pool)
    assert ("no valid instances", "Reverse the letters of the given word.") in first
    # rerun over the same OUT: the pool is rebuilt from OUT (and, for "reference", its rejects)
    second = run_scripted(out, num=3, backend=scripted_backend(unparseable_reverse=True), novelty_pool=pool)[
        len(first) :
    ]
    assert [reason for reason, text in second if "Reverse" in (text or "")] == [second_run]


def _candidate(instances, is_classification):
    return _Candidate("Even or odd?", [], None, 1, {}, 0.0, instances=instances, is_classification=is_classification)


def test_more_prompts_ask_for_the_rarest_label_first_and_leave_one_open():
    settings = SelfInstructConfig(more_prompts_per_task=3, more_samples_per_prompt=4)
    candidate = _candidate([Instance(input=str(n), output="even" if n % 2 == 0 else "odd") for n in (2, 4, 6, 3)], True)
    prompts = _more_prompts(candidate, target=30, settings=settings, rng=random.Random(0))
    assert [opening for _, opening in prompts] == [
        "Class label: odd\nInput:",
        "Class label: even\nInput:",
        "Class label:",
    ]
    # fewer prompts when little is missing: one sample batch covers 3 more instances
    assert len(_more_prompts(candidate, target=7, settings=settings, rng=random.Random(0))) == 1


def test_more_prompts_are_distinct_so_cached_samples_are_not_reused():
    settings = SelfInstructConfig(more_prompts_per_task=4, more_samples_per_prompt=2)
    candidate = _candidate([Instance(input="3, 1", output="1, 3")], False)
    assert len(_more_prompts(candidate, target=30, settings=settings, rng=random.Random(0))) == 1
    candidate = _candidate([Instance(input=f"{n}, 1", output=f"1, {n}") for n in range(2, 9)], False)
    prompts = _more_prompts(candidate, target=30, settings=settings, rng=random.Random(0))
    assert len(prompts) == 4 and len({p[0][0]["content"] for p in prompts}) == 4


TINY = """\
teacher: {{backend: local, batch_size: 4, cache_dir: {cache}}}
generate:
  method: self-instruct
  out: {out}
  num: {num}
  instances_per_task: 1
  self_instruct:
    prompts_per_batch: {prompts}
    max_instance_rounds: 1
    max_stalled_batches: 30
    similarity_threshold: {threshold}
    bootstrap_sampling: {{temperature: 0.7, top_p: 0.5, max_tokens: 400, stop: ["\\n\\n", "\\n16", "16.", "16 ."]}}
    instance_sampling: {{temperature: 0.0, max_tokens: 64}}
"""


def write_tiny_config(tmp_path, num, prompts, threshold=0.7):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        TINY.format(cache=tmp_path / "cache", out=tmp_path / "raw.jsonl", num=num, prompts=prompts, threshold=threshold)
    )
    return path


def test_end_to_end_on_the_embedded_model_killed_mid_run_then_resumed(tmp_path, recorded, monkeypatch):
    """A whole run of the entry point in a fresh process on the embedded model's replies (recorded,
    tests/recorded.py), SIGKILLed with its first batch on disk, then rerun to the end."""
    # The 135M teacher mostly copies its prompt (at the paper's 0.7 it can stall for 30 batches);
    # a looser novelty threshold keeps this test about the loop, the 0.7 rule is pinned above.
    config = write_tiny_config(tmp_path, num=3, prompts=1, threshold=0.95)
    recording = recorded("self_instruct_end_to_end")
    output = tmp_path / "raw.jsonl"
    # the teacher hangs on the first request after a task is on disk: the kill lands mid-run, every time
    command = [sys.executable, "-m", "tests.recorded", recording.name, "--hang-when", str(output),
               "--", "generate", "--config", str(config)]
    log = tmp_path / "killed.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPOSITORY)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and process.poll() is None and not hung_marker(output).exists():
            time.sleep(0.05)
        assert process.poll() is None, f"the run ended before it could be killed: {log.read_text()[-3000:]}"
        assert hung_marker(output).exists(), "the run never reached the hanging request"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    before = read_tasks(output)
    assert 1 <= len(before) < 3
    batches_done = json.loads((tmp_path / "raw.progress.json").read_text())["batches_done"]
    assert batches_done >= 1
    cache = RequestCache(tmp_path / "cache" / "requests.sqlite")
    answered_before = len(cache)  # what the killed run was answered, its last batch's included
    rejects_file = tmp_path / "raw.rejects.jsonl"
    rejected_before = len(rejects_file.read_text().splitlines())

    recording.install(monkeypatch)
    result = run_cli("generate", "--config", str(config))
    assert result.returncode == 0, result.stderr
    after = read_tasks(output)
    assert len(after) == 3 and len({t.id for t in after}) == 3
    assert [t.id for t in after[: len(before)]] == [t.id for t in before]
    summary = json.loads((tmp_path / "raw.summary.json").read_text())
    assert summary["tasks_resumed"] == len(before) and summary["tasks_total"] == 3
    # nothing asked twice: every request the rerun sent is a new entry in the cache
    assert len(cache) == answered_before + summary["requests_sent"]
    cache.close()
    assert f"{len(before)} from before" in result.stderr
    assert f"self-instruct: {3 - len(before)} new tasks" in result.stderr

    seeds = {t.id for t in read_tasks(Path("datagen/data/seed_tasks.jsonl"))}
    for task in after:
        assert task.instances and all(i.output for i in task.instances)
        assert task.lineage.generator == "self-instruct" and task.lineage.teacher_model == "smollm2-135m"
        assert set(task.lineage.parent_ids) <= seeds | {t.id for t in after}
        assert len(task.lineage.most_similar) == 10
        assert max(task.lineage.most_similar.values()) <= 0.95
        assert task.lineage.usage.completion_tokens > 0
    # the killed run's rejects stay, the rerun's follow them: none lost, no finished batch redone
    rejects = [json.loads(line) for line in rejects_file.read_text().splitlines()]
    assert len(rejects) == rejected_before + sum(summary["rejects_by_reason"].values())
    assert all(reject["batch"] < batches_done for reject in rejects[:rejected_before])
    assert all(reject["batch"] >= batches_done for reject in rejects[rejected_before:])


LATER_ROUNDS = 30


def test_later_rounds_grow_a_task_that_passes_natural_instructions_strict(tmp_path, recorded):
    """The lever the export needs: 28 distinct inputs from the embedded 135M teacher (its replies
    recorded once, tests/recorded.py: the whole loop runs on them, nothing is generated here)."""

    settings = SelfInstructConfig(
        more_prompts_per_task=3,
        more_samples_per_prompt=4,
        instance_sampling=SamplingParams(temperature=0.0, max_tokens=64, stop=INSTANCE_STOP),
        # recorded with whole-copy detection (166 live replies); partial copies are covered
        # by the other recordings and test_copy_overlap_is_a_threshold_on_the_sentence_share
        copy_overlap=None,
    )
    runs = {}
    recording = recorded("self_instruct_later_rounds")
    with recording.teacher(TeacherConfig(backend="local", cache="off", batch_size=12)) as teacher:
        # 30 rounds: since copies of the prompt's demonstrations are rejected (issue 11), the
        # 135M teacher needs more than the 20 that reached 28 inputs before
        for rounds in (1, LATER_ROUNDS):
            candidate = _candidate([], False)
            candidate.instruction = "Find the longest word in the sentence."
            sink = TaskSink(tmp_path / f"rounds{rounds}" / "raw.jsonl")
            _add_instances(
                [candidate],
                teacher,
                settings.model_copy(update={"max_instance_rounds": rounds}),
                target=28,
                seed=0,
                sink=sink,
            )
            sink.accept([Task(id="longest-word", instruction=candidate.instruction, instances=candidate.instances)])
            sink.flush()
            runs[rounds] = candidate
    first, more = runs[1], runs[LATER_ROUNDS]
    assert first.instances and not first.asked_for_more
    assert more.asked_for_more
    assert more.instances[: len(first.instances)] == first.instances  # round one is the reference's
    inputs = [i.input for i in more.instances if i.input]
    assert len(inputs) >= 28 and len(set(inputs)) == len(inputs)
    rejects_file = tmp_path / f"rounds{LATER_ROUNDS}" / "raw.rejects.jsonl"
    rejects = [json.loads(line) for line in rejects_file.read_text().splitlines()]
    repeated = [json.loads(r["raw"])["input"] for r in rejects if r["reason"] == "instance: input already present"]
    assert repeated and set(repeated) <= set(inputs)

    out = tmp_path / "ni"
    result = run_cli(
        "export",
        str(tmp_path / f"rounds{LATER_ROUNDS}" / "raw.jsonl"),
        "--format",
        "natural-instructions",
        "--out",
        str(out),
        "--strict",
        "--no-teacher-negatives",
    )
    assert result.returncode == 0, result.stderr
    assert "--strict: 1 of 1 tasks pass" in result.stderr
    [task_file] = (out / "tasks").glob("task001_*.json")
    data = json.loads(task_file.read_text())
    assert len(data["Instances"]) > 25 and data["Negative Examples"]


def test_later_rounds_reject_known_inputs_but_keep_new_outputs_of_inputless_tasks(tmp_path):
    from datagen.teachers.base import Completion

    sink = TaskSink(tmp_path / "raw.jsonl")
    sorting = _candidate([Instance(input="3, 1", output="1, 3")], False)
    _take_instances(
        sorting,
        Completion(" 3, 1\nOutput: 1,3\nExample 3\nInput: 5, 4\nOutput: 4, 5", "stop", 1, 1),
        "Example 2\nInput:",
        True,
        sink,
    )
    _take_instances(sorting, Completion("Output: 7", "stop", 1, 1), "Example 2\nInput:", True, sink)
    assert [(i.input, i.output) for i in sorting.instances] == [("3, 1", "1, 3"), ("5, 4", "4, 5")]
    colours = _candidate([Instance(output="red")], False)
    _take_instances(colours, Completion("Output: blue", "stop", 1, 1), "", True, sink)
    _take_instances(colours, Completion("Output: red", "stop", 1, 1), "", True, sink)
    assert [i.output for i in colours.instances] == ["red", "blue"]
    sink.flush()
    reasons = [json.loads(line)["reason"] for line in rejects_path(tmp_path / "raw.jsonl").read_text().splitlines()]
    assert reasons == ["instance: input already present", "instance: input missing"]


def test_summary_counts_tasks_that_reached_the_instance_target(tmp_path):
    from datagen.generate import GenerateConfig, _instance_target, format_summary
    from datagen.io import write_jsonl_atomic

    full = Task(id="a", instruction="Sort.", instances=[Instance(input=str(n), output=str(n)) for n in range(3)])
    stray = Task(
        id="b",
        instruction="Sort!",
        instances=[Instance(input="1", output="1"), Instance(output="x"), Instance(output="y")],
    )
    no_input = Task(id="c", instruction="Name three colours.", instances=[Instance(output=c) for c in "rgb"])
    output = tmp_path / "raw.jsonl"
    write_jsonl_atomic(output, [full, stray, no_input])
    settings = GenerateConfig(instances_per_task=3)
    extra = _instance_target(output, settings)
    assert extra == {"instances_per_task": 3, "tasks_reaching_instances_per_task": 2}
    assert _instance_target(output, settings.model_copy(update={"method": "orca"})) == {}
    summary = {
        "method": "self-instruct",
        "tasks_produced": 3,
        "tasks_total": 3,
        "output": str(output),
        "tasks_resumed": 0,
        "teacher": {"backend": "local", "model": "m"},
        "requests_sent": 1,
        "cache_hits": 0,
        "retries": 0,
        "failures": 0,
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "cost": None,
        "parse_failures": 0,
        "rejects_by_reason": {},
        "wall_seconds": 1.0,
        "rejects": "r",
        **extra,
    }
    assert (
        "2 of 3 tasks have 3 instances (--instances-per-task); more max_instance_rounds would give the rest more"
        in format_summary(summary)
    )


# -- batches in flight (batches_ahead) --------------------------------------------------------

WINDOW_PIN = Path(__file__).parent / "data" / "self_instruct_window1"


def run_on_engine(out: Path, num: int, batches_ahead: int, engine=None, cache: str = "use",
                  instances_per_task: int = 3) -> SimulatedEngine:
    """The loop on the simulated serving engine (tests/helpers.py), seeds bundled, cache beside OUT."""
    from datagen.generators.self_instruct import run_self_instruct
    from datagen.io import read_records

    engine = engine or SimulatedEngine()
    seeds = list(read_records(Path("datagen/data/seed_tasks.jsonl"), Task))
    settings = SelfInstructConfig(prompts_per_batch=4, batches_ahead=batches_ahead)
    teacher = Teacher(engine, TeacherConfig(cache=cache, cache_dir=str(out.parent / "cache")))
    progress = out.parent / "batches_done"
    done = int(progress.read_text()) if progress.exists() else 0
    with teacher, TaskSink(out) as sink:
        context = RunContext(teacher, sink, num=num, seed=3, instances_per_task=instances_per_task,
                             batches_done=done, on_batch_done=lambda n: progress.write_text(str(n)))
        run_self_instruct(seeds, settings, context)
    return engine


def test_one_batch_in_flight_writes_what_the_reference_loop_wrote(tmp_path):
    """The pinned files were written by the loop before batches could overlap (commit 6680690)."""
    out = tmp_path / "raw.jsonl"
    engine = run_on_engine(out, num=60, batches_ahead=1, cache="off")
    assert out.read_bytes() == (WINDOW_PIN / "tasks.jsonl").read_bytes()
    assert rejects_path(out).read_bytes() == (WINDOW_PIN / "rejects.jsonl").read_bytes()
    assert engine.calls == 24  # bootstrap, classify, instance rounds: one batch at a time


class KilledAfter(SimulatedEngine):
    """Dies (as a kill would) on its `calls`-th call, after answering half of it."""

    def __init__(self, calls: int):
        super().__init__()
        self.die_at = calls

    def generate(self, requests, on_result):
        if self.calls + 1 == self.die_at:
            super().generate(requests[: len(requests) // 2], on_result)
            raise KeyboardInterrupt
        super().generate(requests, on_result)


def test_batches_in_flight_fill_calls_and_resume_from_the_cache_without_asking_twice(tmp_path):
    whole = tmp_path / "whole" / "raw.jsonl"
    whole.parent.mkdir()
    uninterrupted = run_on_engine(whole, num=60, batches_ahead=9)
    one_at_a_time = SimulatedEngine()
    run_on_engine(tmp_path / "one" / "raw.jsonl", num=60, batches_ahead=1, engine=one_at_a_time)
    assert uninterrupted.calls < one_at_a_time.calls / 2
    assert max(uninterrupted.sizes) > 3 * max(one_at_a_time.sizes)

    resumed = tmp_path / "resumed" / "raw.jsonl"
    resumed.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_on_engine(resumed, num=60, batches_ahead=9, engine=KilledAfter(calls=5))
    partial = resumed.read_text().splitlines()
    assert 0 < len(partial) < 60  # some batches were decided and flushed, others were in flight
    rerun = run_on_engine(resumed, num=60, batches_ahead=9)
    assert resumed.read_bytes() == whole.read_bytes()
    assert rejects_path(resumed).read_bytes() == rejects_path(whole).read_bytes()
    # the rerun sent only what the killed run had not been answered: together, what one run asked
    cache = RequestCache(resumed.parent / "cache" / "requests.sqlite")
    assert 0 < rerun.requests < uninterrupted.requests and len(cache) == uninterrupted.requests
    cache.close()


def test_without_the_cache_batches_go_one_at_a_time(tmp_path):
    engine = run_on_engine(tmp_path / "raw.jsonl", num=20, batches_ahead=9, cache="off")
    single = run_on_engine(tmp_path / "single" / "raw.jsonl", num=20, batches_ahead=1, cache="off")
    assert engine.calls == single.calls
