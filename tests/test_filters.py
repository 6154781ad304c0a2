"""Filter passes: each reason asserted on a crafted task, stats that add up, no silent drops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datagen.filters.base import check_pass
from datagen.filters.decontaminate import EvalIndex, decontaminate_pass
from datagen.filters.heuristics import OUR_REASONS, REFERENCE_REASONS, HeuristicsConfig, checks_for, score_rules
from datagen.filters.judge import JudgeConfig, judge_messages, judge_pass, parse_judgement
from datagen.filters.novelty import NoveltyConfig, novelty_pass
from datagen.io import read_tasks
from datagen.records import Instance, Task
from tests.helpers import run_cli


def task(instruction, *pairs, task_id=None):
    instances = [Instance(input=i, output=o) for i, o in pairs] or [Instance(output="A fine answer.")]
    return Task(id=task_id or instruction[:20], instruction=instruction, instances=instances)


GOOD = "Explain why the sea is salty in two sentences."

HEURISTIC_CASES = [
    (task("Sort this list."), "too short"),
    (task("Describe what you see in the image of a cat."), "blacklisted word: image"),
    (task("Write a program that prints the first ten primes."), "starts with 'Write a program'"),
    (task("...and then explain why the sky is blue."), "starts with punctuation"),
    (task(GOOD, ("same text", "same text")), "input equals output"),
    (task(GOOD, ("x", "")), "empty output"),
    (task(GOOD, ("x", "The answer is:")), "input or output ends with ':'"),
    (task(GOOD, ("a", "1"), ("a", "2")), "conflicting outputs for the same input"),
    (task(GOOD, ("", "As an AI language model, I cannot have opinions.")), "refusal: 'as an ai language model'"),
    (task(GOOD, ("", "I'm sorry, but I can't help with that.")), "refusal: \"i'm sorry, but\""),
    (task(GOOD, ("", "?!...")), "output is only punctuation"),
    (task(GOOD, ("", "very very very very very very very very good")), "degenerate output (repeats 'very')"),
    # the three mistakes found on real teacher data (text-davinci-003 replies)
    (task(GOOD, ("", "")), "empty output"),  # was "input equals output"
    (task("Write a short exchange between a shop customer and an agent.",
          ("", "Customer: Where is my order?\nAgent: I'm sorry, but it has been delayed by two days.")),
     None),  # an apology inside a dialogue is content, not the reply declining
    (task("List three people with their ages as a markdown table.",
          ("", "| Name | Age |\n| --- | --- |\n| Ann | 31 |\n| Bob | 27 |\n| Cid | 45 |")), None),
    (task("Compose a simple tune and write it as note names.", ("", "C D D D D E F G G G D D D D C C")),
     None),  # a melody written as notes
    # found on the labelled Alpaca sample (tests/data/filter_precision/): a dialogue line that
    # opens the reply is still content; a decline and a placeholder are not answers
    (task("Rewrite the dialogue so that the tone is more polite.",
          ("- Agent: I'm sorry, we can't do that.", "- Agent: I'm sorry, but we are unable to fulfill your request.")),
     None),
    (task("Write a polite note declining a wedding invitation.", ("", "I'm sorry, but I cannot attend.")), None),
    (task("Create a flow chart of the water cycle.", ("", "This task cannot be performed by a GPT model.")),
     "refusal: 'this task cannot'"),
    (task(GOOD, ("", "Unfortunately, I'm unable to browse the web.")),
     "refusal: \"i'm unable to\""),
    (task("Create a visual of the company's growth.", ("", "<nooutput>")), "placeholder output: '<nooutput>'"),
    (task("Design a banner for the product.", ("Heated cushion", "<noinput>\n<output image>")),
     "placeholder output: '<noinput>'"),
    (task(GOOD, ("", "No Output")), "placeholder output: 'No Output'"),
    (task("Select the description tags from this HTML code.", ("<html>...</html>", '<meta name="description">')),
     None),  # markup, not a placeholder
    (Task(id="none", instruction=GOOD), "no instances"),
    (task(GOOD), None),
]


@pytest.mark.parametrize(("candidate", "reason"), HEURISTIC_CASES, ids=lambda v: str(v)[:30])
def test_each_heuristic_reason(candidate, reason):
    kept, rejected = check_pass(checks_for(HeuristicsConfig()))([candidate])
    assert [r.reason for r in rejected] == ([reason] if reason else [])
    assert len(kept) + len(rejected) == 1


LABELLED = Path(__file__).parent / "data" / "filter_precision" / "alpaca_labelled.jsonl"
PRECISION_FLOOR = 0.95


def test_our_heuristics_hold_their_precision_on_labelled_teacher_data():
    """Real text-davinci-003 rows (Stanford Alpaca, CC BY-NC 4.0), each labelled with the rules
    whose defect it really has: a rule change that misfires on them fails here. The Self-Instruct
    reference rules are the method's and only reported (bench/filter_precision.py)."""
    rows = [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines()]
    labelled = [(Task(id=str(r["row"]), instruction=r["instruction"],
                      instances=[Instance(input=r["input"], output=r["output"])]), r["defects"]) for r in rows]
    scores = score_rules(labelled, checks_for(HeuristicsConfig()))
    ours = {rule: s for rule, s in scores.items() if rule not in REFERENCE_REASONS}
    assert set(ours) <= set(OUR_REASONS)
    low = {rule: (s.correct, s.fired) for rule, s in ours.items() if s.fired and s.precision < PRECISION_FLOOR}
    assert not low, f"below {PRECISION_FLOOR} precision (right, fired): {low}"
    # the labels stay honest about what the rules miss and misfire on: both are counted
    assert ours["placeholder output"].fired >= 8 and ours["refusal"].recall < 1
    assert scores["input or output ends with ':'"].precision == 0.0


