"""Training data for SFT: conversations in, token ids with completion-only labels out.

`load_conversations(path)` reads any format `datagen.readers` reads (task JSONL, Alpaca,
ShareGPT, chat `messages`, prompt/completion, preference rows, NI task files, Hugging Face
datasets; an export folder means its `train.jsonl`), one conversation per instance, made by
`datagen.chat.instance_messages` (Orca tasks in the Orca shape; `prompt_erasure=True`, i.e.
`finetune.prompt_erasure`, trains them on the generic system message; a multi-turn instance
is one conversation with every assistant turn), and names the file and line of a bad one.

`encode_conversation` renders a conversation with the student's own chat template and
supervises only the assistant turns: a token is supervised when its characters lie in
an assistant reply (the reply text and the template's end-of-turn token). Every example
must keep at least one supervised token and its EOS supervised, or encoding fails with
a message naming the example: silently training on nothing is the bug this prevents.

    from datagen.finetune.data import load_conversations, encode_all
    conversations = load_conversations("out/dataset/train.jsonl")
    encoded = encode_all(tokenizer, conversations, max_length=None)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen.errors import InputError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """One training example: chat messages ending with the assistant reply, and where it came from."""

    messages: tuple[tuple[str, str], ...]
    source: str  # "file:line" (or "file:line#instance") for error messages

    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass
class Encoded:
    """A tokenized conversation: labels are IGNORE_INDEX outside the assistant replies."""

    input_ids: list[int]
    labels: list[int]
    source: str

    @property
    def supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class EncodedSet:
    """Encoded examples plus what happened on the way: lengths, the chosen max length, drops."""

    examples: list[Encoded]
    max_length: int
    dropped_overlong: list[str] = field(default_factory=list)
    length_stats: dict[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


# ----------------------------------------------------------------------------- reading


def load_conversations(path: str | Path, *, prompt_erasure: bool = False, generic_system: str | None = None,
                       input_format: str | None = None, split: str | None = None) -> list[Conversation]:
    """Every conversation in `path`, read by `datagen.readers` (any format it reads; an export
    folder means its `train.jsonl`); one per instance, as `datagen.chat.instance_messages`
    makes it. With `prompt_erasure`, Orca tasks get `generic_system` (default:
    datagen.chat.GENERIC_SYSTEM)."""
    from datagen.chat import GENERIC_SYSTEM, instance_messages
    from datagen.readers import load

    path = Path(path)
    if path.is_dir() and (path / "train.jsonl").is_file():
        path = path / "train.jsonl"
    loaded = load(path, input_format, split, strict=True)
    conversations: list[Conversation] = []
    several = loaded.format in ("tasks", "hf-export")  # one row, several instances: name each
    for task, where in zip(loaded.tasks, loaded.where):
        for index, instance in enumerate(task.instances):
            messages = instance_messages(task, instance, prompt_erasure=prompt_erasure,
                                         generic_system=generic_system or GENERIC_SYSTEM)
            source = f"{where}#{index}" if several else where
            conversations.append(Conversation(_checked_messages(source, messages), source))
    if not conversations:
        raise InputError(f"{path}: no examples in file (is the split empty?)")
    return conversations


def _checked_messages(where: str, messages: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise InputError(f'{where}: field "messages": expected a non-empty list')
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InputError(f'{where}: messages[{index}]: role must be one of {", ".join(ROLES)}')
        if not isinstance(message.get("content"), str):
            raise InputError(f'{where}: messages[{index}]: "content" must be a string')
        checked.append((message["role"], message["content"]))
    if checked[-1][0] != "assistant":
        raise InputError(f"{where}: the last message must be the assistant's reply")
    return tuple(checked)


# ----------------------------------------------------------------------------- encoding


def render_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> str:
    """The chat-template text that asks the model for the next assistant reply."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def assistant_spans(tokenizer, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant replies.

    Each span runs from the end of the generation prompt before the reply to the end of
    the template's rendering of the reply (which holds its end-of-turn token). A template
    that renders a prefix differently once more turns follow cannot be masked this way;
    that is an error rather than a silent mis-mask.
    """
    chat = conversation.chat()
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    spans = []
    for index, (role, _content) in enumerate(conversation.messages):
        if role != "assistant":
            continue
        before = render_prompt(tokenizer, chat[:index])
        through = tokenizer.apply_chat_template(chat[: index + 1], tokenize=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise InputError(
                f"{conversation.source}: the chat template does not render turns as prefixes of "
                "the whole conversation, so the assistant tokens cannot be located"
            )
        spans.append((len(before), len(through)))
    return full, spans


def encode_conversation(tokenizer, conversation: Conversation) -> Encoded:
    """Token ids and completion-only labels for one conversation.

    Supervised: tokens inside an assistant span, up to and including the last EOS in it
    (what follows the EOS, e.g. ChatML's newline, is never generated, so it is not taught).
    """
    text, spans = assistant_spans(tokenizer, conversation)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    eos = tokenizer.eos_token_id
    for start, end in spans:
        inside = [k for k, (a, b) in enumerate(encoding["offset_mapping"]) if a >= start and b <= end and b > a]
        eos_positions = [k for k in inside if ids[k] == eos]
        if not eos_positions:
            raise InputError(
                f"{conversation.source}: the chat template does not end the assistant reply with EOS "
                f"({tokenizer.eos_token!r}), so the student would never learn to stop"
            )
        for k in inside:
            if k <= eos_positions[-1]:
                labels[k] = ids[k]
    encoded = Encoded(ids, labels, conversation.source)
    if encoded.supervised <= 1:  # the EOS alone: an empty reply teaches nothing
        raise InputError(f"{conversation.source}: the assistant reply is empty; nothing to learn from it")
    return encoded


def choose_max_length(lengths: Sequence[int], model_limit: int, cap: int) -> int:
    """The longest example rounded up to a multiple of 8, within the model's context and `cap`."""
    longest = max(lengths)
    return min(int(math.ceil(longest / 8) * 8), model_limit, cap)


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    ordered = sorted(lengths)

    def quantile(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"examples": len(ordered), "min": ordered[0], "p50": quantile(0.5), "p95": quantile(0.95),
            "max": ordered[-1], "mean": round(sum(ordered) / len(ordered), 1)}


def encode_all(
    tokenizer,
    conversations: Sequence[Conversation],
    *,
    max_length: int | None,
    model_limit: int = 8192,
    auto_cap: int = 2048,
    overlong: str = "drop",
) -> EncodedSet:
    """Encode every conversation, choose the max length from the data unless given, and
    drop (`overlong: drop`, each one named in the result) or refuse (`error`) examples
    longer than it: truncating them would cut the EOS off the reply."""
    encoded = [encode_conversation(tokenizer, conversation) for conversation in conversations]
    lengths = [len(e.input_ids) for e in encoded]
    chosen = max_length or choose_max_length(lengths, model_limit, auto_cap)
    kept, dropped = [], []
    for example in encoded:
        if len(example.input_ids) <= chosen:
            kept.append(example)
            continue
        if overlong == "error":
            raise InputError(
                f"{example.source}: {len(example.input_ids)} tokens, longer than max_length {chosen}; "
                "raise finetune.max_length or set finetune.overlong: drop"
            )
        dropped.append(example.source)
    if not kept:
        raise InputError(f"every example is longer than max_length {chosen}")
    return EncodedSet(kept, chosen, dropped, length_stats(lengths))


# ----------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class Batch:
    """Which examples go into one micro-batch; `packed` rows hold several examples each."""

    rows: tuple[tuple[int, ...], ...]


def plan_batches(lengths: Sequence[int], batch_size: int, seed: int, *, packing: bool, max_length: int) -> list[Batch]:
    """The micro-batches of one epoch, in order, deterministic in `seed`.

    Without packing: examples are shuffled, then sorted by length within windows of 50
    batches, so each batch pads little while the epoch order stays random. With packing:
    shuffled examples are packed first-fit into rows of at most `max_length` tokens.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if packing:
        rows = _pack_first_fit(order, lengths, max_length)
        batches = [tuple(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    else:
        window = batch_size * 50
        grouped: list[int] = []
        for start in range(0, len(order), window):
            grouped += sorted(order[start : start + window], key=lambda i: lengths[i])
        batches = [tuple((i,) for i in grouped[s : s + batch_size]) for s in range(0, len(grouped), batch_size)]
        rng.shuffle(batches)
    return [Batch(rows) for rows in batches]


def micro_batches(plan_epoch: Callable[[int], list], start: int, count: int) -> list[tuple[int, Any]]:
    """Micro-batches number `start`..`start+count-1` of the endless stream epoch 0, 1, 2, …"""
    chosen, epoch, offset = [], 0, 0
    batches = plan_epoch(0)
    while len(chosen) < count:
        index = start + len(chosen)
        while index >= offset + len(batches):
            offset += len(batches)
            epoch += 1
            batches = plan_epoch(epoch)
        chosen.append((epoch, batches[index - offset]))
    return chosen


def _pack_first_fit(order: Sequence[int], lengths: Sequence[int], max_length: int) -> list[tuple[int, ...]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(max_length - lengths[index])
    return [tuple(row) for row in rows]


def collate(examples: Sequence[Encoded], batch: Batch, pad_id: int) -> dict[str, Any]:
    """Tensors for one micro-batch, right-padded.

    Packed rows carry position ids that restart at each example and no attention mask:
    transformers then masks attention per example (no token sees another example).
    Unpacked rows carry an ordinary padding mask.
    """
    import torch

    ids_rows, label_rows, position_rows = [], [], []
    for row in batch.rows:
        ids, labels, positions = [], [], []
        for index in row:
            example = examples[index]
            ids += example.input_ids
            labels += example.labels
            positions += list(range(len(example.input_ids)))
        ids_rows.append(ids)
        label_rows.append(labels)
        position_rows.append(positions)
    width = max(len(ids) for ids in ids_rows)
    packed = any(len(row) > 1 for row in batch.rows)
    padded_ids = [ids + [pad_id] * (width - len(ids)) for ids in ids_rows]
    padded_labels = [labels + [IGNORE_INDEX] * (width - len(labels)) for labels in label_rows]
    tensors: dict[str, Any] = {
        "input_ids": torch.tensor(padded_ids),
        "labels": torch.tensor(padded_labels),
    }
    if packed:
        # Padding continues as one more "example" of its own, so it never joins a real one.
        tensors["position_ids"] = torch.tensor(
            [positions + list(range(width - len(positions))) for positions in position_rows]
        )
    else:
        tensors["attention_mask"] = torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids in ids_rows]
        )
    tensors["tokens"] = sum(len(ids) for ids in ids_rows)
    return tensors
