"""LoRA / QLoRA DPO of a student on preference pairs: `datagen finetune PAIRS --method dpo`.

    datagen finetune pairs.jsonl --method dpo --base out/student --out out/dpo

Direct Preference Optimisation (Rafailov et al. 2023) with a LoRA adapter on the base (an
SFT output folder means its merged model, as in the Zephyr recipe). The reference policy is
the same weights with the adapter disabled (peft's `disable_adapter()`), so no second model
is held in memory; its log-probabilities are computed once, before training, in eval mode
(`precompute_reference`, the default: one forward per pair instead of one per pair per
epoch, and cached in `OUT/reference_logps.pt` for a resumed run), or on the fly.

A sequence's log-probability is summed over the response tokens only, encoded exactly as
SFT encodes a conversation (`datagen.finetune.data.encode_conversation`: the student's
chat template, the reply through its EOS; only the final reply counts). With
h = (log π(c) − log π(r)) − (log π_ref(c) − log π_ref(r)):

- `sigmoid`: −(1−ε)·log σ(βh) − ε·log σ(−βh)   (ε = `label_smoothing`, conservative DPO)
- `ipo`:     (h − 1/(2β))²  on log-probs averaged over response tokens (as TRL does)

Rewards are β·(log π − log π_ref) of chosen and rejected; reward accuracy is the share of
pairs whose chosen reward is higher; the margin is their mean difference.

Everything else is SFT's (imported from `datagen.finetune.sft`): model loading, LoRA/QLoRA
setup, precision, optimiser and schedule, gradient clipping and fp16 loss scaling,
checkpoints (kill it and rerun: it resumes from `OUT/checkpoints/`), merge. It writes
`OUT/adapter/`, `OUT/merged/`, `OUT/train_log.jsonl` (per step: loss, reward accuracy,
chosen/rejected rewards, margin, tokens/s) and `OUT/summary.json` (with the reward
accuracy and margin over the training pairs after training).

Several processes: `datagen finetune PAIRS --method dpo --nproc N` (or `torchrun ... -m
datagen.finetune PAIRS --method dpo`) with `distributed: ddp` trains as SFT does
(`datagen.finetune.distributed`): rank r takes micro-batches r, r+N, … of every step, and the
loss is summed over pairs and divided by the step's pairs on all ranks, so N ranks train
what one process accumulating over the same global batch trains. Each rank computes the
reference log-probs of its share of the pairs and all gather the whole (one pass split N
ways; every rank then has each pair's reference wherever the shuffled batches send it);
rank 0 alone writes the cache, log, checkpoints (with every rank's RNG), adapter, merged
model and summary. The final reward accuracy and margin are summed over the ranks' shares.
`fsdp` is refused: FSDP2 gathers parameters only inside the sharded module's forward, and
the reference and final-metric passes call the model outside it.

Pairs: our `generate --method preferences` output or any TRL preference JSONL
(`prompt` as messages or a string, `chosen`/`rejected` as assistant messages or strings),
or an export folder's `train.jsonl`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from datagen.errors import ConfigError, InputError
from datagen.finetune.sft import FinetuneConfig
from datagen.io import atomic_write_json, read_jsonl, write_dir_atomic, write_file_atomic

REFERENCE_FILE = "reference_logps.pt"
# FSDP2 unshards parameters only inside the sharded module's forward; the reference pass,
# on-the-fly references and the final metrics call the peft model outside it
FSDP_REFUSAL = ("dpo: distributed: fsdp is not supported (the reference and final-metric passes run "
                "the model outside FSDP's sharded forward); use distributed: ddp")


class DPOConfig(FinetuneConfig):
    """DPO settings: SFT's LoRA / QLoRA and optimisation fields (`method` is the adapter kind,
    lora or qlora) plus the DPO loss. Defaults suit LoRA DPO of a small student."""

    # No LoRA dropout: the reference log-probs come from the same model without dropout (eval
    # mode), so dropout on the policy alone would put noise into every log-ratio the loss compares
    # (TRL's DPO turns dropout off by default for the same reason). SFT keeps its 0.05.
    dropout: float = Field(0.0, ge=0, lt=1)
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # sigmoid loss only
    precompute_reference: bool = True
    learning_rate: float = Field(5e-5, gt=0)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)  # pairs per micro-batch (2x sequences)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)


# ----------------------------------------------------------------------------- data


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


# ----------------------------------------------------------------------------- loss


@dataclass
class DPOTerms:
    losses: Any  # per pair
    chosen_rewards: Any
    rejected_rewards: Any


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, *, beta: float,
             loss: str = "sigmoid", label_smoothing: float = 0.0) -> DPOTerms:
    """Per-pair DPO losses and rewards from sequence log-probabilities (tensors of shape [pairs])."""
    import torch.nn.functional as F

    h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return DPOTerms(losses, beta * (policy_chosen - reference_chosen).detach(),
                    beta * (policy_rejected - reference_rejected).detach())


def sequence_logps(model, batch: dict[str, Any], fast: bool = True):
    """Per row: the summed log-probability of its supervised tokens, and their count.

    fast: the output layer only at the positions that predict a supervised token (as SFT's
    `summed_loss`; `check_fast_loss` decides once per run whether that is the model's own)."""
    import torch

    from datagen.finetune.sft import supervised_logits

    logits, targets, supervised = supervised_logits(model, batch, fast)
    token_logps = -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    rows = supervised.nonzero()[:, 0]
    sums = torch.zeros(supervised.shape[0], dtype=torch.float32, device=supervised.device).index_add(
        0, rows, token_logps)
    return sums, supervised.sum(1)


def _for_loss(logps, counts, loss: str):
    """IPO compares log-probs averaged over the response tokens; sigmoid DPO their sums."""
    return logps / counts if loss == "ipo" else logps


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

    from datagen.finetune.sft import _to_device

    batches = pair_batches(len(pairs), batch_size)
    several = context is not None and context.distributed
    found = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), model.disable_adapter():
            for indexes in (batches[context.rank::context.world_size] if several else batches):
                tensors = _to_device(collate_pairs(pairs, indexes, pad_id), device)
                logps, counts = sequence_logps(model, tensors, fast)
                half = len(indexes)
                found.append((indexes[0], logps[:half].cpu(), logps[half:].cpu(), counts[:half].cpu(),
                              counts[half:].cpu()))
    finally:
        model.train(was_training)
    if several:
        found = [part for parts in context.gather(found) for part in parts]
    found.sort(key=lambda part: part[0])  # back into pair order
    return tuple(torch.cat([part[k] for part in found]) for k in range(1, 5))