def test_alpaca_preset_and_length_limits():
    music = task("Recommend some relaxing music for studying tonight.")
    assert check_pass(checks_for(HeuristicsConfig()))([music])[1] == []
    [rejection] = check_pass(checks_for(HeuristicsConfig(preset="alpaca")))([music])[1]
    assert rejection.reason == "blacklisted word: music"
    limits = checks_for(HeuristicsConfig(min_output_words=3, max_output_words=5))
    assert check_pass(limits)([task(GOOD, ("", "Yes."))])[1][0].reason == "output shorter than 3 words"
    assert (check_pass(limits)([task(GOOD, ("", "one two three four five six"))])[1][0].reason
            == "output longer than 5 words")


def test_novelty_pass_keeps_the_first_and_names_it():
    tasks = [
        task("Give me three tips for sleeping better at night.", task_id="a"),
        task("Give me three tips for sleeping better tonight.", task_id="b"),
        task("Name the capital city of Australia.", task_id="c"),
    ]
    kept, rejected = novelty_pass(tasks, NoveltyConfig())
    assert [t.id for t in kept] == ["a", "c"]
    assert rejected[0].reason == "too similar (ROUGE-L)" and rejected[0].duplicate_of == "a"


def test_decontamination_names_the_eval_item(tmp_path):
    evals = tmp_path / "evals.jsonl"
    evals.write_text(
        json.dumps({"question": "Alice has five apples and gives two of them to Bob who already had three apples, "
                                "how many does Bob have now"}) + "\n"
        + json.dumps({"question": "What is the boiling point of water?"}) + "\n"
    )
    index = EvalIndex.from_files([evals], n=13)
    leaked = task("Solve: alice has five apples and gives two of them to Bob, who already had three apples. "
                  "How many does Bob have now?")
    short_hit = task("Answer this: what is the boiling point of water?")
    clean = task("Alice has five pears; how many pears remain if she eats one?")
    kept, rejected = decontaminate_pass([leaked, short_hit, clean], index)
    assert kept == [clean]
    assert [r.detail for r in rejected] == [f"shares a 13-gram with {evals}:1", f"shares a 13-gram with {evals}:2"]
    plain = tmp_path / "evals.txt"
    plain.write_text("the quick brown fox jumps over the lazy dog near the river bank today\n")
    index = EvalIndex.from_files([plain], n=13)
    assert index.hit("Note: The quick brown fox jumps over the lazy dog near the river bank today!") == f"{plain}:1"


