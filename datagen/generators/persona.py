"""Persona-driven generation (Persona Hub, Ge et al. 2024; tencent-ailab/persona-hub).

A persona is one sentence describing a person ("a beekeeper who sells honey at farmers'
markets"). Each persona is crossed with each prompt kind, and the teacher writes, from that
person's point of view:

- `instruction`: the request they would send an AI assistant (templates/persona_instruction.jinja);
- `math`: a multi-step math word problem grown from their work or life, unsolved (persona_math.jinja);
- `knowledge`: a factual question they would ask (persona_knowledge.jinja).

The teacher then answers what it wrote (the text as the user's message, no template), and each
pair becomes a task whose lineage keeps the persona and the kind (`persona`, `persona_kind`,
`persona_source`).

Personas come from a file (`personas`: one per line, or JSONL with a `persona` field; default
the 34 we wrote, datagen/data/personas.txt) and/or are derived from texts (`persona_texts`: one
per line, or JSONL with a `text` field): the teacher is asked who would `relation` (write, read...)
each text, the paper's text-to-persona (persona_from_text.jinja). Near-identical personas are
dropped before use (`dedup_personas`: MinHash LSH over word sets, Jaccard >= `dedup_threshold`,
checked exactly), as the paper dedups its personas.

Every request goes through the Teacher, so a killed run resumes from the request cache: the
derived personas and every finished prompt and answer are read back, and tasks already in OUT
(stable ids from kind and persona) are not written twice. Batches of `items_per_batch`
(persona, kind) items; the run stops at `num` tasks or when every item was tried.

Rejects (stage "persona"): a teacher error, a reply with no text after its label ("parse
failure"), a written prompt or answer cut off at max_tokens, an empty answer.

    datagen generate --method persona --num 20 --out persona.jsonl
    # generate: {method: persona, persona: {kinds: [instruction, math], personas: mine.txt}} in a config
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field

from datagen.config import SamplingParams, Strict
from datagen.errors import InputError
from datagen.generators.common import RunContext, lineage, stable_id
from datagen.prompts import load_template
from datagen.records import Instance, Task
from datagen.rejects import EMPTY_RESPONSE, LENGTH_LIMIT, PARSE_FAILURE, TEACHER_ERROR
from datagen.teachers.base import Completion

STAGE_PERSONA = "persona"
Kind = Literal["instruction", "math", "knowledge"]
TEMPLATES: dict[str, str] = {
    "instruction": "persona_instruction.jinja",
    "math": "persona_math.jinja",
    "knowledge": "persona_knowledge.jinja",
}
LABELS = {"instruction": "Request", "math": "Problem", "knowledge": "Question"}
FROM_TEXT = "persona_from_text.jinja"


class PersonaConfig(Strict):
    """The `generate.persona` section: which personas, which kinds of prompt, how the teacher is sampled."""

    personas: str | None = None
    """A persona file: one per line (blank lines and lines starting with # skipped), or JSONL
    with a `persona` field. Unset: the bundled datagen/data/personas.txt, unless `persona_texts`
    is set (then only the derived personas are used)."""
    persona_texts: str | None = None
    """Texts to derive personas from (one per line, or JSONL with a `text` field): the teacher
    describes who would `relation` each (Persona Hub's text-to-persona)."""
    relation: Literal["write", "read", "ask about", "enjoy"] = "write"
    """Text-to-persona: the person who would write / read / ... the text."""
    kinds: list[Kind] = Field(default_factory=lambda: ["instruction"], min_length=1)
    """The prompt kinds, each crossed with every persona (persona-major order)."""
    dedup_threshold: float = Field(0.9, gt=0.0, le=1.0)
    """Personas whose word sets have Jaccard similarity at or above this are near-identical
    (the first is kept). 1.0 drops only personas with the same words."""
    items_per_batch: int = Field(8, ge=1)
    """(persona, kind) items per teacher call."""
    persona_sampling: SamplingParams = SamplingParams(temperature=0.7, max_tokens=96, seed=0)
    """Text-to-persona replies."""
    prompt_sampling: SamplingParams = SamplingParams(temperature=0.7, max_tokens=256, seed=0)
    """The persona's instruction, problem or question."""
    answer_sampling: SamplingParams = SamplingParams(temperature=0.0, max_tokens=512)
    """The teacher's answer to it."""


# -- pure functions: reading personas, dedup, prompts and parsing ------------------------------


def read_lines_or_jsonl(path: Path, field: str) -> list[str]:
    """The `field` of each JSONL object, or each non-blank line not starting with #; InputError
    naming the file and line for a JSON line without a usable `field`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror or error})") from None
    values = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                value = json.loads(line).get(field)
            except (ValueError, AttributeError):
                raise InputError(f"{path}:{number}: not a JSON object") from None
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"{path}:{number}: no text in field {field!r}")
            line = value.strip()
        values.append(line)
    return values


def bundled_personas_path() -> Path:
    return Path(str(resources.files("datagen").joinpath("data/personas.txt")))


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.casefold()))


def dedup_personas(personas: Sequence[str], threshold: float = 0.9, num_perm: int = 128) -> list[str]:
    """`personas` without near-identical ones, in order (the first of each group kept): MinHash
    LSH (datasketch) over word sets proposes pairs, their exact Jaccard similarity decides."""
    from datasketch import MinHash, MinHashLSH

    kept: list[str] = []
    kept_words: list[set[str]] = []
    # LSH banded at the threshold itself misses many pairs just above it: propose at a lower one
    lsh = MinHashLSH(threshold=max(0.3, threshold - 0.3), num_perm=num_perm) if threshold < 1.0 else None
    seen_exact: set[frozenset[str]] = set()
    for persona in personas:
        words = _words(persona)
        if not words or frozenset(words) in seen_exact:
            continue
        if lsh is not None:
            signature = MinHash(num_perm=num_perm, seed=1)
            signature.update_batch([w.encode("utf-8") for w in sorted(words)])
            close = [int(k) for k in lsh.query(signature)]
            if any(len(words & kept_words[k]) / len(words | kept_words[k]) >= threshold for k in close):
                continue
            lsh.insert(str(len(kept)), signature)
        seen_exact.add(frozenset(words))
        kept.append(persona)
        kept_words.append(words)
    return kept


def labelled_text(reply: str, label: str) -> str:
    """The reply without the label the template ends with ("Request:", "Persona:"...), which a
    chat model often repeats; markdown marks around it are dropped too."""
    text = reply.strip()
    text = re.sub(r"^[*_#\s]*" + re.escape(label) + r"[*_\s]*:[*_\s]*", "", text, flags=re.IGNORECASE)
    return text.strip()


def persona_prompt(persona: str, kind: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": load_template(TEMPLATES[kind]).render(persona=persona)}]


def from_text_prompt(text: str, relation: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": load_template(FROM_TEXT).render(text=text, relation=relation)}]


def _problem(reply: Completion, params: SamplingParams) -> str | None:
    """Why a reply cannot be used (a reject reason), or None."""
    if not reply.ok:
        return TEACHER_ERROR
    if reply.finish_reason == "length":
        return LENGTH_LIMIT
    return None


# -- the run ------------------------------------------------------------------------------------


def load_personas(settings: PersonaConfig, run: RunContext) -> dict[str, str]:
    """The run's personas, each with where it came from ("file" or "text"): from the file, then
    derived from the texts (one teacher call, from the cache on a rerun), deduplicated."""
    personas: list[str] = []
    if settings.personas or not settings.persona_texts:
        personas += read_lines_or_jsonl(Path(settings.personas) if settings.personas else bundled_personas_path(),
                                        "persona")
    source = {persona: "file" for persona in personas}
    if settings.persona_texts:
        texts = read_lines_or_jsonl(Path(settings.persona_texts), "text")
        derived: list[str] = []
        replies = run.teacher.complete([from_text_prompt(t, settings.relation) for t in texts],
                                       settings.persona_sampling)
        for text, [reply] in zip(texts, replies):
            described = labelled_text(reply.text, "Persona") if reply.ok else ""
            # a description is one sentence: the first line, also when the reply was cut off
            described = described.splitlines()[0].strip() if described else ""
            if described:
                derived.append(described)
            elif run.batches_done == 0:  # a resumed run wrote these rejects before
                run.sink.reject(_problem(reply, settings.persona_sampling) or PARSE_FAILURE, STAGE_PERSONA,
                                raw=reply.text or reply.error, detail=f"text-to-persona: {text[:200]}")
        source.update({persona: "text" for persona in derived if persona not in source})
        personas += derived
    kept = dedup_personas(personas, settings.dedup_threshold)
    if not kept:
        raise InputError("persona: no persona to write from (the persona file is empty, or no text gave one)")
    return {persona: source[persona] for persona in kept}


def run_persona(seeds: Sequence[Task], settings: PersonaConfig, run: RunContext) -> None:
    """Write persona x kind tasks into `run.sink` until it holds `run.num` (those already there
    count) or every item was tried. `seeds` are not used: the personas are the seeds."""
    teacher, sink = run.teacher, run.sink
    personas = load_personas(settings, run)
    sink.flush()  # text-to-persona rejects
    items = [(persona, kind) for persona in personas for kind in settings.kinds]
    backend = (teacher.backend.name, teacher.backend.model)
    have = len(sink.existing)
    batch = run.batches_done
    while have < run.num and batch * settings.items_per_batch < len(items):
        sink.at(batch)
        chunk = items[batch * settings.items_per_batch:(batch + 1) * settings.items_per_batch]
        written = teacher.complete([persona_prompt(p, k) for p, k in chunk], settings.prompt_sampling)
        asks = []
        for (persona, kind), [reply] in zip(chunk, written):
            text = labelled_text(reply.text, LABELS[kind]) if reply.ok else ""
            reason = _problem(reply, settings.prompt_sampling) or (None if text else PARSE_FAILURE)
            if reason:
                sink.reject(reason, STAGE_PERSONA, raw=reply.text or reply.error, detail=f"{kind} for: {persona}")
                continue
            asks.append((persona, kind, text, reply))
        answers = teacher.complete([[{"role": "user", "content": text}] for _, _, text, _ in asks],
                                   settings.answer_sampling) if asks else []
        tasks = []
        for (persona, kind, text, written_reply), [answer] in zip(asks, answers):
            reason = _problem(answer, settings.answer_sampling) or (None if answer.text.strip() else EMPTY_RESPONSE)
            if reason:
                sink.reject(reason, STAGE_PERSONA, raw=answer.text or answer.error, detail=f"answer to: {text[:200]}")
                continue
            tasks.append(Task(
                id=stable_id("persona", kind, persona), instruction=text,
                instances=[Instance(output=answer.text.strip())],
                lineage=lineage(generator="persona", operation=kind, teacher_name=backend,
                                templates=[load_template(TEMPLATES[kind])], sampling=settings.prompt_sampling,
                                seed=settings.prompt_sampling.seed, completions=[written_reply, answer],
                                persona=persona, persona_kind=kind, persona_source=personas[persona]),
            ))
        fresh = sink.accept(tasks[: run.num - have])
        sink.flush()
        have += len(fresh)
        batch += 1
        run.on_batch_done(batch)
        run.progress(len(fresh))
    sink.flush()
