"""Reading and writing JSONL and JSON without losing work.

- `read_text_lines` / `read_text` are the one place text files are decoded: UTF-8, a
  byte-order mark accepted, and a bad byte reported as `FILE:LINE: not UTF-8 text`.
  Every reader of user files (seeds, filter and export input, finetune data, eval files,
  configs) goes through them.
- `read_jsonl` / `read_tasks` report the file and line of a bad record as one line:
  `seeds.jsonl:12: missing "instruction"`.
- `JsonlAppender` appends records and flushes them to disk per batch, so a killed run
  keeps everything it finished.
- `write_file_atomic` / `write_dir_atomic` (and `atomic_write_text` / `atomic_write_json`
  on top) write final files and folders through a temp path and a rename: a reader sees the
  old one or the new one, never half of one.
- `rejects_path`, `summary_path`, `stats_path`, `progress_path`: the sidecar files every
  stage writes beside its output (`raw.jsonl` -> `raw.rejects.jsonl`), named in one place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from datagen.errors import InputError
from datagen.records import Reject, Task


def describe_validation_error(error: ValidationError) -> str:
    """The first problem of a pydantic error as `missing "instruction"` or `field x: why`."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        return f'missing "{location}"'
    if not location:
        return first["msg"]
    return f'field "{location}": {first["msg"]}'


UTF8_BOM = b"\xef\xbb\xbf"


def _open_binary(path: Path, kind: str):
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected {kind}") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror})") from None


def _not_utf8(path: Path, line_number: int) -> InputError:
    return InputError(f"{path}:{line_number}: not UTF-8 text")


def read_text_lines(path: str | Path, kind: str = "a text file") -> Iterator[tuple[int, str]]:
    """Yield (line number, line without its line ending) of a UTF-8 text file.

    A leading byte-order mark is dropped; the first line holding a byte that is not UTF-8
    raises InputError `FILE:LINE: not UTF-8 text`. Lines end at "\n" only (a "\r" before
    it is dropped), so a U+2028 inside a JSON string does not split a record. `kind` names
    what was expected when `path` is a folder.
    """
    path = Path(path)
    with _open_binary(path, kind) as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _not_utf8(path, line_number) from None
            yield line_number, line.rstrip("\n").removesuffix("\r")


def read_lines_tolerant(path: str | Path) -> Iterator[tuple[int, str | None]]:
    """Like `read_text_lines`, but a line that is not UTF-8 (one a kill cut inside a
    multibyte character) comes back as None instead of stopping the read: for files whose
    lines only add information, such as rejects."""
    path = Path(path)
    with _open_binary(path, "a text file") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            try:
                yield line_number, raw.decode("utf-8").rstrip("\n").removesuffix("\r")
            except UnicodeDecodeError:
                yield line_number, None