def pair_metrics(model, pairs: Sequence[EncodedPair], reference: tuple, config: DPOConfig, pad_id: int,
                 device: str, fast: bool, context=None) -> dict[str, float]:
    """Loss, reward accuracy, mean chosen/rejected rewards and margin over `pairs` (eval mode).

    context (several ranks): each rank scores its share of the batches; the sums are
    all-reduced, so every rank gets the figures over all pairs."""
    import torch

    from datagen.finetune.sft import _to_device

    several = context is not None and context.distributed
    batches = pair_batches(len(pairs), config.batch_size)
    totals = dict.fromkeys(STEP_FIGURES, 0.0)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for indexes in (batches[context.rank::context.world_size] if several else batches):
                tensors = _to_device(collate_pairs(pairs, indexes, pad_id), device)
                logps, counts = sequence_logps(model, tensors, fast)
                terms = _terms(logps.cpu(), counts.cpu(), indexes, reference, config)
                for key, value in _step_figures(terms).items():
                    totals[key] += value * len(indexes)
    finally:
        model.train(was_training)
    if several:
        totals = dict(zip(totals, context.sum(list(totals.values()))))
    return {key: round(value / len(pairs), 6) for key, value in totals.items()}


def logps_module(model, fast: bool):
    """An nn.Module whose forward is `sequence_logps(model, batch, fast)`: DDP sees only the
    work inside the forward of the module it wraps, and the fast path calls the base model and
    the output layer separately. Call it as `module(**batch)` (extra keys ignored)."""
    import torch

    class SequenceLogps(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, labels, attention_mask=None, **_ignored):
            batch = {"input_ids": input_ids, "labels": labels}
            if attention_mask is not None:
                batch["attention_mask"] = attention_mask
            return sequence_logps(self.model, batch, fast)

    return SequenceLogps()


