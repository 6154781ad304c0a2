"""`datagen export`: task JSONL -> Natural-Instructions task files, training files or a HF dataset.

Every format is a view of the same task records, written into one folder with a dataset
card (`README.md`, see `datagen.card`) beside the data:

| format | what lands in OUT |
| --- | --- |
| `natural-instructions` | `tasks/taskNNN_<name>.json` (allenai/natural-instructions schema), `tasks/README.md`, `splits/default/{train,test,excluded}_tasks.txt` |
| `alpaca` | `train.json`, `validation.json`, `test.json`: JSON arrays of `{instruction, input, output}` |
| `messages` | `train.jsonl`, `validation.jsonl`, `test.jsonl`: `{messages, task_id, instance_index}` |
| `prompt-completion` | `train.jsonl`, `validation.jsonl`, `test.jsonl`: `{prompt, completion, task_id, instance_index}` |
| `hf` | `dataset/` (`DatasetDict.save_to_disk`) and `data/<split>.parquet`, one typed row per instance, lineage as columns |

Splits are by task (`split_by_task`): no task has instances on both sides. Natural-
Instructions files put each task's first instances (Orca explanations first) into
`Positive Examples` and take `Negative Examples` from the rejects file beside the input
(`raw.jsonl` -> `raw.rejects.jsonl`, and through `kept.stats.json` the rejects of the run
the filter read); a task with none gets one from the teacher (`templates/
negative_example.jinja`), which is only loaded when some task needs it. `--strict`
applies the upstream repository's validation rules (`validate_ni_task`) and exports only
the tasks that pass, naming the rule each other task breaks.

    datagen export kept.jsonl --format natural-instructions --out ni/ --strict
    datagen export kept.jsonl --format messages --out sft/        # sft/train.jsonl

    from datagen.export import chat_examples, run_export, split_by_task
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from datagen.config import SamplingParams, Strict
from datagen.errors import ConfigError, InputError
from datagen.generators.orca import GENERIC_SYSTEM, task_kind, task_text, training_messages
from datagen.io import (
    atomic_write_json,
    atomic_write_text,
    read_tasks,
    rejects_path,
    stats_path,
    summary_path,
    write_dir_atomic,
    write_file_atomic,
    write_jsonl_atomic,
)
from datagen.prompts import load_template
from datagen.records import Instance, Lineage, Reject, Task, takes_input
from datagen.teachers.base import Message

FORMATS = ("natural-instructions", "alpaca", "messages", "prompt-completion", "hf")
SPLITS = ("train", "validation", "test")
NEGATIVE_TEMPLATE = "negative_example.jinja"
MANIFEST = "export.json"


class ExportConfig(Strict):
    """The `export:` section. Split fractions are of tasks, not instances."""

    validation: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    # ISO 639 name ("English", "French", ...) for every task; None detects it per task
    language: str | None = None
    # Natural-Instructions: instances moved into "Positive Examples" per task (upstream needs 2)
    positive_examples: int = Field(2, ge=1)
    # most negative examples per task taken from the rejects
    negative_examples: int = Field(2, ge=1)
    # ask the teacher for a wrong answer when a task has no rejected output to show
    teacher_negatives: bool = True
    negative_sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=1.0, max_tokens=256, seed=0)
    first_task_number: int = Field(1, ge=1)
    contributors: list[str] = Field(default_factory=lambda: ["datagen"])
    url: list[str] = Field(default_factory=list)
    instance_license: list[str] = Field(default_factory=lambda: ["Unknown"])

    @field_validator("language")
    @classmethod
    def _iso_name(cls, name: str | None) -> str | None:
        if name is not None and name not in iso_language_names():
            raise ValueError(f"{name!r} is not an ISO 639 language name (e.g. 'English', 'French')")
        return name

    @model_validator(mode="after")
    def _room_for_train(self) -> ExportConfig:
        if self.validation + self.test >= 1.0:
            raise ValueError("validation + test must leave some tasks for train")
        return self


# -- languages --------------------------------------------------------------------------------


@cache
def iso_language_names() -> frozenset[str]:
    """ISO 639-3 reference names, normalised as the upstream checker does ("Malay
    (individual language)" -> "Malay"), so every name we write passes its check."""
    import iso639

    return frozenset(
        language.name.replace("(individual language)", "").replace(" languages", "").strip()
        for language in iso639.ALL_LANGUAGES
    )


# A few very frequent, mostly language-specific function words per language: enough to
# tell these languages apart on a sentence or two without loading any model.
_STOPWORDS: dict[str, frozenset[str]] = {
    "English": frozenset("the and is are of to that it with for this was be you what which on not have from "
                         "they or by at your can given write".split()),
    "French": frozenset("le la les des est et une du que qui dans pour pas sur avec ce il elle je nous vous "
                        "sont au aux mais ou cette".split()),
    "German": frozenset("der die das und ist nicht ein eine zu mit den dem von sie es ich auf für sich auch "
                        "wir wie aber oder werden".split()),
    "Spanish": frozenset("el los las y es en una un que del por para con no se su al lo como más pero muy "
                         "está son".split()),
    "Italian": frozenset("il gli e è di che una un per non con del della sono si ma come anche questo nel "
                         "alla".split()),
    "Portuguese": frozenset("o os as e é um uma que do da dos das em para com não por se mais mas como no na "
                            "são".split()),
    "Dutch": frozenset("de het een en is van niet dat die ik je op te zijn met voor maar ook er wat naar hij "
                       "zij".split()),
}


def detect_language(text: str, default: str = "English") -> str:
    """The language of `text` among a handful, by function-word counts; `default` when
    there is too little evidence (fewer than 3 hits) or English ties for first."""
    words = re.findall(r"[^\W\d_]+", text.lower())
    scores = {name: sum(word in stopwords for word in words) for name, stopwords in _STOPWORDS.items()}
    best = max(scores, key=lambda name: scores[name])
    if scores[best] < 3 or scores[best] == scores["English"]:
        return default
    return best


# -- splits and training views ----------------------------------------------------------------


def split_by_task(
    tasks: list[Task], *, validation: float = 0.1, test: float = 0.1, seed: int = 0
) -> dict[str, list[Task]]:
    """Tasks into "train", "validation" and "test", each task (all records with its id) wholly
    in one split, input order kept within a split.

    Deterministic: tasks are ranked by sha256(seed, task id), so the split does not depend
    on input order. Counts are `round(fraction * tasks)`, except that test gets at least one
    task when there are two or more and `test > 0`, validation at least one when there are
    three or more and `validation > 0`, and train always keeps at least one.
    """
    if validation < 0 or test < 0 or validation + test >= 1:
        raise ConfigError("export: validation and test must be >= 0 and leave some tasks for train")
    ids = list(dict.fromkeys(task.id for task in tasks))
    ranked = sorted(ids, key=lambda task_id: hashlib.sha256(f"{seed}\x1f{task_id}".encode()).hexdigest())
    total = len(ids)
    n_test, n_validation = round(test * total), round(validation * total)
    if test > 0 and total >= 2:
        n_test = max(n_test, 1)
    if validation > 0 and total >= 3:
        n_validation = max(n_validation, 1)
    while total and n_test + n_validation > total - 1:  # train keeps one; validation gives way first
        if n_validation:
            n_validation -= 1
        else:
            n_test -= 1
    side = {task_id: "test" for task_id in ranked[:n_test]}
    side.update({task_id: "validation" for task_id in ranked[n_test : n_test + n_validation]})
    splits: dict[str, list[Task]] = {name: [] for name in SPLITS}
    for task in tasks:
        splits[side.get(task.id, "train")].append(task)
    return splits


def is_orca(task: Task) -> bool:
    return task.system is not None or (task.lineage is not None and task.lineage.generator == "orca")


def instance_messages(
    task: Task, instance: Instance, *, prompt_erasure: bool = False, generic_system: str = GENERIC_SYSTEM
) -> list[Message]:
    """The chat training example for one instance: Orca tasks through
    `orca.training_messages` (system message, explanation, "Final answer:" line, prompt
    erasure); any other task as the user's task text and the output."""
    if is_orca(task):
        return training_messages(task, instance, prompt_erasure, generic_system)
    return [
        {"role": "user", "content": task_text(task.instruction, instance.input)},
        {"role": "assistant", "content": instance.output.strip()},
    ]


def chat_examples(
    tasks: list[Task], *, prompt_erasure: bool = False, generic_system: str = GENERIC_SYSTEM
) -> list[dict]:
    """One `{"messages", "task_id", "instance_index"}` per instance, in task order."""
    return [
        {
            "messages": instance_messages(task, instance, prompt_erasure=prompt_erasure, generic_system=generic_system),
            "task_id": task.id,
            "instance_index": index,
        }
        for task in tasks
        for index, instance in enumerate(task.instances)
    ]


def alpaca_examples(tasks: list[Task], **chat: Any) -> list[dict]:
    """Alpaca's `{instruction, input, output}`; an Orca output carries its explanation and the
    "Final answer:" line, as in the chat view (Alpaca has no system message)."""
    return [
        {"instruction": task.instruction, "input": task.instances[example["instance_index"]].input,
         "output": example["messages"][-1]["content"]}
        for task in tasks
        for example in chat_examples([task], **chat)
    ]


def prompt_completion_examples(tasks: list[Task], **chat: Any) -> list[dict]:
    """`{prompt, completion, task_id, instance_index}`: the system message (if any) and the
    user turn as the prompt, the assistant turn as the completion."""
    examples = []
    for example in chat_examples(tasks, **chat):
        *context, answer = example["messages"]
        examples.append({
            "prompt": "\n\n".join(message["content"] for message in context),
            "completion": answer["content"],
            "task_id": example["task_id"],
            "instance_index": example["instance_index"],
        })
    return examples


# -- Natural-Instructions ---------------------------------------------------------------------

NI_KEYS = (
    "Contributors", "Source", "URL", "Categories", "Reasoning", "Definition", "Input_language",
    "Output_language", "Instruction_language", "Domains", "Positive Examples", "Negative Examples",
    "Instances", "Instance License",
)
# Keys upstream's src/test_all.py requires (Instruction_language through its type check).
NI_REQUIRED = (
    "Definition", "Input_language", "Output_language", "Instruction_language", "Positive Examples",
    "Negative Examples", "Instances", "Contributors", "Categories", "Domains", "Source", "URL", "Reasoning",
)
NI_LIST_KEYS = ("Definition", "Source", "URL", "Contributors", "Categories", "Reasoning", "Domains",
                "Input_language", "Output_language", "Instruction_language")
# The part of upstream's doc/task-hierarchy.md that export emits: categories and domains
# must be listed there.
NI_CATEGORIES = frozenset({"Classification", "Translation", "Text Generation"})
NI_DOMAINS = frozenset({"Miscellaneous"})
MIN_INSTANCES, MAX_INSTANCES = 25, 6500  # upstream: more than 25, at most 6,500

_ID_LIKE = re.compile(r"^[a-z_]+-[0-9a-f]{8,}$")


def snake_name(task: Task, limit: int = 60) -> str:
    """A lowercase snake_case name: the task's own name, or (when that is just an id) the
    first words of its instruction."""
    base = task.name if task.name and task.name != task.id and not _ID_LIKE.match(task.name) else task.instruction
    words = re.sub(r"[^a-z0-9]+", " ", base.lower()).split()
    name = ""
    for word in words:
        if len(name) + len(word) + 1 > limit:
            break
        name = f"{name}_{word}" if name else word
    return name or "task"


def ni_task_name(number: int, task: Task) -> str:
    return f"task{number:03d}_{snake_name(task)}"


def ni_instance_id(number: int, task_id: str, instance_input: str) -> str:
    """Upstream's id shape, "taskNNN-" and 32 hex digits; derived from the task and the
    input (unique within a task once equal inputs are merged), so a rerun gives the same ids."""
    digest = hashlib.sha256(f"{task_id}\x1f{instance_input}".encode("utf-8")).hexdigest()[:32]
    return f"task{number:03d}-{digest}"


def positive_explanation(task: Task, output: str) -> str:
    if task.is_classification:
        return f'The input belongs to the class "{output.strip()}", so that label is the answer.'
    return "The output does what the definition asks for this input."


def inputless_strays(task: Task) -> int:
    """Instances without an input in a task that takes input: the teacher left the input
    out, and a Natural-Instructions instance needs one. They are not exported."""
    return sum(1 for instance in task.instances if not instance.input) if takes_input(task.instances) else 0


def ni_instances(task: Task) -> list[tuple[str, list[str], str | None]]:
    """(input, outputs, explanation) with equal inputs merged (upstream: "merge outputs
    before removing duplicates"), outputs de-duplicated, first-seen order kept; inputless
    strays left out."""
    merged: dict[str, tuple[list[str], list[str | None]]] = {}
    needs_input = takes_input(task.instances)
    for instance in task.instances:
        if needs_input and not instance.input:
            continue
        outputs, explanations = merged.setdefault(instance.input, ([], []))
        if instance.output not in outputs:
            outputs.append(instance.output)
        explanations.append(instance.explanation)
    return [(text, outputs, next((e for e in expl if e), None)) for text, (outputs, expl) in merged.items()]


def ni_task(
    task: Task, number: int, settings: ExportConfig, negatives: Sequence[dict] = ()
) -> dict[str, Any]:
    """The Natural-Instructions task file for `task` (keys in upstream order).

    Up to `settings.positive_examples` merged instances become positive examples (ones with
    an Orca explanation first), always leaving one instance; the rest are the instances,
    each `{"id": "taskNNN-<32 hex>", "input", "output": [...]}`.
    """
    merged = ni_instances(task)
    take = min(settings.positive_examples, max(len(merged) - 1, 0))
    ranked = sorted(range(len(merged)), key=lambda i: (merged[i][2] is None, i))
    chosen = sorted(ranked[:take])
    positives = [
        {"input": merged[i][0], "output": merged[i][1][0],
         "explanation": (merged[i][2] or positive_explanation(task, merged[i][1][0])).strip()}
        for i in chosen
    ]
    instances = [
        {"id": ni_instance_id(number, task.id, text), "input": text, "output": outputs}
        for i, (text, outputs, _explanation) in enumerate(merged) if i not in chosen
    ]
    instruction_language = settings.language or detect_language(task.instruction)
    inputs = " ".join(text for text, _o, _e in merged)
    outputs = " ".join(output for _t, outs, _e in merged for output in outs)
    generator = task.lineage.generator if task.lineage and task.lineage.generator else None
    teacher = task.lineage.teacher_model if task.lineage and task.lineage.teacher_model else None
    source = "datagen" + (f" {generator}" if generator else "") + (f" (teacher {teacher})" if teacher else "")
    return {
        "Contributors": list(settings.contributors),
        "Source": [source],
        "URL": list(settings.url),
        "Categories": [ni_category(task)],
        "Reasoning": [],
        "Definition": [task.instruction.strip()],
        "Input_language": [settings.language or (detect_language(inputs) if inputs.strip() else instruction_language)],
        "Output_language": [settings.language or detect_language(outputs)],
        "Instruction_language": [instruction_language],
        "Domains": ["Miscellaneous"],
        "Positive Examples": positives,
        "Negative Examples": list(negatives),
        "Instances": instances,
        "Instance License": list(settings.instance_license),
    }


def ni_category(task: Task) -> str:
    return {"translation": "Translation", "classification": "Classification"}.get(task_kind(task), "Text Generation")


def validate_ni_task(data: dict[str, Any], name: str) -> list[str]:
    """Every upstream rule (allenai/natural-instructions src/test_all.py) `data` breaks, as
    "rule: detail". `name` is the file name without ".json". Unlike upstream, which stops
    at the first failed assert, this lists them all. [] means the task passes."""
    problems: list[str] = []

    def fail(rule: str, detail: str) -> None:
        problems.append(f"{rule}: {detail}")

    if name != name.lower():
        fail("file name", f"{name!r} has upper-case letters")
    missing = [key for key in NI_REQUIRED if key not in data]
    if missing:
        fail("required keys", "missing " + ", ".join(f'"{key}"' for key in missing))
    misspelt = [key for key in ("instruction_language", "input_language", "output_language") if key in data]
    if misspelt:
        fail("required keys", "lower-case " + ", ".join(misspelt))
    for key in NI_LIST_KEYS:
        if key in data and not isinstance(data[key], list):
            fail("types", f'"{key}" must be a list')
    for definition in data.get("Definition") or []:
        if not isinstance(definition, str):
            fail("types", '"Definition" must be a list of strings')
            continue
        absent = [lang for lang in data.get("Input_language") or [] if lang != "English" and lang not in definition]
        if absent:
            fail("definition language", f"the definition must name the input language {', '.join(absent)}")
    names = iso_language_names()
    for key in ("Input_language", "Output_language", "Instruction_language"):
        for language in data.get(key) or []:
            if language not in names:
                fail("language names", f'{key} "{language}" is not an ISO 639 language name')
    for category in data.get("Categories") or []:
        if category not in NI_CATEGORIES:
            fail("categories", f'"{category}" is not a category of the task hierarchy')
    for domain in data.get("Domains") or []:
        if domain not in NI_DOMAINS:
            fail("domains", f'"{domain}" is not a domain of the task hierarchy')

    instances = data.get("Instances") or []
    if not MIN_INSTANCES < len(instances) <= MAX_INSTANCES:
        fail("instance count", f"{len(instances)} instances; needs more than {MIN_INSTANCES} and at most {MAX_INSTANCES}")
    ids: set[str] = set()
    for position, instance in enumerate(instances):
        where = f"instance {position}"
        lacking = [key for key in ("id", "input", "output") if key not in instance]
        if lacking:
            fail("instances", f"{where} lacks {', '.join(lacking)}")
            continue
        if instance["id"] in ids:
            fail("instances", f"{where}: duplicate id {instance['id']}")
        ids.add(instance["id"])
        if not isinstance(instance["input"], str) or not instance["input"]:
            fail("instances", f"{where}: input must be a non-empty string")
        output = instance["output"]
        if not isinstance(output, list) or not output or not all(isinstance(o, str) for o in output):
            fail("instances", f"{where}: output must be a non-empty list of strings")

    positives = data.get("Positive Examples") or []
    negatives = data.get("Negative Examples") or []
    if len(positives) < 2:
        fail("positive examples", f"{len(positives)} positive examples; needs at least 2")
    if len(negatives) < 1:
        fail("negative examples", "no negative example; needs at least 1")
    for kind, examples in (("positive", positives), ("negative", negatives)):
        for position, example in enumerate(examples):
            if any(not isinstance(example.get(key), str) for key in ("input", "output", "explanation")):
                fail("examples", f"{kind} example {position}: input, output and explanation must be strings")

    inputs = [instance.get("input") for instance in instances]
    repeated = sorted((text for text, count in Counter(inputs).items() if count > 1), key=str)
    if repeated:
        fail("unique inputs", f"{len(repeated)} inputs repeat, e.g. {str(repeated[0])[:60]!r}")
    shown = {example.get("input") for example in positives}
    overlap = [text for text in inputs if text in shown]
    if overlap:
        fail("positive example overlap", f"instance input {str(overlap[0])[:60]!r} is also a positive example")

    outputs = [o for instance in instances if isinstance(instance.get("output"), list) for o in instance["output"]]
    counts = list(Counter(outputs).values())
    if len(counts) == 1:
        fail("label balance", f"every instance has the same output {outputs[0][:60]!r}")
    elif 1 < len(counts) < 15:
        total = sum(counts)
        entropy = -sum(c / total * math.log(c / total) for c in counts) / math.log(len(counts))
        if entropy <= 0.8:
            fail("label balance", f"normalised entropy {entropy:.2f} of {len(counts)} outputs; needs more than 0.8")
    return problems


# -- negative examples ------------------------------------------------------------------------

# Rejections that say nothing about an output being wrong: duplicates, novelty,
# contamination, prompt-level failures.
_NOT_ABOUT_OUTPUT_STAGES = frozenset({"exact-dedup", "near-dedup", "novelty", "decontaminate", "bootstrap", "read"})
_NOT_ABOUT_OUTPUT_REASONS = frozenset({
    "conflicting outputs for the same input", "surplus beyond num", "duplicate input task id",
    "no valid instances", "no instance answered", "teacher error", "instance: input already present",
    "instance: input missing",
})


def _instruction_key(text: str) -> str:
    return " ".join(text.split()).casefold()


def _rejected_instances(reject: Reject) -> tuple[str | None, str | None, list[Instance]]:
    """(task id, instruction, instances) a reject shows as wrong outputs, or no instances.

    A rejected instance (Self-Instruct: the instance JSON in `raw`, the instruction in
    `detail`) counts; so does a rejected task with exactly one instance, the reason then
    being about that instance's output. A rejected task with several instances does not:
    the reason may concern only one of them.
    """
    if reject.stage in _NOT_ABOUT_OUTPUT_STAGES or reject.reason in _NOT_ABOUT_OUTPUT_REASONS or reject.duplicate_of:
        return None, None, []
    if reject.task is not None:
        instances = reject.task.instances if len(reject.task.instances) == 1 else []
        return reject.task.id, reject.task.instruction, instances
    if reject.raw and reject.detail:
        try:
            instance = Instance.model_validate_json(reject.raw)
        except ValidationError:
            return None, None, []
        return None, reject.detail, [instance]
    return None, None, []


def negatives_from_rejects(tasks: Sequence[Task], rejects: Iterable[Reject], limit: int = 2) -> dict[str, list[dict]]:
    """Task id -> up to `limit` negative examples `{input, output, explanation}` from rejects
    matched by task id, else by instruction (case and white space folded). The explanation
    is the rejection reason. Empty outputs and outputs the task accepts for that input are
    left out."""
    by_id = {task.id: task for task in tasks}
    by_instruction: dict[str, list[Task]] = {}
    for task in tasks:
        by_instruction.setdefault(_instruction_key(task.instruction), []).append(task)
    found: dict[str, list[dict]] = {}
    for reject in rejects:
        task_id, instruction, instances = _rejected_instances(reject)
        if not instances:
            continue
        targets = [by_id[task_id]] if task_id in by_id else by_instruction.get(_instruction_key(instruction or ""), [])
        reason = reject.reason.removeprefix("instance: ")
        for target in targets:
            accepted = {(i.input, i.output.strip()) for i in target.instances}
            examples = found.setdefault(target.id, [])
            for instance in instances:
                output = instance.output.strip()
                example = {"input": instance.input, "output": output,
                           "explanation": f"This output was rejected ({reject.stage}): {reason}."}
                if output and (instance.input, output) not in accepted and len(examples) < limit and all(
                    (e["input"], e["output"]) != (instance.input, output) for e in examples
                ):
                    examples.append(example)
    return {task_id: examples for task_id, examples in found.items() if examples}


def read_rejects(paths: Iterable[Path]) -> tuple[list[Reject], list[str]]:
    """Rejects from each existing file, and "file:line" of lines that are not rejects (a run
    killed mid-line leaves one; rejects only add examples, so they are skipped and counted)."""
    rejects, unreadable = [], []
    for path in paths:
        if not path.exists():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rejects.append(Reject.model_validate_json(line))
                except ValidationError:
                    unreadable.append(f"{path}:{number}")
    return rejects, unreadable


def negative_prompt(instruction: str, example_input: str, correct_output: str) -> list[Message]:
    """What the teacher is asked for a task without a rejected output to show."""
    text = load_template(NEGATIVE_TEMPLATE).render(
        instruction=instruction.strip(), input=example_input.strip(), output=correct_output.strip()
    )
    return [{"role": "user", "content": text}]


# "Wrong answer:", also "**Wrong answer:**" and "**Wrong answer**:" (chat models like bold)
_WRONG = re.compile(r"^\W*wrong answer\W*?:(?:\*\*|__)?[ \t]*", re.IGNORECASE | re.MULTILINE)
_WHY = re.compile(r"^\W*why it is wrong\W*?:(?:\*\*|__)?[ \t]*", re.IGNORECASE | re.MULTILINE)


def parse_negative(text: str, correct_output: str) -> tuple[str, str] | None:
    """(wrong answer, why it is wrong) from a reply in the template's form; None when there is
    no "Wrong answer:" line or it is empty or the correct answer. Small teachers often leave
    out the "Why it is wrong:" line; the explanation then names the correct answer."""
    wrong_at = _WRONG.search(text)
    if not wrong_at:
        return None
    why_at = _WHY.search(text, wrong_at.end())
    wrong = text[wrong_at.end() : why_at.start() if why_at else len(text)].strip()
    why_lines = text[why_at.end() :].strip().splitlines() if why_at else []
    why = why_lines[0].strip() if why_lines else ""
    if not wrong or wrong.casefold() == correct_output.strip().casefold():
        return None
    return wrong, why or f'The correct answer is "{correct_output.strip()}".'


def teacher_negatives(tasks: Sequence[Task], files: dict[str, dict], complete: Callable, params: SamplingParams) -> int:
    """Ask the teacher for one negative example per task in `tasks`, on the input of its first
    positive example (else its first instance); set it in `files[task.id]`. Returns how many
    replies were usable. `complete` is `Teacher.complete`."""
    asked = []
    for task in tasks:
        data = files[task.id]
        shown = data["Positive Examples"][:1] or [
            {"input": i["input"], "output": i["output"][0]} for i in data["Instances"][:1]
        ]
        if shown:
            asked.append((task, shown[0]["input"], shown[0]["output"]))
    if not asked:
        return 0
    replies = complete([negative_prompt(task.instruction, text, output) for task, text, output in asked], params)
    usable = 0
    for (task, text, output), [reply] in zip(asked, replies):
        parsed = parse_negative(reply.text, output) if reply.ok else None
        if parsed:
            wrong, why = parsed
            files[task.id]["Negative Examples"] = [{"input": text, "output": wrong, "explanation": why}]
            usable += 1
    return usable


# -- Hugging Face rows ------------------------------------------------------------------------


def hf_features():
    """Typed columns of the `hf` format (imports `datasets`)."""
    import datasets

    string, listing = datasets.Value("string"), getattr(datasets, "List", datasets.Sequence)
    return datasets.Features({
        "task_id": string, "task_name": string, "instruction": string, "input": string, "output": string,
        "explanation": string, "system": string, "is_classification": datasets.Value("bool"),
        "instance_index": datasets.Value("int32"),
        "messages": listing({"role": string, "content": string}),
        "generator": string, "operation": string, "round": datasets.Value("int32"),
        "parent_ids": listing(string), "teacher_backend": string, "teacher_model": string,
        "template": string, "template_sha256": string, "seed": datasets.Value("int64"),
        "task_prompt_tokens": datasets.Value("int64"), "task_completion_tokens": datasets.Value("int64"),
        "judge_score": datasets.Value("float64"),
        "lineage": string, "task_extra": string, "instance_extra": string,
    })


def hf_rows(tasks: Sequence[Task], **chat: Any) -> list[dict[str, Any]]:
    """One row per instance. Lineage fields are typed columns (token counts are the whole
    task's, repeated on each of its rows); `lineage`, `task_extra` and `instance_extra` hold
    the full lineage and any unknown keys as JSON, so `tasks_from_rows` loses nothing."""
    rows = []
    for task in tasks:
        lineage = task.lineage or Lineage()
        task_extra = json.dumps(task.model_extra or {}, ensure_ascii=False, sort_keys=True)
        for index, instance in enumerate(task.instances):
            rows.append({
                "task_id": task.id, "task_name": task.name, "instruction": task.instruction,
                "input": instance.input, "output": instance.output, "explanation": instance.explanation,
                "system": task.system, "is_classification": task.is_classification, "instance_index": index,
                "messages": instance_messages(task, instance, **chat),
                "generator": lineage.generator, "operation": lineage.operation, "round": lineage.round,
                "parent_ids": list(lineage.parent_ids), "teacher_backend": lineage.teacher_backend,
                "teacher_model": lineage.teacher_model, "template": lineage.template,
                "template_sha256": lineage.template_sha256, "seed": lineage.seed,
                "task_prompt_tokens": lineage.usage.prompt_tokens,
                "task_completion_tokens": lineage.usage.completion_tokens,
                "judge_score": lineage.judge_score,
                "lineage": task.lineage.model_dump_json() if task.lineage else None,
                "task_extra": task_extra,
                "instance_extra": json.dumps(instance.model_extra or {}, ensure_ascii=False, sort_keys=True),
            })
    return rows


def tasks_from_rows(rows: Iterable[dict[str, Any]]) -> list[Task]:
    """The task records back from `hf` rows (e.g. a split loaded with `datasets`)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["task_id"], []).append(row)
    tasks = []
    for task_id, task_rows in grouped.items():
        task_rows.sort(key=lambda row: row["instance_index"])
        first = task_rows[0]
        instances = [
            Instance(input=row["input"], output=row["output"], explanation=row["explanation"],
                     **json.loads(row["instance_extra"] or "{}"))
            for row in task_rows
        ]
        tasks.append(Task(
            id=task_id, name=first["task_name"], instruction=first["instruction"], instances=instances,
            is_classification=first["is_classification"], system=first["system"],
            lineage=Lineage.model_validate_json(first["lineage"]) if first["lineage"] else None,
            **json.loads(first["task_extra"] or "{}"),
        ))
    return tasks


# -- the run ----------------------------------------------------------------------------------


def provenance_paths(source: Path) -> dict[str, Any]:
    """Files beside `source` that say how it was made: the filter stats (`kept.stats.json`),
    the generation summary (`raw.summary.json`, of the source itself or of the file the
    filter read) and every rejects file along that chain."""

    stats = stats_path(source)
    upstream = None
    if stats.exists():
        try:
            named = json.loads(stats.read_text(encoding="utf-8")).get("input")
        except (json.JSONDecodeError, AttributeError):
            named = None
        if named:
            upstream = next((p for p in (Path(named), source.parent / Path(named).name) if p.exists()), None)
    summary = summary_path(source)
    if not summary.exists() and upstream is not None:
        summary = summary_path(upstream)
    return {
        "stats": stats,
        "summary": summary,
        "rejects": list(dict.fromkeys([rejects_path(source)] + ([rejects_path(upstream)] if upstream else []))),
    }


def _split_files(fmt: str, splits: dict[str, list[Task]], out_dir: Path, chat: dict) -> list[Path]:
    written = []
    for name, tasks in splits.items():
        if fmt == "alpaca":
            path = out_dir / f"{name}.json"
            atomic_write_json(path, alpaca_examples(tasks, **chat))
        else:
            path = out_dir / f"{name}.jsonl"
            rows = chat_examples(tasks, **chat) if fmt == "messages" else prompt_completion_examples(tasks, **chat)
            write_jsonl_atomic(path, (json.dumps(row, ensure_ascii=False) for row in rows))
        written.append(path)
    return written


def _hf_files(splits: dict[str, list[Task]], out_dir: Path, chat: dict) -> list[Path]:
    import datasets

    features = hf_features()
    present = {name: tasks for name, tasks in splits.items() if name == "train" or any(t.instances for t in tasks)}
    dataset = datasets.DatasetDict({
        name: datasets.Dataset.from_list(hf_rows(tasks, **chat), features=features) for name, tasks in present.items()
    })
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per file would drown the closing summary
    try:
        write_dir_atomic(out_dir / "dataset", lambda folder: dataset.save_to_disk(str(folder)))
        written = []
        for name, split in dataset.items():
            path = out_dir / "data" / f"{name}.parquet"
            write_file_atomic(path, lambda temp, split=split: split.to_parquet(str(temp)))
            written.append(path)
    finally:
        if bars:
            datasets.enable_progress_bars()
    for name in SPLITS:  # a split emptied since the last export: its old file would leak tasks
        if name not in present:
            (out_dir / "data" / f"{name}.parquet").unlink(missing_ok=True)
    return written + [out_dir / "dataset"]


def _natural_instructions(
    config, tasks: list[Task], out_dir: Path, strict: bool, rejects: list[Reject], summary: dict[str, Any],
) -> tuple[list[Path], dict[str, list[Task]]]:
    """Write the task files, README and splits; return them and the split of the exported
    tasks (made after --strict, so train is never emptied by it)."""
    settings: ExportConfig = config.export
    numbers = {task.id: settings.first_task_number + position for position, task in enumerate(tasks)}
    names = {task.id: ni_task_name(numbers[task.id], task) for task in tasks}
    found = negatives_from_rejects(tasks, rejects, settings.negative_examples)
    files = {task.id: ni_task(task, numbers[task.id], settings, found.get(task.id, ())) for task in tasks}

    def other_problems(task: Task) -> list[str]:
        return [p for p in validate_ni_task(files[task.id], names[task.id]) if not p.startswith("negative examples:")]

    # Only tasks that could still be exported are worth a teacher call.
    wanting = [t for t in tasks if not files[t.id]["Negative Examples"] and not (strict and other_problems(t))]
    from_teacher = 0
    if wanting and settings.teacher_negatives:
        from datagen.teachers.teacher import make_teacher

        with make_teacher(config.teacher) as teacher:
            from_teacher = teacher_negatives(wanting, files, teacher.complete, settings.negative_sampling)
            summary["negative_teacher"] = {"teacher": teacher.name, **teacher.stats.as_dict()}
    summary["negatives"] = {
        "from_rejects": len(found), "from_teacher": from_teacher,
        "without": sum(1 for t in tasks if not files[t.id]["Negative Examples"]),
    }
    summary["inputless_left_out"] = sum(inputless_strays(task) for task in tasks)
    failures = []
    for task in tasks:
        problems = validate_ni_task(files[task.id], names[task.id])
        if problems:
            failures.append({"task_id": task.id, "name": names[task.id], "problems": problems})
    failed = {failure["task_id"] for failure in failures}
    exported = [task for task in tasks if not (strict and task.id in failed)]
    summary["strict"] = strict
    summary["failures"] = failures
    summary["tasks_exported"] = len(exported)

    written = []
    for task in exported:
        path = out_dir / "tasks" / f"{names[task.id]}.json"
        atomic_write_json(path, files[task.id])
        written.append(path)
    listing = "".join(f"- `{names[task.id]}`\n" for task in sorted(exported, key=lambda t: numbers[t.id]))
    readme = out_dir / "tasks" / "README.md"
    atomic_write_text(readme, "# Tasks\n\nOne line per task file in this folder, by task number.\n\n" + listing)
    splits = split_by_task(exported, validation=settings.validation, test=settings.test, seed=settings.seed)
    split_dir = out_dir / "splits" / "default"
    split_files = {  # upstream has no validation split: those tasks train
        "train_tasks.txt": splits["train"] + splits["validation"],
        "test_tasks.txt": splits["test"],
        "excluded_tasks.txt": [],
    }
    for file_name, members in split_files.items():
        atomic_write_text(split_dir / file_name, "".join(f"{names[t.id]}\n" for t in members))
        written.append(split_dir / file_name)
    return written + [readme], splits


def run_export(
    config, source: Path, fmt: str, out_dir: Path, *, strict: bool = False, command_line: str = ""
) -> dict[str, Any]:
    """Export the tasks in `source` as `fmt` into `out_dir`, with a dataset card; return the
    summary also written to `out_dir/export.json`. Every file is written atomically; files a
    previous export into `out_dir` wrote that this one does not write are removed."""
    from datagen.card import write_card

    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if strict and fmt != "natural-instructions":
        raise ConfigError("--strict: applies to --format natural-instructions only")
    source, out_dir = Path(source), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    tasks = read_tasks(source)
    seen: set[str] = set()
    for task in tasks:  # one id, two tasks: file names, negatives and row groups would mix them
        if task.id in seen:
            raise InputError(f"{source}: task id {task.id!r} appears more than once; export needs unique ids")
        seen.add(task.id)
    settings: ExportConfig = config.export
    chat = {"prompt_erasure": config.generate.orca.prompt_erasure, "generic_system": config.generate.orca.generic_system}
    paths = provenance_paths(source)
    summary: dict[str, Any] = {"format": fmt, "input": str(source), "out": str(out_dir), "tasks": len(tasks),
                               "instances": sum(len(t.instances) for t in tasks), "command": command_line}

    if fmt == "natural-instructions":
        rejects, unreadable = read_rejects(paths["rejects"])
        summary["rejects_read"] = {"files": [str(p) for p in paths["rejects"] if p.exists()],
                                   "records": len(rejects), "unreadable_lines": unreadable[:5]}
        written, splits = _natural_instructions(config, tasks, out_dir, strict, rejects, summary)
    else:
        splits = split_by_task(tasks, validation=settings.validation, test=settings.test, seed=settings.seed)
        written = _hf_files(splits, out_dir, chat) if fmt == "hf" else _split_files(fmt, splits, out_dir, chat)
    summary["splits"] = {name: {"tasks": len(members), "instances": sum(len(t.instances) for t in members)}
                         for name, members in splits.items()}
    card, plots = write_card(out_dir, fmt=fmt, source=source, splits=splits, provenance=paths,
                             export_config=settings, export_summary=summary, chat=chat)
    written += [card, *plots]
    summary["files"] = sorted({str(p.relative_to(out_dir)) for p in written} | {MANIFEST})
    _remove_stale(out_dir, summary["files"])
    atomic_write_json(out_dir / MANIFEST, summary)
    return summary


def _remove_stale(out_dir: Path, current: list[str]) -> None:
    manifest = out_dir / MANIFEST
    if not manifest.exists():
        return
    try:
        previous = json.loads(manifest.read_text(encoding="utf-8")).get("files", [])
    except (json.JSONDecodeError, AttributeError):
        return
    for name in set(previous) - set(current):
        path = (out_dir / name).resolve()
        if out_dir.resolve() in path.parents:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def format_export_summary(summary: dict[str, Any]) -> str:
    """The closing lines of `datagen export`: counts per split, negatives, strict failures."""
    lines = [f"{summary['format']}: {summary['tasks']} tasks, {summary['instances']} instances from {summary['input']}"]
    lines += [f"  {name:<11}{counts['tasks']:>6} tasks {counts['instances']:>8} instances"
              for name, counts in summary["splits"].items()]
    if "negatives" in summary:
        negatives = summary["negatives"]
        lines.append(f"negative examples: {negatives['from_rejects']} tasks from rejects, "
                     f"{negatives['from_teacher']} from the teacher, {negatives['without']} without")
    if summary.get("inputless_left_out"):
        lines.append(f"left out {summary['inputless_left_out']} instances without input from tasks whose "
                     "other instances have one (Natural-Instructions instances need an input)")
    if summary.get("strict"):
        for failure in summary["failures"]:
            lines.append(f"{failure['name']} ({failure['task_id']}) not exported:")
            lines += [f"    {problem}" for problem in failure["problems"]]
        lines.append(f"--strict: {summary['tasks_exported']} of {summary['tasks']} tasks pass")
    elif summary.get("failures"):
        lines.append(f"{len(summary['failures'])} of {summary['tasks']} tasks would fail --strict "
                     f"(reasons in {Path(summary['out']) / MANIFEST} and the card)")
    lines.append(f"wrote {len(summary['files'])} files to {summary['out']} (card: README.md)")
    return "\n".join(lines)
