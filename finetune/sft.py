"""LoRA / QLoRA supervised fine-tuning of a student on chat data: `datagen finetune`.

    datagen finetune out/dataset --base smollm2-135m --method lora --out out/student

The recipe: conversations become token ids with completion-only labels
(`datagen.finetune.data`), length-grouped batches or packing without cross-example attention,
and each step's loss is the cross-entropy summed over supervised tokens divided by the step's
supervised tokens on all ranks (`datagen.finetune.losses`). Everything around the step loop —
ranks (DDP / FSDP2 under `--nproc N` or torchrun), loading, resume, optimiser and schedule,
log, checkpoints, adapter, merge — is `datagen.finetune.run.TrainingRun`'s.

Kill it and rerun the same command: it resumes from the last checkpoint in `OUT/checkpoints/`
and ends with the same weights an uninterrupted run would have. It writes:

    OUT/adapter/        the LoRA adapter (peft) and the tokenizer
    OUT/merged/         base reloaded in full precision + adapter merged; plain transformers loads it
    OUT/train_log.jsonl one line per optimiser step: loss, lr, tokens/s, grad norm
    OUT/summary.json    settings, data statistics, final loss, throughput, peak memory

Start-up self-checks, on the data's own first batch, in eval mode without gradients: the
supervised-positions loss must be the model's own (`check_fast_loss`), else the full-logits
path is taken and one line says so; with packing, two packed examples must get the logits they
get alone (`check_packing`), or packing is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datagen.finetune.checkpoints import fingerprint
from datagen.finetune.config import FinetuneConfig
from datagen.finetune.data import collate, encode_all, load_conversations, plan_batches
from datagen.finetune.losses import (
    LOSS_PATH_FULL,
    check_fast_loss,
    check_packing,
    loss_module,
    supervised_count,
    to_device,
)
from datagen.finetune.model import context_length, load_tokenizer
from datagen.finetune.run import TrainingRun


def train(config: FinetuneConfig, data: str | Path, out_dir: str | Path, *, show_progress: bool = True
          ) -> dict[str, Any]:
    """Fine-tune (resuming from the last checkpoint in `out_dir`), save the adapter and
    the merged model; return the summary also written to `out_dir/summary.json`.

    Under torchrun every rank calls this: each trains on its share of the same global
    batches; rank 0 alone writes and shows progress."""
    from datagen.model_paths import resolve_model

    with TrainingRun(config, out_dir, "sft", show_progress=show_progress) as run:
        base_path = resolve_model(config.base)
        conversations = load_conversations(data, prompt_erasure=config.prompt_erasure,
                                           generic_system=config.generic_system,
                                           input_format=config.input_format, split=config.split)
        tokenizer, pad_id = load_tokenizer(base_path)
        encoded = encode_all(tokenizer, conversations, max_length=config.max_length,
                             model_limit=context_length(base_path), auto_cap=config.max_length_cap,
                             overlong=config.overlong)
        examples = encoded.examples
        lengths = [len(e.input_ids) for e in examples]
        run.plan(lambda epoch: plan_batches(lengths, config.batch_size, config.seed + epoch,
                                            packing=config.packing, max_length=encoded.max_length))

        run.load_student(base_path)  # the run holds the student (`run.model`): the merge at the end frees it
        if config.packing:
            run.on_main(lambda: check_packing(run.model, examples, pad_id, run.load_device), share=True)
        run.resume(fingerprint(config, [e.input_ids for e in examples], base_path, run.world))
        if encoded.dropped_overlong:
            run.say(f"dropped {len(encoded.dropped_overlong)} examples longer than {encoded.max_length} tokens "
                    f"(first: {encoded.dropped_overlong[0]})")

        # The loss path is decided once, before wrapping, on the step's first global micro-batch
        # (the same one on every rank, so every rank decides alike).
        fast_loss, loss_note = None, None
        if run.step < run.total_steps:
            _epoch, first = run.step_chunk(run.step)[0]
            first_batch = to_device(collate(examples, first, pad_id), run.load_device)
            loss_note = run.on_main(lambda: check_fast_loss(run.model, first_batch), share=True)
            fast_loss = loss_note is None
            if loss_note:
                run.say(f"loss: {loss_note}; using the model's own forward ({LOSS_PATH_FULL})")
        run.start_training(loss_module(run.model, fast_loss is not False))

        def batches_of(step: int) -> list[dict[str, Any]]:
            return [to_device(collate(examples, batch, pad_id), run.device)
                    for _epoch, batch in run.my_share(run.step_chunk(step))]

        unit = "rows" if config.packing else "sequences"
        with run.training(unit, shown={"loss": lambda record: f"{record['loss']:.4f}"}):
            while run.step < run.total_steps:
                tensors = batches_of(run.step)
                supervised, tokens = (int(v) for v in run.context.sum(
                    [supervised_count(tensors), sum(t["tokens"] for t in tensors)]))
                local_loss = run.backward(tensors, lambda batch: run.module(**batch), over=max(1, supervised))
                [loss] = run.context.sum([local_loss])
                run.end_step({"loss": loss}, {"tokens": tokens, "supervised": supervised})

        return run.finish(
            tokenizer=tokenizer, base_path=base_path, data=data, fast_loss=fast_loss, loss_note=loss_note,
            about={"method": config.method, "base": config.base},
            data_facts={"examples": len(examples), "dropped_overlong": encoded.dropped_overlong,
                        "max_length": encoded.max_length, "length_stats": encoded.length_stats})


def format_sft_summary(summary: dict[str, Any]) -> str:
    """The closing line of `datagen finetune`."""
    ranks = f" on {summary['world_size']} ranks" if summary.get("world_size", 1) > 1 else ""
    return (f"finetune: {summary['step']}/{summary['total_steps']} steps on {summary['examples']} examples{ranks} "
            f"(max_length {summary['max_length']}), final loss {summary['final_loss']}, "
            f"{summary['tokens_per_s']} tokens/s, peak {summary['peak_memory_mib']} MiB; "
            f"adapter {summary.get('adapter')}, merged {summary.get('merged')}")
