"""Export: splits by task, round trips through `datasets`, Natural-Instructions files and the
upstream rules `--strict` enforces, ISO language names, negative examples, the dataset card.

The inputs are real: tasks from a Self-Instruct run of the embedded teacher
(tests/data/export/raw.jsonl with its rejects and summary), run through the real filter
here, plus tasks built in the test where a rule needs an exact shape.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from datagen.chat import GENERIC_SYSTEM
from datagen.config import SamplingParams
from datagen.config_file import load_config
from datagen.errors import ConfigError
from datagen.export import (
    FORMATS,
    ExportConfig,
    alpaca_examples,
    chat_examples,
    detect_language,
    format_export_summary,
    iso_language_names,
    negative_prompt,
    negatives_from_rejects,
    ni_task,
    parse_negative,
    prompt_completion_examples,
    run_export,
    split_by_task,
    tasks_from_rows,
    validate_ni_task,
)
from datagen.filtering import run_filter
from datagen.io import read_tasks, rejects_path, write_jsonl_atomic
from datagen.records import Instance, Lineage, Reject, Task
from datagen.teachers.base import BackendCounters, Completion
from tests.helpers import run_cli

FIXTURE = Path(__file__).parent / "data" / "export"
PNG = b"\x89PNG\r\n\x1a\n"


def config(**export):
    return load_config(None, {f"export.{key}": (f"--{key}", value) for key, value in export.items()})


def offline(**export):
    """Config that never loads a model: no teacher negatives."""
    return config(teacher_negatives=False, **export)


def even_odd_task(task_id="even-odd", n=30, **fields) -> Task:
    """A task that passes every upstream rule once it has a negative example: n distinct
    inputs, two balanced labels, English."""
    instances = [Instance(input=f"The number is {k}.", output="Even" if k % 2 == 0 else "Odd") for k in range(n)]
    defaults = dict(name="even_or_odd", instruction="Say whether the given number is even or odd.",
                    instances=instances, is_classification=True,
                    lineage=Lineage(generator="self-instruct", operation="bootstrap", teacher_backend="local",
                                    teacher_model="smollm2-135m"))
    return Task(id=task_id, **{**defaults, **fields})


def write_tasks(path: Path, tasks: list[Task], rejects: list[Reject] = ()) -> Path:
    write_jsonl_atomic(path, tasks)
    if rejects:
        write_jsonl_atomic(rejects_path(path), rejects)
    return path


def odd_reject(task: Task) -> Reject:
    """A Self-Instruct instance reject for `task`, as the generator writes it."""
    bad = Instance(input="The number is 7.", output="Even")
    return Reject(reason="instance: label contradicts the input", stage="instances",
                  raw=bad.model_dump_json(), detail=task.instruction)


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A copy of the real Self-Instruct run, filtered here by the real default passes."""
    for path in FIXTURE.iterdir():
        shutil.copy(path, tmp_path / path.name)
    run_filter(load_config(None), tmp_path / "raw.jsonl", tmp_path / "kept.jsonl", tmp_path / "kept.rejects.jsonl",
               "datagen filter raw.jsonl --out kept.jsonl")
    return tmp_path


# -- splits -----------------------------------------------------------------------------------


def test_split_by_task_is_deterministic_and_has_no_leakage():
    tasks = [even_odd_task(f"t{k}", n=2) for k in range(50)]
    tasks.append(even_odd_task("t7", n=3))  # a repeated id stays with its twin
    splits = split_by_task(tasks, validation=0.1, test=0.2, seed=3)
    assert set(splits) == {"train", "validation", "test"}
    ids = {name: {t.id for t in members} for name, members in splits.items()}
    assert (not ids["train"] & ids["test"] and not ids["train"] & ids["validation"]
            and not ids["test"] & ids["validation"])
    assert (len(ids["train"]), len(ids["validation"]), len(ids["test"])) == (35, 5, 10)
    assert sum(len(m) for m in splits.values()) == len(tasks)
    assert split_by_task(list(reversed(tasks)), validation=0.1, test=0.2, seed=3)["test"] == list(
        reversed(splits["test"]))  # order-independent membership
    assert {t.id for t in split_by_task(tasks, validation=0.1, test=0.2, seed=4)["test"]} != ids["test"]


@pytest.mark.parametrize(("count", "expected"), [(0, (0, 0, 0)), (1, (1, 0, 0)), (2, (1, 0, 1)), (3, (1, 1, 1)),
                                                 (10, (8, 1, 1))])
def test_split_by_task_with_few_tasks(count, expected):
    splits = split_by_task([even_odd_task(f"t{k}", n=1) for k in range(count)])
    assert tuple(len(splits[name]) for name in ("train", "validation", "test")) == expected


def test_split_fractions_must_leave_train():
    with pytest.raises(ConfigError):
        split_by_task([], validation=0.5, test=0.5)
    with pytest.raises(ConfigError,
                       match="config: export: Value error, validation \\+ test must leave some tasks for train"):
        config(validation=0.6, test=0.4)


