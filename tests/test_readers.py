"""Bring your own data: every format `datagen.readers` reads, through the `datagen` entry point
(filter with the heuristics pass, dedup, export: no model needed), detection and its one-line
errors, stable ids, a lossless Alpaca round trip, and multi-turn conversations from ShareGPT
through the filters and the messages export to finetune's supervision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datagen.chat import FINAL_ANSWER, instance_messages
from datagen.io import read_tasks
from datagen.readers import load, read_tasks_any
from tests.helpers import run_cli, single_error_line

ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat vegetables, sleep eight hours and walk every day.", "category": "advice", "text": "row one"},
    {"instruction": "Translate the sentence into French.", "input": "The cat sleeps.",
     "output": "Le chat dort.", "category": "translation"},
    {"instruction": "Name the largest planet of the solar system.", "input": "", "output": "Jupiter is the largest.",
     "category": "qa", "id": "q17"},
]
CHAT = [("system", "You are a terse assistant."), ("user", "Name a primary colour."),
        ("assistant", "Red is a primary colour."), ("user", "Name another one, please."),
        ("assistant", "Blue is another primary colour.")]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def alpaca_rows(path: Path) -> Path:
    return write_jsonl(path / "alpaca.jsonl", ALPACA)


def alpaca_array(path: Path) -> Path:
    target = path / "alpaca.json"
    target.write_text(json.dumps(ALPACA, indent=2), encoding="utf-8")
    return target


def sharegpt(path: Path) -> Path:
    turns = [{"from": SHAREGPT_ROLE[role], "value": text} for role, text in CHAT]
    return write_jsonl(path / "sharegpt.jsonl", [{"id": "conv-1", "conversations": turns, "model": "gpt-4"}])


def messages(path: Path) -> Path:
    return write_jsonl(path / "chat.jsonl", [{"messages": [{"role": r, "content": t} for r, t in CHAT]}])


def prompt_completion(path: Path) -> Path:
    return write_jsonl(path / "pc.jsonl", [{"prompt": row["instruction"], "completion": row["output"]}
                                           for row in ALPACA])


def preferences(path: Path) -> Path:
    return write_jsonl(path / "pairs.jsonl", [{"prompt": row["instruction"], "chosen": row["output"],
                                               "rejected": "No."} for row in ALPACA])


def ni_task(row: dict) -> dict:
    return {"Contributors": ["someone"], "Definition": [row["instruction"]], "Positive Examples": [],
            "Negative Examples": [], "Instances": [{"id": "t-1", "input": row["input"] or "go",
                                                    "output": [row["output"]]}]}


def ni_file(path: Path) -> Path:
    target = path / "task001_tips.json"
    target.write_text(json.dumps(ni_task(ALPACA[0]), indent=1), encoding="utf-8")
    return target


def ni_folder(path: Path) -> Path:
    (path / "ni" / "tasks").mkdir(parents=True)
    for number, row in enumerate(ALPACA, start=1):
        (path / "ni" / "tasks" / f"task00{number}_x.json").write_text(json.dumps(ni_task(row), indent=1))
    (path / "ni" / "tasks" / "README.md").write_text("tasks\n")
    return path / "ni"


def hf_saved(path: Path) -> Path:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA[:2]),
                          "test": datasets.Dataset.from_list(ALPACA[2:])}).save_to_disk(str(path / "saved"))
    return path / "saved"


def parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ALPACA), path / "train-00000-of-00001.parquet")
    return path / "train-00000-of-00001.parquet"


def arrow(path: Path) -> Path:
    import pyarrow as pa

    table = pa.Table.from_pylist(ALPACA)
    with pa.OSFile(str(path / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path / "data.arrow"


def tasks_file(path: Path) -> Path:
    return write_jsonl(path / "tasks.jsonl", [{"id": f"t{n}", "instruction": row["instruction"],
                                                "instances": [{"input": row["input"], "output": row["output"]}]}
                                               for n, row in enumerate(ALPACA)])


# format -> (writer, tasks it holds)
SOURCES = {
    "tasks": (tasks_file, 3), "alpaca": (alpaca_rows, 3), "alpaca-json": (alpaca_array, 3),
    "sharegpt": (sharegpt, 1), "messages": (messages, 1), "prompt-completion": (prompt_completion, 3),
    "preferences": (preferences, 3), "natural-instructions": (ni_file, 1), "ni-folder": (ni_folder, 3),
    "hf-saved": (hf_saved, 2), "parquet": (parquet, 3), "arrow": (arrow, 3),
}
DETECTED = {"alpaca-json": "alpaca", "ni-folder": "natural-instructions", "hf-saved": "alpaca", "parquet": "alpaca",
            "arrow": "alpaca"}


@pytest.mark.parametrize("name", SOURCES)
def test_filter_reads_every_format(tmp_path, name):
    """Through the entry point; export, dedup, view, seeds and finetune read with the same
    `datagen.readers.load`, and the tests below run each of them on formats of their own."""
    write, count = SOURCES[name]
    source = write(tmp_path)
    kept = tmp_path / "kept.jsonl"
    result = run_cli("filter", str(source), "--out", str(kept), "--passes", "heuristics")
    assert result.returncode == 0, result.stderr
    tasks = read_tasks(kept)
    assert len(tasks) == count
    if name != "tasks":
        assert {t.lineage.source_format for t in tasks} == {DETECTED.get(name, name)}
        assert all(t.lineage.source_file == str(source) for t in tasks)


def test_alpaca_jsonl_filter_no_longer_needs_ids(tmp_path):
    source = alpaca_rows(tmp_path)
    result = run_cli("filter", str(source), "--out", str(tmp_path / "kept.jsonl"))
    assert result.returncode == 0, result.stderr
    first = read_tasks(tmp_path / "kept.jsonl")[0]
    assert first.id.startswith("alpaca-") and first.lineage.source_line == 1


def test_dedup_reads_a_sharegpt_dump_and_split_picks_a_split(tmp_path):
    source = write_jsonl(tmp_path / "dump.jsonl", [json.loads(sharegpt(tmp_path).read_text())] * 1 + [
        {"conversations": [{"from": "human", "value": "Hello there, how are you?"},
                           {"from": "gpt", "value": "Very well, thank you."}]}] * 2)
    result = run_cli("dedup", str(source), "--out", str(tmp_path / "kept.jsonl"))
    assert result.returncode == 0, result.stderr
    assert len(read_tasks(tmp_path / "kept.jsonl")) == 2  # the repeated conversation is a duplicate
    saved = hf_saved(tmp_path)
    result = run_cli("filter", str(saved), "--split", "test", "--passes", "heuristics",
                     "--out", str(tmp_path / "test.jsonl"))
    assert result.returncode == 0, result.stderr
    assert [t.instruction for t in read_tasks(tmp_path / "test.jsonl")] == [ALPACA[2]["instruction"]]
    result = run_cli("filter", str(saved), "--split", "dev", "--out", str(tmp_path / "x.jsonl"))
    assert single_error_line(result) == f"error: {saved}: no split 'dev'; it has train, test (--split)"


def test_a_dataset_in_the_local_hf_cache_is_read_offline(tmp_path, monkeypatch):
    """What `load_dataset("me/tiny")` left in the cache, made here from a local file."""
    import glob
    import os
    import shutil

    import datasets

    cache = tmp_path / "cache"
    datasets.load_dataset("json", data_files={"train": str(alpaca_rows(tmp_path))}, cache_dir=str(cache))
    [built] = [p for p in glob.glob(str(cache / "json" / "*" / "*" / "*")) if os.path.isdir(p)]
    target = cache / "me___tiny" / "default" / "0.0.0" / Path(built).name
    shutil.move(built, target)
    for arrow_file in target.glob("json-*.arrow"):
        arrow_file.rename(target / arrow_file.name.replace("json-", "tiny-", 1))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    result = run_cli("filter", "me/tiny", "--passes", "heuristics", "--out", str(tmp_path / "kept.jsonl"))
    assert result.returncode == 0, result.stderr
    assert len(read_tasks(tmp_path / "kept.jsonl")) == 3
    assert os.environ.get("HF_HUB_OFFLINE") is None or "HF_HUB_OFFLINE" in os.environ  # restored as it was
    result = run_cli("filter", "me/not-cached", "--out", str(tmp_path / "x.jsonl"))
    assert single_error_line(result).startswith("error: me/not-cached: no such file, and not a dataset in the "
                                                "local Hugging Face cache")


def test_unknown_and_ambiguous_files_are_one_line_and_input_format_overrides(tmp_path):
    unknown = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Why?", "answer": "Because."}])
    result = run_cli("filter", str(unknown), "--out", str(tmp_path / "k.jsonl"))
    line = single_error_line(result)
    assert line.startswith(f"error: {unknown}:1: unknown format (keys: answer, question); expected one of ")
    assert "alpaca (instruction, input, output)" in line and "--input-format NAME" in line
    both = write_jsonl(tmp_path / "both.jsonl", [{"messages": [{"role": "user", "content": "Say hi to me now."},
                                                               {"role": "assistant", "content": "Hi!"}],
                                                  "instruction": "Say hello to me now.", "output": "Hello!"}])
    result = run_cli("filter", str(both), "--out", str(tmp_path / "k.jsonl"))
    assert single_error_line(result) == (f"error: {both}:1: ambiguous row: it reads as messages and as alpaca; "
                                         "pass --input-format messages (or alpaca)")
    result = run_cli("filter", str(both), "--out", str(tmp_path / "k.jsonl"), "--input-format", "alpaca",
                     "--passes", "heuristics")
    assert result.returncode == 0, result.stderr
    [task] = read_tasks(tmp_path / "k.jsonl")
    assert task.instruction == "Say hello to me now." and task.instances[0].model_extra["messages"]
    result = run_cli("filter", str(both), "--out", str(tmp_path / "k.jsonl"), "--input-format", "csv")
    assert result.returncode == 2
    assert single_error_line(result).startswith("error: --input-format: expected one of hf-export, ")
    bad_row = write_jsonl(tmp_path / "mixed.jsonl", ALPACA[:1] + [{"prompt": "x", "completion": "y"}])
    result = run_cli("export", str(bad_row), "--format", "alpaca", "--out", str(tmp_path / "e"))
    assert single_error_line(result) == f"error: {bad_row}:2: not a alpaca row (expected instruction, input, output)"


def test_ids_are_stable_and_a_repeated_row_gets_its_own(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", ALPACA + ALPACA[:1])
    first, second = load(source), load(source)
    assert [t.id for t in first.tasks] == [t.id for t in second.tasks]
    assert first.tasks[3].id == first.tasks[0].id + "-2"
    assert len({t.id for t in first.tasks}) == 4 and not first.invalid
    assert [t.lineage.source_line for t in first.tasks] == [1, 2, 3, 4]


def test_alpaca_round_trip_keeps_every_field(tmp_path):
    source = alpaca_array(tmp_path)
    assert run_cli("filter", str(source), "--out", str(tmp_path / "kept.jsonl"), "--passes",
                   "heuristics").returncode == 0
    result = run_cli("export", str(tmp_path / "kept.jsonl"), "--format", "alpaca", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    rows = [row for split in ("train", "validation", "test")
            for row in json.loads((tmp_path / "out" / f"{split}.json").read_text())]
    assert sorted(rows, key=json.dumps) == sorted(ALPACA, key=json.dumps)


def test_a_sharegpt_conversation_is_filtered_per_turn_and_exported_with_every_turn(tmp_path):
    good = json.loads(sharegpt(tmp_path).read_text())
    refusing = {"id": "conv-2", "conversations": [
        {"from": "human", "value": "Tell me about the moon landing."},
        {"from": "gpt", "value": "Apollo 11 landed on the moon in July 1969."},
        {"from": "human", "value": "Now write my homework essay for me."},
        {"from": "gpt", "value": "As an AI language model, I cannot do your homework."}]}
    source = write_jsonl(tmp_path / "dump.jsonl", [good, refusing])
    result = run_cli("filter", str(source), "--out", str(tmp_path / "kept.jsonl"), "--passes", "heuristics")
    assert result.returncode == 0, result.stderr
    [reject] = [json.loads(line) for line in (tmp_path / "kept.rejects.jsonl").read_text().splitlines()]
    assert reject["task"]["id"] == "conv-2" and reject["reason"] == "refusal: 'as an ai language model' (turn 2)"
    [kept] = read_tasks(tmp_path / "kept.jsonl")
    assert kept.system == CHAT[0][1] and len(kept.instances[0].followups) == 1
    result = run_cli("export", str(tmp_path / "kept.jsonl"), "--format", "messages", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    [row] = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert [(m["role"], m["content"]) for m in row["messages"]] == CHAT  # a plain chat: no Orca "Final answer:"
    result = run_cli("export", str(tmp_path / "kept.jsonl"), "--format", "alpaca", "--out", str(tmp_path / "a"))
    assert single_error_line(result) == ("error: --format alpaca: task 'conv-1' (instance 0) is a conversation of 2 "
                                         "turns, and alpaca rows hold one; export it with --format messages or hf")


def test_a_system_prompt_read_from_a_chat_is_not_orca_but_a_task_file_system_still_is(tmp_path):
    [chat] = read_tasks_any(messages(tmp_path))
    single = chat.model_copy(update={"instances": [chat.instances[0].model_copy(update={"followups": None})]})
    assert [m["role"] for m in instance_messages(single, single.instances[0])] == ["system", "user", "assistant"]
    assert FINAL_ANSWER not in instance_messages(single, single.instances[0])[-1]["content"]
    ours = single.model_copy(update={"lineage": None})  # a task file's system message: the Orca shape
    assert instance_messages(ours, ours.instances[0])[-1]["content"].startswith(FINAL_ANSWER)


def test_hf_export_rows_read_back_multi_turn_losslessly(tmp_path):
    kept = tmp_path / "kept.jsonl"
    kept.write_text("".join(t.to_json() + "\n" for t in read_tasks_any(sharegpt(tmp_path))))
    result = run_cli("export", str(kept), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert read_tasks_any(tmp_path / "hf" / "data" / "train.parquet") == read_tasks(kept)
    assert read_tasks_any(tmp_path / "hf") == read_tasks(kept)


def test_finetune_reads_a_sharegpt_file_and_supervises_both_replies(tmp_path, embedded_model_path):
    from transformers import AutoTokenizer

    from datagen.finetune.data import IGNORE_INDEX, encode_conversation, load_conversations

    [conversation] = load_conversations(sharegpt(tmp_path))
    assert [role for role, _text in conversation.messages] == [role for role, _text in CHAT]
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path)
    encoded = encode_conversation(tokenizer, conversation)
    supervised = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])
    assert CHAT[2][1] in supervised and CHAT[4][1] in supervised
    assert CHAT[1][1] not in supervised and CHAT[3][1] not in supervised


def test_view_and_seeds_read_other_formats(tmp_path):
    from datagen.config_file import load_config
    from datagen.generate import load_seeds
    from datagen.view.server import ViewState

    source = alpaca_array(tmp_path)
    state = ViewState(source)
    state.index.wait(30)
    assert sorted(state.index.ids) == sorted(t.id for t in read_tasks_any(source))
    assert state.overrides == tmp_path / "alpaca.json.overrides.jsonl"  # marks go beside the data
    config = load_config(None, {"generate.seeds": ("--seeds", str(sharegpt(tmp_path)))})
    assert [t.id for t in load_seeds(config)] == ["conv-1"]
