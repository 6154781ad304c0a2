"""DPO throughput: `datagen finetune --method dpo` vs TRL's `DPOTrainer`, same model, pairs and LoRA.

Both train the embedded SmolLM2-135M-Instruct with the same LoRA (r, alpha, dropout, all
linear layers), sigmoid loss and beta, learning rate, schedule, batch size (pairs), number of
steps, maximum length and gradient checkpointing, on the same conversational preference pairs
(prompts and chosen replies of the bundled seed tasks; rejected = another task's reply). Both
use the adapter-disabled model as the reference, with reference log-probs precomputed before
training (`--precompute`, TRL's `precompute_ref_log_probs`) or computed in each step. Each runs
in its own process. Printed for each: real (non-pad) tokens per second of the training loop
(chosen + rejected sequences; the reference pre-pass is outside it on both sides), peak memory
(CUDA allocations on a GPU, resident set size on CPU) and final loss, then the ratios (target:
>= 1.0x TRL's tokens/s at <= 1.0x its memory).

    .venv/bin/pip install -e '.[bench]'   # TRL, the baseline; not a datagen dependency
    .venv/bin/python bench/dpo.py --steps 20 --batch-size 4
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
LORA = dict(r=16, alpha=32, dropout=0.05)


def build_pairs(count: int) -> list[dict]:
    """Preference pairs from the bundled seed tasks: a task's own reply chosen, the next task's rejected."""
    from datagen.export import chat_examples
    from datagen.generate import bundled_seeds_path
    from datagen.io import read_tasks

    pool = chat_examples(read_tasks(bundled_seeds_path()))
    pairs = []
    for i in range(count):
        mine, other = pool[i % len(pool)]["messages"], pool[(i + 7) % len(pool)]["messages"]
        pairs.append({"prompt": mine[:-1], "chosen": mine[-1:], "rejected": other[-1:]})
    return pairs


def run_ours(args, data: Path, out: Path) -> dict:
    from datagen.finetune.config import DPOConfig
    from datagen.finetune.dpo import train_dpo

    config = DPOConfig(
        r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], learning_rate=args.lr, beta=args.beta,
        max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, overlong="drop",
        warmup_ratio=0.1, scheduler="cosine", merge=False, save_every=10**6,
        gradient_checkpointing=args.gradient_checkpointing, precompute_reference=args.precompute,
    )
    summary = train_dpo(config, data, out, show_progress=False)
    return {"tokens_per_s": summary["tokens_per_s"], "peak_memory_mib": summary["peak_memory_mib"],
            "final_loss": summary["final_loss"], "tokens": summary["tokens_this_run"],
            "seconds": summary["train_seconds_this_run"], "pairs": summary["pairs"]}


def run_trl(args, data: Path, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from datagen.finetune.model import pick_device, pick_dtype
    from datagen.finetune.run import peak_memory_mib
    from datagen.model_paths import resolve_model

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    path = resolve_model("smollm2-135m")
    device = pick_device("auto")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype("auto", device))
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = DPOConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.1, max_length=args.max_length,
        beta=args.beta, loss_type=["sigmoid"], logging_steps=1, save_strategy="no", report_to=[],
        bf16=device == "cuda" and torch.cuda.is_bf16_supported(), use_cpu=device == "cpu", seed=0,
        gradient_checkpointing=args.gradient_checkpointing, precompute_ref_log_probs=args.precompute,
    )
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)
    result = trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    tokens = int(max(entry.get("num_tokens", 0) for entry in trainer.state.log_history))
    seconds = result.metrics["train_runtime"]
    return {"tokens_per_s": round(tokens / seconds, 1), "peak_memory_mib": peak_memory_mib(device),
            "final_loss": logged[-1]["loss"], "tokens": tokens, "seconds": round(seconds, 2), "pairs": len(rows)}


def worker(args) -> None:
    data, out = Path(args.data), Path(args.out)
    result = run_ours(args, data, out) if args.worker == "ours" else run_trl(args, data, out)
    print("RESULT " + json.dumps(result))


def run_in_child(args, which: str, data: Path, out: Path) -> dict:
    command = [sys.executable, str(HERE), "--worker", which, "--data", str(data), "--out", str(out),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--beta", str(args.beta),
               "--max-length", str(args.max_length), "--lr", str(args.lr),
               "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
               "--precompute" if args.precompute else "--no-precompute"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(HERE.parents[1])}
    if args.malloc_mmap_threshold is not None:
        # one allocator setting for both sides, so peak RSS compares tensors, not glibc's heuristics
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{which} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--precompute", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ in both children (CPU peak RSS)")
    parser.add_argument("--worker", choices=["ours", "trl"])
    parser.add_argument("--data")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "pairs.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in build_pairs(args.pairs)))
        ours = run_in_child(args, "ours", data, Path(scratch) / "ours")
        print(f"datagen dpo:    {json.dumps(ours)}", flush=True)
        trl = run_in_child(args, "trl", data, Path(scratch) / "trl")
        print(f"TRL DPOTrainer: {json.dumps(trl)}", flush=True)
    print(f"{args.steps} steps x {args.batch_size} pairs, max_length {args.max_length}, LoRA r={LORA['r']}, "
          f"beta {args.beta}, reference {'precomputed' if args.precompute else 'per step'}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, MALLOC_MMAP_THRESHOLD_ "
          f"{args.malloc_mmap_threshold if args.malloc_mmap_threshold is not None else 'unset'}")
    print(f"{'':<16}{'tokens/s':>10}{'peak MiB':>10}{'final loss':>12}{'tokens':>9}{'seconds':>9}")
    for name, result in (("datagen dpo", ours), ("TRL DPOTrainer", trl)):
        print(f"{name:<16}{result['tokens_per_s']:>10.1f}{result['peak_memory_mib']:>10.0f}"
              f"{result['final_loss']:>12.4f}{result['tokens']:>9}{result['seconds']:>9.1f}")
    print(f"ratio: tokens/s {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x TRL's, "
          f"peak memory {ours['peak_memory_mib'] / trl['peak_memory_mib']:.2f}x TRL's")


if __name__ == "__main__":
    main()