def _terms(logps, counts, indexes: Sequence[int], reference: tuple, config: DPOConfig) -> DPOTerms:
    half = len(indexes)
    ref_c, ref_r, n_c, n_r = (t[indexes].to(logps.device) for t in reference)
    return dpo_loss(
        _for_loss(logps[:half], counts[:half], config.loss), _for_loss(logps[half:], counts[half:], config.loss),
        _for_loss(ref_c, n_c, config.loss), _for_loss(ref_r, n_r, config.loss),
        beta=config.beta, loss=config.loss, label_smoothing=config.label_smoothing)


STEP_FIGURES = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin")


def _step_figures(terms: DPOTerms) -> dict[str, float]:
    return {
        "loss": float(terms.losses.detach().mean()),
        "reward_accuracy": float((terms.chosen_rewards > terms.rejected_rewards).float().mean()),
        "chosen_reward": float(terms.chosen_rewards.mean()),
        "rejected_reward": float(terms.rejected_rewards.mean()),
        "margin": float((terms.chosen_rewards - terms.rejected_rewards).mean()),
    }


# ----------------------------------------------------------------------------- training


def resolve_base(base: str) -> str:
    """The model DPO starts from: an SFT output folder means its merged model."""
    from datagen.finetune.evaluate import resolve_student
    from datagen.model_paths import resolve_model

    student = resolve_student(base)
    return student if student != base else resolve_model(base)


def _load_reference(path: Path, fingerprint: str):
    import torch

    if not path.exists():
        return None
    stored = torch.load(path, weights_only=False)
    return stored["logps"] if stored.get("fingerprint") == fingerprint else None


def train_dpo(config: DPOConfig, data: str | Path, out_dir: str | Path, *, show_progress: bool = True
              ) -> dict[str, Any]:
    """DPO-train (resuming from the last checkpoint in `out_dir`), save adapter and merged
    model; return the summary also written to `out_dir/summary.json`.

    Under torchrun every rank calls this, as SFT's `train` (`datagen.finetune.distributed`):
    each trains on its share of every step's micro-batches, the loss is the mean over the
    step's pairs on all ranks, and rank 0 alone writes and shows progress."""
    from datagen.finetune.distributed import start

    context = start(config.device)
    try:
        return _train_dpo(config, data, Path(out_dir), show_progress and context.is_main, context)
    finally:
        context.close()