def read_text(path: str | Path, kind: str = "a text file") -> str:
    """The whole of a UTF-8 text file (for YAML and JSON documents), decoded as
    `read_text_lines` decodes: byte-order mark dropped, `FILE:LINE: not UTF-8 text`."""
    path = Path(path)
    with _open_binary(path, kind) as handle:
        data = handle.read()
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, data.count(b"\n", 0, error.start) + 1) from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; bad JSON raises InputError."""
    for line_number, line in read_text_lines(path, "a JSONL file"):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{line_number}: invalid JSON ({error.msg})") from None
        if not isinstance(value, dict):
            raise InputError(
                f"{path}:{line_number}: expected a JSON object, got {type(value).__name__}"
            )
        yield line_number, value


def read_records(path: str | Path, model: type[BaseModel]) -> Iterator[Any]:
    """Yield `model` instances from a JSONL file, naming file and line on a bad record."""
    for line_number, value in read_jsonl(path):
        try:
            yield model.model_validate(value)
        except ValidationError as error:
            raise InputError(
                f"{path}:{line_number}: {describe_validation_error(error)}"
            ) from None


def read_tasks_lenient(path: str | Path) -> tuple[list[Task], list[tuple[str, str, str]]]:
    """Tasks, and (file:line, problem, raw line) for every line that is not a valid task.

    A task whose id an earlier line already used is not valid either, even when the
    whole line repeats: ids are what `duplicate_of`, lineage and splits refer to, so two
    records under one id would make those references ambiguous.
    """
    path = Path(path)
    tasks, invalid = [], []
    first_seen: dict[str, tuple[int, int]] = {}  # id -> (line, index in tasks)
    for line_number, line in read_text_lines(path, "a JSONL file"):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            task = Task.model_validate_json(line)
        except ValidationError as error:
            first = error.errors()[0]
            problem = "invalid JSON" if first["type"] == "json_invalid" else describe_validation_error(error)
            invalid.append((where, problem, line))
            continue
        if task.id in first_seen:
            earlier, index = first_seen[task.id]
            how = "(the same task repeated)" if tasks[index] == task else "with a different task"
            invalid.append((where, f'id "{task.id}" already used by line {earlier} {how}', line))
            continue
        first_seen[task.id] = (line_number, len(tasks))
        tasks.append(task)
    return tasks, invalid


def read_tasks(path: str | Path) -> list[Task]:
    """Load a task JSONL file (Self-Instruct seed format or ours); empty files are an error."""
    tasks = list(read_records(path, Task))
    if not tasks:
        raise InputError(f"{path}: no tasks in file")
    return tasks


def as_jsonl_line(record: str | BaseModel) -> str:
    """A record (task, other pydantic model or ready JSON text) as one line, no newline."""
    if isinstance(record, (Task, Reject)):
        return record.to_json()
    if isinstance(record, BaseModel):
        return record.model_dump_json()
    return record.rstrip("\n")


class JsonlAppender:
    """Append JSONL lines to a file, flushed and fsynced per `write_many` call.

    Opening in append mode means a rerun continues the file a killed run left.
    A torn last line (the process died mid-write) is cut off on open, so the file
    stays valid JSONL.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_last_line(self.path)
        self._handle = self.path.open("a", encoding="utf-8")

    def write_many(self, lines: Iterable[str | BaseModel]) -> None:
        for line in lines:
            self._handle.write(as_jsonl_line(line) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _drop_torn_last_line(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        handle.truncate(data.rfind(b"\n") + 1)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once at import (os.umask can only be read by setting it, which is not thread-safe)
_UMASK = _read_umask()


def write_file_atomic(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Have `write` produce a file at a temp path beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(Path(temp_name))
        os.chmod(temp_name, 0o666 & ~_UMASK)  # mkstemp makes it owner-only; a plain open would not
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_dir_atomic(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Have `write` fill a fresh folder beside `path`, then swap it in for `path`.

    A crash leaves either the old folder or the new one at `path` (or, between the two
    renames, the old one beside it as `.NAME.old`), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        os.chmod(fresh, 0o777 & ~_UMASK)  # mkdtemp makes it owner-only; a plain mkdir would not
        write(fresh)
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(fresh, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise


def _write_text_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same folder and a rename."""
    write_file_atomic(path, lambda temp: _write_text_synced(temp, text))


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, lines: Iterable[str | BaseModel]) -> None:
    """Write a whole JSONL file atomically (for final outputs such as kept.jsonl)."""
    atomic_write_text(path, "".join(as_jsonl_line(line) + "\n" for line in lines))


# -- sidecar files: what each stage writes beside its output ---------------------------------


REJECTS_SUFFIX = ".rejects.jsonl"
SUMMARY_SUFFIX = ".summary.json"
STATS_SUFFIX = ".stats.json"
PROGRESS_SUFFIX = ".progress.json"
SPEND_SUFFIX = ".spend.json"


def _sidecar(output: str | Path, suffix: str) -> Path:
    output = Path(output)
    return output.with_name(output.stem + suffix)


def rejects_path(output: str | Path) -> Path:
    """Everything a stage threw away, with its reason: `raw.jsonl` -> `raw.rejects.jsonl`."""
    return _sidecar(output, REJECTS_SUFFIX)


def summary_path(output: str | Path) -> Path:
    """A generation run's summary (requests, tokens, cost): `raw.jsonl` -> `raw.summary.json`."""
    return _sidecar(output, SUMMARY_SUFFIX)


def stats_path(output: str | Path) -> Path:
    """A filter run's statistics per pass and reason: `kept.jsonl` -> `kept.stats.json`."""
    return _sidecar(output, STATS_SUFFIX)


def progress_path(output: str | Path) -> Path:
    """How many batches a generation run finished: `raw.jsonl` -> `raw.progress.json`."""
    return _sidecar(output, PROGRESS_SUFFIX)


def spend_path(output: str | Path) -> Path:
    """What a run with a spending cap has spent, over resumes: `raw.jsonl` -> `raw.spend.json`."""
    return _sidecar(output, SPEND_SUFFIX)
