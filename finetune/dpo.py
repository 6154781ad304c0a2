"""LoRA / QLoRA DPO of a student on preference pairs: `datagen finetune PAIRS --method dpo`.

    datagen finetune pairs.jsonl --method dpo --base out/student --out out/dpo

Direct Preference Optimisation (Rafailov et al. 2023) with a LoRA adapter on the base (an
SFT output folder means its merged model, as in the Zephyr recipe). The reference policy is
the same weights with the adapter disabled (peft's `disable_adapter()`), so no second model
is held in memory; its log-probabilities are computed once, before training, in eval mode
(`precompute_reference`, the default: one forward per pair instead of one per pair per
epoch, cached in `OUT/reference_logps.pt` for a resumed run), or on the fly.

The recipe: pairs encoded as SFT encodes a conversation (`datagen.finetune.pairs`), the
sigmoid or IPO loss (`datagen.finetune.losses.dpo_loss`) summed over a step's pairs and
divided by the step's pairs on all ranks. Everything around the step loop is
`datagen.finetune.run.TrainingRun`'s, as for SFT: ranks (DDP; FSDP is refused, see
`DPOConfig.fsdp_refusal`), loading, resume (kill it and rerun), optimiser and schedule, log,
checkpoints, adapter, merge. It writes `OUT/adapter/`, `OUT/merged/`, `OUT/train_log.jsonl`
(per step: loss, reward accuracy, chosen/rejected rewards, margin, tokens/s) and
`OUT/summary.json` (with the reward accuracy and margin over the training pairs after training).

Several ranks (`--nproc N`, `distributed: ddp`): each computes the reference log-probs of its
share of the pairs and all gather the whole; the final reward accuracy and margin are summed
over the ranks' shares.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from datagen.finetune.checkpoints import fingerprint
from datagen.finetune.config import DPOConfig
from datagen.finetune.data import plan_batches
from datagen.finetune.losses import LOSS_PATH_FULL, check_fast_loss, logps_module, to_device
from datagen.finetune.model import context_length, load_tokenizer
from datagen.finetune.pairs import (
    PAIR_FIGURES,
    collate_pairs,
    encode_pairs,
    load_pairs,
    pair_figures,
    pair_metrics,
    pair_terms,
    reference_logps,
)
from datagen.finetune.run import TrainingRun
from datagen.io import write_file_atomic

REFERENCE_FILE = "reference_logps.pt"


def train_dpo(config: DPOConfig, data: str | Path, out_dir: str | Path, *, show_progress: bool = True
              ) -> dict[str, Any]:
    """DPO-train (resuming from the last checkpoint in `out_dir`), save adapter and merged
    model; return the summary also written to `out_dir/summary.json`.

    Under torchrun every rank calls this: each trains on its share of every step's
    micro-batches, the loss is the mean over the step's pairs on all ranks, and rank 0 alone
    writes and shows progress."""
    with TrainingRun(config, out_dir, "dpo", show_progress=show_progress) as run:
        base_path = resolve_base(config.base)
        pairs = load_pairs(data)
        tokenizer, pad_id = load_tokenizer(base_path)
        encoded, max_length, dropped = encode_pairs(tokenizer, pairs, max_length=config.max_length,
                                                    model_limit=context_length(base_path),
                                                    cap=config.max_length_cap, overlong=config.overlong)
        lengths = [e.length for e in encoded]
        run.plan(lambda epoch: plan_batches(lengths, config.batch_size, config.seed + epoch, packing=False,
                                            max_length=max_length))

        run.load_student(base_path)  # the run holds the student (`run.model`): the merge at the end frees it
        data_ids = [ids for e in encoded for ids in (e.chosen.input_ids, e.rejected.input_ids)]
        run_fingerprint = fingerprint(config, data_ids, base_path, run.world)
        run.resume(run_fingerprint)
        if dropped:
            run.say(f"dropped {len(dropped)} pairs longer than {max_length} tokens (first: {dropped[0]})")

        # decided before wrapping, on the same pairs on every rank, so every rank decides alike
        probe = to_device(collate_pairs(encoded, list(range(min(2, len(encoded)))), pad_id), run.device)
        loss_note = check_fast_loss(run.model, probe)
        fast = loss_note is None
        if loss_note:
            run.say(f"loss: {loss_note}; using the model's own forward ({LOSS_PATH_FULL})")

        reference, reference_seconds = None, 0.0
        if config.precompute_reference:
            reference_file = run.out_dir / REFERENCE_FILE
            reference = _load_reference(reference_file, run_fingerprint)
            # every rank must take part in computing it, or none: the pass is split between them
            if not all(run.context.gather(reference is not None)):
                started = time.monotonic()
                reference = reference_logps(run.model, encoded, pad_id, run.device, config.batch_size * 2, fast,
                                            run.context)
                reference_seconds = time.monotonic() - started
                if run.main:
                    write_file_atomic(reference_file, lambda target: _save_reference(target, run_fingerprint,
                                                                                     reference))
        run.start_training(logps_module(run.model, fast))

        def pair_losses(batch: dict[str, Any], figures: dict[str, float], pairs_in_step: int):
            """The summed DPO loss of one micro-batch's pairs (its figures noted on the way)."""
            indexes = batch["pair_indexes"]
            if reference is not None:
                batch_reference, ref_indexes = reference, indexes
            else:
                batch_reference = reference_logps(run.model, [encoded[i] for i in indexes], pad_id, run.device,
                                                  len(indexes) * 2, fast)
                ref_indexes = list(range(len(indexes)))
            logps, counts = run.module(**batch)
            terms = pair_terms(logps, counts, ref_indexes, batch_reference, config)
            for key, value in pair_figures(terms).items():
                figures[key] += value * len(indexes) / pairs_in_step
            return terms.losses.sum()

        shown = {"loss": lambda record: f"{record['loss']:.4f}",
                 "acc": lambda record: f"{record['reward_accuracy']:.2f}",
                 "margin": lambda record: f"{record['margin']:.3f}"}
        with run.training("pairs", shown):
            while run.step < run.total_steps:
                chunk = run.step_chunk(run.step)
                pairs_in_step = sum(len(batch.rows) for _epoch, batch in chunk)  # every rank plans the whole step
                tensors = []
                for _epoch, batch in run.my_share(chunk):
                    indexes = [row[0] for row in batch.rows]
                    tensors.append({**to_device(collate_pairs(encoded, indexes, pad_id), run.device),
                                    "pair_indexes": indexes})
                # the loss is a mean over the step's pairs on all ranks (as SFT's over its tokens)
                figures = dict.fromkeys(PAIR_FIGURES, 0.0)
                run.backward(tensors, partial(pair_losses, figures=figures, pairs_in_step=pairs_in_step),
                             over=pairs_in_step)
                *summed, tokens = run.context.sum([*figures.values(), sum(t["tokens"] for t in tensors)])
                run.end_step(dict(zip(figures, summed)), {"pairs": pairs_in_step, "tokens": int(tokens)})

        # over every training pair after training, in eval mode (each rank scores its share)
        final = dict.fromkeys(("reward_accuracy", "margin", "chosen_reward", "rejected_reward"))
        if run.finished:
            if reference is None:
                reference = reference_logps(run.model, encoded, pad_id, run.device, config.batch_size * 2, fast,
                                            run.context)
            metrics = pair_metrics(run.model, encoded, reference, config, pad_id, run.device, fast, run.context)
            final = {key: metrics[key] for key in final}
        return run.finish(
            tokenizer=tokenizer, base_path=base_path, data=data, fast_loss=fast, loss_note=loss_note,
            about={"method": "dpo", "adapter_method": config.method, "loss": config.loss, "beta": config.beta,
                   "label_smoothing": config.label_smoothing, "base": config.base},
            data_facts={"pairs": len(encoded), "dropped_overlong": dropped, "max_length": max_length,
                        "reference": "precomputed" if config.precompute_reference else "on the fly",
                        "reference_seconds": round(reference_seconds, 2)},
            results=final)


