"""SFT throughput, like for like: `datagen finetune` vs TRL's `SFTTrainer`, 1 and N ranks.

Both sides train the embedded SmolLM2-135M-Instruct on the SAME micro-batches in the same
order, from the same starting weights, with the same loss, learning rate and schedule:

- batches: datagen plans them (length-grouped, shuffled; `datagen.finetune.data.plan_batches`);
  TRL gets those examples pre-tokenized (`input_ids` + `completion_mask` from datagen's
  encoder, so the supervised tokens are the same tokens) in that order, read sequentially
  (`train_sampling_strategy="sequential"`), `per_device_train_batch_size` = our batch size;
- starting weights: both use `datagen.finetune.model.load_student` after the same seed (the
  same LoRA initialisation); LoRA dropout 0 by default, so neither side draws random masks;
- loss: summed over supervised tokens / their count over the whole optimiser step (TRL:
  `num_items_in_batch`, `average_tokens_across_devices`);
- optimiser and schedule: fused AdamW, no weight decay, clip 1.0, cosine from the first step
  without warm-up (HF's warm-up gives step 0 a learning rate of 0, ours 1/warmup);
- the same global batch at every rank count: N ranks x accumulation 1 and 1 rank x
  accumulation N train on identical global batches, so all runs log the same losses.

Each run is its own process (`torchrun` for several ranks), so peak memory (CUDA
allocations on a GPU, resident set size on CPU; the largest rank) does not hide in
another's. Printed: wall seconds per optimiser step, tokens/s (real, non-pad), supervised
tokens, final loss and the largest per-step loss difference against datagen's 1-rank run,
peak memory, then the ratios.

    .venv/bin/pip install -e '.[bench]'   # TRL, the baseline; not a datagen dependency
    .venv/bin/python bench/sft.py --steps 10 --batch-size 8 --nproc 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
LORA = dict(r=16, alpha=32)
SIDES = ("ours", "trl")
NAMES = {"ours": "datagen finetune", "trl": "TRL SFTTrainer"}


def build_examples(count: int) -> list[dict]:
    """Chat examples from the bundled seed tasks (real instructions and replies of varied length)."""
    from datagen.export import chat_examples
    from datagen.generate import bundled_seeds_path
    from datagen.io import read_tasks

    pool = [{"messages": e["messages"]} for e in chat_examples(read_tasks(bundled_seeds_path()))]
    return [pool[i % len(pool)] for i in range(count)]


def finetune_config(args, grad_accum: int):
    from datagen.finetune.config import FinetuneConfig

    return FinetuneConfig(
        r=LORA["r"], alpha=LORA["alpha"], dropout=args.lora_dropout, learning_rate=args.lr,
        max_steps=args.steps, batch_size=args.batch_size, grad_accum=grad_accum, max_length=args.max_length,
        warmup_ratio=0.0, scheduler="cosine", merge=False, save_every=10**6,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def trl_rows(args, data: Path, global_micro_batches: int) -> list[dict]:
    """The examples of datagen's first `global_micro_batches` micro-batches, in order, tokenized
    by datagen: what TRL reads sequentially."""
    from transformers import AutoTokenizer

    from datagen.finetune.data import IGNORE_INDEX, encode_all, load_conversations, micro_batches, plan_batches
    from datagen.model_paths import resolve_model

    config = finetune_config(args, 1)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.base))
    encoded = encode_all(tokenizer, load_conversations(data), max_length=config.max_length)
    lengths = [len(e.input_ids) for e in encoded.examples]

    def plan_epoch(epoch: int):
        return plan_batches(lengths, config.batch_size, config.seed + epoch, packing=False,
                            max_length=encoded.max_length)

    rows = []
    for _epoch, batch in micro_batches(plan_epoch, 0, global_micro_batches):
        if len(batch.rows) != config.batch_size:
            sys.exit("--examples must be a multiple of --batch-size (TRL reads the batches as a flat sequence)")
        for (index,) in batch.rows:
            example = encoded.examples[index]
            rows.append({"input_ids": example.input_ids,
                         "completion_mask": [int(label != IGNORE_INDEX) for label in example.labels]})
    return rows


def run_ours(args, data: Path, out: Path) -> dict:
    from datagen.finetune.sft import train

    summary = train(finetune_config(args, args.grad_accum), data, out, show_progress=False)
    if summary["world_size"] > 1 and int(os.environ.get("RANK", 0)) != 0:
        return {}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {"seconds": summary["train_seconds_this_run"], "tokens": summary["tokens_this_run"],
            "supervised": sum(entry["supervised"] for entry in log), "losses": [entry["loss"] for entry in log],
            "peak_memory_mib": summary["peak_memory_mib"]}


def run_trl(args, data: Path, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from datagen.finetune.model import load_student
    from datagen.finetune.run import peak_memory_mib
    from datagen.model_paths import resolve_model

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    config = finetune_config(args, args.grad_accum)
    path = resolve_model(config.base)
    cuda = torch.cuda.is_available()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    torch.manual_seed(config.seed)  # as datagen's train(): the same LoRA initialisation
    model = load_student(config, path, device)
    sft_config = SFTConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=config.max_grad_norm, optim="adamw_torch_fused",
        max_length=args.max_length, logging_steps=1, save_strategy="no", report_to=[],
        completion_only_loss=True, train_sampling_strategy="sequential", average_tokens_across_devices=True,
        bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda, seed=config.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    trainer = SFTTrainer(model=model, args=sft_config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(path))
    supervised = [0]
    collate = trainer.data_collator

    def counting_collate(features):  # the supervised tokens TRL's own batches carry
        batch = collate(features)
        supervised[0] += int((batch["labels"][:, 1:] != -100).sum())
        return batch

    trainer.data_collator = counting_collate
    result = trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    tokens = int(max(entry.get("num_tokens", 0) for entry in trainer.state.log_history))
    totals = [supervised[0], peak_memory_mib(device)]
    if torch.distributed.is_initialized():
        gathered = torch.tensor(totals, dtype=torch.float64)
        torch.distributed.all_reduce(gathered[:1])
        torch.distributed.all_reduce(gathered[1:], op=torch.distributed.ReduceOp.MAX)
        totals = gathered.tolist()
        if torch.distributed.get_rank() != 0:
            return {}
    return {"seconds": round(result.metrics["train_runtime"], 2), "tokens": tokens, "supervised": int(totals[0]),
            "losses": [entry["loss"] for entry in logged], "peak_memory_mib": round(totals[1], 1)}


def worker(args) -> None:
    data, out = Path(args.data), Path(args.out)
    result = run_ours(args, data, out) if args.worker == "ours" else run_trl(args, data, out)
    if result:
        print("RESULT " + json.dumps(result), flush=True)


def run_in_child(args, which: str, ranks: int, data: Path, out: Path) -> dict:
    """One side at one rank count, accumulating so the global batch is `args.nproc` micro-batches."""
    grad_accum = args.nproc // ranks
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
                if ranks > 1 else [sys.executable])
    command = [*launcher, str(HERE), "--worker", which, "--data", str(data), "--out", str(out),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum", str(grad_accum),
               "--max-length", str(args.max_length), "--lr", str(args.lr), "--lora-dropout", str(args.lora_dropout),
               "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(HERE.parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{which} on {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["tokens_per_s"] = round(result["tokens"] / result["seconds"], 1)
    result["s_per_step"] = round(result["seconds"] / args.steps, 3)
    return result


def format_table(args, results: dict[tuple[str, int], dict]) -> str:
    """The side-by-side table and ratios (a pure function of the runs' results)."""
    reference = results[("ours", 1)]["losses"]
    lines = [
        f"{args.steps} steps x global batch {args.batch_size * args.nproc} ({args.batch_size} per micro-batch), "
        f"max_length {args.max_length}, LoRA r={LORA['r']} dropout {args.lora_dropout}, lr {args.lr} cosine, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}",
        f"{'':<18}{'ranks':>6}{'s/step':>9}{'tokens/s':>10}{'tokens':>8}{'supervised':>11}{'final loss':>12}"
        f"{'max |dloss|':>12}{'peak MiB':>10}",
    ]
    for (side, ranks), result in results.items():
        gap = max(abs(a - b) for a, b in zip(result["losses"], reference, strict=True))
        lines.append(f"{NAMES[side]:<18}{ranks:>6}{result['s_per_step']:>9.3f}{result['tokens_per_s']:>10.1f}"
                     f"{result['tokens']:>8}{result['supervised']:>11}{result['losses'][-1]:>12.4f}"
                     f"{gap:>12.2e}{result['peak_memory_mib']:>10.0f}")
    for ranks in sorted({ranks for _side, ranks in results}):
        ours, trl = results.get(("ours", ranks)), results.get(("trl", ranks))
        if ours and trl:
            lines.append(f"ratio, {ranks} rank(s): datagen {trl['s_per_step'] / ours['s_per_step']:.2f}x TRL's "
                         f"speed per step at {ours['peak_memory_mib'] / trl['peak_memory_mib']:.2f}x its peak memory")
    if args.nproc > 1:
        for side in SIDES:
            one, many = results.get((side, 1)), results.get((side, args.nproc))
            if one and many:
                lines.append(f"{NAMES[side]}: {args.nproc} ranks {one['s_per_step'] / many['s_per_step']:.2f}x "
                             f"the speed per step of 1 rank with accumulation {args.nproc}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=1, help="Also run N ranks (the global batch: N micro-batches)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    # TRL's SFTConfig turns gradient checkpointing on by default; both sides get the same setting.
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sides", default="ours,trl", help="ours,trl or one of them")
    parser.add_argument("--results", help="Print the table of a saved results JSON (no training)")
    parser.add_argument("--save", help="Also write the results JSON here")
    parser.add_argument("--worker", choices=SIDES)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--data")
    parser.add_argument("--out")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    if args.results:
        saved = json.loads(Path(args.results).read_text())
        print(format_table(args, {(r["side"], r["ranks"]): r for r in saved}))
        return
    if args.examples % args.batch_size:
        sys.exit("--examples must be a multiple of --batch-size")
    sides = [side for side in args.sides.split(",") if side]
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "train.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in build_examples(args.examples)))
        tokenized = Path(scratch) / "trl.jsonl"
        tokenized.write_text("".join(json.dumps(row) + "\n"
                                     for row in trl_rows(args, data, args.steps * args.nproc)))
        for ranks in sorted({1, args.nproc}):
            for side in sides:
                result = run_in_child(args, side, ranks, data if side == "ours" else tokenized,
                                      Path(scratch) / f"{side}-{ranks}")
                results[(side, ranks)] = result
                print(f"{NAMES[side]}, {ranks} rank(s): {json.dumps(result)}", flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps([{"side": s, "ranks": r, **v} for (s, r), v in results.items()]))
    if ("ours", 1) in results:
        print(format_table(args, results))


if __name__ == "__main__":
    main()
