"""Teacher throughput: datagen's openai backend vs a plain asyncio.gather vs a sequential loop.

The same N chat requests go to the same local vLLM OpenAI-compatible server three ways,
in one run:

1. datagen's `openai` backend (bounded concurrency, retries, rate limits, cache off);
2. a plain `asyncio.gather` over `openai.AsyncOpenAI` (the fastest thing one can write);
3. a sequential loop over `openai.OpenAI` (how the Alpaca / WizardLM scripts call their teacher).

It prints generated tokens/s for each and the ratios (targets: >= 0.9x the gather,
>= 5x the sequential loop). Run from the repository root:

    .venv/bin/python bench/teacher_throughput.py            # starts its own vLLM server
    .venv/bin/python bench/teacher_throughput.py --base-url http://127.0.0.1:8000/v1 --model NAME
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

from datagen.config import SamplingParams
from datagen.teachers import TeacherConfig, make_teacher

TOPICS = ["rivers", "chess", "bread", "volcanoes", "jazz", "bees", "glass", "comets", "tea", "bridges",
          "owls", "maps", "salt", "kites", "coral", "clocks"]


def build_prompts(count: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (#{i})."}]
            for i in range(count)]


def run_datagen(base_url, model, prompts, params, concurrency) -> tuple[int, float]:
    config = TeacherConfig(backend="openai", model=model, base_url=base_url, cache="off",
                           max_concurrency=concurrency, sampling=params)
    with make_teacher(config) as teacher:
        teacher.complete(prompts[:1])  # connection set-up and server check, not timed
        started = time.perf_counter()
        replies = teacher.complete(prompts, params)
        elapsed = time.perf_counter() - started
    assert all(reply.ok for [reply] in replies)
    return sum(reply.completion_tokens for [reply] in replies), elapsed


def request_args(model, messages, params):
    return dict(model=model, messages=messages, temperature=params.temperature,
                max_tokens=params.max_tokens, seed=params.seed)


def run_gather(base_url, model, prompts, params) -> tuple[int, float]:
    from openai import AsyncOpenAI

    async def main():
        async with AsyncOpenAI(base_url=base_url, api_key="EMPTY") as client:
            started = time.perf_counter()
            responses = await asyncio.gather(
                *(client.chat.completions.create(**request_args(model, p, params)) for p in prompts))
            return responses, time.perf_counter() - started

    responses, elapsed = asyncio.run(main())
    return sum(r.usage.completion_tokens for r in responses), elapsed


def run_sequential(base_url, model, prompts, params) -> tuple[int, float]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="EMPTY")
    started = time.perf_counter()
    tokens = 0
    for prompt in prompts:
        tokens += client.chat.completions.create(**request_args(model, prompt, params)).usage.completion_tokens
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an already running server; default: start one")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    params = SamplingParams(temperature=0.7, max_tokens=args.max_tokens, seed=0)
    prompts = build_prompts(args.requests)

    with contextlib.ExitStack() as stack:
        base_url = args.base_url
        if base_url is None:
            from datagen.vllm_server import vllm_server

            print("starting a vLLM server (about two minutes on CPU) ...", flush=True)
            base_url = stack.enter_context(vllm_server(args.model))
        run_gather(base_url, args.model, prompts[:2], params)  # warm the server up
        results = {
            "datagen openai backend": run_datagen(base_url, args.model, prompts, params, args.concurrency),
            "plain asyncio.gather": run_gather(base_url, args.model, prompts, params),
            "sequential loop": run_sequential(base_url, args.model, prompts, params),
        }

    rate = {name: tokens / seconds for name, (tokens, seconds) in results.items()}
    ours = rate["datagen openai backend"]
    print(f"\n{args.requests} requests, max_tokens={args.max_tokens}, server {base_url}")
    print(f"{'way':<26}{'tokens':>8}{'seconds':>10}{'tok/s':>10}{'datagen is':>14}")
    for name, (tokens, seconds) in results.items():
        ratio = "" if name.startswith("datagen") else f"{ours / rate[name]:.2f}x"
        print(f"{name:<26}{tokens:>8}{seconds:>10.2f}{rate[name]:>10.1f}{ratio:>14}")


if __name__ == "__main__":
    main()
