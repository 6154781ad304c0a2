"""Byte-range shards of a JSONL file and the work files sharded stages share.

What every sharded route (`datagen.engines.sharded_dedup`, `datagen.engines.sharded_filter`)
does the same way: shard r of N owns the lines that start in its 1/N of the bytes
(`shard_lines`), parses them as `read_tasks_lenient` does (`ShardTasks`), and hands its results
to the next stage in small files under the run's work folder (`save_npz`, `save_json`, ...).
Invalid lines and repeated ids are worded and ordered over all shards by `invalid_lines`, as a
single-process run words them; a work folder belongs to one input and one config
(`check_work_folder`).

    for offset, index, task in ShardTasks(path, rank, world_size): ...
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from datagen.errors import ConfigError, DatagenError, InputError
from datagen.io import atomic_write_json, atomic_write_text, describe_validation_error, write_file_atomic
from datagen.records import Task

NOT_UTF8 = "not UTF-8 text"
UTF8_BOM = b"\xef\xbb\xbf"


def text_key(text: str) -> np.ndarray:
    """A 128-bit blake2b of `text` as two uint64s."""
    return np.frombuffer(hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest(), dtype="<u8")


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    write_file_atomic(path, lambda temp: np.savez(temp.open("wb"), **arrays))


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def save_json(path: Path, value: Any) -> None:
    atomic_write_json(path, value)


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def shard_lines(path: Path, rank: int, world_size: int) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, index in shard, raw line) of the lines that start in shard `rank`'s bytes.

    Shard r owns the lines starting in [size * r / N, size * (r + 1) / N): every line lands
    in exactly one shard, in order, without a pass that counts lines first.
    """
    size = path.stat().st_size
    start, end = size * rank // world_size, size * (rank + 1) // world_size
    with path.open("rb") as handle:
        if start > 0:
            handle.seek(start - 1)
            handle.readline()  # the rest of the line that started before us (just "\n" at a boundary)
        position, index = handle.tell(), 0
        while position < end:
            raw = handle.readline()
            if not raw:
                break
            yield position, index, raw
            position += len(raw)
            index += 1


def decode_line(raw: bytes, offset: int) -> str | None:
    if offset == 0 and raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM):]
    try:
        return raw.decode("utf-8").rstrip("\n").removesuffix("\r")
    except UnicodeDecodeError:
        return None


def read_lines_at(path: Path, offsets: list[int]) -> dict[int, str]:
    """The lines starting at these byte offsets (decoded)."""
    found = {}
    with path.open("rb") as handle:
        for offset in sorted(set(offsets)):
            handle.seek(offset)
            found[offset] = decode_line(handle.readline(), offset)
    return found


@dataclass
class ShardTasks:
    """The tasks of one byte-range shard, parsed as `read_tasks_lenient` parses lines: iterate
    for (byte offset, line index in the shard, task); afterwards `lines` is the shard's line
    count, `errors` its (index, problem) for lines that are not tasks, `fatal` its lines that
    are not UTF-8 (which stop a run whatever skip_invalid says)."""

    path: Path
    rank: int
    world_size: int
    lines: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    fatal: list[tuple[int, str]] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[int, int, Task]]:
        for offset, index, raw in shard_lines(self.path, self.rank, self.world_size):
            self.lines = index + 1
            line = decode_line(raw, offset)
            if line is None:
                self.fatal.append((index, NOT_UTF8))
                continue
            if not line.strip():
                continue
            try:
                task = Task.model_validate_json(line)
            except ValidationError as error:
                first = error.errors()[0]
                self.errors.append((index, "invalid JSON" if first["type"] == "json_invalid"
                                    else describe_validation_error(error)))
                continue
            yield offset, index, task


def groups_of(keys: np.ndarray) -> np.ndarray:
    """Group number of each row of an (n, 2) uint64 key array."""
    if len(keys) == 0:
        return np.empty(0, dtype=np.int64)
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)