# -- training formats and round trips ---------------------------------------------------------


def test_hf_round_trip_through_datasets(run_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "hf"
    summary = run_export(offline(), run_dir / "kept.jsonl", "hf", out)
    tasks = read_tasks(run_dir / "kept.jsonl")
    expected = split_by_task(tasks)
    files = {name: str(out / "data" / f"{name}.parquet") for name in ("train", "validation", "test")
             if (out / "data" / f"{name}.parquet").exists()}
    loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache"))
    on_disk = datasets.load_from_disk(str(out / "dataset"))
    for name in files:
        assert tasks_from_rows(loaded[name]) == [t for t in expected[name] if t.instances]
        assert tasks_from_rows(on_disk[name]) == tasks_from_rows(loaded[name])
    features = loaded["train"].features
    assert features["instance_index"].dtype == "int32" and features["is_classification"].dtype == "bool"
    assert features["round"].dtype == "int32" and features["task_prompt_tokens"].dtype == "int64"
    row = loaded["train"][0]
    assert row["generator"] == "self-instruct" and row["teacher_model"] and row["template_sha256"]
    ids = {name: set(loaded[name]["task_id"]) for name in files}
    assert all(not ids[a] & ids[b] for a in ids for b in ids if a < b)
    # the card's front matter lets `datasets` find the same splits from the folder alone
    by_folder = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache2"))
    assert {name: by_folder[name].num_rows for name in by_folder} == summary_rows(summary)


def summary_rows(summary):
    return {name: c["instances"] for name, c in summary["splits"].items() if c["instances"]}


@pytest.mark.parametrize("fmt", ["messages", "prompt-completion", "alpaca"])
def test_training_formats_round_trip_through_datasets(run_dir, tmp_path, fmt):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / fmt
    run_export(offline(), run_dir / "kept.jsonl", fmt, out)
    expected = split_by_task(read_tasks(run_dir / "kept.jsonl"))
    view = {"messages": chat_examples, "prompt-completion": prompt_completion_examples, "alpaca": alpaca_examples}[fmt]
    suffix = ".json" if fmt == "alpaca" else ".jsonl"
    for name, tasks in expected.items():
        path = out / f"{name}{suffix}"
        assert path.exists()
        records = view(tasks)
        if records:
            loaded = datasets.load_dataset("json", data_files=str(path), cache_dir=str(tmp_path / "cache"))["train"]
            assert loaded.to_list() == records
        else:
            assert path.read_text().strip() in ("", "[]")


def orca_task() -> Task:
    return Task(id="orca-1", name="capital", instruction="Name the capital of the country.",
                instances=[Instance(input="France", output="Paris", explanation="France's capital is Paris.")],
                system="Think the task through step by step.",
                lineage=Lineage(generator="orca", operation="orca:step_by_step", parent_ids=["seed-1"]))


def test_chat_examples_keep_the_orca_system_message_or_erase_it():
    plain, orca = even_odd_task(n=1), orca_task()
    [first, second] = chat_examples([plain, orca])
    assert first == {"messages": [{"role": "user", "content": f"{plain.instruction}\n\nInput:\nThe number is 0."},
                                  {"role": "assistant", "content": "Even"}],
                     "task_id": "even-odd", "instance_index": 0}
    assert second["messages"][0] == {"role": "system", "content": "Think the task through step by step."}
    assert second["messages"][-1]["content"] == "France's capital is Paris.\n\nFinal answer: Paris"
    [_, erased] = chat_examples([plain, orca], prompt_erasure=True)
    assert erased["messages"][0] == {"role": "system", "content": GENERIC_SYSTEM}
    [pair] = prompt_completion_examples([orca])  # the prompt is the user turn; the system message beside it
    assert pair["prompt"] == "Name the capital of the country.\n\nInput:\nFrance"
    assert pair["system"] == "Think the task through step by step."
    assert prompt_completion_examples([plain])[0]["system"] is None


def test_prompt_erasure_flag_reaches_the_exported_file(tmp_path):
    source = write_tasks(tmp_path / "orca.jsonl", [orca_task()])
    result = run_cli("export", str(source), "--format", "messages", "--out", str(tmp_path / "sft"), "--prompt-erasure")
    assert result.returncode == 0, result.stderr
    [line] = (tmp_path / "sft" / "train.jsonl").read_text().splitlines()
    assert json.loads(line)["messages"][0]["content"] == GENERIC_SYSTEM


# -- Natural-Instructions ---------------------------------------------------------------------


def test_ni_task_file_shape():
    task = even_odd_task()
    data = ni_task(task, 7, ExportConfig(), negatives=[{"input": "x", "output": "y", "explanation": "z"}])
    assert list(data) == ["Contributors", "Source", "URL", "Categories", "Reasoning", "Definition", "Input_language",
                          "Output_language", "Instruction_language", "Domains", "Positive Examples",
                          "Negative Examples", "Instances", "Instance License"]
    assert data["Definition"] == [task.instruction] and data["Categories"] == ["Text Categorization"]
    assert data["Domains"] == ["Miscellaneous"] and data["Reasoning"] == []
    assert data["Input_language"] == data["Output_language"] == data["Instruction_language"] == ["English"]
    assert [e["input"] for e in data["Positive Examples"]] == ["The number is 0.", "The number is 1."]
    assert len(data["Instances"]) == 28
    first = data["Instances"][0]
    assert first["input"] == "The number is 2." and first["output"] == ["Even"]
    assert first["id"].startswith("task007-") and len(first["id"]) == len("task007-") + 32
    assert validate_ni_task(data, "task007_even_or_odd") == []


def test_ni_merges_equal_inputs_and_prefers_orca_explanations_for_positives():
    task = Task(id="m", instruction="Answer.", instances=[
        Instance(input="a", output="1"), Instance(input="b", output="2", explanation="Because two."),
        Instance(input="a", output="one"), Instance(input="c", output="3")])
    data = ni_task(task, 1, ExportConfig())
    assert data["Positive Examples"][0] == {"input": "a", "output": "1",
                                            "explanation": "The output does what the definition asks for this input."}
    assert data["Positive Examples"][1]["explanation"] == "Because two."
    assert data["Positive Examples"][0]["input"] == "a"
    assert [(i["input"], i["output"]) for i in data["Instances"]] == [("c", ["3"])]


def test_ni_leaves_out_inputless_strays_but_keeps_tasks_without_inputs():
    stray = Instance(input="", output="Even")
    task = even_odd_task()
    task = task.model_copy(update={"instances": [task.instances[0], stray, *task.instances[1:]]})
    data = ni_task(task, 1, ExportConfig(), negatives=[{"input": "x", "output": "y", "explanation": "z"}])
    assert all(i["input"] for i in data["Instances"]) and len(data["Instances"]) == 28
    assert validate_ni_task(data, "task001_even_or_odd") == []
    no_input = Task(id="n", instruction="Name a colour.", instances=[Instance(output="red"), Instance(output="blue")])
    assert [(i["input"], i["output"]) for i in ni_task(no_input, 1, ExportConfig())["Instances"]] == [
        ("", ["red", "blue"])]


def test_a_repeated_input_is_not_a_negative_example():
    task = even_odd_task()
    repeat = Reject(reason="instance: input already present", stage="instances",
                    raw=Instance(input="The number is 2.", output="Odd").model_dump_json(), detail=task.instruction)
    assert negatives_from_rejects([task], [repeat]) == {}
    assert negatives_from_rejects([task], [odd_reject(task)])[task.id][0]["output"] == "Even"


@pytest.mark.parametrize(("break_it", "rule"), [
    (lambda d: d.pop("Domains"), "required keys"),
    (lambda d: d.update(Definition="a string"), "types"),
    (lambda d: d.update(Instances=d["Instances"][:20]), "instance count"),
    (lambda d: d["Instances"][3].update(input=""), "instances"),
    (lambda d: d["Instances"][3].update(output="Even"), "instances"),
    (lambda d: d["Instances"][3].update(id=d["Instances"][4]["id"]), "instances"),
    (lambda d: d["Instances"][3].update(input=d["Instances"][4]["input"]), "unique inputs"),
    (lambda d: d["Instances"][3].update(input=d["Positive Examples"][0]["input"]), "positive example overlap"),
    (lambda d: d.update({"Positive Examples": d["Positive Examples"][:1]}), "positive examples"),
    (lambda d: d.update({"Negative Examples": []}), "negative examples"),
    (lambda d: d["Negative Examples"][0].pop("explanation"), "examples"),
    (lambda d: [i.update(output=["Even"]) for i in d["Instances"]], "label balance"),
    (lambda d: [i.update(output=["Odd"]) for i in d["Instances"][:24]], "label balance"),
    (lambda d: d.update(Input_language=["French"]), "definition language"),
    (lambda d: d.update(Output_language=["Elvish"]), "language names"),
    (lambda d: d.update(Categories=["Poetry"]), "categories"),
    (lambda d: d.update(Categories=["Classification"]), "categories"),  # in the old hierarchy only
    (lambda d: d.update(Domains=["Elves"]), "domains"),
    (lambda d: d.update(Reasoning=["Guessing"]), "reasoning"),
    (lambda d: d.update(input_language=["English"]), "required keys"),
])
def test_each_upstream_rule_is_named(break_it, rule):
    data = ni_task(even_odd_task(), 1, ExportConfig(), negatives=[{"input": "x", "output": "y", "explanation": "z"}])
    assert validate_ni_task(data, "task001_even_or_odd") == []
    break_it(data)
    problems = validate_ni_task(data, "task001_even_or_odd")
    assert [p.split(":")[0] for p in problems] == [rule], problems


def test_upper_case_file_name_is_named():
    data = ni_task(even_odd_task(), 1, ExportConfig(), negatives=[{"input": "x", "output": "y", "explanation": "z"}])
    assert validate_ni_task(data, "task001_Even") == ["file name: 'task001_Even' has upper-case letters"]


def test_strict_exports_the_conforming_task_and_names_the_rules_the_others_break(tmp_path):
    good = even_odd_task("good")
    short = even_odd_task("short", n=10, name="short_task", instruction="Say whether this number is even or odd.")
    skewed = even_odd_task("skewed", name="skewed_task", instruction="Classify the number as even or odd, please.",
                           instances=[Instance(input=f"n = {k}", output="Even" if k < 29 else "Odd")
                                      for k in range(30)])
    # not a classification task, so no other label stands in for a rejected output
    no_negative = even_odd_task("lonely", name="no_rejects", instruction="Is the number odd or even?",
                                is_classification=False)
    source = write_tasks(tmp_path / "raw.jsonl", [good, short, skewed, no_negative],
                         [odd_reject(t) for t in (good, short, skewed)])
    out = tmp_path / "ni"
    result = run_cli("export", str(source), "--format", "natural-instructions", "--out", str(out), "--strict",
                     "--no-teacher-negatives")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["README.md", "task001_even_or_odd.json"]
    assert "task002_short_task (short) not exported:\n    instance count: 8 instances" in result.stderr
    assert "task003_skewed_task (skewed) not exported:\n    label balance: normalised entropy 0.22" in result.stderr
    assert "task004_no_rejects (lonely) not exported:\n    negative examples: no negative example" in result.stderr
    assert ("task004_no_rejects (lonely): no negative example: no rejected output to show, and teacher negatives "
            "are off") in result.stderr
    assert "--strict: 1 of 4 tasks pass" in result.stderr
    data = json.loads((out / "tasks" / "task001_even_or_odd.json").read_text())
    assert data["Negative Examples"] == [{"input": "The number is 7.", "output": "Even",
                                          "explanation": "This output was rejected (instances): label contradicts "
                                                         "the input."}]
    assert (out / "tasks" / "README.md").read_text().count("`task001_even_or_odd`") == 1
    listed = [(out / "splits" / "default" / f).read_text().split() for f in ("train_tasks.txt", "test_tasks.txt")]
    assert listed == [["task001_even_or_odd"], []]
    assert (out / "splits" / "default" / "excluded_tasks.txt").read_text() == ""
    summary = json.loads((out / "export.json").read_text())
    assert [f["name"] for f in summary["failures"]] == ["task002_short_task", "task003_skewed_task",
                                                         "task004_no_rejects"]


def test_strict_with_no_passing_task_is_an_error(tmp_path):
    source = write_tasks(tmp_path / "raw.jsonl", [even_odd_task(n=3)])
    result = run_cli("export", str(source), "--format", "natural-instructions", "--out", str(tmp_path / "ni"),
                     "--strict", "--no-teacher-negatives")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --strict: none of the 1 tasks passes; see the reasons above"
    )