def _train_dpo(config: DPOConfig, data: str | Path, out_dir: Path, show_progress: bool, context
               ) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from datagen.finetune import sft
    from datagen.finetune.data import plan_batches
    from datagen.finetune.distributed import rank_share, sync_gradients, wrap

    device, world, main = context.device, context.world_size, context.is_main
    if context.distributed and config.distributed == "fsdp":
        raise ConfigError(FSDP_REFUSAL)
    if config.method == "qlora":
        sft.require_qlora_support(device)
    precision = sft.precision_for(config, device)
    base_path = resolve_base(config.base)
    pairs = load_pairs(data)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model_limit = int(getattr(AutoConfig.from_pretrained(base_path), "max_position_embeddings", 8192) or 8192)
    encoded, max_length, dropped = encode_pairs(tokenizer, pairs, max_length=config.max_length,
                                                model_limit=model_limit, cap=config.max_length_cap,
                                                overlong=config.overlong)
    lengths = [e.length for e in encoded]

    def plan_epoch(epoch: int):
        return plan_batches(lengths, config.batch_size, config.seed + epoch, packing=False, max_length=max_length)

    # one optimiser step: grad_accum micro-batches on each of `world` ranks (as SFT)
    per_step = config.grad_accum * world
    steps_per_epoch = max(1, math.ceil(len(plan_epoch(0)) / per_step))
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup = int(config.warmup_ratio * total_steps)

    torch.manual_seed(config.seed)  # the same fresh adapter on every rank
    model = sft.load_student(config, base_path, device, precision)
    model.train()
    if context.distributed:
        torch.manual_seed(config.seed + context.rank)  # each rank its own dropout masks

    say = sft._printer(show_progress)
    data_ids = [ids for e in encoded for ids in (e.chosen.input_ids, e.rejected.input_ids)]
    run_fingerprint = sft.fingerprint(config, data_ids, base_path, world)
    checkpoints = out_dir / "checkpoints"
    step, resumed_from, resume_state = 0, None, None
    last = sft.latest_checkpoint(checkpoints)
    if last is not None:
        resume_state = sft.read_checkpoint(last, run_fingerprint)
        sft.restore_adapter(last, model)
        step = resumed_from = resume_state["step"]
        say(f"resuming from {last} (step {step} of {total_steps})")
    if dropped:
        say(f"dropped {len(dropped)} pairs longer than {max_length} tokens (first: {dropped[0]})")

    # decided before wrapping, on the same pairs on every rank, so every rank decides alike
    probe = sft._to_device(collate_pairs(encoded, list(range(min(2, len(encoded)))), pad_id), device)
    loss_note = sft.check_fast_loss(model, probe)
    fast = loss_note is None
    if loss_note:
        say(f"loss: {loss_note}; using the model's own forward ({sft.LOSS_PATH_FULL})")

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    reference, reference_seconds = None, 0.0
    if config.precompute_reference:
        reference_file = out_dir / REFERENCE_FILE
        reference = _load_reference(reference_file, run_fingerprint)
        # every rank must take part in computing it, or none: the pass is split between them
        if not all(context.gather(reference is not None)):
            started = time.monotonic()
            reference = reference_logps(model, encoded, pad_id, device, config.batch_size * 2, fast, context)
            reference_seconds = time.monotonic() - started
            if main:
                write_file_atomic(reference_file, lambda target: torch.save(
                    {"fingerprint": run_fingerprint, "logps": reference}, target))

    wrapped = wrap(logps_module(model, fast), model, config.distributed, context)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = sft.make_optimizer(config, trainable, device)
    scaler = sft.make_grad_scaler(precision, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: sft.lr_factor(step, total_steps, warmup, config.scheduler))
    if resume_state is not None:
        sft.restore_training_state(resume_state, optimizer, scheduler, scaler, context.rank, device=device)
        del resume_state

    def checkpoint() -> None:
        rngs = context.gather(sft.rng_state(device))  # collective: every rank its own, rank 0 writes
        if main:
            sft.save_checkpoint(checkpoints, step, model, optimizer, scheduler,
                                {"fingerprint": run_fingerprint, "world_size": world, sft.RNG_BY_RANK: rngs},
                                config.keep_checkpoints, scaler)
        context.barrier()

    def pair_losses(batch: dict[str, Any], figures: dict[str, float], pairs_in_step: int):
        """The summed DPO loss of one micro-batch's pairs (its figures noted on the way)."""
        indexes = batch["pair_indexes"]
        if reference is not None:
            batch_reference, ref_indexes = reference, indexes
        else:
            batch_reference = reference_logps(model, [encoded[i] for i in indexes], pad_id, device,
                                              len(indexes) * 2, fast)
            ref_indexes = list(range(len(indexes)))
        logps, counts = wrapped(**batch)
        terms = _terms(logps, counts, ref_indexes, batch_reference, config)
        for key, value in _step_figures(terms).items():
            figures[key] += value * len(indexes) / pairs_in_step
        return terms.losses.sum()

    log_path = out_dir / "train_log.jsonl"
    if main:
        sft._truncate_log(log_path, step)
    global_batch = config.batch_size * per_step
    if context.distributed:
        say(f"{world} ranks ({config.distributed}, {context.backend}), global batch {global_batch} pairs = "
            f"{config.batch_size} x {config.grad_accum} accumulation x {world} ranks")
    started = time.monotonic()
    tokens_seen = 0
    sync = (lambda last: sync_gradients(wrapped, last)) if context.distributed else None
    from datagen.progress import progress

    with progress("dpo", total=total_steps, done=step, fields=("loss", "acc", "margin")) if show_progress \
            else _Silent() as bar, (log_path.open("a") if main else sft._NullLog()) as log:
        while step < total_steps:
            chunk = sft.micro_batches(plan_epoch, step * per_step, per_step)
            pairs_in_step = sum(len(batch.rows) for _epoch, batch in chunk)  # every rank plans the whole step
            figures = dict.fromkeys(STEP_FIGURES, 0.0)
            tensors = []
            for _epoch, batch in rank_share(chunk, context.rank, world):
                indexes = [row[0] for row in batch.rows]
                tensors.append({**sft._to_device(collate_pairs(encoded, indexes, pad_id), device),
                                "pair_indexes": indexes})

            # the loss is a mean over the step's pairs on all ranks (as SFT's over its tokens)
            sft.accumulate_gradients(model, tensors, scaler=scaler, supervised=pairs_in_step,
                                     loss_fn=partial(pair_losses, figures=figures, pairs_in_step=pairs_in_step),
                                     scale=world, sync=sync)
            *summed, step_tokens = context.sum([*figures.values(), sum(t["tokens"] for t in tensors)])
            figures = dict(zip(figures, summed))
            grad_norm = sft.optimizer_step(optimizer, trainable, config.max_grad_norm, scaler)
            scheduler.step()
            step += 1
            step_tokens = int(step_tokens)
            tokens_seen += step_tokens
            elapsed = time.monotonic() - started
            record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                      **{key: round(value, 6) for key, value in figures.items()},
                      "lr": scheduler.get_last_lr()[0], "grad_norm": round(grad_norm, 4), "pairs": pairs_in_step,
                      "tokens": step_tokens, "tokens_per_s": round(tokens_seen / elapsed, 1),
                      "elapsed_s": round(elapsed, 2)}
            if context.distributed:
                record["tokens_per_s_per_rank"] = round(tokens_seen / elapsed / world, 1)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.advance(1, loss=f"{record['loss']:.4f}", acc=f"{record['reward_accuracy']:.2f}",
                        margin=f"{record['margin']:.3f}")
            if step % config.save_every == 0 or step == total_steps:
                checkpoint()
    train_seconds = time.monotonic() - started
    finished = step >= total_steps
    final = None
    if finished:
        final_reference = reference if reference is not None else \
            reference_logps(model, encoded, pad_id, device, config.batch_size * 2, fast, context)
        final = pair_metrics(model, encoded, final_reference, config, pad_id, device, fast, context)
    peaks = context.gather(sft.peak_memory_mib(device))
    summary: dict[str, Any] = {
        "finished": finished, "step": step, "total_steps": total_steps, "resumed_from_step": resumed_from,
        "method": "dpo", "adapter_method": config.method, "loss": config.loss, "beta": config.beta,
        "label_smoothing": config.label_smoothing, "base": config.base, "base_path": base_path,
        "device": device, "world_size": world, "distributed": config.distributed if context.distributed else None,
        "global_batch": global_batch, "compute_dtype": precision.dtype, "loss_scaling": precision.loss_scaling,
        "loss_path": sft.LOSS_PATH_FAST if fast else sft.LOSS_PATH_FULL, "loss_path_note": loss_note,
        "data": str(data), "pairs": len(encoded), "dropped_overlong": dropped, "max_length": max_length,
        "reference": "precomputed" if config.precompute_reference else "on the fly",
        "reference_seconds": round(reference_seconds, 2),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "tokens_this_run": tokens_seen, "train_seconds_this_run": round(train_seconds, 2),
        "tokens_per_s": round(tokens_seen / train_seconds, 1) if train_seconds > 0 else None,
        "tokens_per_s_per_rank": round(tokens_seen / train_seconds / world, 1) if train_seconds > 0 else None,
        "peak_memory_mib": max(peaks), "peak_memory_mib_per_rank": peaks,
        "final_loss": sft._last_logged_loss(log_path) if main else None,
        # over every training pair after training, in eval mode (each rank scores its share)
        "reward_accuracy": final["reward_accuracy"] if final else None,
        "margin": final["margin"] if final else None,
        "chosen_reward": final["chosen_reward"] if final else None,
        "rejected_reward": final["rejected_reward"] if final else None,
        "config": config.model_dump(mode="json"),
    }
    if finished:
        adapter_dir = out_dir / "adapter"
        if main:
            write_dir_atomic(adapter_dir, lambda target: (model.save_pretrained(target),
                                                          tokenizer.save_pretrained(target)))
        summary["adapter"] = str(adapter_dir)
        del model, optimizer, wrapped
        context.barrier()
        if config.merge and main:
            summary["merged"] = str(sft.merge_adapter(base_path, adapter_dir, out_dir / "merged"))
    if main:
        atomic_write_json(out_dir / "summary.json", summary)
    return summary


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def advance(self, *args, **kwargs) -> None:
        pass


