"""Benchmark: how fast `datagen view` opens a big task file, against loading it with read_tasks.

Run from the repository root (under a minute on 2 cores):

    .venv/bin/python bench/view.py              # 100,000 tasks
    .venv/bin/python bench/view.py --n 20000

The file is synthetic and deterministic (`random.Random(--seed)`): tasks shaped like
Self-Instruct and Evol-Instruct output (an instruction of 8-25 words, 1-4 instances, a full
lineage with template hashes, sampling and token usage; about 1 KB a line), a tenth of them
rejects in a `*.rejects.jsonl` beside it.

Rows, each measured from nothing in the same process:

- ours: `ViewState` (discover the files, start reading them into the light index in a
  background thread: byte offsets and the table's columns, stdlib `json`, no pydantic) and
  the first page of the table (`/api/tasks`), answered from the first rows read while the
  rest is indexed: "time to first page". Then, from the same start, the whole index and a
  page with every facet count ("whole index"); a search (a word in ~1% of instructions)
  with facet counts, and opening one task page (record read back from its offset, lineage
  links, ROUGE-L neighbours).
- baseline: the naive page, `datagen.io.read_tasks` on both files (every line validated
  by pydantic into a `Task`), then the first 50 rows and their facet counts (its first page
  and its whole load are the same thing); the search is a scan of the loaded tasks with the
  same counts.

The first open leaves each file's parsed rows in a hidden `.NAME.view-index.jsonl` beside it
(written after the index is complete); the "again" rows open the same folder a second
time, the rest of each file read from that cache.

Language detection and the ROUGE-L pool are built in a background thread after the first
page; their time is shown on its own line (the language facet says "detecting…" until it
is done). Times are wall and CPU seconds of this process: on a shared machine the CPU
figure is what an idle one takes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("write explain describe list summarise translate classify compare poem story email recipe "
         "weather river mountain city history science music garden kitchen travel budget meeting "
         "letter friend teacher student computer program function error network market price "
         "customer product review movie book chapter energy climate ocean forest animal bird").split()
OPERATIONS = ["evol:deepen", "evol:concretize", "evol:add_constraints", "evol:increase_reasoning", "evol:breadth"]
NEEDLE = "zephyrine"  # the search word, put in about 1% of instructions


def synthetic_task(rng: random.Random, number: int) -> dict:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 25))]
    if rng.random() < 0.01:
        words.insert(rng.randrange(len(words)), NEEDLE)
    evol = rng.random() < 0.5
    lineage = {
        "generator": "evol-instruct" if evol else "self-instruct",
        "operation": rng.choice(OPERATIONS) if evol else "bootstrap",
        "round": rng.randint(1, 4) if evol else None,
        "parent_ids": [f"t{rng.randrange(max(1, number)):06d}"] if evol else [f"seed_task_{i}" for i in range(8)],
        "template": "evol_deepen.jinja" if evol else "self_instruct_bootstrap.jinja",
        "template_sha256": f"{rng.getrandbits(256):064x}",
        "teacher_backend": "openai", "teacher_model": "smollm2-135m",
        "sampling": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 400, "stop": [], "seed": None},
        "seed": 0, "usage": {"prompt_tokens": rng.randint(200, 1200), "completion_tokens": rng.randint(20, 400)},
    }
    instances = [{"input": " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 20))),
                  "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))}
                 for _ in range(rng.randint(1, 4))]
    return {"id": f"t{number:06d}", "name": f"t{number:06d}", "instruction": " ".join(words).capitalize() + ".",
            "instances": instances, "is_classification": rng.random() < 0.2,
            "lineage": {k: v for k, v in lineage.items() if v is not None}}


def write_corpus(folder: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    kept, rejects = folder / "kept.jsonl", folder / "kept.rejects.jsonl"
    with kept.open("w") as kept_file, rejects.open("w") as rejects_file:
        for number in range(n):
            task = synthetic_task(rng, number)
            if rng.random() < 0.1:
                rejects_file.write(json.dumps({"reason": rng.choice(["near duplicate", "instance: empty output"]),
                                               "stage": rng.choice(["near-dedup", "heuristics"]), "task": task}) + "\n")
            else:
                kept_file.write(json.dumps(task) + "\n")
    return kept


class Clock:
    """Wall seconds and this process's CPU seconds (the machine is shared: CPU time is what an idle one would take)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def open_page(folder: Path) -> tuple:
    """`datagen view`'s state on `folder`: time to the first page and to the whole index, and its pages."""
    from datagen.view.server import ViewState

    started_wall, started_cpu = time.perf_counter(), time.process_time()
    with Clock() as first_page:
        state = ViewState(folder)  # starts reading the files in a background thread
        first = state.page(limit=50)  # answered once the first rows are in
    state.index.wait()
    whole = state.page(limit=50)
    opened = Clock()
    opened.wall, opened.cpu = time.perf_counter() - started_wall, time.process_time() - started_cpu
    assert first["indexing"] or first["all"] == len(state.index), "the bench wants a file bigger than a first batch"
    assert not whole["indexing"] and [r["id"] for r in whole["rows"]] == [r["id"] for r in first["rows"]]
    return state, first_page, opened, first, whole