def test_rerun_replaces_its_own_files_and_leaves_others(tmp_path):
    tasks = [even_odd_task(f"t{k}", name=f"task_{k}", instruction=f"Task number {k}: even or odd?") for k in range(3)]
    out = tmp_path / "ni"
    run_export(offline(), write_tasks(tmp_path / "a.jsonl", tasks), "natural-instructions", out)
    (out / "notes.txt").write_text("mine")
    run_export(offline(), write_tasks(tmp_path / "b.jsonl", tasks[:1]), "natural-instructions", out)
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["README.md", "task001_task_0.json"]
    assert (out / "notes.txt").read_text() == "mine"


# -- negative examples ------------------------------------------------------------------------


def test_negatives_come_from_rejected_outputs_not_from_duplicates():
    task = even_odd_task()
    duplicate = Reject(reason="near duplicate", stage="near-dedup", duplicate_of=task.id,
                       task=even_odd_task("dup", n=1, instances=[Instance(input="q", output="w")]))
    whole = Reject(reason="refusal", stage="heuristics",
                   task=Task(id="other", instruction=f"  {task.instruction.upper()} ",
                             instances=[Instance(input="The number is 3.", output="I'm sorry, I cannot.")]))
    accepted = Reject(reason="instance: input equals output", stage="instances", detail=task.instruction,
                      raw=Instance(input="The number is 2.", output="Even").model_dump_json())
    found = negatives_from_rejects([task], [duplicate, odd_reject(task), whole, accepted])
    assert found == {task.id: [
        {"input": "The number is 7.", "output": "Even",
         "explanation": "This output was rejected (instances): label contradicts the input."},
        {"input": "The number is 3.", "output": "I'm sorry, I cannot.",
         "explanation": "This output was rejected (heuristics): refusal."},
    ]}


