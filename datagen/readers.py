"""One reader for anyone's data: every command that reads tasks (generate's seeds, filter, dedup,
export, view, finetune, eval) turns its input into `datagen.records.Task` records here.

Where rows come from (`_rows`): a JSONL file, a JSON array, one JSON object (a
Natural-Instructions task file), a folder of NI task files, or a Hugging Face dataset
(`save_to_disk` folder, parquet or arrow files, or a name already in the local HF cache, read
offline), with `split` picking a split. What the rows are (`FORMATS`): detected from the first
row's keys, or named with `input_format`:

    tasks               ours / Self-Instruct seeds: id, instruction, instances
    alpaca              instruction, input, output
    sharegpt            conversations: [{from: human|gpt|system, value}]
    messages            messages: [{role, content}] (OpenAI / TRL chat), multi-turn included
    prompt-completion   prompt, completion (TRL), system optional
    preferences         prompt, chosen, rejected (TRL; the chosen reply is the output)
    natural-instructions  Definition, Instances (one task file per row)
    hf-export           datagen's own `--format hf` rows (task_id, instance_index, ...), lossless

A conversation is one instance: a leading system message is `Task.system`, the first user turn
the instruction, the first reply the output, later exchanges `Instance.followups`. Keys a format
does not use are kept on the instance (or, for NI files, the task), so they come back out.
A row without an id gets a stable one from its content (`alpaca-<sha256 prefix>`; a repeat of
the same row gets `-2`, `-3`); lineage records `source_file`, `source_format`, `source_line`.

    from datagen.readers import load, read_tasks_any
    loaded = load("alpaca_data.json")          # .tasks, .where, .invalid (file:line, problem, raw)
    tasks = read_tasks_any("conversations.jsonl", input_format="sharegpt")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from datagen.errors import ConfigError, InputError
from datagen.io import describe_validation_error, read_text, read_text_lines
from datagen.records import Instance, Lineage, Task, Turn


class Problem(ValueError):
    """A row that is not a record of its format; the message is the problem, without the place."""


@dataclass
class Row:
    where: str  # "file:line" (or "file" for a whole-file row)
    line: int | None
    data: dict[str, Any] | None  # None when the line is not a JSON object
    raw: str
    problem: str | None = None


@dataclass
class Loaded:
    """What a source held: the tasks (and where each came from), the rows that are not records."""

    source: str
    format: str
    tasks: list[Task] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    invalid: list[tuple[str, str, str]] = field(default_factory=list)  # (file:line, problem, raw line)


# -- conversations ------------------------------------------------------------------------------


def conversation_fields(turns: list[tuple[str, str]], label: str = "messages") -> dict[str, Any]:
    """Task and instance fields of a conversation of (role, text): a leading system message,
    then user and assistant turns alternating, ending with the assistant's reply."""
    system = None
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    if not turns:
        raise Problem(f'field "{label}": no user and assistant turns')
    for index, (role, _text) in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            position = index + (system is not None)
            raise Problem(f"{label}[{position}]: expected a {expected} turn, got {role}"
                          + (" (a system message only leads)" if role == "system" else ""))
    if turns[-1][0] != "assistant":
        raise Problem("the last message must be the assistant's reply")
    followups = [Turn(user=turns[k][1], assistant=turns[k + 1][1]) for k in range(2, len(turns), 2)]
    return {"system": system, "instruction": turns[0][1], "output": turns[1][1], "followups": followups or None}


MESSAGE_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "model": "assistant"}


