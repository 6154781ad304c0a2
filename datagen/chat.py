"""One task instance as one conversation: the single source of the user turn and of the
training messages, for every export format, `datagen finetune`, `datagen eval` and Orca.

Vocabulary layer: imports only `datagen.records` and the standard library.

- `user_turn(instruction, input)`: what the user says. The instruction, then (when there
  is an input) a blank line, `Input:` and the input, both stripped:

      Say whether the number is even or odd.

      Input:
      The number is 4.

  An Alpaca row `{instruction, input, output}` is the same instance as data; the prompt a
  trainer builds from it is `user_turn(row["instruction"], row["input"])` (that is what
  `datagen finetune` does with Alpaca and prompt-completion files).
- `instance_messages(task, instance, prompt_erasure=..., generic_system=...)`: the chat
  training example. A plain task is `[user, assistant(output)]`. An Orca task (it has a
  system message, or lineage generator "orca") is `[system, user, assistant]` where the
  assistant turn is the explanation, a blank line, and `Final answer: <output>`, so the
  student learns to end the same parseable way (a task read from a chat format, see
  `PLAIN_CHAT_FORMATS`, keeps its system message as a plain first turn instead); a
  multi-turn instance's `followups` come after, as user and assistant turns (every
  assistant turn is trained on); with Orca 2 *prompt erasure* the system message is
  replaced by `generic_system`, so the student learns to choose the strategy itself rather than being told it.

    from datagen.chat import instance_messages, user_turn
    messages = instance_messages(task, task.instances[0], prompt_erasure=True)
"""

from __future__ import annotations

from datagen.records import Instance, Task

FINAL_ANSWER = "Final answer:"
GENERIC_SYSTEM = (
    "You are a careful, helpful assistant. Decide for yourself how best to approach each task, "
    "reason it through, and then give your answer."
)


def user_turn(instruction: str, instance_input: str) -> str:
    """The task as the user states it: the instruction, then the input if there is one."""
    instruction = instruction.strip()
    instance_input = instance_input.strip()
    return f"{instruction}\n\nInput:\n{instance_input}" if instance_input else instruction


# formats whose system message is a plain chat's (datagen.readers): not a sign of an Orca task
PLAIN_CHAT_FORMATS = frozenset({"sharegpt", "messages", "prompt-completion", "preferences"})


def is_orca(task: Task) -> bool:
    """Whether `task` is trained in the Orca shape (system message, explanation, final answer):
    made by the orca method, or carrying a system message, unless it was read from a chat
    format, whose system prompt is just part of the conversation."""
    lineage = task.lineage
    if lineage is not None and lineage.generator == "orca":
        return True
    read_as_chat = lineage is not None and getattr(lineage, "source_format", None) in PLAIN_CHAT_FORMATS
    return task.system is not None and not read_as_chat


def orca_messages(
    task: Task, instance: Instance, prompt_erasure: bool = False, generic_system: str = GENERIC_SYSTEM
) -> list[dict[str, str]]:
    """The Orca training example for one answered instance, whatever the task.

    system: the task's system message, or `generic_system` with prompt erasure; left out
    when the task has none and erasure is off. user: `user_turn`. assistant: the
    explanation, then the "Final answer:" line.
    """
    messages: list[dict[str, str]] = []
    system = generic_system if prompt_erasure else task.system
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user_turn(task.instruction, instance.input)})
    answer = f"{FINAL_ANSWER} {instance.output.strip()}"
    if instance.explanation:
        answer = f"{instance.explanation.strip()}\n\n{answer}"
    messages.append({"role": "assistant", "content": answer})
    return messages


def instance_messages(
    task: Task, instance: Instance, *, prompt_erasure: bool = False, generic_system: str = GENERIC_SYSTEM
) -> list[dict[str, str]]:
    """The chat training example for one instance: Orca tasks through `orca_messages`, any
    other task as the user turn and the output; then the `followups`' user and assistant turns."""
    if is_orca(task):
        messages = orca_messages(task, instance, prompt_erasure, generic_system)
    else:
        messages = [{"role": "system", "content": task.system}] if task.system else []
        messages += [
            {"role": "user", "content": user_turn(task.instruction, instance.input)},
            {"role": "assistant", "content": instance.output.strip()},
        ]
    for turn in instance.followups or ():
        messages.append({"role": "user", "content": turn.user.strip()})
        messages.append({"role": "assistant", "content": turn.assistant.strip()})
    return messages
