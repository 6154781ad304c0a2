"""Natural-Instructions task files (allenai/natural-instructions schema): one JSON file per
task, `tasks/README.md` (one line per task that begins with the backquoted task name, the
form upstream's checker parses), `splits/default/` and `splits/xlingual/` (the checker
reads both; datagen makes no cross-lingual split, so both list the same tasks), and
`validate_ni_task`, the upstream checker's rules that `--strict` enforces.

Categories, domains and reasoning types are names of upstream's task hierarchy
(`datagen.export.hierarchy`); the category comes from `datagen.export.categories`.

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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from datagen.export.categories import (
    SOURCE_OPTION,
    SOURCE_RULES,
    SOURCE_TEACHER,
    rule_category,
    teacher_categories,
)
from datagen.export.config import ExportConfig
from datagen.export.formats import split_by_task
from datagen.export.hierarchy import CATEGORIES, DOMAINS, REASONING
from datagen.export.languages import detect_language, iso_language_names
from datagen.export.negatives import label_negative, negatives_from_rejects, teacher_negatives
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
SPLIT_FOLDERS = ("default", "xlingual")
README_HEAD = "# Tasks\n\nOne line per task file in this folder, by task number.\n\n"
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
    task: Task, number: int, settings: ExportConfig, negatives: Sequence[dict] = (), category: str | None = None
) -> dict[str, Any]:
    """The Natural-Instructions task file for `task` (keys in upstream order).

    The category is `category`, else `settings.category`, else the rule table's; domains
    and reasoning types are `settings.domains` and `settings.reasoning`.

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
        "Categories": [category or settings.category or rule_category(task)],
        "Reasoning": list(settings.reasoning),
        "Definition": [task.instruction.strip()],
        "Input_language": [settings.language or (detect_language(inputs) if inputs.strip() else instruction_language)],
        "Output_language": [settings.language or detect_language(outputs)],
        "Instruction_language": [instruction_language],
        "Domains": list(settings.domains),
        "Positive Examples": positives,
        "Negative Examples": list(negatives),
        "Instances": instances,
        "Instance License": list(settings.instance_license),
    }


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
        if category not in CATEGORIES:
            fail("categories", f'"{category}" is not a category of the task hierarchy')
    for domain in data.get("Domains") or []:
        if domain not in DOMAINS:
            fail("domains", f'"{domain}" is not a domain of the task hierarchy')
    for reasoning in data.get("Reasoning") or []:
        if reasoning not in REASONING:
            fail("reasoning", f'"{reasoning}" is not a reasoning type of the task hierarchy')

    instances = data.get("Instances") or []
    if not MIN_INSTANCES < len(instances) <= MAX_INSTANCES:
        fail("instance count",
             f"{len(instances)} instances; needs more than {MIN_INSTANCES} and at most {MAX_INSTANCES}")
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


def readme_text(names: Sequence[str]) -> str:
    """`tasks/README.md`: a heading, then one line per task name in the given order, each
    beginning with the backquoted name (upstream reads the task number after "`task")."""
    return README_HEAD + "".join(f"`{name}`\n" for name in names)