def ours(folder: Path) -> dict:
    from datagen.view.index_cache import cache_path

    state, first_page, opened, first, whole = open_page(folder)
    with Clock() as cache_written:
        state.index.join()  # the index cache files are written after the index is complete
    with Clock() as searched:
        found = state.page(search=NEEDLE, limit=50)
    with Clock() as warm:
        state.warm_up_later().join()
    with Clock() as task_page:
        state.details.page(first["rows"][0]["row"])
    cached = all(cache_path(folder / name).is_file() for name in ("kept.jsonl", "kept.rejects.jsonl"))
    _state, first_again, opened_again, _first, whole_again = open_page(folder)
    assert cached and whole_again["facets"] == whole["facets"]
    return {"first": first_page, "first_rows": first["all"], "open": opened, "search": searched, "warm": warm,
            "task": task_page, "rows": whole["all"], "found": found["total"], "first_again": first_again,
            "open_again": opened_again, "cache_written": cache_written}


def baseline(folder: Path) -> dict:
    from datagen.io import read_records, read_tasks
    from datagen.records import Reject

    def counts(tasks):
        return {name: Counter(getter(t) for t in tasks) for name, getter in (
            ("method", lambda t: t.lineage.generator if t.lineage else None),
            ("operation", lambda t: t.lineage.operation if t.lineage else None),
            ("round", lambda t: t.lineage.round if t.lineage else None))}

    with Clock() as opened:
        tasks = read_tasks(folder / "kept.jsonl")
        tasks += [r.task for r in read_records(folder / "kept.rejects.jsonl", Reject) if r.task]
        _page = tasks[:50], counts(tasks)
    with Clock() as searched:
        hits = [t for t in tasks if NEEDLE in t.instruction.lower() or NEEDLE in t.id.lower()]
        _found = hits[:50], counts(hits)
    return {"open": opened, "search": searched, "rows": len(tasks), "found": len(hits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="tasks in the file (default 100000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        write_corpus(folder, args.n, args.seed)
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        print(f"datagen view on {args.n:,} synthetic tasks ({size:.0f} MiB: kept.jsonl + kept.rejects.jsonl)")
        mine, naive = ours(folder), baseline(folder)
    assert mine["rows"] == naive["rows"] and mine["found"] == naive["found"], (mine, naive)
    print(f"\n{'':<40}{'ours wall / cpu (s)':>22}{'read_tasks wall / cpu (s)':>28}{'speed-up (cpu)':>16}")
    for key, baseline_key, label in (("first", "open", "time to first page"),
                                     ("open", "open", "whole index + page with all facets"),
                                     ("first_again", "open", "again, index cached: first page"),
                                     ("open_again", "open", "again, index cached: whole index"),
                                     ("search", "search", f"search '{NEEDLE}' + facets")):
        a, b = mine[key], naive[baseline_key]
        print(f"{label:<40}{a.wall:>12.3f} / {a.cpu:<7.3f}{b.wall:>18.3f} / {b.cpu:<7.3f}{b.cpu / a.cpu:>14.1f}x")
    print(f"\nthe index cache beside the files was written {mine['cache_written'].wall:.3f} s after the whole index")
    print(f"the first page came from the first {mine['first_rows']:,} rows read, the rest indexed meanwhile "
          f"in a background thread (the page says 'indexing…' and its counts fill in)")
    print(f"\nrows {mine['rows']:,}, search hits {mine['found']:,} (both ways)")
    print(f"ours, in a background thread after the first page: language facet + ROUGE-L pool "
          f"{mine['warm'].wall:.3f} s wall / {mine['warm'].cpu:.3f} s cpu; then a task page "
          f"{mine['task'].wall:.3f} s")


if __name__ == "__main__":
    main()
