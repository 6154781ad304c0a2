"""Natural-Instructions task files (allenai/natural-instructions schema): one JSON file per
task, `tasks/README.md`, `splits/default/`, and `validate_ni_task`, the upstream
checker's rules that `--strict` enforces.

    from datagen.export.natural_instructions import ni_task, validate_ni_task
    data = ni_task(task, 1, ExportConfig())
    problems = validate_ni_task(data, "task001_even_or_odd")   # [] when it passes
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datagen.export.config import ExportConfig
from datagen.export.formats import split_by_task
from datagen.export.languages import detect_language, iso_language_names
from datagen.export.negatives import negatives_from_rejects, teacher_negatives
from datagen.generators.orca import task_kind
from datagen.io import atomic_write_json, atomic_write_text
from datagen.records import Reject, Task, takes_input

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


def write_natural_instructions(
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
