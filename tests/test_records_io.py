"""Task records and JSONL I/O: the Self-Instruct seed format, file:line errors, no lost work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datagen.config import read_yaml
from datagen.errors import DatagenError, InputError
from datagen.io import (
    JsonlAppender,
    atomic_write_json,
    read_tasks,
    read_tasks_lenient,
    read_text,
    read_text_lines,
    write_jsonl_atomic,
)
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


# -- text decoding: every reader goes through datagen.io.read_text_lines / read_text -----------

def _read_tasks(path):
    return [task.instruction for task in read_tasks(path)]


def _read_tasks_lenient(path):
    tasks, invalid = read_tasks_lenient(path)
    assert invalid == []
    return [task.instruction for task in tasks]


def _read_config(path):
    return read_yaml(path)["teacher"]["model"]


def _load_conversations(path):
    from datagen.finetune.data import load_conversations

    return [conversation.messages for conversation in load_conversations(path)]


def _eval_file(path):
    from datagen.filters.decontaminate import EvalIndex

    return sorted(set(EvalIndex.from_files([path], n=2).grams.values()))


# reader, file name, the file's text (line 2 holds the only non-ASCII character, "é")
READERS = [
    (_read_tasks, "seeds.jsonl",
     '{"id": "a", "instruction": "Say hi."}\n{"id": "b", "instruction": "Say café."}\n'),
    (_read_tasks_lenient, "raw.jsonl",
     '{"id": "a", "instruction": "Say hi."}\n{"id": "b", "instruction": "Say café."}\n'),
    (_read_config, "run.yaml", "teacher:\n  model: café\n"),
    (_load_conversations, "train.jsonl",
     '{"prompt": "Say hi.", "completion": "hi"}\n{"prompt": "Say café.", "completion": "café"}\n'),
    (_load_conversations, "alpaca.json",
     '[{"instruction": "Say hi.", "output": "hi"},\n {"instruction": "Say café.", "output": "café"}]\n'),
    (_eval_file, "eval.txt", "the first eval item here\nthe second café item\n"),
    (_eval_file, "eval.jsonl", '{"q": "the first eval item"}\n{"q": "the second café item"}\n'),
]


@pytest.mark.parametrize(("read", "name", "text"), READERS, ids=lambda v: getattr(v, "__name__", v)[:20])
def test_every_reader_accepts_a_byte_order_mark(tmp_path, read, name, text):
    plain, marked = tmp_path / "plain" / name, tmp_path / "marked" / name
    for path, data in ((plain, text.encode()), (marked, b"\xef\xbb\xbf" + text.encode())):
        path.parent.mkdir()
        path.write_bytes(data)
    assert repr(read(marked)).replace("marked", "plain") == repr(read(plain))  # eval items name their file


@pytest.mark.parametrize(("read", "name", "text"), READERS, ids=lambda v: getattr(v, "__name__", v)[:20])
def test_every_reader_names_the_line_of_a_byte_that_is_not_utf8(tmp_path, read, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))  # "é" as the single byte 0xE9
    with pytest.raises(DatagenError) as caught:
        read(path)
    assert str(caught.value) == f"{path}:2: not UTF-8 text"


def test_read_text_counts_lines_to_the_first_bad_byte(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("one\r\ntwo é\nthree \xe9\n".encode() + b"four \xff\n")
    with pytest.raises(InputError, match=r"notes\.txt:4: not UTF-8 text$"):
        read_text(path)
    lines = read_text_lines(path)
    assert [next(lines), next(lines), next(lines)] == [(1, "one"), (2, "two é"), (3, "three é")]
    with pytest.raises(InputError, match=r"notes\.txt:4: not UTF-8 text$"):
        next(lines)


def test_a_line_separator_inside_a_json_string_does_not_split_the_record(tmp_path):
    path = tmp_path / "raw.jsonl"
    path.write_text('{"id": "a", "instruction": "one\u2028two"}\n', encoding="utf-8")
    tasks, invalid = read_tasks_lenient(path)
    assert invalid == [] and tasks[0].instruction == "one\u2028two"


def test_a_reused_id_is_named_with_both_lines(tmp_path):
    path = tmp_path / "kept.jsonl"
    first = Task(id="x", instruction="Say hi.").to_json()
    path.write_text("\n".join([first, Task(id="y", instruction="Bye.").to_json(), first,
                               Task(id="x", instruction="Say hello.").to_json()]) + "\n")
    tasks, invalid = read_tasks_lenient(path)
    assert [task.id for task in tasks] == ["x", "y"]
    assert [(where, problem) for where, problem, _ in invalid] == [
        (f"{path}:3", 'id "x" already used by line 1 (the same task repeated)'),
        (f"{path}:4", 'id "x" already used by line 1 with a different task'),
    ]


def test_a_run_killed_mid_line_resumes_and_its_torn_reject_is_only_counted(tmp_path):
    from datagen.export.negatives import read_rejects
    from datagen.generators.common import TaskSink
    from datagen.io import rejects_path

    out = tmp_path / "raw.jsonl"
    whole = Task(id="t1", instruction="Name a colour.", instances=[Instance(output="Blue.")])
    out.write_text(whole.to_json() + "\n" + whole.to_json()[:25])  # killed mid-line
    rejects_path(out).write_bytes(b'{"reason": "parse failure", "stage": "alpaca"}\n{"reason": "caf\xc3')
    with TaskSink(out) as sink:
        assert [task.id for task in sink.existing] == ["t1"]
    assert out.read_text() == whole.to_json() + "\n"
    found, unreadable = read_rejects([rejects_path(out)])
    assert [r.reason for r in found] == ["parse failure"] and unreadable == []  # the torn line was cut on open
    rejects_path(out).write_bytes(b'{"reason": "caf\xc3\n')  # a bad byte inside a whole line
    assert read_rejects([rejects_path(out)]) == ([], [f"{rejects_path(out)}:1"])


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    from datagen.io import _UMASK, atomic_write_text, write_dir_atomic

    atomic_write_text(tmp_path / "a.txt", "x")
    write_dir_atomic(tmp_path / "d", lambda folder: (folder / "f").write_text("y"))
    # what open() and mkdir() would give, not the owner-only modes of mkstemp / mkdtemp
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~_UMASK
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~_UMASK
