"""The `hf` format: one typed row per instance (lineage as columns), written as a
`DatasetDict` on disk and parquet files; `tasks_from_rows` gives the records back.

    from datagen.export.hf import hf_rows, tasks_from_rows
    assert tasks_from_rows(hf_rows(tasks)) == tasks
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datagen.chat import instance_messages
from datagen.export.formats import SPLITS
from datagen.io import write_dir_atomic, write_file_atomic
from datagen.readers import tasks_from_rows  # noqa: F401 (the reading side lives with the readers)
from datagen.records import Instance, Lineage, Task


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
                "instance_extra": json.dumps(_instance_extra(instance), ensure_ascii=False, sort_keys=True),
            })
    return rows


def _instance_extra(instance: Instance) -> dict[str, Any]:
    """Unknown keys, and a multi-turn instance's later turns (no column of their own)."""
    extra = dict(instance.model_extra or {})
    if instance.followups:
        extra["followups"] = [turn.model_dump() for turn in instance.followups]
    return extra


def write_hf_files(splits: dict[str, list[Task]], out_dir: Path, chat: dict) -> list[Path]:
    present = {name: tasks for name, tasks in splits.items() if name == "train" or any(t.instances for t in tasks)}
    return write_dataset_dict({name: hf_rows(tasks, **chat) for name, tasks in present.items()}, hf_features(),
                              out_dir)


def write_dataset_dict(rows_by_split: dict[str, list[dict[str, Any]]], features, out_dir: Path) -> list[Path]:
    """`out_dir/dataset` (`DatasetDict.save_to_disk`) and `out_dir/data/<split>.parquet` for the
    splits given; the parquet file of any other split is removed. Returns the paths written."""
    import datasets

    dataset = datasets.DatasetDict({name: datasets.Dataset.from_list(rows, features=features)
                                    for name, rows in rows_by_split.items()})
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
        if name not in rows_by_split:
            (out_dir / "data" / f"{name}.parquet").unlink(missing_ok=True)
    return written + [out_dir / "dataset"]