def resolve_base(base: str) -> str:
    """The model DPO starts from: an SFT output folder means its merged model."""
    from datagen.finetune.evaluate import resolve_student
    from datagen.model_paths import resolve_model

    student = resolve_student(base)
    return student if student != base else resolve_model(base)


def _load_reference(path: Path, run_fingerprint: str):
    """The cached reference log-probs, if made for this very run."""
    import torch

    if not path.exists():
        return None
    stored = torch.load(path, weights_only=False)
    return stored["logps"] if stored.get("fingerprint") == run_fingerprint else None


def _save_reference(target: Path, run_fingerprint: str, reference) -> None:
    import torch

    torch.save({"fingerprint": run_fingerprint, "logps": reference}, target)


def format_dpo_summary(summary: dict[str, Any]) -> str:
    """The closing line of `datagen finetune --method dpo`."""
    ranks = f" on {summary['world_size']} ranks" if summary.get("world_size", 1) > 1 else ""
    return (f"dpo: {summary['step']}/{summary['total_steps']} steps on {summary['pairs']} pairs{ranks} "
            f"(max_length {summary['max_length']}), final loss {summary['final_loss']}, "
            f"reward accuracy {summary['reward_accuracy']}, margin {summary['margin']}, "
            f"{summary['tokens_per_s']} tokens/s, peak {summary['peak_memory_mib']} MiB; "
            f"adapter {summary.get('adapter')}, merged {summary.get('merged')}")