def test_judge_prompt_and_parse():
    [message] = judge_messages("Add the numbers.", "2 3", "5")
    assert message["content"].endswith(
        "Instruction: Add the numbers.\nInput: 2 3\nResponse: 5\n\nReply in exactly this form:\n"
        "Score: <a number from 0 to 5>\nRationale: <one or two sentences>")
    assert "Input:" not in judge_messages("Say hi.", "", "Hi!")[0]["content"]
    assert parse_judgement("Score: 4.5\nRationale: Correct and clear.") == (4.5, "Correct and clear.")
    assert parse_judgement("score=3") == (3.0, "")
    assert parse_judgement("5 - perfect") == (5.0, "")
    assert parse_judgement("Score: 9") is None
    assert parse_judgement("I think it is good.") is None


def test_judge_keeps_at_the_threshold_and_rejects_below_it_with_the_mean_score():
    from datagen.teachers import TeacherConfig
    from datagen.teachers.teacher import Teacher
    from tests.helpers import ScriptedBackend

    scores = {"Paris is the capital of France.": "Score: 4.5\nRationale: Correct.",
              "Bananas are yellow.": "Score: 1\nRationale: Off topic.",
              "Berlin.": "Score: 4", "Rome.": "score=2"}
    backend = ScriptedBackend(lambda prompt: scores[prompt.split("\nResponse: ")[1].split("\n\n")[0]])
    tasks = [task("What is the capital of France?", ("", "Paris is the capital of France."), task_id="good"),
             task("What is the capital of France?", ("", "Bananas are yellow."), task_id="bad"),
             task("Name a capital city.", ("", "Berlin."), ("", "Rome."), task_id="mean")]
    kept, rejected = judge_pass(tasks, Teacher(backend, TeacherConfig(cache="off")), JudgeConfig(threshold=3.0))
    assert [(t.id, t.lineage.judge_score, t.lineage.judge_rationale) for t in kept] == [
        ("good", 4.5, "Correct."), ("mean", 3.0, "")]  # (4 + 2) / 2: at the threshold is kept
    assert [(r.task.id, r.reason, r.detail, r.task.lineage.judge_score) for r in rejected] == [
        ("bad", "judge score below threshold", "1.00 < 3.0", 1.0)]
    assert len(backend.seen) == 4 and backend.seen[0] == judge_messages(
        "What is the capital of France?", "", "Paris is the capital of France.")[0]["content"]


def test_judge_pass_on_the_embedded_model(recorded):
    """The embedded 135M model as judge (its replies recorded, tests/recorded.py), asked in text
    (no reply schema: the fallback path; tests/test_structured.py covers constrained decoding): it
    does not keep to the rubric's form, and a reply without a score rejects the task with the reply."""
    from datagen.teachers import TeacherConfig

    tasks = [task("What is the capital of France?", ("", "Paris is the capital of France."), task_id="good"),
             task("What is the capital of France?", ("", "Bananas are yellow."), task_id="bad")]
    with recorded("judge_pass").teacher(TeacherConfig(cache="off", structured_outputs=False)) as teacher:
        kept, rejected = judge_pass(tasks, teacher, JudgeConfig(threshold=3.0))
    assert kept == []
    assert [(r.task.id, r.reason) for r in rejected] == [("good", "judge reply unparseable"),
                                                          ("bad", "judge reply unparseable")]
    assert rejected[0].detail == "The answer to the instruction is indeed the capital of France."
    assert rejected[1].detail.startswith("The answer to the instruction is correct, but the response")


def write_tasks(path, tasks):
    path.write_text("".join(t.to_json() + "\n" for t in tasks))


