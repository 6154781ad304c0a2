"""Task records and JSONL I/O: the Self-Instruct seed format, file:line errors, no lost work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datagen.errors import InputError
from datagen.io import JsonlAppender, atomic_write_json, read_tasks, write_jsonl_atomic
from datagen.records import Instance, Lineage, Task

DATA = Path(__file__).parent / "data"


def test_self_instruct_seed_format_loads_unchanged():
    tasks = read_tasks(DATA / "seed_tasks_sample.jsonl")
    assert [t.id for t in tasks] == [f"seed_task_{i}" for i in range(6)]
    assert tasks[5].is_classification is True
    assert tasks[5].instances[0].output == "false"
    original = json.loads((DATA / "seed_tasks_sample.jsonl").read_text().splitlines()[1])
    assert json.loads(tasks[1].to_json()) == original  # round trip adds nothing


def test_lineage_and_orca_fields_round_trip():
    task = Task(
        id="t1",
        instruction="Add the numbers.",
        instances=[Instance(input="2 3", output="5", explanation="2 plus 3 is 5.")],
        system="Think step by step.",
        lineage=Lineage(generator="orca", operation="evol:deepen", round=2, parent_ids=["s1"],
                        template="orca.jinja", template_sha256="ab" * 32, teacher_backend="local",
                        teacher_model="smollm2-135m", sampling={"temperature": 0.7}, seed=3),
    )
    back = Task.model_validate_json(task.to_json())
    assert back == task
    assert back.lineage.operation == "evol:deepen"


def test_unknown_keys_are_kept(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"id": "x", "instruction": "Say hi.", "source": "elsewhere"}\n')
    [task] = read_tasks(path)
    assert json.loads(task.to_json())["source"] == "elsewhere"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"id": "a", "instruction": "ok"}', '{"id": "b"}'], ':2: missing "instruction"'),
        (['{"id": "a", "instruction": "ok"}', "", "{not json"], ":3: invalid JSON"),
        (["[1, 2]"], ":1: expected a JSON object, got list"),
        (['{"id": "a", "instruction": "x", "instances": [{"input": "i"}]}'], ':1: missing "instances.0.output"'),
        (['{"id": "a", "instruction": "x", "is_classification": "maybe"}'], ':1: field "is_classification"'),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, lines, expected):
    path = tmp_path / "seeds.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as caught:
        read_tasks(path)
    assert str(caught.value).startswith(f"{path}{expected}")
    assert "\n" not in str(caught.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_tasks(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no tasks"):
        read_tasks(tmp_path / "empty.jsonl")


def test_appender_flushes_per_batch_and_repairs_a_torn_line(tmp_path):
    path = tmp_path / "raw.jsonl"
    with JsonlAppender(path) as out:
        out.write_many([Task(id="a", instruction="one")])
        assert read_tasks(path)[0].id == "a"  # on disk before close
    with path.open("a") as handle:
        handle.write('{"id": "b", "instr')  # a kill mid-write
    with JsonlAppender(path) as out:
        out.write_many([Task(id="c", instruction="three")])
    assert [t.id for t in read_tasks(path)] == ["a", "c"]


def test_atomic_writes_leave_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "stats.json", {"kept": 3})
    write_jsonl_atomic(tmp_path / "kept.jsonl", [Task(id="a", instruction="one"), '{"id": "b", "instruction": "two"}'])
    assert json.loads((tmp_path / "stats.json").read_text()) == {"kept": 3}
    assert [t.id for t in read_tasks(tmp_path / "kept.jsonl")] == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.jsonl", "stats.json"]