def test_negatives_follow_the_filter_back_to_the_generation_rejects(run_dir, tmp_path):
    summary = run_export(offline(), run_dir / "kept.jsonl", "natural-instructions", tmp_path / "ni")
    read = summary["rejects_read"]["files"]
    assert str(run_dir / "kept.rejects.jsonl") in read and str(run_dir / "raw.rejects.jsonl") in read


def test_negative_prompt_is_pinned():
    [message] = negative_prompt("Say whether the number is even or odd.", "The number is 4.", "Even")
    assert message == {"role": "user", "content": (
        "Show a wrong answer to a task: one that looks plausible but is wrong, the kind of mistake a careless "
        "student would make, and say in one sentence why it is wrong.\n\n"
        "Example:\n"
        "Task: Name the capital of the given country.\n"
        "Input: Australia\n"
        "Correct answer: Canberra\n"
        "Wrong answer: Sydney\n"
        "Why it is wrong: Sydney is Australia's largest city, but the capital is Canberra.\n\n"
        'Now the real one. Reply with the two lines "Wrong answer:" and "Why it is wrong:" only.\n'
        "Task: Say whether the number is even or odd.\n"
        "Input: The number is 4.\n"
        "Correct answer: Even")}
    [without_input] = negative_prompt("Name a prime.", "", "7")
    assert without_input["content"].endswith("Task: Name a prime.\nCorrect answer: 7")


