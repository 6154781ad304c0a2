"""Preference pairs for DPO: reading them, encoding both sides as SFT encodes a conversation,
batching, and scoring them under a policy and its reference.

Pairs: our `generate --method preferences` output or any TRL preference JSONL (`prompt` as
messages or a string, `chosen`/`rejected` as assistant messages or strings), or an export
folder's `train.jsonl`. A sequence's log-probability is summed over the response tokens only
(the final reply; assistant turns inside the prompt are context).

    pairs = load_pairs("pairs.jsonl")
    encoded, max_length, dropped = encode_pairs(tokenizer, pairs, max_length=None, model_limit=8192,
                                                cap=2048, overlong="drop")
    reference = reference_logps(model, encoded, pad_id, device, batch_size=8, fast=True)
    figures = pair_metrics(model, encoded, reference, config, pad_id, device, fast=True)

Rewards are β·(log π − log π_ref) of chosen and rejected; reward accuracy is the share of
pairs whose chosen reward is higher; the margin is their mean difference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.errors import InputError
from datagen.finetune.config import DPOConfig
from datagen.finetune.losses import DPOTerms, dpo_loss, evaluating, sequence_logps, to_device
from datagen.io import read_jsonl

# what a DPO step logs and the final metrics report, over pairs
PAIR_FIGURES = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin")


@dataclass(frozen=True)
class Pair:
    prompt: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str
    source: str


def load_pairs(path: str | Path) -> list[Pair]:
    """Every preference pair in `path` (a JSONL file or an export folder's train.jsonl)."""
    path = Path(path)
    if path.is_dir():
        path = path / "train.jsonl"
    pairs = [_pair(f"{path}:{number}", row) for number, row in read_jsonl(path)]
    if not pairs:
        raise InputError(f"{path}: no preference pairs in file")
    return pairs


def _pair(where: str, row: dict[str, Any]) -> Pair:
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in row]
    if missing:
        raise InputError(f'{where}: missing "{missing[0]}" (a preference pair has prompt, chosen, rejected)')
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in prompt):
        raise InputError(f'{where}: field "prompt": expected a string or a list of chat messages')
    return Pair(tuple((m["role"], m["content"]) for m in prompt), _reply(where, row, "chosen"),
                _reply(where, row, "rejected"), where)


def _reply(where: str, row: dict[str, Any], key: str) -> str:
    value = row[key]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        value = value[0]["content"]
    if not isinstance(value, str):
        raise InputError(f'{where}: field "{key}": expected a string or one assistant message')
    return value


