"""Evol-Instruct: pinned prompts, exact parses, every elimination rule, sampling, the loop, resume.

The loop tests drive a real `Teacher` (with its real request cache) over a backend that
injects faulty replies (leaked template words, "Equal" verdicts, apologies, garbage,
errors), so every elimination path is exercised; the slow test runs the embedded model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from datagen.config import SamplingParams, Strict, validate_config
from datagen.errors import ConfigError
from datagen.generators.common import RunContext, TaskSink
from datagen.generators.evol_instruct import (
    ANSWER_CUT_OFF,
    BREADTH,
    COMPLICATE_INPUT,
    DATA_FORMATS,
    OPERATIONS,
    STOP_WORDS,
    EvolInstructConfig,
    answer_messages,
    copied_words_reason,
    evolution_messages,
    evolution_source,
    information_gain_reason,
    judge_messages,
    parse_judge_reply,
    parse_rewrite,
    plan_evolution,
    run_evol_instruct,
    sorry_reason,
    stop_words_reason,
)
from datagen.io import read_records, read_tasks, rejects_path
from datagen.records import Instance, Reject, Task
from datagen.teachers import TeacherConfig
from datagen.teachers.base import Completion
from datagen.teachers.teacher import Teacher
from tests.helpers import ScriptedBackend

# -- prompts ------------------------------------------------------------------------------------

DEPTH_HEAD = (
    "You are a prompt rewriter. Rewrite the prompt under #Given Prompt# into a harder version of itself, "
    "one that makes even strong AI assistants such as ChatGPT and GPT-4 work harder to answer it well. "
    "The new prompt must stay sensible: a person must be able to understand it and answer it.\n"
    "Keep every part of #Given Prompt# that is not plain prose, such as tables and code, "
    "and keep any input it contains.\n\n"
    "Make the prompt harder in this one way:\n"
)
DEPTH_TAIL = (
    "Write only the new prompt. The phrases '#Given Prompt#', '#Rewritten Prompt#', 'given prompt' and "
    "'rewritten prompt' must not appear in #Rewritten Prompt#.\n\n"
    "#Given Prompt#:\n"
)


def test_add_constraints_prompt_is_pinned():
    [message] = evolution_messages("evol:add_constraints", "  Name three rivers.\n\nin Europe  ")
    assert message == {
        "role": "user",
        "content": DEPTH_HEAD
        + "Add one more constraint or requirement to #Given Prompt#.\n\n"
        "Keep #Rewritten Prompt# concise: it may add only 10 to 20 words to #Given Prompt#.\n"
        + DEPTH_TAIL
        + "Name three rivers.\n\nin Europe\n\n#Rewritten Prompt#:",
    }


@pytest.mark.parametrize(
    ("operation", "method"),
    [
        ("evol:deepen",
         "If #Given Prompt# asks about particular issues, make the inquiry into them deeper and broader."),
        ("evol:concretize", "Replace general concepts in #Given Prompt# with more specific ones."),
        ("evol:increase_reasoning", "If #Given Prompt# can be answered after only a few simple steps of thought, "
         "rewrite it so that it explicitly asks for reasoning in several steps."),
    ],
)
def test_other_depth_prompts_differ_only_in_the_method(operation, method):
    [message] = evolution_messages(operation, "Name three rivers.")
    assert message["content"] == (
        DEPTH_HEAD + method + "\n\nKeep #Rewritten Prompt# concise: it may add only 10 to 20 words to #Given Prompt#.\n"
        + DEPTH_TAIL + "Name three rivers.\n\n#Rewritten Prompt#:"
    )


def test_complicate_input_prompt_names_the_data_and_exempts_it_from_the_word_limit():
    [message] = evolution_messages(COMPLICATE_INPUT, "Name three rivers.", "a JSON object")
    text = message["content"]
    assert text.startswith(DEPTH_HEAD)
    assert ("Add a JSON object to the prompt as input data, and change the task so that answering it "
            "requires using that data.") in text
    assert "it may add only 10 to 20 words to #Given Prompt#, not counting the data you add." in text
    assert text.endswith("#Given Prompt#:\nName three rivers.\n\n#Rewritten Prompt#:")
    with pytest.raises(ValueError, match="data format"):
        evolution_messages(COMPLICATE_INPUT, "Name three rivers.")


def test_breadth_prompt_asks_for_a_rarer_task_in_the_same_domain():
    [message] = evolution_messages(BREADTH, "Name three rivers.")
    text = message["content"]
    assert text.startswith("You are a prompt creator. Taking the prompt under #Given Prompt# as inspiration, "
                           "write a brand-new prompt.\n")
    assert "same domain as #Given Prompt#, but ask for something rarer" in text
    assert "about as long and as difficult as #Given Prompt#" in text
    assert ("The phrases '#Given Prompt#', '#Created Prompt#', 'given prompt' and 'created prompt' "
            "must not appear in #Created Prompt#.") in text
    assert "10 to 20 words" not in text
    assert text.endswith("#Given Prompt#:\nName three rivers.\n\n#Created Prompt#:")


def test_unknown_operation_is_refused():
    with pytest.raises(ValueError, match="unknown operation"):
        evolution_messages("evol:shorten", "Name three rivers.")


def test_judge_prompt_is_pinned():
    [message] = judge_messages("Name three rivers.\n", " Name three rivers in Europe longer than 1,000 km.")
    assert message == {
        "role": "user",
        "content": (
            "Here are two instructions for an AI assistant. Are they equal? "
            "Two instructions are equal when both of these hold:\n"
            "1. They set the same constraints and requirements.\n"
            "2. They ask for the same depth and breadth of inquiry.\n\n"
            "First instruction:\nName three rivers.\n\n"
            "Second instruction:\nName three rivers in Europe longer than 1,000 km.\n\n"
            'Reply with exactly one of "Equal" or "Not Equal", and no explanation.'
        ),
    }


def test_the_answer_prompt_is_the_instruction_itself():
    assert answer_messages("Name three rivers.") == [{"role": "user", "content": "Name three rivers."}]


def test_prompt_to_evolve_appends_the_first_input():
    task = Task(id="t", instruction=" Fix the grammar. ", instances=[Instance(input="me and him goes", output="x"),
                                                                   Instance(input="other", output="y")])
    assert evolution_source(task) == "Fix the grammar.\n\nme and him goes"
    blank_input = Task(id="t", instruction="Tell a joke.", instances=[Instance(input=" ", output="x")])
    assert evolution_source(blank_input) == "Tell a joke."
    assert evolution_source(Task(id="t", instruction="Tell a joke.")) == "Tell a joke."


# -- parses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [
        ("#Rewritten Prompt#:\nName three rivers in Europe longer than 1,000 km.",
         "Name three rivers in Europe longer than 1,000 km."),
        ("  # Rewritten Prompt # : Name three rivers.", "Name three rivers."),
        ("**Rewritten Prompt:** Name three rivers.", "Name three rivers."),
        ("#Created Prompt#:\n\nDescribe the delta of the Lena.", "Describe the delta of the Lena."),
        ("The rewritten prompt: Name three rivers.", "Name three rivers."),
        ('"Name three rivers."', "Name three rivers."),
        ("“Name three rivers.”", "Name three rivers."),
        ('"Yes" or "No": is the Nile longer than the Amazon?', '"Yes" or "No": is the Nile longer than the Amazon?'),
        ("Name three rivers.\n\n#Rewritten Prompt#: Name four rivers.",
         "Name three rivers.\n\n#Rewritten Prompt#: Name four rivers."),  # inside: left for rule (4)
        ("#Given Prompt#: Name three rivers.", "#Given Prompt#: Name three rivers."),
        ("Rewritten prompts are harder to answer.", "Rewritten prompts are harder to answer."),
        ("", None),
        ("   \n ", None),
        ("#Rewritten Prompt#:", None),
        ('#Rewritten Prompt#: ""', None),
    ],
)
def test_rewrite_parse(reply, parsed):
    assert parse_rewrite(reply) == parsed


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("Equal", True),
        (" equal.\n", True),
        ("Not Equal", False),
        ("**Not Equal**", False),
        ('"Not equal."', False),
        ("Judgement: Equal", True),
        ("Your Judgement: Not Equal", False),
        ("\nNot Equal\nThe second one adds a length limit.", False),
        ("They are equal.", None),
        ("Not Equal, because the second adds a constraint.", None),
        ("Equal or Not Equal", None),
        ("1. They set the same constraints and", None),
        ("I'm sorry for your loss.", None),
        ("", None),
    ],
)
def test_judge_parse(reply, verdict):
    assert parse_judge_reply(reply) is verdict


# -- elimination rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("Not Equal", None),
        ("Equal", "no information gain"),
        ("Possibly.", "parse failure"),
        ("", "parse failure"),
    ],
)
def test_rule_1_information_gain(reply, reason):
    assert information_gain_reason(reply) == reason


def test_rule_2_sorry_in_a_short_answer():
    assert sorry_reason("I'm sorry, but I cannot answer that.") == "teacher could not answer"
    assert sorry_reason("SORRY: that data is not available.") == "teacher could not answer"
    long_apology = "Sorry for the long answer. " + "The river flows north through the plain. " * 12
    assert len(long_apology.split()) >= 80
    assert sorry_reason(long_apology) is None
    assert sorry_reason(" ".join(["sorry"] + ["word"] * 78)) == "teacher could not answer"  # 79 words
    assert sorry_reason(" ".join(["sorry"] + ["word"] * 79)) is None  # 80 words is not "under 80"
    assert sorry_reason("The Nile, the Amazon and the Yangtze.") is None
    assert sorry_reason("I'm sorry, no.", min_words=3) is None


def test_rule_3_only_punctuation_and_stop_words():
    assert stop_words_reason("It is what it is.") == "answer is only punctuation and stop words"
    assert stop_words_reason("... !? --") == "answer is only punctuation and stop words"
    assert stop_words_reason("So, I don’t!") == "answer is only punctuation and stop words"
    assert stop_words_reason("   ") == "empty answer"
    assert stop_words_reason("It is 42.") is None
    assert stop_words_reason("The Nile.") is None


@pytest.mark.parametrize("answer", ["Yes.", "No.", "42", "Both.", "yes", "No, it is not.", "Yes, it is."])
def test_rule_3_spares_short_correct_answers(answer):
    assert stop_words_reason(answer) is None
    assert {"the", "and", "is", "don't", "yourselves"} <= STOP_WORDS and "river" not in STOP_WORDS


@pytest.mark.parametrize(
    ("instruction", "reason"),
    [
        ("Name three rivers in Europe.", None),
        ("#Rewritten Prompt#: Name three rivers.", "copies rewriter words: #Rewritten Prompt#"),
        ("Using the #given prompt#, name rivers.", "copies rewriter words: #Given Prompt#"),
        ("#The Given Prompt# asks for rivers.", "copies rewriter words: #The Given Prompt#"),
        ("Answer the given  prompt about rivers.", "copies rewriter words: given prompt"),
        ("Compare it with the REWRITTEN PROMPT.", "copies rewriter words: rewritten prompt"),
        ("#Created Prompt#\nDescribe the Lena delta.", "copies rewriter words: #Created Prompt#"),
        ("Here is the created prompt: describe the Lena delta.", "copies rewriter words: created prompt"),
        ("Rank the given prompts by how hard they are to answer.", None),
        ("Is this a recreated prompt-book from 1920?", None),
    ],
)
def test_rule_4_copied_rewriter_words(instruction, reason):
    assert copied_words_reason(instruction) == reason


# -- operation sampling and config --------------------------------------------------------------


def test_operation_sampling_is_deterministic_and_uniform():
    ids = [f"task-{i}" for i in range(3000)]
    first = [plan_evolution(7, 2, task_id) for task_id in ids]
    assert first == [plan_evolution(7, 2, task_id) for task_id in ids]
    assert first != [plan_evolution(7, 3, task_id) for task_id in ids]  # a new draw each round
    assert first != [plan_evolution(8, 2, task_id) for task_id in ids]  # and each seed
    counts = Counter(operation for operation, _ in first)
    assert set(counts) == set(OPERATIONS) and min(counts.values()) > 400  # ~500 each
    for operation, data_format in first:
        assert (data_format in DATA_FORMATS) if operation == COMPLICATE_INPUT else data_format is None
    assert {plan_evolution(0, 1, t, ("evol:deepen",))[0] for t in ids[:50]} == {"evol:deepen"}


def test_operation_sampling_does_not_depend_on_the_process():
    code = ("from datagen.generators.evol_instruct import plan_evolution as p; "
            "print([p(3, r, f'id{i}') for r in (1, 2) for i in range(20)])")
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed}).stdout
        for hash_seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert outputs.pop().strip() == str([plan_evolution(3, r, f"id{i}") for r in (1, 2) for i in range(20)])


def test_config_defaults_and_operation_names():
    config = EvolInstructConfig()
    assert config.rounds == 4 and config.items_per_batch == 32 and config.min_answer_words_for_sorry == 80
    assert config.operations == OPERATIONS and len(OPERATIONS) == 6
    assert config.judge_sampling.temperature == 0.0 and config.judge_sampling.max_tokens == 8
    assert config.answer_sampling.max_tokens == 2048  # the reference's; a cut-off answer is rejected
    assert EvolInstructConfig(operations=["deepen", "evol:breadth"]).operations == ("evol:deepen", "evol:breadth")
    with pytest.raises(ConfigError, match=r"evol_instruct.operations: .*unknown operation 'evol:shorten'"):
        validate_config(_Wrapper, {"evol_instruct": {"operations": ["shorten"]}}, "config.yaml")
    with pytest.raises(ConfigError, match="listed twice"):
        validate_config(_Wrapper, {"evol_instruct": {"operations": ["deepen", "evol:deepen"]}}, "config.yaml")
    with pytest.raises(ConfigError, match="at least one operation"):
        validate_config(_Wrapper, {"evol_instruct": {"operations": []}}, "config.yaml")
    with pytest.raises(ConfigError, match="unknown key"):
        validate_config(_Wrapper, {"evol_instruct": {"round": 3}}, "config.yaml")


class _Wrapper(Strict):
    evol_instruct: EvolInstructConfig = EvolInstructConfig()


# -- the loop, with injected faults -------------------------------------------------------------

# Each seed's instruction names the fault the backend injects for it (and for its descendants).
FAULTS = ("ok", "leak", "equal", "garbled", "sorry", "stopwords", "empty", "cutoff", "error")


def FaultyBackend() -> ScriptedBackend:  # named like the class it replaced
    """Answers every request instantly, with a faulty reply where the prompt names a fault."""
    return ScriptedBackend(faulty_reply, name="faulty", model="scripted")


def faulty_reply(prompt: str) -> Completion:
    def has(fault: str) -> bool:
        return f"[{fault}]" in prompt

    if prompt.startswith(("You are a prompt rewriter", "You are a prompt creator")):
        given = prompt.split("#Given Prompt#:\n")[-1].rsplit("\n\n#", 1)[0]
        if has("error"):
            return Completion("", "error", error="HTTP 500")
        if has("empty"):
            return Completion("#Rewritten Prompt#:  ", "stop", 100, 3)
        if has("cutoff"):
            return Completion(given + " and also", "length", 100, 512)
        if has("leak"):
            return Completion(f"#Given Prompt#: {given}\n#Rewritten Prompt#: {given} Twice.", "stop", 100, 20)
        return Completion(f"#Rewritten Prompt#:\n{given} Use exactly 40 words.", "stop", 100, 10)
    if prompt.startswith("Here are two instructions"):
        if has("equal"):
            return Completion("Equal", "stop", 80, 1)
        return Completion("I think so" if has("garbled") else "Not Equal", "stop", 80, 2)
    if has("sorry"):
        return Completion("Sorry, I cannot do that.", "stop", 30, 7)
    if has("answercut"):
        return Completion("The Danube rises in the Black Forest and flows", "length", 30, 1024)
    if has("yesno"):
        return Completion("No.", "stop", 30, 2)
    if has("stopwords"):
        return Completion("It is what it is!", "stop", 30, 6)
    return Completion("The Danube, the Rhine and the Volga are long European rivers.", "stop", 30, 15)


def fault_seeds() -> list[Task]:
    return [
        Task(id=f"seed-{fault}", instruction=f"[{fault}] Name some rivers.",
             instances=[Instance(input="Europe" if fault == "ok" else "", output="The Rhine.")])
        for fault in FAULTS
    ]


def run_faulty(tmp_path, *, num=100, rounds=2, batches_done=0, cache="use", backend=None):
    backend = backend or FaultyBackend()
    teacher = Teacher(backend, TeacherConfig(cache=cache, cache_dir=str(tmp_path / "cache")))
    calls: list[int] = []
    progressed: list[int] = []
    settings = EvolInstructConfig(rounds=rounds, items_per_batch=4)
    with TaskSink(tmp_path / "evol.jsonl") as sink:
        context = RunContext(teacher, sink, num=num, seed=5, instances_per_task=3, progress=progressed.append,
                             batches_done=batches_done, on_batch_done=calls.append)
        run_evol_instruct(fault_seeds(), settings, context)
    teacher.close()
    return backend, teacher, calls, progressed


def read_out(tmp_path) -> tuple[list[Task], list[Reject]]:
    path = tmp_path / "evol.jsonl"
    tasks = list(read_records(path, Task)) if path.exists() else []
    return tasks, list(read_records(rejects_path(path), Reject))


def outcome_key(reject: Reject) -> tuple[str, int]:
    """(parent id, round) of a reject: from its candidate task, else from its detail line."""
    if reject.task is not None:
        return reject.task.lineage.parent_ids[0], reject.task.lineage.round
    # "evol:deepen round 2 of seed-empty: rewriter reply"
    _operation, _round, round_number, _of, parent = reject.detail.split(" ")[:5]
    return parent.rstrip(":"), int(round_number)


EXPECTED_REASONS = {
    "seed-leak": "copies rewriter words: #Given Prompt#",
    "seed-equal": "no information gain",
    "seed-garbled": "parse failure",
    "seed-sorry": "teacher could not answer",
    "seed-stopwords": "answer is only punctuation and stop words",
    "seed-cutoff": "rewrite hit the length limit",
}


def test_every_failure_is_a_reject_and_the_parent_stays_in_the_pool(tmp_path):
    backend, teacher, calls, progressed = run_faulty(tmp_path, rounds=2)
    tasks, rejects = read_out(tmp_path)
    # 9 pool items x 2 rounds, 4 per batch: 3 batches a round
    assert calls == [1, 2, 3, 4, 5, 6] and sum(progressed) == len(tasks) == 2

    first, second = tasks
    assert first.instruction == "[ok] Name some rivers.\n\nEurope Use exactly 40 words."
    answer = "The Danube, the Rhine and the Volga are long European rivers."
    assert first.instances == [Instance(input="", output=answer)]
    assert first.is_classification is False and first.name == first.id and first.id.startswith("evol-")
    assert first.lineage.generator == "evol-instruct" and first.lineage.round == 1
    assert first.lineage.parent_ids == ["seed-ok"]
    assert first.lineage.operation == plan_evolution(5, 1, "seed-ok")[0]
    assert first.lineage.teacher_backend == "faulty" and first.lineage.seed == 5
    assert first.lineage.usage.prompt_tokens == 100 + 80 + 30 and first.lineage.usage.completion_tokens == 10 + 2 + 15
    depth_or_breadth = "evol_breadth.jinja" if first.lineage.operation == BREADTH else "evol_depth.jinja"
    assert first.lineage.template == depth_or_breadth
    assert set(first.lineage.templates) == {depth_or_breadth, "evol_judge.jinja"}
    assert first.lineage.sampling["seed"] == 5 * 1_000_003 + 1 and first.lineage.sampling["temperature"] == 1.0
    # round 2 evolves the round-1 task, not its seed
    assert second.lineage.round == 2 and second.lineage.parent_ids == [first.id]
    assert second.instruction == first.instruction + " Use exactly 40 words."

    assert all(r.stage == "evol" for r in rejects)
    by_parent = {outcome_key(r): r for r in rejects}
    assert len(by_parent) == len(rejects) == 2 * (len(FAULTS) - 1)  # one outcome per item and round
    for round_number in (1, 2):
        for parent, reason in EXPECTED_REASONS.items():
            reject = by_parent[(parent, round_number)]
            assert reject.reason == reason and reject.raw
        empty = by_parent[("seed-empty", round_number)]
        assert empty.reason == "parse failure" and empty.raw == "#Rewritten Prompt#:  " and empty.task is None
        error = by_parent[("seed-error", round_number)]
        assert error.reason == "teacher error" and "HTTP 500" in error.detail
    sorry = by_parent[("seed-sorry", 1)]
    assert sorry.raw == "Sorry, I cannot do that." and sorry.task.instances[0].output == sorry.raw
    assert sorry.task.lineage.operation == plan_evolution(5, 1, "seed-sorry")[0] and sorry.task.lineage.round == 1
    leak = by_parent[("seed-leak", 2)]
    assert leak.task.instruction.startswith("#Given Prompt#: [leak]") and leak.task.instances == []
    assert by_parent[("seed-garbled", 1)].raw == "I think so"
    # failed items cost no answer: only the ok, sorry and stopwords items were answered
    answered = [text for text in backend.seen if not text.startswith(("You are a prompt", "Here are two"))]
    assert len(answered) == 6
    # 9 rewrites, 5 verdicts, 3 answers a round; the greedy verdicts on the 4 round-2 pairs this
    # backend repeats (same parent, same rewrite) are the same question, answered from the cache
    assert teacher.stats.requests_sent == len(backend.seen) == 2 * (9 + 5 + 3) - 4
    assert teacher.stats.cache_hits == 4


def test_a_cut_off_answer_is_rejected_and_a_one_word_answer_kept(tmp_path):
    seeds = [Task(id=f"seed-{fault}", instruction=f"[{fault}] Name some rivers.") for fault in ("answercut", "yesno")]
    teacher = Teacher(FaultyBackend(), TeacherConfig(cache="off"))
    with TaskSink(tmp_path / "evol.jsonl") as sink:
        run_evol_instruct(
            seeds, EvolInstructConfig(rounds=1), RunContext(teacher, sink, num=10, seed=5, instances_per_task=1)
        )
    tasks, rejects = read_out(tmp_path)
    assert [(t.lineage.parent_ids, t.instances[0].output) for t in tasks] == [(["seed-yesno"], "No.")]
    [cut] = rejects
    assert cut.reason == "answer hit the length limit" == ANSWER_CUT_OFF
    assert cut.raw == "The Danube rises in the Black Forest and flows" and cut.detail == "answer"
    assert cut.task.lineage.parent_ids == ["seed-answercut"]
    assert cut.task.lineage.answer_finish_reason == "length"


def test_stops_once_the_sink_holds_num_tasks(tmp_path):
    (tmp_path / "evol.jsonl").write_text(Task(id="old", instruction="Old task.").to_json() + "\n")
    backend, teacher, calls, progressed = run_faulty(tmp_path, num=2, rounds=4)
    tasks, _ = read_out(tmp_path)
    assert [t.id for t in tasks][0] == "old" and len(tasks) == 2 and calls == [1] and progressed == [1]
    backend, teacher, calls, _ = run_faulty(tmp_path, num=2, rounds=4)
    assert backend.seen == [] and calls == []  # already full: not a single request


def test_a_rerun_replays_from_the_cache_and_writes_nothing_twice(tmp_path):
    _, _, calls, _ = run_faulty(tmp_path, rounds=2)
    tasks_before = (tmp_path / "evol.jsonl").read_text()
    rejects_before = rejects_path(tmp_path / "evol.jsonl").read_text()
    backend, teacher, again, progressed = run_faulty(tmp_path, rounds=2, batches_done=calls[-1])
    # only the failed requests (errors are never cached) are sent again
    assert len(backend.seen) == 2 and all("[error]" in text for text in backend.seen)
    assert teacher.stats.cache_hits == 2 * (9 + 5 + 3) - 2 and again == calls and sum(progressed) == 0
    assert (tmp_path / "evol.jsonl").read_text() == tasks_before
    assert rejects_path(tmp_path / "evol.jsonl").read_text() == rejects_before


def test_a_longer_rerun_continues_where_the_first_stopped(tmp_path):
    run_faulty(tmp_path, rounds=1)
    run_faulty(tmp_path, rounds=3, batches_done=3)
    tasks, rejects = read_out(tmp_path)
    assert [t.lineage.round for t in tasks] == [1, 2, 3]
    assert Counter(r.reason for r in rejects)["no information gain"] == 3  # once per round, not repeated


def test_the_same_run_sends_the_same_prompts(tmp_path):
    first, *_ = run_faulty(tmp_path / "a", cache="off")
    second, *_ = run_faulty(tmp_path / "b", cache="off")
    assert first.seen == second.seen and len(first.seen) == 2 * (9 + 5 + 3)


# -- a real run ---------------------------------------------------------------------------------

KNOWN_REASONS = {
    "no information gain",
    "teacher could not answer",
    "answer is only punctuation and stop words",
    "empty answer",
    "parse failure",
    "teacher error",
    "rewrite hit the length limit",
    "answer hit the length limit",
}


@pytest.mark.slow
def test_end_to_end_on_the_embedded_model_and_replay(tmp_path):
    from datagen.teachers import make_teacher

    seeds = read_tasks(Path("datagen/data/seed_tasks.jsonl"))[:2]
    settings = EvolInstructConfig(
        rounds=2,
        rewrite_sampling=SamplingParams(temperature=1.0, top_p=0.95, max_tokens=96),
        answer_sampling=SamplingParams(temperature=0.7, max_tokens=96),
    )
    output = tmp_path / "evol.jsonl"

    def run(batches_done: int) -> tuple[Teacher, list[int]]:
        calls: list[int] = []
        config = TeacherConfig(backend="local", cache_dir=str(tmp_path), batch_size=4)
        with make_teacher(config) as teacher, TaskSink(output) as sink:
            run_evol_instruct(
                seeds,
                settings,
                RunContext(
                    teacher,
                    sink,
                    num=50,
                    seed=0,
                    instances_per_task=1,
                    batches_done=batches_done,
                    on_batch_done=calls.append,
                ),
            )
        return teacher, calls

    started = time.monotonic()
    teacher, calls = run(0)
    print(f"first run: {time.monotonic() - started:.1f} s, {teacher.stats.requests_sent} requests")
    assert calls == [1, 2] and teacher.stats.requests_sent >= 2 * 2 * 1  # at least the rewrites
    tasks = list(read_records(output, Task)) if output.exists() else []
    rejects = list(read_records(rejects_path(output), Reject))
    assert len(tasks) + len(rejects) == 2 * 2  # every item, every round: a task or a reject
    seed_ids = {s.id for s in seeds}
    for task in tasks:
        assert task.lineage.generator == "evol-instruct" and task.lineage.operation in OPERATIONS
        assert task.lineage.round in (1, 2) and task.lineage.teacher_model == "smollm2-135m"
        assert task.lineage.parent_ids[0] in seed_ids | {t.id for t in tasks}
        assert len(task.instances) == 1 and task.instances[0].output and task.lineage.usage.completion_tokens > 0
    for reject in rejects:
        assert reject.stage == "evol"
        assert reject.reason in KNOWN_REASONS or reject.reason.startswith("copies rewriter words: ")
        assert reject.raw is not None or reject.reason == "teacher error"
        if reject.task is not None:
            assert reject.task.lineage.operation in OPERATIONS and reject.task.lineage.round in (1, 2)
            assert reject.task.lineage.parent_ids[0] in seed_ids | {t.id for t in tasks}
    written = (output.read_text() if output.exists() else "", rejects_path(output).read_text())

    teacher, again = run(calls[-1])
    assert teacher.stats.requests_sent == 0 and again == calls
    assert (output.read_text() if output.exists() else "", rejects_path(output).read_text()) == written
    print(json.dumps({"tasks": len(tasks), "rejects": Counter(r.reason for r in rejects)}))


def test_every_reject_says_which_batch_and_round_made_it(tmp_path):
    # the same fault recurs in every round: without batch and round, those lines would look
    # like one line written twice by a resumed run
    run_faulty(tmp_path, rounds=2)
    _tasks, rejects = read_out(tmp_path)
    assert rejects and all(reject.batch is not None for reject in rejects)
    assert {reject.round for reject in rejects} == {1, 2}
    lines = [reject.to_json() for reject in rejects]
    assert len(set(lines)) == len(lines)
