"""The parsed index rows of one big task file, cached beside it: a second `datagen view` of an
unchanged file reads them back instead of parsing every line again.

    rows = load_rows(path, os.stat(path), facets=9)  # what `save_rows` stored, or None (none, stale, damaged)
    save_rows(path, stat, rows)  # atomic; quietly skipped where the folder is not writable

The cache of `NAME` is `.NAME.view-index.jsonl` in the same folder (hidden: discovery skips
it). It is plain JSON Lines, never pickle (a file in a data folder must not be able to run
code): a head line, then each column's rows a piece at a time, so neither writing nor
reading holds the interpreter lock for long while the server answers pages. It is used only
while the data file has the size and mtime it had when the rows were read and the format
version matches; otherwise the file is parsed as if there were no cache.
The data file itself is never written. `rows` is a dict of equal-length columns (see COLUMNS)
plus where reading stopped (`end`, `next_line`, `torn`), each row's facet values as an index
into `combo_values`, and `parents` as (row, parent ids) pairs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datagen.io import atomic_write_text

CACHE_VERSION = 2  # 2: the tag facets (Magpie)
CACHE_MIN_BYTES = 8 * 2**20  # smaller files parse in a fraction of a second: no file beside them
COLUMNS = {"offsets": int, "lines": int, "ids": str, "texts": str, "instances": int, "combos": int, "rejected": bool}
PLACES = ("end", "next_line", "torn")
PIECE_ROWS = 5000  # rows of one column a line: each line is one short JSON parse or dump


def cache_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.view-index.jsonl")


def _key(stat: os.stat_result) -> dict[str, int]:
    return {"version": CACHE_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _well_formed(rows: Any, facets: int) -> bool:
    """Whether `rows` has the shape `save_rows` writes (a damaged or crafted file is not trusted)."""
    if not isinstance(rows, dict) or not all(type(rows.get(place)) is int for place in PLACES):
        return False
    columns = [rows.get(name) for name in COLUMNS]
    if not all(isinstance(column, list) and len(column) == len(columns[0]) for column in columns):
        return False
    if not all(all(type(value) is kind for value in rows[name]) for name, kind in COLUMNS.items()):
        return False
    combo_values = rows.get("combo_values")
    if not isinstance(combo_values, list) or not all(
            isinstance(combo, list) and len(combo) == facets and all(type(v) is str for v in combo)
            for combo in combo_values):
        return False
    if rows["combos"] and not 0 <= min(rows["combos"]) <= max(rows["combos"]) < len(combo_values):
        return False
    parents = rows.get("parents")
    return isinstance(parents, list) and all(
        isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int and 0 <= pair[0] < len(columns[0])
        and isinstance(pair[1], list) and pair[1] for pair in parents)


def load_rows(path: Path, stat: os.stat_result, facets: int) -> dict[str, Any] | None:
    """The cached rows of `path` if they were read from the file as it is now (`stat`)."""
    if stat.st_size < CACHE_MIN_BYTES:
        return None
    try:
        with cache_path(path).open("rb") as handle:
            head = json.loads(handle.readline())
            if not isinstance(head, dict) or head.get("key") != _key(stat):
                return None
            rows = {name: [] for name in (*COLUMNS, "parents")}
            rows.update({name: head.get(name) for name in (*PLACES, "combo_values")})
            for line in handle:
                name, values = json.loads(line)
                rows[name].extend(values)
                time.sleep(0)  # let the server's threads run between pieces (a parse holds the GIL)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return rows if _well_formed(rows, facets) else None


def _pieces(rows: dict[str, Any]) -> Iterator[str]:
    yield json.dumps({"key": None, **{name: rows[name] for name in (*PLACES, "combo_values")}})
    for name in (*COLUMNS, "parents"):
        column = rows[name]
        for start in range(0, len(column), PIECE_ROWS):
            yield json.dumps([name, column[start: start + PIECE_ROWS]], ensure_ascii=False, separators=(",", ":"))
            time.sleep(0)


def save_rows(path: Path, stat: os.stat_result, rows: dict[str, Any]) -> bool:
    """Store `rows`, read from `path` when it was as `stat` says, if it still is; whether it was stored."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    if _key(now) != _key(stat) or stat.st_size < CACHE_MIN_BYTES or rows["end"] + rows["torn"] != stat.st_size:
        return False  # changed while it was read, not read to its end, or small
    pieces = _pieces(rows)
    head = json.loads(next(pieces))
    head["key"] = _key(stat)
    text = "\n".join([json.dumps(head), *pieces]) + "\n"
    try:
        atomic_write_text(cache_path(path), text)
    except OSError:  # a read-only folder: the next open parses again
        return False
    return True
