"""Orca: the catalogue, exact prompts, exact parses, deterministic choice, prompt erasure,
the loop (with a fault-injecting backend behind the real Teacher and cache), and a real run."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from datagen.config import SamplingParams, validate_config
from datagen.errors import ConfigError
from datagen.generators.common import RunContext, TaskSink, stable_id
from datagen.generators.orca import (
    CATALOGUE,
    GENERIC_SYSTEM,
    SYSTEM_MESSAGES,
    OrcaConfig,
    ParsedAnswer,
    ParseFailure,
    answer_messages,
    choose_system_message,
    clean_label,
    instances_to_answer,
    matching_label,
    parse_answer,
    run_orca,
    task_kind,
    training_messages,
)
from datagen.io import read_records, read_tasks, rejects_path
from datagen.records import Instance, Task
from datagen.teachers import TeacherConfig
from datagen.teachers.base import Completion
from datagen.teachers.teacher import Teacher
from tests.helpers import ScriptedBackend

SEEDS = Path("datagen/data/seed_tasks.jsonl")


# -- catalogue and config ---------------------------------------------------------------------


def test_catalogue_has_at_least_twelve_distinct_messages():
    ids = [m.id for m in SYSTEM_MESSAGES]
    texts = [m.text for m in SYSTEM_MESSAGES]
    assert len(ids) >= 12 and len(set(ids)) == len(ids) and len(set(texts)) == len(texts)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]{1,19}", i) for i in ids)
    assert set(CATALOGUE) == set(ids)
    for kind in ("open", "classification", "translation"):
        assert sum(kind in m.kinds for m in SYSTEM_MESSAGES) >= 10, kind
    # the range the method needs: terse to step-by-step, a five-year-old, a translator, a teacher
    for wanted in ("terse", "step_by_step", "eli5", "translator", "teacher", "restate", "alternatives"):
        assert wanted in CATALOGUE


def test_config_defaults_and_errors():
    config = OrcaConfig()
    assert config.system_messages is None and len(config.allowed_messages()) == len(SYSTEM_MESSAGES)
    assert config.max_instances_per_task == 4 and config.items_per_batch == 32
    assert config.answer_sampling == SamplingParams(temperature=0.7, top_p=1.0, max_tokens=1024)
    assert config.prompt_erasure is False and config.generic_system == GENERIC_SYSTEM
    # listed order does not matter: catalogue order is kept
    assert [m.id for m in OrcaConfig(system_messages=("eli5", "terse")).allowed_messages()] == ["terse", "eli5"]
    with pytest.raises(ConfigError,
                       match=r"^orca.yaml: system_messages: Value error, unknown system message id 'nope'"):
        validate_config(OrcaConfig, {"system_messages": ["terse", "nope"]}, "orca.yaml")
    with pytest.raises(ConfigError, match="at least one"):
        validate_config(OrcaConfig, {"system_messages": []}, "orca.yaml")
    with pytest.raises(ConfigError, match="negative"):
        validate_config(OrcaConfig, {"system_weights": {"terse": -1}}, "orca.yaml")
    with pytest.raises(ConfigError, match="n must be 1"):
        validate_config(OrcaConfig, {"answer_sampling": {"n": 2}}, "orca.yaml")
    with pytest.raises(ConfigError, match="unknown key"):
        validate_config(OrcaConfig, {"instances": 3}, "orca.yaml")


# -- prompts ----------------------------------------------------------------------------------


def test_answer_prompt_for_a_classification_task_is_pinned():
    messages = answer_messages(
        "Classify the sentiment of the customer review as Positive, Negative or Neutral.",
        "The headphones arrived a day early, sound amazing, and the battery easily lasts all week.",
        True,
        CATALOGUE["step_by_step"].text,
    )
    assert messages == [
        {
            "role": "system",
            "content": "Think the task through step by step. Number the steps, and after each one say in a "
            "sentence why it is justified by what came before.",
        },
        {
            "role": "user",
            "content": "Classify the sentiment of the customer review as Positive, Negative or Neutral.\n\n"
            "Input:\n"
            "The headphones arrived a day early, sound amazing, and the battery easily lasts all week.\n\n"
            "Explain your reasoning the way your instructions ask. Then write a last line that starts with "
            '"Final answer:" followed by the label alone, with no other words.',
        },
    ]


def test_answer_prompt_for_an_open_task_without_input_is_pinned():
    messages = answer_messages("  Name three prime numbers.\n", "", False, CATALOGUE["eli5"].text)
    assert messages == [
        {
            "role": "system",
            "content": "Explain your answer as if you were talking to a five-year-old: short sentences, everyday "
            "words, and a comparison to something a small child already knows.",
        },
        {
            "role": "user",
            "content": "Name three prime numbers.\n\n"
            'Explain your reasoning the way your instructions ask. Then write "Final answer:" on a new line, '
            "followed by the complete answer, and write nothing after the answer.",
        },
    ]


# -- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "is_classification", "finish_reason", "expected"),
    [
        ("1. 18 x 2.5 = 45 km.\n2. 12 x 1.5 = 18 km.\nFinal answer: 63 km", False, "stop",
         ParsedAnswer("1. 18 x 2.5 = 45 km.\n2. 12 x 1.5 = 18 km.", "63 km")),
        # a multi-line deliverable: everything after the marker is the answer
        ("Keep it short and upbeat.\n\nFinal answer:\nStay cool.\nStay hydrated.", False, "stop",
         ParsedAnswer("Keep it short and upbeat.", "Stay cool.\nStay hydrated.")),
        # markdown variants of the marker, a wrapped answer
        ("The review praises speed and sound.\n**Final Answer:** **Positive**.", True, "stop",
         ParsedAnswer("The review praises speed and sound.", "Positive")),
        ("It asks for money up front.\n**Final answer**: \"Spam\"", True, "stop",
         ParsedAnswer("It asks for money up front.", "Spam")),
        ("Reason.\nThe final answer: `Fruit`", True, "stop", ParsedAnswer("Reason.", "Fruit")),
        ('Word for word.\nFinal answer: "Could you remind me?"', False, "stop",
         ParsedAnswer("Word for word.", "Could you remind me?")),
        ('Dialogue.\nFinal answer: "Hi," she said. "Bye."', False, "stop",
         ParsedAnswer("Dialogue.", '"Hi," she said. "Bye."')),
        # a label task keeps only the label line; an open task keeps all of it
        ("Rule out Positive.\nFinal answer: Negative\nI hope this helps!", True, "stop",
         ParsedAnswer("Rule out Positive.", "Negative")),
        ("Rule out Positive.\nFinal answer: Negative\nI hope this helps!", False, "stop",
         ParsedAnswer("Rule out Positive.", "Negative\nI hope this helps!")),
        # the last marker wins; the earlier one stays in the explanation
        ("Final answer: 12\nWait, that is wrong.\nFinal answer: 15", False, "stop",
         ParsedAnswer("Final answer: 12\nWait, that is wrong.", "15")),
        # a direct answer: no explanation, kept
        ("Final answer: Paris", False, "stop", ParsedAnswer(None, "Paris")),
        # malformed
        ("The answer is 63 km.", False, "stop",
         ParseFailure("parse failure", 'no line starting with "Final answer:"')),
        ('It ends with the label "Final Answer: Spam" somewhere.', True, "stop",
         ParseFailure("parse failure", 'no line starting with "Final answer:"')),
        ("", False, "stop", ParseFailure("parse failure", 'no line starting with "Final answer:"')),
        ("Some reasoning.\nFinal answer:", False, "stop", ParseFailure("empty final answer")),
        ("Some reasoning.\nFinal answer: .\n", True, "stop", ParseFailure("empty final answer")),
        ("Some reasoning.\nFinal answer: 63", False, "length", ParseFailure("reply hit the length limit")),
    ],
)
def test_parse_answer(reply, is_classification, finish_reason, expected):
    assert parse_answer(reply, is_classification=is_classification, finish_reason=finish_reason) == expected


def test_labels():
    assert clean_label("\n  'Not spam'.\nbecause ...") == "Not spam"
    assert matching_label("positive.", "Positive") == "Positive"
    assert matching_label("Not  spam", "Not spam") == "Not spam"
    assert matching_label("Neutral", "Positive") is None


# -- choosing the system message --------------------------------------------------------------


def task(task_id: str, instruction: str = "Summarize the text.", is_classification: bool = False, **kw) -> Task:
    return Task(id=task_id, instruction=instruction, is_classification=is_classification, **kw)


def test_choice_is_deterministic_per_seed_and_task():
    allowed = OrcaConfig().allowed_messages()
    tasks = [task(f"t{i}") for i in range(60)]
    first = [choose_system_message(t, allowed, None, seed=7).id for t in tasks]
    assert first == [choose_system_message(t, allowed, None, seed=7).id for t in tasks]
    assert first != [choose_system_message(t, allowed, None, seed=8).id for t in tasks]
    assert len(set(first)) >= 8  # spread over the catalogue
    # pinned: a change here changes every dataset made before it
    assert choose_system_message(task("seed_task_0"), allowed, None, seed=0).id == "terse"
    assert choose_system_message(task("seed_task_2"), allowed, None, seed=0).id == "eli5"


def test_choice_respects_kinds_restriction_and_weights():
    allowed = OrcaConfig().allowed_messages()
    translation = task("tr", "Translate the sentence into German.")
    label = task("cl", "Label the message as Spam or Not spam.", is_classification=True)
    assert task_kind(translation) == "translation" and task_kind(label) == "classification"
    assert task_kind(task("o", "Explain how transistors work.")) == "open"
    for seed in range(40):
        assert choose_system_message(translation, allowed, None, seed).id not in {"eli5", "labels", "example_first"}
        assert choose_system_message(label, allowed, None, seed).id != "translator"
        assert choose_system_message(task("o"), allowed, None, seed).id not in {"translator", "labels"}
    only = OrcaConfig(system_messages=("terse", "eli5")).allowed_messages()
    assert {choose_system_message(task(f"x{i}"), only, None, 0).id for i in range(30)} == {"terse", "eli5"}
    weights = {"terse": 0.0}
    assert {choose_system_message(task(f"x{i}"), only, weights, 0).id for i in range(30)} == {"eli5"}
    # nothing allowed suits the task
    assert choose_system_message(label, OrcaConfig(system_messages=("translator",)).allowed_messages(), None, 0) is None


def test_instances_to_answer():
    many = task("m", instances=[Instance(input=x, output=x.upper()) for x in ["a", "b", " a ", "c", "d"]])
    assert [i.input for i in instances_to_answer(many, 3)] == ["a", "b", "c"]
    assert instances_to_answer(task("none"), 4) == [Instance(input="", output="")]


# -- training examples and prompt erasure -----------------------------------------------------


ANSWERED = Task(
    id="orca-1",
    instruction="Label the message as Spam or Not spam.",
    is_classification=True,
    system=CATALOGUE["labels"].text,
    instances=[Instance(input="You won a free cruise!", output="Spam",
                        explanation="Strangers rarely give cruises away.")],
)


def test_training_example_keeps_the_system_message():
    assert training_messages(ANSWERED, ANSWERED.instances[0]) == [
        {"role": "system", "content": CATALOGUE["labels"].text},
        {"role": "user", "content": "Label the message as Spam or Not spam.\n\nInput:\nYou won a free cruise!"},
        {"role": "assistant", "content": "Strangers rarely give cruises away.\n\nFinal answer: Spam"},
    ]


def test_prompt_erasure_replaces_the_system_message():
    assert training_messages(ANSWERED, ANSWERED.instances[0], prompt_erasure=True) == [
        {
            "role": "system",
            "content": "You are a careful, helpful assistant. Decide for yourself how best to approach each task, "
            "reason it through, and then give your answer.",
        },
        {"role": "user", "content": "Label the message as Spam or Not spam.\n\nInput:\nYou won a free cruise!"},
        {"role": "assistant", "content": "Strangers rarely give cruises away.\n\nFinal answer: Spam"},
    ]
    custom = training_messages(ANSWERED, ANSWERED.instances[0], prompt_erasure=True, generic_system="Be useful.")
    assert custom[0] == {"role": "system", "content": "Be useful."}
    plain = Task(id="p", instruction="Name a river.", instances=[Instance(output="The Nile")])
    assert training_messages(plain, plain.instances[0]) == [
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "Final answer: The Nile"},
    ]


# -- the loop, with faults injected behind the real Teacher and request cache -----------------


def FaultyBackend(answers: dict[str, str]) -> ScriptedBackend:  # named like the class it replaced
    """Answers from a script keyed by the instance input; the faults are what it is for:
    'boom' -> a failed request, 'cut' -> cut off at max_tokens, 'ramble' -> no marker."""

    def reply(user: str) -> Completion:
        match = re.search(r"Input:\n(.*?)\n\n", user, flags=re.S)
        key = match.group(1) if match else ""
        if key == "boom":
            return Completion("", "error", error="HTTP 500")
        if key == "cut":
            return Completion("Step 1. Let me think about", "length", 20, 6)
        if key == "ramble":
            return Completion("I like this one a lot.", "stop", 20, 6)
        return Completion(f"Because of {key}.\nFinal answer: {answers[key]}", "stop", 20, 8)

    return ScriptedBackend(reply, name="scripted", model="faults")


INPUT = [
    task("A", "Reverse the word.",
         instances=[Instance(input="abc", output="cba"), Instance(input="ramble", output="x")]),
    task("B", "Label the review as Positive or Negative.", True,
         instances=[Instance(input="great", output="Positive"), Instance(input="awful", output="Negative")]),
    task("C", "Double the number.", instances=[Instance(input="boom", output="4"), Instance(input="cut", output="6")]),
    task("A", "A second task reusing the id A."),
    task("D", "Name a colour."),
]
ANSWERS = {"abc": "cba", "great": "positive", "awful": "Positive", "": "Blue"}


def run(tmp_path, **options) -> tuple[Teacher, list[int]]:
    teacher = Teacher(FaultyBackend(ANSWERS), TeacherConfig(cache_dir=str(tmp_path / "cache")))
    batches: list[int] = []
    settings = options.pop("settings", OrcaConfig())
    with TaskSink(tmp_path / "orca.jsonl") as sink:
        context = RunContext(teacher, sink, num=options.pop("num", 10), seed=3, instances_per_task=1,
                             on_batch_done=batches.append, **options)
        run_orca(INPUT, settings, context)
    return teacher, batches


def read_rejects(tmp_path) -> list[dict]:
    path = rejects_path(tmp_path / "orca.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_loop_records_rejects_and_resumes_without_duplicates(tmp_path):
    teacher, batches = run(tmp_path, settings=OrcaConfig(items_per_batch=2))
    assert teacher.stats.requests_sent == 7 and batches == [1, 2]
    tasks = read_tasks(tmp_path / "orca.jsonl")
    assert [t.lineage.parent_ids for t in tasks] == [["A"], ["B"], ["D"]]
    a, b, d = tasks
    assert a.instruction == "Reverse the word." and a.instances == [
        Instance(input="abc", output="cba", explanation="Because of abc.")
    ]
    assert b.instances == [Instance(input="great", output="Positive", explanation="Because of great.")]
    assert d.instances == [Instance(input="", output="Blue", explanation="Because of .")]
    for t in tasks:
        system_id = t.lineage.system_message_id
        assert t.system == CATALOGUE[system_id].text
        assert t.id == stable_id("orca", t.lineage.parent_ids[0], system_id)
        assert t.lineage.generator == "orca" and t.lineage.operation == f"orca:{system_id}"
        assert t.lineage.template == "orca_answer.jinja" and t.lineage.sampling["seed"] == 3
        assert t.lineage.teacher_backend == "scripted" and t.lineage.usage.prompt_tokens > 0
    rejects = read_rejects(tmp_path)
    assert Counter(r["reason"] for r in rejects) == Counter(
        {
            "parse failure": 1,
            "label differs from the original output": 1,
            "teacher error": 1,
            "reply hit the length limit": 1,
            "no instance answered": 1,
            "duplicate input task id": 1,
        }
    )
    assert all(r["stage"] == "orca" for r in rejects)
    by_reason = {r["reason"]: r for r in rejects}
    assert by_reason["parse failure"]["raw"] == "I like this one a lot."
    assert by_reason["parse failure"]["detail"].startswith("task A, instance 1, system ")
    assert by_reason["label differs from the original output"]["detail"].endswith(
        "answered 'Positive', original 'Negative'"
    )
    # the wrong answer rides along as a one-instance task, so export can show it as a negative example
    from datagen.export import negatives_from_rejects
    from datagen.records import Reject

    wrong = by_reason["label differs from the original output"]["task"]
    assert wrong["id"] == b.id and [i["output"] for i in wrong["instances"]] == ["Positive"]
    [negative] = negatives_from_rejects(tasks, [Reject.model_validate(r) for r in rejects])[b.id]
    assert negative["output"] == "Positive" and negative["input"] == wrong["instances"][0]["input"]
    assert negative["explanation"] == "This output was rejected (orca): label differs from the original output."
    assert by_reason["no instance answered"]["task"]["lineage"]["parent_ids"] == ["C"]

    before = ((tmp_path / "orca.jsonl").read_text(), rejects_path(tmp_path / "orca.jsonl").read_text())
    again, _ = run(tmp_path, settings=OrcaConfig(items_per_batch=2))
    assert again.stats.requests_sent == 1  # only the failed request: failures are not cached
    after = ((tmp_path / "orca.jsonl").read_text(), rejects_path(tmp_path / "orca.jsonl").read_text())
    assert after == before


def test_loop_stops_at_num_and_continues_later(tmp_path):
    teacher, batches = run(tmp_path, num=1, batches_done=5)
    assert teacher.stats.requests_sent == 2 and batches == [6]  # only task A was asked
    assert [t.lineage.parent_ids for t in read_tasks(tmp_path / "orca.jsonl")] == [["A"]]
    teacher, _ = run(tmp_path, num=2)
    assert teacher.stats.requests_sent == 2  # B's two instances; A is skipped before sending
    assert [t.lineage.parent_ids for t in read_tasks(tmp_path / "orca.jsonl")] == [["A"], ["B"]]


# -- a real run on the embedded model ---------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_on_the_embedded_model(tmp_path):
    from datagen.teachers import make_teacher

    wanted = ["seed_task_17", "seed_task_29", "seed_task_10"]  # translation, open, classification x2
    seeds = sorted((t for t in read_tasks(SEEDS) if t.id in wanted), key=lambda t: wanted.index(t.id))
    # Greedy and the terse message keep replies short enough for 128 tokens on a CPU. The
    # 135M model rarely gives the label the seed has, so the label check (covered above) is
    # off here: this test is about the structure of what a real teacher run writes.
    settings = OrcaConfig(
        system_messages=("terse",),
        check_labels=False,
        answer_sampling=SamplingParams(temperature=0.0, max_tokens=128),
    )
    config = TeacherConfig(backend="local", cache_dir=str(tmp_path / "cache"), batch_size=4)
    out = tmp_path / "orca.jsonl"

    def generate() -> int:
        with TaskSink(out) as sink, make_teacher(config) as teacher:
            run_orca(seeds, settings, RunContext(teacher, sink, num=3, seed=0, instances_per_task=1))
            return teacher.stats.requests_sent

    assert generate() == 4
    # Whether the 135M model gets a parseable answer out varies; what it writes must not.
    tasks = list(read_records(out, Task)) if out.exists() else []
    rejects = read_rejects(tmp_path)
    assert len(tasks) <= 3 and len({t.id for t in tasks}) == len(tasks)
    for t in tasks:
        assert t.system == CATALOGUE["terse"].text
        assert t.lineage.generator == "orca" and t.lineage.operation == "orca:terse"
        assert t.lineage.teacher_model == "smollm2-135m" and t.lineage.usage.completion_tokens > 0
        assert len(t.lineage.parent_ids) == 1 and t.lineage.parent_ids[0] in wanted
        assert t.instances and all(i.output.strip() for i in t.instances)
    whole = [r for r in rejects if r["reason"] == "no instance answered"]
    assert len(tasks) + len(whole) == 3  # every input task is either kept or rejected as a whole
    known = {"parse failure", "empty final answer", "reply hit the length limit", "no instance answered"}
    for r in rejects:
        assert r["stage"] == "orca" and r["reason"] in known and r["detail"]
        assert (r.get("raw") is None) == (r["reason"] == "no instance answered")  # None is not written

    before = (out.read_text(), rejects_path(out).read_text() if rejects else "")
    assert generate() == 0
    assert (out.read_text(), rejects_path(out).read_text() if rejects else "") == before