def best_of_groups(group: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For each row, the row of its group with the largest rank tuple (rank rows compare as tuples)."""
    order = np.lexsort((*rank.T[::-1], group))  # by group, then rank ascending: the best is last
    last = np.ones(len(order), dtype=bool)
    last[:-1] = group[order][1:] != group[order][:-1]
    best_of_group = np.empty(group.max() + 1 if len(group) else 0, dtype=np.int64)
    best_of_group[group[order][last]] = order[last]
    return best_of_group[group]


def first_lines(source: Path, metas: list[dict]) -> np.ndarray:
    """The line number before each shard (from the shards' `lines` counts); stops at a non-UTF-8 line."""
    first_line = np.cumsum([0] + [meta["lines"] for meta in metas])
    fatal = [(int(first_line[rank]) + index + 1, problem) for rank, meta in enumerate(metas)
             for index, problem in meta["fatal"]]
    if fatal:
        raise InputError(f"{source}:{min(fatal)[0]}: {NOT_UTF8}")
    return first_line


def invalid_lines(source: Path, metas: list[dict], first_line: np.ndarray, line: np.ndarray, ident: np.ndarray,
                  whole: np.ndarray, id_of, skip_invalid: bool) -> tuple[list[tuple[int, str]], np.ndarray, np.ndarray]:
    """(line, problem) of every line that is not a task or repeats an earlier line's id, in
    `read_tasks_lenient`'s words and line order; the rows that repeat an id; each row's first row
    with its id. Stops the run at the first (InputError) unless `skip_invalid`.

    `line`, `ident` and `whole` (blake2b of the id and of the task) hold one row per valid
    task in input order; `id_of(row)` gives a row's id (only asked for repeated ones).
    """
    invalid = [(int(first_line[rank]) + at + 1, problem) for rank, meta in enumerate(metas)
               for at, problem in meta["errors"]]
    first_of_id = best_of_groups(groups_of(ident), -line[:, None].astype(np.float64))
    repeated = np.flatnonzero(first_of_id != np.arange(len(line)))
    for row in repeated.tolist():
        earlier = first_of_id[row]
        how = "(the same task repeated)" if (whole[row] == whole[earlier]).all() else "with a different task"
        invalid.append((int(line[row]), f'id "{id_of(row)}" already used by line {line[earlier]} {how}'))
    invalid.sort()
    if invalid and not skip_invalid:
        where, problem = invalid[0]
        more = f" (and {len(invalid) - 1} more bad lines)" if len(invalid) > 1 else ""
        raise InputError(f"{source}:{where}: {problem}{more}; fix it or pass --skip-invalid")
    return invalid, repeated, first_of_id


def concatenate_files(sources: list[Path], target: Path) -> None:
    def copy(temp: Path) -> None:
        with temp.open("wb") as sink:
            for source in sources:
                with source.open("rb") as part:
                    shutil.copyfileobj(part, sink)

    write_file_atomic(target, copy)


def check_work_folder(plan, settings: dict) -> None:
    """A work folder belongs to one input and one config: a rerun resumes it, a changed one starts over.

    `plan`: anything with source, work, tasks and skip_invalid; `settings`: what else must match."""
    stat = plan.source.stat() if plan.source.is_file() else None
    if stat is None:
        raise InputError(f"{plan.source}: no such file" if not plan.source.exists() else
                         f"{plan.source}: is a directory, expected a JSONL file")
    identity = {"source": str(plan.source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "tasks": plan.tasks, "skip_invalid": plan.skip_invalid,
                **settings}
    marker = plan.work / "run.json"
    if marker.exists() and {**load_json(marker), "started": None} != {**identity, "started": None}:
        shutil.rmtree(plan.work)  # left by a run on another input or config: nothing in it applies
    elif plan.work.exists() and not marker.exists() and any(plan.work.iterdir()):
        raise ConfigError(f"{plan.work}: not empty and not a work folder of this command; pass another --work-dir")
    if not marker.exists():
        save_json(marker, {**identity, "started": time.time()})


def report_stage_error(path: Path, error: DatagenError, engine: str) -> None:
    """An error a stage found (bad input, the spending cap): written to `path`, where the driver
    (datatrove, ray) reads it after the stage and stops the run with it; retrying the task would
    not help. On Slurm no driver waits, so the task fails too: its job log ends with this line, and the jobs after
    it (afterok, kill-on-invalid-dep) are cancelled instead of failing later on missing files."""
    atomic_write_text(path, str(error))
    if engine == "slurm":
        raise error