def test_filter_cli_writes_kept_rejects_and_stats_that_add_up(tmp_path):
    source = tmp_path / "raw.jsonl"
    tasks = [case.model_copy(update={"id": f"h{number}"}) for number, (case, _) in enumerate(HEURISTIC_CASES)]
    tasks.append(task("Give me three tips for sleeping better at night.", task_id="n1"))
    tasks.append(task("Give me three tips for sleeping better tonight.", task_id="n2"))
    write_tasks(source, tasks)
    result = run_cli("filter", str(source), "--out", str(tmp_path / "kept.jsonl"), "--passes", "heuristics,novelty")
    assert result.returncode == 0, result.stderr
    kept = read_tasks(tmp_path / "kept.jsonl")
    rejects = [json.loads(line) for line in (tmp_path / "kept.rejects.jsonl").read_text().splitlines()]
    stats = json.loads((tmp_path / "kept.stats.json").read_text())
    assert stats["in"] == len(tasks) == len(kept) + len(rejects)
    assert [p["pass"] for p in stats["passes"]] == ["heuristics", "novelty"]
    assert stats["passes"][0]["rejected"] == sum(1 for _, reason in HEURISTIC_CASES if reason)
    assert stats["passes"][1]["reasons"] == {"too similar (ROUGE-L)": 1}
    novelty_reject = next(r for r in rejects if r["stage"] == "novelty")
    assert novelty_reject["task"]["id"] == "n2" and novelty_reject["duplicate_of"] == "n1"
    assert all(r["reason"] for r in rejects)
    assert "heuristics" in result.stderr and "kept" in result.stderr


def test_malformed_line_stops_before_writing(tmp_path):
    source = tmp_path / "raw.jsonl"
    source.write_text(task(GOOD).to_json() + "\n{broken\n" + '{"id": "x"}\n')
    out = tmp_path / "kept.jsonl"
    result = run_cli("filter", str(source), "--out", str(out))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {source}:2: invalid JSON (and 1 more bad lines); fix it or pass --skip-invalid"
    )
    assert not out.exists()
    result = run_cli("filter", str(source), "--out", str(out), "--skip-invalid")
    assert result.returncode == 0, result.stderr
    rejects = [json.loads(line) for line in (tmp_path / "kept.rejects.jsonl").read_text().splitlines()]
    assert [r["detail"] for r in rejects[:2]] == [f"{source}:2: invalid JSON", f'{source}:3: missing "instruction"']
    assert len(read_tasks(out)) == 1


def test_decontaminate_without_eval_file_is_a_usage_error(tmp_path):
    source = tmp_path / "raw.jsonl"
    write_tasks(source, [task(GOOD)])
    result = run_cli("filter", str(source), "--out", str(tmp_path / "k.jsonl"), "--passes", "decontaminate")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --eval: the decontaminate pass needs at least one evaluation file"


def test_dedup_cli_names_what_each_duplicate_repeats(tmp_path):
    source = tmp_path / "raw.jsonl"
    write_tasks(source, [
        task("Give me three tips for sleeping better at night.", task_id="a"),
        task("give me three tips for sleeping better at night!", task_id="a-exact"),
        task("Give me three good tips for sleeping better at night.", task_id="a-near"),
        task("Name the capital city of Australia and its population.", task_id="b"),
    ])
    result = run_cli("dedup", str(source), "--out", str(tmp_path / "kept.jsonl"))
    assert result.returncode == 0, result.stderr
    assert [t.id for t in read_tasks(tmp_path / "kept.jsonl")] == ["a", "b"]
    rejects = {r["task"]["id"]: r for r in map(json.loads, (tmp_path / "kept.rejects.jsonl").read_text().splitlines())}
    assert rejects["a-exact"]["reason"] == "exact duplicate" and rejects["a-exact"]["duplicate_of"] == "a"
    assert rejects["a-near"]["reason"] == "near duplicate" and rejects["a-near"]["duplicate_of"] == "a"
    stats = json.loads((tmp_path / "kept.stats.json").read_text())
    assert [p["pass"] for p in stats["passes"]] == ["exact-dedup", "near-dedup"]
    assert "bands" in stats["passes"][1]["report"]
