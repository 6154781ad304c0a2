"""One task instance, one conversation: `datagen.chat` renders the user turn and the
training messages, and every export format, `datagen finetune` (task, Alpaca and
prompt-completion files), eval and Orca give the student that same user turn."""

from __future__ import annotations

import pytest

from datagen.chat import GENERIC_SYSTEM, instance_messages, orca_messages, user_turn
from datagen.config_file import load_config
from datagen.errors import InputError
from datagen.export import run_export
from datagen.finetune.data import load_conversations
from datagen.io import write_jsonl_atomic
from datagen.records import Instance, Lineage, Task

PLAIN = Task(id="plain", instruction="  Say whether the number is even or odd. ",
             instances=[Instance(input=" The number is 4.\n", output="Even")], is_classification=True)
NO_INPUT = Task(id="bare", instruction="Name a river.", instances=[Instance(output="The Nile")])
ORCA = Task(id="orca", instruction="Name the capital of the country.", system="Think it through step by step.",
            instances=[Instance(input="France", output="Paris", explanation="France's capital is Paris.")],
            lineage=Lineage(generator="orca", operation="orca:step_by_step", parent_ids=["seed-1"]))


def test_user_turn_is_pinned():
    assert user_turn(PLAIN.instruction, PLAIN.instances[0].input) == (
        "Say whether the number is even or odd.\n\nInput:\nThe number is 4.")
    assert user_turn("Name a river.", "") == "Name a river."
    assert user_turn("Name a river.", "  \n") == "Name a river."


def test_instance_messages_are_pinned():
    assert instance_messages(PLAIN, PLAIN.instances[0]) == [
        {"role": "user", "content": "Say whether the number is even or odd.\n\nInput:\nThe number is 4."},
        {"role": "assistant", "content": "Even"},
    ]
    assert instance_messages(ORCA, ORCA.instances[0]) == [
        {"role": "system", "content": "Think it through step by step."},
        {"role": "user", "content": "Name the capital of the country.\n\nInput:\nFrance"},
        {"role": "assistant", "content": "France's capital is Paris.\n\nFinal answer: Paris"},
    ]
    erased = instance_messages(ORCA, ORCA.instances[0], prompt_erasure=True)
    assert erased[0] == {"role": "system", "content": GENERIC_SYSTEM} and erased[1:] == instance_messages(
        ORCA, ORCA.instances[0])[1:]
    # prompt erasure is about Orca's system messages: a plain task is unchanged
    assert instance_messages(PLAIN, PLAIN.instances[0], prompt_erasure=True) == instance_messages(
        PLAIN, PLAIN.instances[0])


def test_orca_uses_the_same_turns():
    from datagen.generators.orca import answer_messages, training_messages

    assert training_messages is orca_messages
    [_system, user] = answer_messages(ORCA.instruction, "France", False, ORCA.system)
    assert user["content"].startswith(user_turn(ORCA.instruction, "France") + "\n")


def user_turns(conversations) -> list[tuple[str | None, str]]:
    """(system, user) of each conversation."""
    return [(dict(c.messages).get("system"), dict(c.messages)["user"]) for c in conversations]


@pytest.mark.parametrize("erasure", [False, True])
def test_every_format_and_finetune_on_tasks_give_the_same_user_turn(tmp_path, erasure):
    tasks = [PLAIN, NO_INPUT, ORCA]
    source = tmp_path / "tasks.jsonl"
    write_jsonl_atomic(source, tasks)
    settings = load_config(None, {"export.validation": ("--validation", 0.0), "export.test": ("--test", 0.0),
                                  "generate.orca.prompt_erasure": ("--prompt-erasure", erasure)})
    expected = [(m[0]["content"] if m[0]["role"] == "system" else None, next(x["content"] for x in m
                                                                            if x["role"] == "user"))
                for m in (instance_messages(t, t.instances[0], prompt_erasure=erasure) for t in tasks)]
    assert [user for _system, user in expected] == [
        "Say whether the number is even or odd.\n\nInput:\nThe number is 4.", "Name a river.",
        "Name the capital of the country.\n\nInput:\nFrance"]
    loaded = {}
    for fmt, name in (("messages", "train.jsonl"), ("prompt-completion", "train.jsonl"), ("alpaca", "train.json")):
        run_export(settings, source, fmt, tmp_path / fmt)
        loaded[fmt] = user_turns(load_conversations(tmp_path / fmt / name))
    loaded["tasks"] = user_turns(load_conversations(source, prompt_erasure=erasure))
    assert loaded["messages"] == loaded["prompt-completion"] == loaded["tasks"] == expected
    # Alpaca rows have no system message; the user turn is the same
    assert loaded["alpaca"] == [(None, user) for _system, user in expected]


def test_finetune_on_an_orca_task_file_honours_prompt_erasure(tmp_path):
    from datagen.finetune.sft import FinetuneConfig

    source = tmp_path / "orca.jsonl"
    write_jsonl_atomic(source, [ORCA])
    [kept] = load_conversations(source)
    [erased] = load_conversations(source, prompt_erasure=True)
    assert kept.messages[0] == ("system", "Think it through step by step.")
    assert erased.messages[0] == ("system", GENERIC_SYSTEM) and erased.messages[1:] == kept.messages[1:]
    config = tmp_path / "config.yaml"
    config.write_text("finetune:\n  prompt_erasure: true\n")
    assert load_config(config).finetune.prompt_erasure is True
    assert FinetuneConfig().prompt_erasure is False


def test_finetune_and_eval_on_task_files_use_the_exports_generic_system(tmp_path):
    """A custom generate.orca.generic_system reaches training and evaluation on task JSONL,
    as it reaches the export; finetune.generic_system / eval.generic_system override it."""
    from datagen.finetune.evaluate import EvalConfig
    from datagen.finetune.sft import FinetuneConfig

    source = tmp_path / "orca.jsonl"
    write_jsonl_atomic(source, [ORCA])
    config = tmp_path / "config.yaml"
    config.write_text("generate:\n  orca:\n    prompt_erasure: true\n    generic_system: Be useful.\n"
                      "finetune:\n  prompt_erasure: true\neval:\n  prompt_erasure: true\n"
                      "  generic_system: Be brief.\n")
    loaded = load_config(config)
    assert (loaded.finetune.generic_system, loaded.eval.generic_system) == ("Be useful.", "Be brief.")
    [tuned] = load_conversations(source, prompt_erasure=True, generic_system=loaded.finetune.generic_system)
    assert tuned.messages[0] == ("system", "Be useful.")
    export = tmp_path / "export"
    run_export(loaded, source, "messages", export)
    [exported] = load_conversations(export / "train.jsonl")
    assert exported.messages == tuned.messages
    assert load_config(None).finetune.generic_system == GENERIC_SYSTEM
    assert FinetuneConfig().generic_system is None and EvalConfig().generic_system is None


def test_prompt_completion_rows_keep_their_system_message(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text('{"prompt": "Say hi.", "completion": "Hi!", "system": "Be brief."}\n'
                    '{"prompt": "Say bye.", "completion": "Bye!", "system": null}\n')
    assert [c.messages for c in load_conversations(path)] == [
        (("system", "Be brief."), ("user", "Say hi."), ("assistant", "Hi!")),
        (("user", "Say bye."), ("assistant", "Bye!")),
    ]
    path.write_text('{"prompt": "Say hi.", "completion": "Hi!", "system": 3}\n')
    with pytest.raises(InputError, match=f'{path}:1: field "system": expected a string'):
        load_conversations(path)
