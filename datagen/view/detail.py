"""What the task page shows beyond the record itself: lineage links, Evol chains, near instructions.

    detail = TaskDetails(index)
    page = detail.page(row)   # {"record", "row", "parents", "chain", "children", "similar", "duplicate_of", ...}

- `chain`: for a task with parents (Evol-Instruct: one parent a round), the parents back to
  the first one not in the index (the seed), oldest first.
- `children`: the rows whose `lineage.parent_ids` name this task.
- `similar`: the most similar instructions among the indexed tasks by exact ROUGE-L F1
  (`datagen.rouge.RougeLIndex`, built on first use and grown as rows are indexed), next to
  the scores Self-Instruct stored in `lineage.most_similar` when it made the task.
"""

from __future__ import annotations

import threading
from typing import Any

from datagen.rouge import RougeLIndex
from datagen.view.index import STATUS_KEPT, TaskIndex

CHAIN_LIMIT = 64  # parents followed at most (a loop in bad data must not hang the page)
SIMILAR_SHOWN = 8


def _link(index: TaskIndex, task_id: str) -> dict[str, Any]:
    row = index.row_of_id.get(task_id)
    if row is None:
        return {"id": task_id, "row": None}
    return {"id": task_id, "row": row, "instruction": index.instruction[row], "status": index.status(row),
            "operation": index.value("operation", row), "round": index.value("round", row)}


class TaskDetails:
    def __init__(self, index: TaskIndex) -> None:
        self.index = index
        self._rouge: RougeLIndex | None = None
        self._rouge_rows: list[int] = []
        self._rouge_covered = 0  # rows of the index the pool has seen
        self._lock = threading.Lock()

    def _rouge_index(self) -> tuple[RougeLIndex, list[int]]:
        with self._lock:
            index = self.index
            rows = len(index)
            if self._rouge is None:
                # every task once (kept rows first, so a duplicate instruction points at the kept one)
                pool = [r for r in range(rows) if index.status(r) == STATUS_KEPT]
                pool += [r for r in range(rows) if index.status(r) != STATUS_KEPT
                         and not index.instruction[r].startswith("(raw) ")]
                self._rouge_rows = pool
                self._rouge = RougeLIndex(index.instruction[r] for r in pool)
            elif rows > self._rouge_covered:  # rows indexed since (the rest of the file, or lines appended)
                for r in range(self._rouge_covered, rows):
                    if not index.instruction[r].startswith("(raw) "):
                        self._rouge_rows.append(r)
                        self._rouge.add(index.instruction[r])
            self._rouge_covered = rows
            return self._rouge, self._rouge_rows

    def similar_ready(self) -> None:
        """Build the ROUGE-L pool now (a task page would otherwise build it on first use)."""
        self._rouge_index()

    def chain(self, row: int) -> list[dict[str, Any]]:
        """Parents back to the seed, oldest first (the first parent id of each step)."""
        index = self.index
        chain, seen = [], {index.ids[row]}
        current = row
        while current is not None and len(chain) < CHAIN_LIMIT:
            parents = index.parent_ids(current)
            if not parents or parents[0] in seen:
                break
            seen.add(parents[0])
            chain.append(_link(index, parents[0]))
            current = index.row_of_id.get(parents[0])
        return chain[::-1]

    def similar(self, row: int, instruction: str) -> list[dict[str, Any]]:
        if not instruction.strip():
            return []
        rouge, rows = self._rouge_index()
        found = []
        for match in rouge.nearest(instruction, k=SIMILAR_SHOWN + 1).matches:
            other = rows[match.index]
            if other == row or match.score <= 0:
                continue
            found.append({**_link(self.index, self.index.ids[other]), "row": other, "rouge_l": round(match.score, 4)})
        return found[:SIMILAR_SHOWN]

    def page(self, row: int) -> dict[str, Any]:
        index = self.index
        record = index.record(row)
        rejected = "reason" in record and "instruction" not in record
        task = record.get("task") if rejected else record
        task = task if isinstance(task, dict) else {}
        lineage = task.get("lineage") if isinstance(task.get("lineage"), dict) else {}
        mark = index.marks.get(index.ids[row])
        generator = lineage.get("generator") or ""
        page = {
            "row": row, "id": index.ids[row], "file": index.value("file", row), "line": index.line[row],
            "status": index.status(row), "record": record, "task": task,
            "mark": mark.model_dump() if mark is not None else None,
            "parents": [_link(index, p) for p in index.parent_ids(row)],
            "chain": self.chain(row) if generator.startswith("evol") else [],
            "children": [_link(index, index.ids[c]) | {"row": c} for c in index.children(index.ids[row])],
            "stored_similar": [{"instruction": text, "rouge_l": score}
                               for text, score in (lineage.get("most_similar") or {}).items()],
            "similar": self.similar(row, str(task.get("instruction") or "")),
        }
        if rejected and record.get("duplicate_of"):
            page["duplicate_of"] = _link(index, str(record["duplicate_of"]))
        return page
