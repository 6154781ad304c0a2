"""The `local` backend: transformers generation on CPU or GPU, the embedded default teacher.

Batched, left-padded generation with the model's own chat template. Requests are
sorted by prompt length so a batch wastes little on padding, and grouped by sampling
parameters (and reply schema) so each batch is one `generate` call. A request with a reply
schema is decoded under xgrammar's JSON-schema grammar (a logits processor that masks every
token the schema does not allow), so even a small model writes valid JSON. The default model
alias resolves to the embedded SmolLM2-135M-Instruct (see `datagen.model_paths`).

    datagen teacher "Name three primes." --backend local
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from datagen.config import SamplingParams
from datagen.model_paths import resolve_model
from datagen.teachers.base import BackendCounters, Completion, Request, ResultCallback

if TYPE_CHECKING:  # a type hint only: the teacher module imports this one
    from datagen.teachers.teacher import TeacherConfig


class LocalBackend:
    name = "local"

    def __init__(self, config: TeacherConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = config.model
        self.counters = BackendCounters()
        self.batch_size = config.batch_size
        path = resolve_model(config.model)
        if config.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = config.device
        if config.dtype == "auto":
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, config.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.network = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device)
        self.network.eval()
        self._torch = torch
        self._grammars: dict[str, object] = {}  # schema text -> xgrammar's compiled grammar
        self._compiler = None

    def generate(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        # a raw prefix (Magpie) is continued as it stands: no chat template around it
        prompts = [
            r.prefix if r.prefix is not None
            else self.tokenizer.apply_chat_template(r.chat(), add_generation_prompt=True, tokenize=False)
            for r in requests
        ]
        groups: dict[tuple[SamplingParams, str | None], list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[request.params.model_copy(update={"seed": None}), request.schema].append(index)
        for (params, schema), indices in groups.items():
            indices.sort(key=lambda i: len(prompts[i]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                seeds = [requests[i].params.seed for i in batch]
                texts = [prompts[i] for i in batch]
                for index, completion in zip(batch, self._generate_batch(texts, params, seeds, schema)):
                    on_result(index, completion)

    def _grammar(self, schema: str):
        """xgrammar's grammar for `schema`, compiled once per backend (compact JSON: a small
        model left free whitespace can pad a reply with newlines until max_tokens)."""
        if schema not in self._grammars:
            import xgrammar

            if self._compiler is None:
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.network.config.vocab_size,
                    stop_token_ids=sorted(self._end_ids()))
                self._compiler = xgrammar.GrammarCompiler(info)
            self._grammars[schema] = self._compiler.compile_json_schema(schema, any_whitespace=False)
        return self._grammars[schema]

    def _end_ids(self) -> set[int]:
        end_ids = set(_as_list(self.network.generation_config.eos_token_id))
        end_ids.add(self.tokenizer.eos_token_id)
        return end_ids

    def _generate_batch(
        self, prompts: list[str], params: SamplingParams, seeds: list[int | None], schema: str | None = None
    ) -> list[Completion]:
        torch = self._torch
        encoded = self.tokenizer(
            prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        ).to(self.device)
        sampling = params.temperature > 0
        options = {
            "max_new_tokens": params.max_tokens,
            "do_sample": sampling,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sampling:
            options.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.stop:
            options.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if schema is not None:
            from xgrammar.contrib.hf import LogitsProcessor

            # one processor per generate() call: its matchers hold the batch's decoding state
            options["logits_processor"] = [LogitsProcessor(self._grammar(schema))]
        if sampling and any(seed is not None for seed in seeds):
            # generate() takes no per-row generator: seed the batch from its members' seeds.
            digest = hashlib.sha256(repr(seeds).encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "little"))
        with torch.inference_mode():
            output = self.network.generate(**encoded, **options)
        prompt_width = encoded["input_ids"].shape[1]
        prompt_lengths = encoded["attention_mask"].sum(dim=1).tolist()
        end_ids = self._end_ids()
        return [
            self._decode(row[prompt_width:].tolist(), end_ids, params, prompt_tokens)
            for row, prompt_tokens in zip(output, prompt_lengths)
        ]

    def _decode(
        self, new_ids: list[int], end_ids: set[int], params: SamplingParams, prompt_tokens: int
    ) -> Completion:
        ended = next((k for k, token in enumerate(new_ids) if token in end_ids), None)
        kept = new_ids if ended is None else new_ids[:ended]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        finish_reason = "stop" if ended is not None else "length"
        cut = _cut_at_stop(text, params.stop)
        if cut is not None:
            text, finish_reason = cut, "stop"
        used = len(kept) + (1 if ended is not None else 0)
        return Completion(text, finish_reason, prompt_tokens=prompt_tokens, completion_tokens=used)

    def close(self) -> None:
        self.network = None


def _cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """`text` up to the first stop string (excluded), or None if none occurs."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return text[: min(positions)] if positions else None


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