@pytest.mark.parametrize(("reply", "parsed"), [
    ("Wrong answer: Odd\nWhy it is wrong: 4 is divisible by 2.", ("Odd", "4 is divisible by 2.")),
    ("**Wrong answer:** Odd\n\n**Why it is wrong:** 4 is even.\nMore text.", ("Odd", "4 is even.")),
    ("Wrong answer: Odd", ("Odd", 'The correct answer is "Even".')),  # what a 135M teacher often sends
    ("Wrong answer: even\nWhy it is wrong: no reason.", None),  # the correct answer again
    ("Odd, because 4 is even.", None),
    ("Why it is wrong: x", None),
])
def test_parse_negative(reply, parsed):
    assert parse_negative(reply, "Even") == parsed


def test_teacher_negatives_on_the_embedded_model(tmp_path, recorded, monkeypatch):
    """The embedded model asked for a negative example (its replies recorded, tests/recorded.py)."""
    recorded("export_teacher_negatives").install(monkeypatch)
    task = even_odd_task(is_classification=False)  # a classification task would take another label instead
    source = write_tasks(tmp_path / "raw.jsonl", [task])
    settings = load_config(None, {"teacher.cache_dir": ("--cache-dir", str(tmp_path / "cache"))})
    summary = run_export(settings, source, "natural-instructions", tmp_path / "ni")
    asked = summary["negative_teacher"]
    negatives = summary["negatives"]
    assert asked["teacher"] == "local:smollm2-135m"
    # the 135M model answers the question instead of writing a wrong answer in the asked form, twice:
    # a second request on another example, then the task is exported without a negative, and says why
    assert negatives == {"from_rejects": 0, "from_labels": 0, "from_teacher": 0, "without": 1}
    assert asked["requests_sent"] == 2
    assert summary["negatives_missing"] == [{
        "task_id": "even-odd", "name": "task001_even_or_odd",
        "reason": 'teacher: 2 tries, none usable: no "Wrong answer:" line; no "Wrong answer:" line'}]
    data = json.loads(next((tmp_path / "ni" / "tasks").glob("task001_*.json")).read_text())
    assert data["Negative Examples"] == []
    assert data["Positive Examples"]


# -- languages --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "language"), [
    ("Write a short poem about the sea and the wind.", "English"),
    ("Le chat est sur la table et il dort dans la cuisine.", "French"),
    ("Der Hund ist nicht mit den Kindern auf der Straße.", "German"),
    ("El perro está en la casa con los niños y no come.", "Spanish"),
    ("Il gatto è sulla tavola e non vuole mangiare con gli altri.", "Italian"),
    ("Yes", "English"),
])
def test_detected_languages_are_iso_639_names(text, language):
    assert detect_language(text) == language
    assert language in iso_language_names()


def test_language_names_follow_upstream_normalisation():
    names = iso_language_names()
    assert {"English", "French", "Modern Greek (1453-)", "Malay", "Swahili"} <= names
    assert "Malay (individual language)" not in names and "Elvish" not in names


def test_language_override_is_checked(tmp_path):
    source = write_tasks(tmp_path / "raw.jsonl", [even_odd_task()])
    result = run_cli("export", str(source), "--format", "natural-instructions", "--out", str(tmp_path / "ni"),
                     "--language", "Elvish")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --language: Value error, 'Elvish' is not an ISO 639 language name "
                                     "(e.g. 'English', 'French')")
    run_export(offline(language="French"), source, "natural-instructions", tmp_path / "ni")
    data = json.loads(next((tmp_path / "ni" / "tasks").glob("*.json")).read_text())
    assert data["Input_language"] == data["Output_language"] == data["Instruction_language"] == ["French"]


# -- the card ---------------------------------------------------------------------------------