# ----------------------------------------------------------------------------- held-out pairs


def evaluate_pairs(student: str | Path, data: str | Path, *, max_pairs: int | None = None,
                   batch_size: int = 4) -> dict[str, Any]:
    """Reward accuracy and margin of a DPO output folder on held-out pairs: the policy is its
    base plus adapter, the reference the same base with the adapter disabled."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(student)
    summary_file = folder / "summary.json"
    if not (folder / "adapter" / "adapter_config.json").exists() or not summary_file.exists():
        raise InputError(f"{folder}: not a `datagen finetune --method dpo` output (no adapter/ and summary.json)")
    summary = json.loads(summary_file.read_text())
    config = DPOConfig.model_validate({**summary["config"], "batch_size": batch_size})
    pairs = load_pairs(data)[:max_pairs] if max_pairs else load_pairs(data)
    tokenizer = AutoTokenizer.from_pretrained(folder / "adapter")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_pair(tokenizer, pair) for pair in pairs]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(summary["base_path"], dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(base, str(folder / "adapter")).eval()
    from datagen.finetune.sft import check_fast_loss

    fast = check_fast_loss(model, {k: v.to(device) if hasattr(v, "to") else v
                                   for k, v in collate_pairs(encoded, [0], pad_id).items()}) is None
    reference = reference_logps(model, encoded, pad_id, device, batch_size * 2, fast)
    metrics = pair_metrics(model, encoded, reference, config, pad_id, device, fast)
    return {"data": str(data), "pairs": len(encoded), "student": str(folder), "base": summary["base_path"],
            **metrics}


def format_dpo_summary(summary: dict[str, Any]) -> str:
    """The closing line of `datagen finetune --method dpo`."""
    ranks = f" on {summary['world_size']} ranks" if summary.get("world_size", 1) > 1 else ""
    return (f"dpo: {summary['step']}/{summary['total_steps']} steps on {summary['pairs']} pairs{ranks} "
            f"(max_length {summary['max_length']}), final loss {summary['final_loss']}, "
            f"reward accuracy {summary['reward_accuracy']}, margin {summary['margin']}, "
            f"{summary['tokens_per_s']} tokens/s, peak {summary['peak_memory_mib']} MiB; "
            f"adapter {summary.get('adapter')}, merged {summary.get('merged')}")


def is_dpo_output(folder: str | Path) -> bool:
    """Whether `folder` is a `datagen finetune --method dpo` output."""
    summary = Path(folder) / "summary.json"
    try:
        return summary.exists() and json.loads(summary.read_text()).get("method") == "dpo"
    except json.JSONDecodeError:
        return False


def evaluate_dpo(config, data: str | Path, tuned: str | Path, out_dir: str | Path, teacher_config=None
                 ) -> dict[str, Any]:
    """`datagen eval` for a DPO student: reward accuracy and margin on held-out pairs (an
    export folder's `test.jsonl`, or a pairs file) and, with `eval.judge`, the teacher-judged
    win rate of the DPO student over the model it started from (the SFT student), each pair
    judged in both orders. Writes `OUT/report.json` and `OUT/report.md`."""
    from datagen.finetune.data import Conversation
    from datagen.finetune.evaluate import held_out_path, score_model, win_rate
    from datagen.io import atomic_write_text

    source = held_out_path(data)
    report: dict[str, Any] = {"kind": "dpo", **evaluate_pairs(tuned, source, max_pairs=config.max_examples,
                                                               batch_size=config.batch_size)}
    if config.judge:
        from datagen.teachers import TeacherConfig
        from datagen.teachers.teacher import make_teacher

        pairs = load_pairs(source)[: config.max_examples] if config.max_examples else load_pairs(source)
        conversations = [Conversation(p.prompt + (("assistant", p.chosen),), p.source) for p in pairs]
        merged = Path(tuned) / "merged"
        if not (merged / "config.json").exists():
            raise InputError(f"{tuned}: no merged/ model to generate with (train with merge: true)")
        before = score_model(report["base"], conversations, config, "base")
        after = score_model(str(merged), conversations, config, "tuned")
        requests = ["\n\n".join(c for r, c in p.prompt if r == "user") for p in pairs]
        with make_teacher(teacher_config or TeacherConfig()) as teacher:
            report["judge"] = win_rate(teacher, requests, after["replies"], before["replies"], config.judge_sampling)
        report["samples"] = [{"request": requests[i], "sft": before["replies"][i], "dpo": after["replies"][i]}
                             for i in range(min(config.samples_in_report, len(pairs)))]
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", format_dpo_report(report))
    return report


def format_dpo_report(report: dict[str, Any]) -> str:
    lines = ["# DPO student evaluation", "",
             f"Held-out pairs: `{report['data']}` ({report['pairs']} pairs, split by task). Student "
             f"`{report['student']}`; reference (adapter disabled): `{report['base']}`.", "",
             "| metric | value |", "| --- | --- |",
             f"| reward accuracy (chosen reward > rejected) | {report['reward_accuracy']:.4f} |",
             f"| reward margin (mean chosen - rejected) | {report['margin']:.4f} |",
             f"| chosen reward | {report['chosen_reward']:.4f} |",
             f"| rejected reward | {report['rejected_reward']:.4f} |",
             f"| DPO loss | {report['loss']:.4f} |"]
    judge = report.get("judge")
    if judge:
        rate = "n/a" if judge["win_rate"] is None else f"{judge['win_rate']:.3f}"
        lines.append(f"| judged win rate of DPO over SFT ({judge['judge']}, both orders) | {rate} |")
    for number, sample in enumerate(report.get("samples", []), start=1):
        lines += ["", f"## Sample {number}", "", sample["request"], "", "**SFT**", "", sample["sft"], "",
                  "**DPO**", "", sample["dpo"]]
    return "\n".join(lines) + "\n"


def format_dpo_eval(report: dict[str, Any]) -> str:
    """Before/after in a few lines, for the terminal."""
    text = (f"held-out pairs: {report['pairs']} ({report['data']})\n"
            f"reward accuracy {report['reward_accuracy']:.4f}, margin {report['margin']:.4f}")
    if report.get("judge"):
        text += f"\njudged win rate of DPO over SFT: {report['judge']['win_rate']}"
    return text