def _messages(value: Any, label: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise Problem(f'field "{label}": expected a non-empty list')
    turns = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in MESSAGE_ROLES:
            raise Problem(f'{label}[{index}]: role must be one of {", ".join(MESSAGE_ROLES)}')
        if not isinstance(message.get("content"), str):
            raise Problem(f'{label}[{index}]: "content" must be a string')
        turns.append((message["role"], message["content"]))
    return turns


def _text(row: dict[str, Any], key: str, default: str | None = None) -> str:
    if key not in row or row[key] is None:
        if default is not None:
            return default
        raise Problem(f'missing "{key}"')
    if not isinstance(row[key], str):
        raise Problem(f'field "{key}": expected a string')
    return row[key]


def _record(fields: dict[str, Any], extra: dict[str, Any], task_extra: dict[str, Any] | None = None) -> dict:
    """Task keyword arguments of a one-instance record; `extra` goes on the instance."""
    instance = Instance(input=fields.get("input", ""), output=fields["output"], followups=fields.get("followups"),
                        **extra)
    task = {"instruction": fields["instruction"], "instances": [instance], **(task_extra or {})}
    if fields.get("system") is not None:
        task["system"] = fields["system"]
    return task


def _rest(row: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in used}


# -- formats: a row in, Task keyword arguments out ----------------------------------------------


def _from_tasks(row: dict[str, Any]) -> dict[str, Any]:
    return row  # validated as a Task as it is: ids are required, as they always were


def _from_alpaca(row: dict[str, Any]) -> dict[str, Any]:
    fields = {"instruction": _text(row, "instruction"), "input": _text(row, "input", ""),
              "output": _text(row, "output")}
    return _record(fields, _rest(row, ("instruction", "input", "output")))


def _from_sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise Problem('field "conversations": expected a non-empty list')
    pairs = []
    for index, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise Problem(f'conversations[{index}]: "from" must be one of {", ".join(SHAREGPT_ROLES)}')
        if not isinstance(turn.get("value"), str):
            raise Problem(f'conversations[{index}]: "value" must be a string')
        pairs.append((SHAREGPT_ROLES[speaker], turn["value"]))
    return _record(conversation_fields(pairs, "conversations"), _rest(row, ("conversations",)))


def _from_messages(row: dict[str, Any]) -> dict[str, Any]:
    return _record(conversation_fields(_messages(row.get("messages"), "messages")), _rest(row, ("messages",)))


def _from_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    fields = {"instruction": _text(row, "prompt"), "output": _text(row, "completion"), "system": None}
    if row.get("system") is not None:
        fields["system"] = _text(row, "system")
    return _record(fields, _rest(row, ("prompt", "completion", "system")))


def _reply(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    if key not in row:
        raise Problem(f'missing "{key}"')
    if not isinstance(value, str):
        raise Problem(f'field "{key}": expected a string or one assistant message')
    return value


def _from_preferences(row: dict[str, Any]) -> dict[str, Any]:
    prompt = row.get("prompt")
    if "prompt" not in row:
        raise Problem('missing "prompt"')
    turns = [("user", prompt)] if isinstance(prompt, str) else _messages(prompt, "prompt")
    fields = conversation_fields(turns + [("assistant", _reply(row, "chosen"))], "prompt")
    extra = _rest(row, ("prompt", "chosen", "rejected", "lineage"))
    extra["rejected"] = _reply(row, "rejected")  # the other side, kept (DPO itself reads pairs files)
    return _record(fields, extra)


def _from_natural_instructions(row: dict[str, Any]) -> dict[str, Any]:
    definition = row.get("Definition")
    if isinstance(definition, str):
        definition = [definition]
    if not isinstance(definition, list) or not definition or not all(isinstance(d, str) for d in definition):
        raise Problem('field "Definition": expected a list of strings')
    instances = []
    for key, positive in (("Positive Examples", True), ("Instances", False)):
        for index, example in enumerate(row.get(key) or []):
            if not isinstance(example, dict) or not isinstance(example.get("input", ""), str):
                raise Problem(f'{key}[{index}]: expected {{"input", "output"}}')
            outputs = example.get("output")
            outputs = [outputs] if isinstance(outputs, str) else outputs
            if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
                raise Problem(f'{key}[{index}]: "output" must be a string or a list of strings')
            extra = _rest(example, ("input", "output", "explanation"))
            if len(outputs) > 1:
                extra["outputs"] = outputs  # every accepted answer; the first is the output
            if positive:
                extra["positive_example"] = True
            instances.append(Instance(input=example.get("input", ""), output=outputs[0],
                                      explanation=example.get("explanation"), **extra))
    if not instances:
        raise Problem('no "Instances" or "Positive Examples"')
    return {"instruction": "\n".join(definition), "instances": instances,
            **_rest(row, ("Definition", "Positive Examples", "Instances"))}


def _has(*keys: str) -> Callable[[dict[str, Any]], bool]:
    return lambda row: all(key in row for key in keys)


@dataclass(frozen=True)
class Format:
    detect: Callable[[dict[str, Any]], bool]
    convert: Callable[[dict[str, Any]], dict[str, Any]]
    expects: str  # what a row of it holds, for error lines


# Detection tries these in order on the first row; two of the chat shapes on one row is ambiguous.
FORMATS: dict[str, Format] = {
    "hf-export": Format(_has("task_id", "instance_index", "instruction", "output", "task_extra"), _from_tasks,
                        "datagen hf rows (task_id, instance_index, instruction, output, task_extra)"),
    "natural-instructions": Format(_has("Definition", "Instances"), _from_natural_instructions,
                                   "Definition, Instances"),
    "tasks": Format(_has("instances"), _from_tasks, "id, instruction, instances"),
    "sharegpt": Format(_has("conversations"), _from_sharegpt, "conversations: [{from, value}]"),
    "messages": Format(_has("messages"), _from_messages, "messages: [{role, content}]"),
    "preferences": Format(_has("prompt", "chosen", "rejected"), _from_preferences, "prompt, chosen, rejected"),
    "prompt-completion": Format(_has("prompt", "completion"), _from_prompt_completion, "prompt, completion"),
    "alpaca": Format(_has("instruction", "output"), _from_alpaca, "instruction, input, output"),
}
CHAT_SHAPES = ("sharegpt", "messages", "prompt-completion", "alpaca")  # "preferences" is a prompt-completion too


def detect_format(row: dict[str, Any], where: str) -> str:
    """The format of a row from its keys; unknown or ambiguous rows are an InputError naming `where`."""
    for name in ("hf-export", "natural-instructions", "tasks"):
        if FORMATS[name].detect(row):
            return name
    shapes = [name for name in CHAT_SHAPES if FORMATS[name].detect(row)]
    if len(shapes) > 1:
        raise InputError(f"{where}: ambiguous row: it reads as {' and as '.join(shapes)}; "
                         f"pass --input-format {shapes[0]} (or {', '.join(shapes[1:])})")
    if shapes:
        return "preferences" if shapes == ["prompt-completion"] and FORMATS["preferences"].detect(row) else shapes[0]
    if FORMATS["preferences"].detect(row):
        return "preferences"
    if "id" in row or "instruction" in row:
        return "tasks"  # one of ours missing something: its own error line says what
    keys = ", ".join(sorted(row)[:8]) or "none"
    expected = "; ".join(f"{name} ({fmt.expects})" for name, fmt in FORMATS.items())
    raise InputError(f"{where}: unknown format (keys: {keys}); expected one of {expected}, "
                     "or pass --input-format NAME")


# -- sources: where rows come from --------------------------------------------------------------

HF_FILES = (".parquet", ".arrow")


def _json_rows(path: Path) -> Iterator[Row]:
    """Rows of a JSONL file, a JSON array or one JSON object, with the line each starts on."""
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"["):
        yield from _array_rows(path, read_text(path, "a JSON file"))
        return
    if head.startswith(b"{") and b"\n" in head:
        first_line = head.split(b"\n", 1)[0]
        try:
            json.loads(first_line)
        except ValueError:  # not one object a line: a whole-file JSON object (an NI task file)?
            try:
                value = json.loads(read_text(path, "a JSON file"))
            except ValueError:
                value = None
            if isinstance(value, dict):
                yield Row(str(path), None, value, "")
                return
    for line_number, line in read_text_lines(path, "a JSONL file"):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            yield Row(where, line_number, None, line, f"invalid JSON ({error.msg})")
            continue
        if not isinstance(value, dict):
            yield Row(where, line_number, None, line, f"expected a JSON object, got {type(value).__name__}")
            continue
        yield Row(where, line_number, value, line)


def _array_rows(path: Path, text: str) -> Iterator[Row]:
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        line = text.count("\n", 0, position) + 1
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
        raw = text[position:end]
        if isinstance(value, dict):
            yield Row(f"{path}:{line}", line, value, raw)
        else:
            yield Row(f"{path}:{line}", line, None, raw, f"expected a JSON object, got {type(value).__name__}")
        position = end


def _ni_folder_rows(folder: Path) -> list[Row]:
    """One row per Natural-Instructions task file of `folder` (or of its `tasks/`, as exported)."""
    files = sorted((folder / "tasks" if (folder / "tasks").is_dir() else folder).glob("*.json"))
    rows = []
    for path in files:
        found = list(_json_rows(path))
        if len(found) == 1 and found[0].line is None and "Definition" in (found[0].data or {}):
            rows.append(found[0])
    return rows


@contextlib.contextmanager
def _offline() -> Iterator[Any]:
    """`datasets`, with nothing downloaded: the local HF cache or nothing. The variables are
    read when the libraries are imported, so their flags are set too; all are restored after."""
    saved_env = {name: os.environ.get(name) for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update({name: "1" for name in saved_env})
    import datasets
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _pick_split(splits: list[str], split: str | None, source: str) -> str:
    if split is not None:
        if split not in splits:
            raise InputError(f"{source}: no split {split!r}; it has {', '.join(splits)} (--split)")
        return split
    if "train" in splits or len(splits) == 1:
        return "train" if "train" in splits else splits[0]
    raise InputError(f"{source}: several splits ({', '.join(splits)}); pick one with --split")


def _table_rows(table, where: str) -> Iterator[Row]:
    for index, row in enumerate(table.to_pylist(), start=1):
        yield Row(f"{where}:{index}", index, row, "")


def _arrow_table(path: Path):
    import pyarrow as pa

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()  # what `datasets` writes
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()


def _saved_dataset(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _folder_rows(path: Path, split: str | None) -> Iterator[Row]:
    """A `save_to_disk` folder (Dataset or DatasetDict, or an export folder's `dataset/`), or a
    folder of split files (`train.jsonl`, `data/train-00000-of-00001.parquet`, arrow files)."""
    saved = next((folder for folder in (path, path / "dataset") if _saved_dataset(folder)), None)
    if saved is not None:
        with _offline() as datasets:
            loaded = datasets.load_from_disk(str(saved))
        if isinstance(loaded, datasets.DatasetDict):
            name = _pick_split(list(loaded), split, str(saved))
            loaded = loaded[name]
        yield from _table_rows(loaded.data.table, str(saved))
        return
    files = sorted(p for p in path.rglob("*") if p.suffix in (*HF_FILES, ".jsonl")
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    by_split: dict[str, list[Path]] = {}
    for file in files:
        by_split.setdefault(file.stem.split("-")[0], []).append(file)
    if not by_split:
        raise InputError(f"{path}: a folder with no task files: expected JSONL, parquet or arrow split files, "
                         "a saved Hugging Face dataset or Natural-Instructions task files")
    name = _pick_split(sorted(by_split), split, str(path))
    for file in by_split[name]:
        yield from (_json_rows(file) if file.suffix == ".jsonl" else _table_rows(_arrow_table(file), str(file)))


def _hub_cache_rows(name: str, split: str | None) -> Iterator[Row]:
    try:
        with _offline() as datasets:
            loaded = datasets.load_dataset(name)
    except Exception as error:  # offline: anything but a cached copy is a miss
        raise InputError(f"{name}: no such file, and not a dataset in the local Hugging Face cache "
                         f"(read offline; {type(error).__name__})") from None
    chosen = _pick_split(list(loaded), split, name)
    yield from _table_rows(loaded[chosen].data.table, f"{name}[{chosen}]")


def _looks_like_dataset_name(text: str) -> bool:
    parts = text.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not text.startswith((".", "~")) and "." not in parts[-1][-6:]


def _rows(path: Path, split: str | None) -> Iterator[Row]:
    if path.is_dir():
        yield from _ni_folder_rows(path) or _folder_rows(path, split)
        return
    if path.suffix in HF_FILES and path.is_file():
        yield from _table_rows(_arrow_table(path), str(path))
        return
    if not path.exists() and _looks_like_dataset_name(str(path)):
        yield from _hub_cache_rows(str(path), split)
        return
    yield from _json_rows(path)


# -- reading ------------------------------------------------------------------------------------


def content_id(fmt: str, data: dict[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    return f"{fmt}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _task(fmt: str, row: Row, source: str) -> Task:
    if fmt not in ("tasks", "natural-instructions") and not FORMATS[fmt].detect(row.data or {}):
        raise Problem(f"not a {fmt} row (expected {FORMATS[fmt].expects})")
    fields = FORMATS[fmt].convert(row.data or {})
    if fmt in ("tasks", "hf-export"):
        return Task.model_validate(fields)
    given = (row.data or {}).get("id")
    if fmt == "natural-instructions":
        given = Path(row.where.rsplit(":", 1)[0] if row.line is not None else row.where).stem  # the file's name
        fields = {"name": given, **fields}
    earlier = (row.data or {}).get("lineage") if fmt == "preferences" else None  # our pairs carry one
    lineage = Lineage.model_validate({**(earlier if isinstance(earlier, dict) else {}),
                                      "source_file": source, "source_format": fmt, "source_line": row.line})
    task_id = str(given) if given not in (None, "") else content_id(fmt, row.data or {})
    return Task(id=task_id, lineage=lineage, **fields)


def _check_format(name: str | None) -> None:
    if name is not None and name not in FORMATS:
        raise ConfigError(f"--input-format: expected one of {', '.join(FORMATS)}, got {name!r}")


def load(path: str | Path, input_format: str | None = None, split: str | None = None, *,
         strict: bool = False) -> Loaded:
    """Every record in `path` as tasks (see the module docstring). Rows that are not records
    of the format go to `invalid` (or, `strict`, raise the first as `FILE:LINE: problem`); a
    task under an id an earlier row used is invalid too (unless `strict`: export says so
    itself). An unknown or ambiguous first row is an InputError whatever `strict` says."""
    _check_format(input_format)
    path = Path(path)
    source = str(path)
    if not path.exists() and not _looks_like_dataset_name(source):
        raise InputError(f"{path}: no such file")
    if path.is_file():
        try:
            path.open("rb").close()
        except OSError as error:  # unreadable: one line, as `datagen.io` words it
            raise InputError(f"{path}: cannot read ({error.strerror})") from None
    loaded = Loaded(source, input_format or "")
    rows = _rows(path, split)
    first_seen: dict[str, tuple[str, int]] = {}
    content_ids: dict[str, int] = {}
    if input_format == "hf-export":
        return _hf_export(rows, loaded, strict)
    for row in rows:
        if row.data is not None and not loaded.format:
            loaded.format = detect_format(row.data, row.where)
            if loaded.format == "hf-export":
                return _hf_export(_chain(row, rows), loaded, strict)
        problem = row.problem
        task = None
        if problem is None:
            try:
                task = _task(loaded.format, row, source)
            except Problem as error:
                problem = str(error)
            except ValidationError as error:
                first = error.errors()[0]
                problem = "invalid JSON" if first["type"] == "json_invalid" else describe_validation_error(error)
        if problem is not None:
            if strict:
                raise InputError(f"{row.where}: {problem}")
            loaded.invalid.append((row.where, problem.split(" (")[0] if problem.startswith("invalid JSON")
                                   else problem, row.raw))
            continue
        if task.lineage is not None and getattr(task.lineage, "source_format", None) == loaded.format \
                and (row.data or {}).get("id") in (None, ""):
            count = content_ids[task.id] = content_ids.get(task.id, 0) + 1
            if count > 1:  # the same row again: an id of its own, stable too
                task.id = f"{task.id}-{count}"
        if task.id in first_seen and not strict:
            earlier, index = first_seen[task.id]
            how = "(the same task repeated)" if loaded.tasks[index] == task else "with a different task"
            line = earlier.rsplit(":", 1)[-1]
            loaded.invalid.append((row.where, f'id "{task.id}" already used by line {line} {how}', row.raw))
            continue
        first_seen.setdefault(task.id, (row.where, len(loaded.tasks)))
        loaded.tasks.append(task)
        loaded.where.append(row.where)
    loaded.format = loaded.format or input_format or "tasks"
    return loaded


def _chain(first: Row, rest: Iterator[Row]) -> Iterator[Row]:
    yield first
    yield from rest


def tasks_from_rows(rows: Iterable[dict[str, Any]]) -> list[Task]:
    """The task records back from `datagen export --format hf` rows (`datagen.export.hf.hf_rows`)."""
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


def _hf_export(rows: Iterator[Row], loaded: Loaded, strict: bool) -> Loaded:
    loaded.format = "hf-export"
    good, first_where = [], {}
    for row in rows:
        if row.problem is not None or not FORMATS["hf-export"].detect(row.data or {}):
            problem = row.problem or f"expected {FORMATS['hf-export'].expects}"
            if strict:
                raise InputError(f"{row.where}: {problem}")
            loaded.invalid.append((row.where, problem, row.raw))
            continue
        good.append(row.data)
        first_where.setdefault(row.data["task_id"], row.where)
    try:
        loaded.tasks = tasks_from_rows(good)
    except (ValidationError, KeyError, TypeError, ValueError) as error:
        raise InputError(f"{loaded.source}: not datagen hf rows ({error})") from None
    loaded.where = [first_where[task.id] for task in loaded.tasks]
    return loaded


def read_tasks_any(path: str | Path, input_format: str | None = None, split: str | None = None) -> list[Task]:
    """The tasks of `path` in any format; the first bad row is an InputError, and so is no tasks."""
    loaded = load(path, input_format, split, strict=True)
    if not loaded.tasks:
        raise InputError(f"{path}: no tasks in file")
    return loaded.tasks


def sniff(path: str | Path, input_format: str | None = None, split: str | None = None) -> str:
    """The format of `path` from its first record (or `input_format`), reading no further."""
    _check_format(input_format)
    if input_format:
        return input_format
    path = Path(path)
    if not path.exists() and not _looks_like_dataset_name(str(path)):
        raise InputError(f"{path}: no such file")
    for row in _rows(path, split):
        if row.data is not None:
            return detect_format(row.data, row.where)
    return "tasks"


def as_task_jsonl(path: str | Path, input_format: str | None, split: str | None, converted: Path) -> Path:
    """`path` itself when it is a task JSONL file, else its tasks written to `converted` (for the
    engines that read task JSONL by byte ranges); a bad row stops with its line."""
    from datagen.io import write_jsonl_atomic

    path = Path(path)
    if path.is_file() and path.suffix not in HF_FILES and sniff(path, input_format, split) == "tasks" \
            and not _is_json_array(path):
        return path
    write_jsonl_atomic(converted, read_tasks_any(path, input_format, split))
    return converted


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4096).lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"[")


def is_task_jsonl(path: str | Path, input_format: str | None = None, split: str | None = None) -> bool:
    """Whether `path` is a file of our task JSONL lines (or a run folder of such files), which
    line-reading tools (the view's index) take as it is; anything else needs `load`."""
    path = Path(path)
    if input_format not in (None, "tasks") or split is not None:
        return False
    if path.is_dir():
        return not (_saved_dataset(path) or _ni_folder_rows(path))
    if not path.is_file():
        return not _looks_like_dataset_name(str(path))  # a missing file: the caller says so
    return path.suffix not in HF_FILES and not _is_json_array(path) and sniff(path, input_format) == "tasks"