def test_card_renders_its_plots_and_cites_the_run(run_dir, tmp_path):
    out = tmp_path / "sft"
    summary = run_export(offline(), run_dir / "kept.jsonl", "messages", out, command_line="datagen export kept.jsonl")
    card = (out / "README.md").read_text()
    for plot in ("breakdown", "lengths", "filter"):
        path = out / "card" / f"{plot}.png"
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
        assert f"(card/{plot}.png)" in card
        assert f"card/{plot}.png" in summary["files"]
    generation = json.loads((run_dir / "raw.summary.json").read_text())
    stats = json.loads((run_dir / "kept.stats.json").read_text())
    assert f"| {stats['passes'][0]['pass']} | {stats['passes'][0]['in']} | {stats['passes'][0]['out']} |" in card
    assert generation["command"] in card and "datagen filter raw.jsonl --out kept.jsonl" in card
    assert "datagen export kept.jsonl" in card
    assert f"{generation['requests_sent']} requests sent" in card
    assert "cost not recorded (no `teacher.prices` set)" in card
    assert "| self-instruct |" in card and "local:smollm2-135m" in card


def test_card_says_what_is_missing(tmp_path):
    source = write_tasks(tmp_path / "tasks.jsonl", [even_odd_task()])
    run_export(offline(), source, "alpaca", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"No generation summary: `{tmp_path / 'tasks.summary.json'}` was not found" in card
    assert f"No filter statistics: `{tmp_path / 'tasks.stats.json'}` was not found" in card
    assert not (tmp_path / "out" / "card" / "filter.png").exists()


# -- the command line -------------------------------------------------------------------------


def test_bad_format_and_misplaced_strict_are_usage_errors(tmp_path):
    source = write_tasks(tmp_path / "raw.jsonl", [even_odd_task()])
    result = run_cli("export", str(source), "--format", "csv", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --format: expected one of {', '.join(FORMATS)}, got 'csv'"
    result = run_cli("export", str(source), "--format", "alpaca", "--out", str(tmp_path / "x"), "--strict")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --strict: applies to --format natural-instructions only"
    assert not (tmp_path / "x").exists()


def test_bad_input_line_is_one_error_line(tmp_path):
    source = tmp_path / "raw.jsonl"
    source.write_text(even_odd_task().to_json() + "\n{\"id\": \"x\"}\n")
    result = run_cli("export", str(source), "--format", "messages", "--out", str(tmp_path / "x"))
    assert result.returncode == 1
    assert result.stderr.strip() == f'error: {source}:2: missing "instruction"'


def test_repeated_task_id_is_one_error_line(tmp_path):
    source = write_tasks(tmp_path / "raw.jsonl", [even_odd_task("same", n=2), even_odd_task("same", n=3)])
    result = run_cli("export", str(source), "--format", "hf", "--out", str(tmp_path / "x"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {source}: task id 'same' appears more than once; export needs unique ids"


# -- Natural-Instructions as upstream's checker reads it ---------------------------------------
# (the rules restated here are those of allenai/natural-instructions src/test_all.py with the
# current doc/task-hierarchy.md; the checker itself is run outside the repository)


def sentiment_tasks(count=4, n=30) -> list[Task]:
    """Conforming sentiment tasks: n distinct inputs, labels positive/negative balanced."""
    subjects = ["movie", "restaurant", "phone", "hotel", "book", "album"][:count]
    return [Task(id=f"sentiment-{k}", name=f"{subject}_review_sentiment",
                 instruction=f"Classify the sentiment of the {subject} review as positive or negative.",
                 instances=[Instance(input=f"Review {i} of the {subject}: " + ("loved it." if i % 2 else "hated it."),
                                     output="positive" if i % 2 else "negative") for i in range(n)],
                 is_classification=True)
            for k, subject in enumerate(subjects)]


def no_teacher(config):
    raise AssertionError("the teacher was started")


def test_conforming_sentiment_tasks_pass_strict_without_any_teacher(tmp_path, monkeypatch):
    monkeypatch.setattr("datagen.teachers.teacher.make_backend", no_teacher)
    out = tmp_path / "ni"
    summary = run_export(config(), write_tasks(tmp_path / "raw.jsonl", sentiment_tasks()), "natural-instructions",
                         out, strict=True)
    assert summary["tasks_exported"] == 4 and summary["failures"] == []
    assert summary["negatives"] == {"from_rejects": 0, "from_labels": 4, "from_teacher": 0, "without": 0}
    assert "negative_teacher" not in summary
    data = json.loads((out / "tasks" / "task001_movie_review_sentiment.json").read_text())
    assert data["Categories"] == ["Sentiment Analysis"]
    [negative] = data["Negative Examples"]
    positive = data["Positive Examples"][0]
    assert negative["input"] == positive["input"] and {negative["output"], positive["output"]} == {"positive",
                                                                                                   "negative"}
    assert negative["explanation"] == (f'The correct label is "{positive["output"]}"; "{negative["output"]}" is '
                                       "another label of this task that does not fit this input.")
    assert "4 from another label, 0 from the teacher, 0 without" in format_export_summary(summary)


def test_readme_lines_and_both_splits_are_in_the_form_upstream_reads(tmp_path):
    out = tmp_path / "ni"
    run_export(offline(), write_tasks(tmp_path / "raw.jsonl", sentiment_tasks()), "natural-instructions", out)
    lines = [line for line in (out / "tasks" / "README.md").read_text().split("\n") if len(line) > 5]
    listed = [line for line in lines if "`" in line]
    assert all(line.startswith("`task") and line.endswith("`") for line in listed)
    numbers = [int(line.replace("`task", "").split("_")[0]) for line in listed]  # upstream's parse
    assert numbers == [1, 2, 3, 4]
    names = [line.split("`")[1] for line in listed]
    assert sorted(f"{name}.json" for name in names) == sorted(p.name for p in (out / "tasks").glob("*.json"))
    for folder in ("default", "xlingual"):
        members = [(out / "splits" / folder / f"{part}_tasks.txt").read_text().split()
                   for part in ("train", "test", "excluded")]
        assert sorted(sum(members, [])) == sorted(names)
        assert not set(members[0]) & set(members[1])
    assert ((out / "splits" / "xlingual" / "test_tasks.txt").read_text()
            == (out / "splits" / "default" / "test_tasks.txt").read_text())


@pytest.mark.parametrize(("fields", "category"), [
    (dict(instruction="Translate the sentence into French."), "Translation"),
    (dict(is_classification=True, outputs=["Positive", "Negative", "Neutral"]), "Sentiment Analysis"),
    (dict(instruction="What is the sentiment of the tweet?"), "Sentiment Analysis"),
    (dict(is_classification=True, outputs=["Spam", "Not spam"]), "Text Categorization"),
    (dict(instruction="Summarize the article in one sentence."), "Summarization"),
    (dict(instruction="Rewrite the sentence in a formal tone."), "Paraphrasing"),
    (dict(instruction="Suggest a title for the blog post."), "Title Generation"),
    (dict(instruction="Write a haiku about the sea."), "Poem Generation"),
    (dict(instruction="Answer the question about the passage."), "Question Answering"),
    (dict(instruction="Name three colours."), "Misc."),
])
def test_rule_categories_come_from_the_hierarchy(fields, category):
    from datagen.export.categories import CATEGORY_RULES, rule_category
    from datagen.export.hierarchy import CATEGORIES

    outputs = fields.pop("outputs", ["a", "b"])
    task = Task(id="t", instruction=fields.pop("instruction", "Label the text."),
                instances=[Instance(input=f"text {k}", output=outputs[k % len(outputs)]) for k in range(6)], **fields)
    assert rule_category(task) == category
    assert category in CATEGORIES and all(name in CATEGORIES for name, _fits, _why in CATEGORY_RULES)


def test_the_hierarchy_is_upstreams_current_one():
    from datagen.export.hierarchy import CATEGORIES, DOMAINS, REASONING

    assert len(CATEGORIES) == len(set(CATEGORIES)) == 76
    assert {"Question Answering", "Sentiment Analysis", "Text Categorization", "Paraphrasing", "Summarization",
            "Misc."} <= set(CATEGORIES)
    assert not {"Classification", "Text Generation"} & set(CATEGORIES)  # the old hierarchy's names
    assert "Miscellaneous" in DOMAINS and "Reviews -> Movies" in DOMAINS
    assert "Commonsense Reasoning" in REASONING and "Logical Reasoning -> Reasoning with Symbols" in REASONING


def test_category_option_and_hierarchy_fields_are_checked(tmp_path):
    source = write_tasks(tmp_path / "raw.jsonl", sentiment_tasks(1))
    result = run_cli("export", str(source), "--format", "natural-instructions", "--out", str(tmp_path / "ni"),
                     "--category", "Classification")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --category: Value error, 'Classification' is not a category of the "
                                     "Natural-Instructions task hierarchy (e.g. 'Question Answering', "
                                     "'Sentiment Analysis', 'Misc.')")
    result = run_cli("export", str(source), "--format", "natural-instructions", "--out", str(tmp_path / "ni"),
                     "--category", "Text Matching", "--no-teacher-negatives")
    assert result.returncode == 0, result.stderr
    data = json.loads(next((tmp_path / "ni" / "tasks").glob("*.json")).read_text())
    assert data["Categories"] == ["Text Matching"]
    assert "categories: Text Matching 1 (from --category 1)" in result.stderr
    with pytest.raises(ConfigError, match="'Elves' is not a domain of the Natural-Instructions task hierarchy"):
        config(domains=["Elves"])
    with pytest.raises(ConfigError, match="'Guessing' is not a reasoning type"):
        config(reasoning=["Guessing"])
    data = ni_task(even_odd_task(), 1, ExportConfig(domains=["Mathematics"], reasoning=["Reasoning on Numbers"]))
    assert (data["Domains"], data["Reasoning"]) == (["Mathematics"], ["Reasoning on Numbers"])


@pytest.mark.parametrize(("reply", "category"), [
    ("Sentiment Analysis", "Sentiment Analysis"),
    ("**sentiment analysis**", "Sentiment Analysis"),
    ("Category: `Misc`\nbecause nothing else fits", "Misc."),
    ("- Question Answering.", "Question Answering"),
    ("Classification", None),  # not a name of the current hierarchy
    ("I think it is Sentiment Analysis.", None),
    ("", None),
])
def test_parse_category_accepts_only_listed_names(reply, category):
    from datagen.export.categories import parse_category

    assert parse_category(reply) == category


def test_teacher_category_pick_falls_back_to_the_rules(tmp_path):
    from datagen.export.categories import category_prompt, teacher_categories
    from datagen.export.hierarchy import CATEGORIES
    from datagen.teachers.base import Completion

    tasks = sentiment_tasks(2)
    replies = {"movie": "Text Matching", "restaurant": "Movie Reviews"}
    asked = []

    def complete(conversations, params):
        asked.extend(conversations)
        return [[Completion(next(r for k, r in replies.items() if k in c[0]["content"]), "stop")]
                for c in conversations]

    picked = teacher_categories(tasks, {t.id: [{"input": "Great film.", "output": "positive"}] for t in tasks},
                                complete, SamplingParams(temperature=0.0))
    assert picked == {"sentiment-0": "Text Matching"}  # "Movie Reviews" is not a category: the rules decide
    [prompt] = category_prompt(tasks[0], [{"input": "Great film.", "output": "positive"}])
    assert prompt["content"].startswith("Choose the category of a task from a fixed list.")
    assert all(f"\n- {name}\n" in prompt["content"] for name in CATEGORIES)
    assert prompt["content"].endswith("Task: Classify the sentiment of the movie review as positive or negative.\n"
                                      "Example input: Great film.\nExample output: positive\nCategory:")


def shown_input(request) -> str:
    """The input a negative-example prompt asks about (the last "Input:" line; the first is
    the template's own example)."""
    return re.findall(r"\nInput: (.*)\n", request.messages[-1][1])[-1]


class ScriptedNegatives:
    """A backend that answers the negative-example prompt from a script keyed by the input
    shown (and the try's seed); what it is for is the unusable replies."""

    name, model = "scripted", "negatives"

    def __init__(self, script):
        self.script = script
        self.counters = BackendCounters()
        self.requests = []

    def generate(self, requests, on_result):
        for index, request in enumerate(requests):
            self.requests.append(request)
            shown = shown_input(request)
            on_result(index, Completion(self.script.get(shown, "I am not sure what you mean."), "stop", 10, 5))

    def close(self):
        pass


def test_teacher_negatives_retry_a_different_sample_and_say_why_none_was_usable(tmp_path, monkeypatch):
    first = even_odd_task("first", name="first_task", instruction="Describe the number in words.",
                          is_classification=False)
    second = even_odd_task("second", name="second_task", instruction="Describe the given number in words.",
                           is_classification=False)
    backend = ScriptedNegatives({
        "The number is 1.": "Wrong answer: Even\nWhy it is wrong: 1 is odd.",   # first task, second try
        "The number is 0.": "Wrong answer: even",                                 # the correct answer again
    })
    monkeypatch.setattr("datagen.teachers.teacher.make_backend", lambda config: backend)
    settings = load_config(None, {"teacher.cache_dir": ("--cache-dir", str(tmp_path / "cache"))})
    source = write_tasks(tmp_path / "raw.jsonl", [first, second])
    summary = run_export(settings, source, "natural-instructions", tmp_path / "ni")
    # try 1 shows the first positive example to both tasks; try 2 the second one, with the next seed
    shown = [(shown_input(r), r.params.seed) for r in backend.requests]
    assert shown == [("The number is 0.", 0), ("The number is 0.", 0), ("The number is 1.", 1),
                     ("The number is 1.", 1)]
    assert summary["negatives"] == {"from_rejects": 0, "from_labels": 0, "from_teacher": 2, "without": 0}
    data = json.loads((tmp_path / "ni" / "tasks" / "task001_first_task.json").read_text())
    assert data["Negative Examples"] == [{"input": "The number is 1.", "output": "Even",
                                          "explanation": "1 is odd."}]

    backend.script = {"The number is 0.": "Wrong answer: even"}
    fresh = load_config(None, {"teacher.cache_dir": ("--cache-dir", str(tmp_path / "cache2"))})  # no replay
    summary = run_export(fresh, source, "natural-instructions", tmp_path / "ni2")
    assert summary["negatives"]["without"] == 2
    reason = ('teacher: 2 tries, none usable: gave the correct answer as the wrong one; no "Wrong answer:" line')
    assert summary["negatives_missing"][0] == {"task_id": "first", "name": "task001_first_task", "reason": reason}
    assert f"  task001_first_task (first): no negative example: {reason}" in format_export_summary(summary)