def write_natural_instructions(
    config, tasks: list[Task], out_dir: Path, strict: bool, rejects: list[Reject], summary: dict[str, Any],
) -> tuple[list[Path], dict[str, list[Task]]]:
    """Write the task files, README and splits; return them and the split of the exported
    tasks (made after --strict, so train is never emptied by it). The teacher is started
    only when a task needs it (a category pick, a negative example)."""
    settings: ExportConfig = config.export
    numbers = {task.id: settings.first_task_number + position for position, task in enumerate(tasks)}
    names = {task.id: ni_task_name(numbers[task.id], task) for task in tasks}
    found = negatives_from_rejects(tasks, rejects, settings.negative_examples)
    with ExitStack() as stack:
        teachers = []

        def teacher():  # on the configured engine; Ray starts at the first reply not in the cache
            if not teachers:
                from datagen.engines.open_teacher import open_teacher

                teachers.append(stack.enter_context(open_teacher(config.teacher, config.engine, connect_now=False)))
            return teachers[0]

        categories, sources = _categories(settings, tasks, teacher)
        files = {task.id: ni_task(task, numbers[task.id], settings, found.get(task.id, ()), categories[task.id])
                 for task in tasks}
        from_labels = 0
        for task in tasks:
            if not files[task.id]["Negative Examples"]:
                negative = label_negative(task, files[task.id])
                if negative:
                    files[task.id]["Negative Examples"] = [negative]
                    from_labels += 1

        def other_problems(task: Task) -> list[str]:
            return [p for p in validate_ni_task(files[task.id], names[task.id])
                    if not p.startswith("negative examples:")]

        lacking = [t for t in tasks if not files[t.id]["Negative Examples"]]
        # Only tasks that could still be exported are worth a teacher call.
        hopeless = {t.id for t in lacking if strict and other_problems(t)}
        wanting = [t for t in lacking if t.id not in hopeless]
        why_none: dict[str, str] = {t.id: "not asked of the teacher: the task breaks other rules" for t in lacking
                                    if t.id in hopeless}
        from_teacher = 0
        if wanting and settings.teacher_negatives:
            missing = teacher_negatives(wanting, files, teacher().complete, settings.negative_sampling,
                                        settings.negative_attempts)
            from_teacher = len(wanting) - len(missing)
            why_none.update(missing)
        elif wanting:
            why_none.update({t.id: "no rejected output to show, and teacher negatives are off" for t in wanting})
        if teachers:
            summary["negative_teacher"] = {"teacher": teachers[0].name, **teachers[0].stats.as_dict(),
                                           **_engine_fields(config.engine, teachers[0])}
    without = [t for t in tasks if not files[t.id]["Negative Examples"]]
    summary["categories"] = dict(Counter(categories[t.id] for t in tasks).most_common())
    summary["category_sources"] = dict(Counter(sources.values()).most_common())
    summary["negatives"] = {
        "from_rejects": len(found), "from_labels": from_labels,
        "from_teacher": from_teacher,
        "without": len(without),
    }
    summary["negatives_missing"] = [{"task_id": t.id, "name": names[t.id], "reason": why_none.get(t.id, "")}
                                    for t in without]
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
    readme = out_dir / "tasks" / "README.md"
    atomic_write_text(readme, readme_text([names[t.id] for t in sorted(exported, key=lambda t: numbers[t.id])]))
    splits = split_by_task(exported, validation=settings.validation, test=settings.test, seed=settings.seed)
    split_files = {  # upstream has no validation split: those tasks train
        "train_tasks.txt": splits["train"] + splits["validation"],
        "test_tasks.txt": splits["test"],
        "excluded_tasks.txt": [],
    }
    for folder in SPLIT_FOLDERS:
        for file_name, members in split_files.items():
            path = out_dir / "splits" / folder / file_name
            atomic_write_text(path, "".join(f"{names[t.id]}\n" for t in members))
            written.append(path)
    return written + [readme], splits


def _categories(settings: ExportConfig, tasks: Sequence[Task], teacher) -> tuple[dict[str, str], dict[str, str]]:
    """Task id -> category, and task id -> where it came from (`--category`, the teacher
    or the rules). `teacher()` starts the teacher; it is called only when one is asked."""
    if settings.category:
        return {t.id: settings.category for t in tasks}, {t.id: SOURCE_OPTION for t in tasks}
    categories = {t.id: rule_category(t) for t in tasks}
    sources = {t.id: SOURCE_RULES for t in tasks}
    if settings.category_from_teacher and tasks:
        examples = {t.id: [{"input": text, "output": outputs[0]} for text, outputs, _e in ni_instances(t)[:2]]
                    for t in tasks}
        picked = teacher_categories(tasks, examples, teacher().complete, settings.category_sampling)
        categories.update(picked)
        sources.update({task_id: SOURCE_TEACHER for task_id in picked})
    return categories, sources


def _engine_fields(engine, teacher) -> dict[str, Any]:
    """Where the teacher ran, for the summary: nothing on `engine: local` (the summary stays as
    it was), the route, replicas and pipelines started (one per teacher call with requests not
    in the cache) on `engine: ray`."""
    if engine.kind != "ray":
        return {}
    return {"engine": {"kind": engine.kind, "route": teacher.backend.route, "replicas": engine.replicas,
                       "pipelines": teacher.backend.pipelines}}