@dataclass
class EncodedPair:
    chosen: Any  # datagen.finetune.data.Encoded
    rejected: Any
    source: str

    @property
    def length(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


def encode_pair(tokenizer, pair: Pair) -> EncodedPair:
    """Both sides encoded as SFT encodes a conversation, supervising the final reply only."""
    from datagen.finetune.data import Conversation, encode_conversation

    sides = [_final_reply_only(encode_conversation(tokenizer, Conversation(
        pair.prompt + (("assistant", reply),), f"{pair.source} ({side})")))
        for side, reply in (("chosen", pair.chosen), ("rejected", pair.rejected))]
    return EncodedPair(sides[0], sides[1], pair.source)


def _final_reply_only(encoded):
    """Keep supervision on the last run of supervised tokens (the final reply): assistant
    turns inside the prompt are context, not the response being compared."""
    from datagen.finetune.data import IGNORE_INDEX

    labels = list(encoded.labels)
    end = max(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    encoded.labels = [label if start <= k <= end else IGNORE_INDEX for k, label in enumerate(labels)]
    return encoded


def encode_pairs(tokenizer, pairs: Sequence[Pair], *, max_length: int | None, model_limit: int, cap: int,
                 overlong: str) -> tuple[list[EncodedPair], int, list[str]]:
    """Encoded pairs, the max length (from the data unless given) and the pairs dropped as
    longer than it (or an error, with `overlong: error`)."""
    from datagen.finetune.data import choose_max_length

    encoded = [encode_pair(tokenizer, pair) for pair in pairs]
    chosen_length = max_length or choose_max_length([e.length for e in encoded], model_limit, cap)
    kept, dropped = [], []
    for example in encoded:
        if example.length <= chosen_length:
            kept.append(example)
        elif overlong == "error":
            raise InputError(f"{example.source}: {example.length} tokens, longer than max_length {chosen_length}")
        else:
            dropped.append(example.source)
    if not kept:
        raise InputError(f"every pair is longer than max_length {chosen_length}")
    return kept, chosen_length, dropped


def collate_pairs(pairs: Sequence[EncodedPair], indexes: Sequence[int], pad_id: int) -> dict[str, Any]:
    """One micro-batch: the chosen sequences of `indexes`, then their rejected ones."""
    from datagen.finetune.data import Batch, collate

    sequences = [pairs[i].chosen for i in indexes] + [pairs[i].rejected for i in indexes]
    return collate(sequences, Batch(tuple((k,) for k in range(len(sequences)))), pad_id)


def pair_batches(count: int, batch_size: int) -> list[list[int]]:
    """Pair indexes 0..count-1 in consecutive batches of `batch_size`: how the reference pass
    and the final metrics go through the pairs. Several ranks: rank r takes batches r, r+W, …
    (the same batches one process computes, so the same numbers)."""
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def reference_logps(model, pairs: Sequence[EncodedPair], pad_id: int, device: str, batch_size: int,
                    fast: bool, context=None) -> tuple[Any, Any, Any, Any]:
    """Chosen and rejected log-probs (and token counts) of every pair under the reference
    policy: the model with its adapter disabled, in eval mode, without gradients.

    context (several ranks): each rank computes its share of the batches and every rank
    gets the whole, gathered (one reference pass split N ways instead of N whole ones)."""
    import torch

    found = []
    for indexes, logps, counts in _scored(model, pairs, batch_size, pad_id, device, fast, context, reference=True):
        half = len(indexes)
        found.append((indexes[0], logps[:half].cpu(), logps[half:].cpu(), counts[:half].cpu(), counts[half:].cpu()))
    if context is not None and context.distributed:
        found = [part for parts in context.gather(found) for part in parts]
    found.sort(key=lambda part: part[0])  # back into pair order
    return tuple(torch.cat([part[k] for part in found]) for k in range(1, 5))


def pair_metrics(model, pairs: Sequence[EncodedPair], reference: tuple, config: DPOConfig, pad_id: int,
                 device: str, fast: bool, context=None) -> dict[str, float]:
    """Loss, reward accuracy, mean chosen/rejected rewards and margin over `pairs` (eval mode).

    context (several ranks): each rank scores its share of the batches; the sums are
    all-reduced, so every rank gets the figures over all pairs."""
    totals = dict.fromkeys(PAIR_FIGURES, 0.0)
    for indexes, logps, counts in _scored(model, pairs, config.batch_size, pad_id, device, fast, context):
        terms = pair_terms(logps.cpu(), counts.cpu(), indexes, reference, config)
        for key, value in pair_figures(terms).items():
            totals[key] += value * len(indexes)
    if context is not None and context.distributed:
        totals = dict(zip(totals, context.sum(list(totals.values()))))
    return {key: round(value / len(pairs), 6) for key, value in totals.items()}


def _scored(model, pairs: Sequence[EncodedPair], batch_size: int, pad_id: int, device: str, fast: bool, context,
            *, reference: bool = False) -> Iterator[tuple[list[int], Any, Any]]:
    """(pair indexes, log-probs, token counts) of each of this rank's `pair_batches`, chosen rows
    then rejected, in eval mode without gradients; `reference`: with the adapter disabled."""
    import torch

    batches = pair_batches(len(pairs), batch_size)
    if context is not None and context.distributed:
        batches = batches[context.rank::context.world_size]
    with evaluating(model), torch.inference_mode(), \
            (model.disable_adapter() if reference else contextlib.nullcontext()):
        for indexes in batches:
            logps, counts = sequence_logps(model, to_device(collate_pairs(pairs, indexes, pad_id), device), fast)
            yield indexes, logps, counts


def pair_terms(logps, counts, indexes: Sequence[int], reference: tuple, config: DPOConfig) -> DPOTerms:
    """The DPO terms of a micro-batch (chosen rows, then rejected) of pairs `indexes`, against
    their rows of `reference` (`reference_logps`' tuple)."""
    half = len(indexes)
    ref_c, ref_r, n_c, n_r = (t[indexes].to(logps.device) for t in reference)
    return dpo_loss(
        _for_loss(logps[:half], counts[:half], config.loss), _for_loss(logps[half:], counts[half:], config.loss),
        _for_loss(ref_c, n_c, config.loss), _for_loss(ref_r, n_r, config.loss),
        beta=config.beta, loss=config.loss, label_smoothing=config.label_smoothing)


def _for_loss(logps, counts, loss: str):
    """IPO compares log-probs averaged over the response tokens; sigmoid DPO their sums."""
    return logps / counts if loss == "ipo" else logps


def pair_figures(terms: DPOTerms) -> dict[str, float]:
    """`PAIR_FIGURES` as means over the pairs of `terms`."""
    return {
        "loss": float(terms.losses.detach().mean()),
        "reward_accuracy": float((terms.chosen_rewards > terms.rejected_rewards).float().mean()),
        "chosen_reward": float(terms.chosen_rewards.mean()),
        "rejected_reward": float(terms.rejected_rewards.mean()),
        "margin": float((terms.chosen_rewards - terms.rejected_rewards).mean()),
    }

